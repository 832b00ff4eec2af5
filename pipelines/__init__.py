"""diffusers pipelines and model wrappers (installed as ``flowalign.pipelines``)."""

from flowalign.pipelines.guidance import classifier_free_guidance
from flowalign.pipelines.rlg import (
    RLG_MODES,
    SAMPLERS,
    ConstantSchedule,
    FinetunedFirstSchedule,
    LinearSchedule,
    RLGSchedule,
    RLGStableDiffusion3Pipeline,
    RLGTransformer,
    check_lora_fits,
    check_rlg_scale,
    check_rlg_sweep,
    check_same_architecture,
    check_sampler,
    constant_schedule,
    finetuned_first_schedule,
    linear_schedule,
    load_peft_adapter,
    resolve_rlg_scales,
)
from flowalign.pipelines.rlg_modes import get_rlg_mode
from flowalign.pipelines.scheduling_flow_match_sde import FlowMatchSDEScheduler

__all__ = [
    "RLG_MODES",
    "SAMPLERS",
    "ConstantSchedule",
    "FinetunedFirstSchedule",
    "FlowMatchSDEScheduler",
    "LinearSchedule",
    "RLGSchedule",
    "RLGStableDiffusion3Pipeline",
    "RLGTransformer",
    "check_lora_fits",
    "check_rlg_scale",
    "check_rlg_sweep",
    "check_same_architecture",
    "check_sampler",
    "classifier_free_guidance",
    "constant_schedule",
    "finetuned_first_schedule",
    "get_rlg_mode",
    "linear_schedule",
    "load_peft_adapter",
    "resolve_rlg_scales",
]
