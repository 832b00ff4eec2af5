"""RLG (Reinforcement Learning Guidance) as a diffusers drop-in.

RLG ("RLG, Reinforcement Learning Guidance") mixes, at every sampling step, the velocity of a
base flow model with the velocity of its RL-fine-tuned version::

    v_rlg(x, s, c) = v_base + w * (v_ft - v_base) = (1 - w) * v_base + w * v_ft

w = 0 is the base model, w = 1 the fine-tuned model, 0 < w < 1 interpolates and w > 1 extrapolates
(the public reference recommends 1.0-3.0). Velocities are linear in the score at a fixed (x, s), so
this samples the geometric mixture ``p_base^(1-w) * p_ft^w``: for a fine-tune of a KL-regularised RL
objective with coefficient beta, the optimum for coefficient ``beta / w``.

Because ``v_rlg`` depends on (x, s, prompt) only, RLG lives at the *model* level here:
:class:`RLGTransformer` has the wrapped transformer's forward signature and returns ``v_rlg`` for
every row of its batch, so any stock diffusers flow pipeline applies CFG and stepping unchanged
(RLG with CFG is then exactly ``(1 - w) * CFG(base) + w * CFG(ft)``).

Every row of a batch has its own w. A row whose w is 0 needs the base model only, a row whose w is
1 the fine-tuned model only (the stock CFG cost): those rows skip the other model. This gives the
free end points ``w = 0`` / ``w = 1`` (per step, so schedules get it too) and the *sweep*: one call
samples a list of scales for every prompt from the same initial noise, the rows of every scale that
need a model batched into one forward of that model per step.

Schedules of w over the sampling steps (constant, linear ramp, "fine-tuned only for the first k
steps", any callable) and THE check of every w live in :mod:`flowalign.pipelines.rlg_schedules`; the
evaluation modes (``mode=`` / ``rlg_mode=``: ``exact``, ``exact_batched``, ``exact_two_pass``,
``lora_scaled``, ``shared_uncond``), one small strategy each with THE check of a mode, in
:mod:`flowalign.pipelines.rlg_modes`; CFG in :mod:`flowalign.pipelines.guidance` (names re-exported
here). What is in this file, top to bottom:

1. The *gate* on each LoRA branch that lets one forward pass evaluate base rows (LoRA skipped) and
   fine-tuned rows (LoRA on) together. Loading adapters lives in :mod:`flowalign.pipelines.lora_utils`
   (its names are re-exported here).
2. :class:`RLGTransformer`, the model-level wrapper: w per row, the rows each model is needed for, the
   forwards its evaluation mode asks for, and the mix.
3. :class:`RLGStableDiffusion3Pipeline`, a ``StableDiffusion3Pipeline`` with ``load_finetuned``,
   ``rlg_scale`` and ``rlg_sweep``. Its ``__call__`` is the stock SD3 call written out: prompts and
   x_T (repeated per scale of a sweep), timesteps, w of every row at every step (resolved and checked
   once), then the denoising loop (:meth:`RLGStableDiffusion3Pipeline._denoise`): per step the RLG
   velocity ``v_base + w_t (v_ft - v_base)``, CFG and the scheduler step (``sampler="euler"``: the stock
   Euler scheduler, ``"sde"``: the Flow-GRPO SDE). ``enable_compile()`` runs the transformer, the RLG mix
   and the SDE step under ``torch.compile`` (one graph each, none recompiled from step to step;
   ``flowalign.compile``).

Example::

    import torch
    from flowalign.pipelines import RLGStableDiffusion3Pipeline, linear_schedule

    pipe = RLGStableDiffusion3Pipeline.from_pretrained(
        "stabilityai/stable-diffusion-3.5-medium", torch_dtype=torch.bfloat16).to("cuda")
    pipe.load_finetuned("path/to/flow-grpo-lora")      # PEFT dir, diffusers LoRA file or full transformer
    image = pipe("a photo of a cat", rlg_scale=1.6, guidance_scale=4.5).images[0]
    ramp = pipe("a photo of a cat", rlg_scale=linear_schedule(0.0, 2.0)).images[0]
    sweep = pipe("a photo of a cat", rlg_sweep=[0, 0.5, 1, 1.5, 2]).images   # one image per scale
"""

from __future__ import annotations

import contextlib
import inspect
import json
import numbers
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.pipelines.pipeline_loading_utils import _fetch_class_library_tuple
from diffusers.pipelines.stable_diffusion_3.pipeline_output import (
    StableDiffusion3PipelineOutput,
)
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
    XLA_AVAILABLE,
    retrieve_timesteps,
)
from flowalign.pipelines.guidance import classifier_free_guidance
from flowalign.pipelines.lora_utils import (
    check_lora_fits,
    check_same_architecture,
    load_finetuned_model,
    load_peft_adapter,
    save_peft_adapter,
    tuner_layers,
)
from flowalign.pipelines.rlg_modes import (
    RLG_MODES,
    EvaluationMode,
    RLGMode,
    RowPlan,
    get_rlg_mode,
)
from flowalign.pipelines.rlg_schedules import (
    ConstantSchedule,
    FinetunedFirstSchedule,
    LinearSchedule,
    RLGScale,
    RLGSchedule,
    _as_scale,
    _sweep_entries,
    check_rlg_scale,
    check_rlg_sweep,
    constant_schedule,
    finetuned_first_schedule,
    linear_schedule,
    resolve_rlg_scales,
)
from flowalign.pipelines.scheduling_flow_match_sde import (
    FlowMatchSDEScheduler,
    check_noise_level,
)
from PIL import Image
from torch import nn
from transformers import (
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    SiglipImageProcessor,
    SiglipVisionModel,
    T5EncoderModel,
    T5TokenizerFast,
)

from flowalign.compile import compile_function, compile_sde_step, compile_transformer
from flowalign.sampling import dynamic_shift

if XLA_AVAILABLE:  # the stock pipeline's TPU step marker
    import torch_xla.core.xla_model as xm

__all__ = [
    "RLG_MODES",
    "SAMPLERS",
    "ConstantSchedule",
    "FinetunedFirstSchedule",
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

SAMPLERS: tuple[str, ...] = ("euler", "sde")  # the stock Euler ODE scheduler, the Flow-GRPO SDE scheduler
DEPRECATED_SAMPLERS: dict[str, str] = {"ode": "euler"}  # old name -> its name now


def check_sampler(sampler: str, argument: str = "sampler", stacklevel: int = 2) -> str:
    """THE check of a sampler name: ``"euler"`` or ``"sde"``; the deprecated ``"ode"`` is ``"euler"``, with a FutureWarning.

    ``stacklevel`` counts frames as ``warnings.warn`` does, from the function that calls ``check_sampler`` (2: its
    caller, who passed the name).

    Example: ``check_sampler("ode")`` warns and returns ``"euler"``; ``check_sampler("heun")`` raises ValueError.
    """
    if isinstance(sampler, str) and sampler in DEPRECATED_SAMPLERS:
        new = DEPRECATED_SAMPLERS[sampler]
        warnings.warn(
            f"{argument}={sampler!r} is deprecated and will be removed; use {argument}={new!r} (the same Euler ODE "
            "sampler, the name of diffusers' FlowMatchEulerDiscreteScheduler and of the training config).",
            FutureWarning,
            stacklevel=stacklevel + 1,  # + 1: this function's own frame
        )
        return new
    if not isinstance(sampler, str) or sampler not in SAMPLERS:
        raise ValueError(f"{argument} must be 'euler' or 'sde', got {sampler!r}.")
    return sampler


# =============================================================================================
# 1. The LoRA gate
# =============================================================================================
class _LoRAGate:
    """Controls the LoRA branch of one adapter per forward pass, without replacing any module.

    Hooks installed once on the adapter's LoRA layers read two knobs (``None``: PEFT runs as loaded):

    - ``adapter_names``: one name per row of the batch, passed to every LoRA layer as PEFT's
      mixed-batch argument (what ``PeftModel.forward(..., adapter_names=...)`` does): rows named
      ``"__base__"`` get no LoRA (it is not computed for them), the other rows get the adapter.
      ``["__base__"] * n + [adapter] * m`` evaluates base and fine-tuned rows in one pass, with the
      matmuls of the two separate passes; ``["__base__"] * n`` is the base model.
    - ``scale``: a tensor multiplying the adapter's ``lora_B`` output (``W + w * B A``: weight-space
      scaling of the LoRA), 0-d or one value per row; a tensor so that changing w does not recompile
      under torch.compile.
    """

    def __init__(self, layers: list[nn.Module], adapter_name: str):
        self.adapter_names: list[str] | None = None
        self.scale: torch.Tensor | None = None
        self.handles = []
        for layer in layers:
            self.handles.append(layer.register_forward_pre_hook(self._before_layer, with_kwargs=True))
            self.handles.append(layer.lora_B[adapter_name].register_forward_hook(self._after_lora_b))

    def set(self, adapter_names: list[str] | None = None, scale: torch.Tensor | None = None) -> None:
        self.adapter_names, self.scale = adapter_names, scale

    def _before_layer(self, module: nn.Module, args: Any, kwargs: dict) -> tuple | None:
        if self.adapter_names is None:
            return None
        return args, {**kwargs, "adapter_names": self.adapter_names}

    def _after_lora_b(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        if self.scale is None:
            return None
        scale = self.scale.to(output.dtype)
        if scale.ndim == 1:  # one w per row: (n,) -> (n, 1, ..., 1)
            scale = scale.view(-1, *([1] * (output.ndim - 1)))
        return output * scale

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


# =============================================================================================
# 2. The model-level wrapper
# =============================================================================================
class RLGTransformer(nn.Module):
    """A flow transformer that returns the RLG velocity ``v_base + w * (v_ft - v_base)`` for every row.

    Drop it in as ``pipe.transformer`` of a stock diffusers flow pipeline (SD3 / SD3.5, FLUX, ...): it
    takes the wrapped transformer's forward arguments (``hidden_states``, ``encoder_hidden_states``,
    ``pooled_projections``, ``timestep``, ``img_ids``, ``joint_attention_kwargs``, ``return_dict``, ...)
    and exposes its ``config``, ``dtype``, ``device`` and other attributes.

    w per row: :meth:`set_rlg_scale` (one w for all rows) or :meth:`set_row_scales` (a pattern that
    repeats over the rows, e.g. one w per image of a sweep). When w is given as numbers, a row with
    w = 0 runs the base model only and a row with w = 1 the fine-tuned model only, and the output of
    an all-0 / all-1 batch is exactly the base / fine-tuned model's. A w given as a tensor
    (``set_rlg_scale(tensor)``) is not read on the host: every row runs both models (no host sync,
    one graph under torch.compile). Which rows each model runs on, and in how many forwards, is the
    evaluation mode's strategy (``self.evaluation``, see :mod:`flowalign.pipelines.rlg_modes`); it calls
    back :meth:`mixed_velocity` or :meth:`lora_scaled_velocity`.

    Args:
        transformer: the base transformer. For a LoRA fine-tune it carries the adapter
            ``adapter_name``: the base model is this same module with that adapter skipped (no second
            copy of the weights); it must be the only active adapter.
        finetuned: a full fine-tuned transformer of the same architecture, or ``None`` for a LoRA.
        adapter_name: the LoRA adapter that makes the fine-tuned model (LoRA only).
        mode: one of ``RLG_MODES`` (the strategies of :mod:`flowalign.pipelines.rlg_modes`); ``"exact"`` by default.
        rlg_scale: the initial w.
        max_rows: the most rows one forward of a model takes (a memory bound; ``None``: no bound).

    Example (any pipeline)::

        pipe.load_lora_weights("lora.safetensors", adapter_name="rlg")
        pipe.transformer = RLGTransformer(pipe.transformer, adapter_name="rlg", rlg_scale=1.5)
        image = pipe(prompt).images[0]
    """

    # Inputs that are not batched (FLUX's 2-d position ids): passed through unchanged when rows are stacked.
    unbatched_inputs: tuple[str, ...] = ("img_ids", "txt_ids")

    def __init__(
        self,
        transformer: nn.Module,
        finetuned: nn.Module | None = None,
        adapter_name: str | None = None,
        mode: RLGMode = "exact",
        rlg_scale: float = 1.0,
        max_rows: int | None = None,
    ):
        super().__init__()
        self.base = transformer
        self.finetuned = finetuned
        self.adapter_name = adapter_name
        self.cfg_batch = False  # True when rows are [uncond; cond] halves (SD3 CFG); needed by shared_uncond
        self.register_buffer("rlg_scale", torch.tensor(0.0, dtype=torch.float32), persistent=False)
        self.row_scales: list[float] | None = None  # w on the host, repeating over the rows; None: tensor only
        self.shared_blocks: tuple[int, int] | None = None  # (K, B): K identical blocks of B rows (see _row_sources)
        self._gate: _LoRAGate | None = None
        # v_base + w (v_ft - v_base) for w a tensor; the RLG pipeline's enable_compile swaps in a compiled copy
        self.mix_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = _mix
        if finetuned is not None:
            if adapter_name is not None:
                raise ValueError(
                    "Give either a full fine-tuned transformer (finetuned=...) or a LoRA adapter_name, not both."
                )
            check_same_architecture(transformer, finetuned)
        else:
            if adapter_name is None:
                raise ValueError(
                    "RLGTransformer needs the fine-tuned model: pass finetuned=<transformer> or the adapter_name "
                    "of a LoRA loaded into the transformer (e.g. pipe.load_lora_weights(path, adapter_name='rlg'))."
                )
            layers = tuner_layers(transformer, adapter_name)
            if not layers:
                loaded = sorted(getattr(transformer, "peft_config", {}) or {})
                raise ValueError(f"The transformer has no LoRA adapter named {adapter_name!r} (loaded: {loaded}).")
            self._lora_layers = layers
            self.check_lora_state()
            self._gate = _LoRAGate(layers, adapter_name)
        self.mode = mode
        self.max_rows = max_rows
        self.set_rlg_scale(rlg_scale)

    # ---- what pipelines read from their transformer --------------------------------------------
    @property
    def config(self):
        return self.base.config

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    @property
    def device(self) -> torch.device:
        return self.base.device

    def __getattr__(self, name: str):
        # nn.Module keeps parameters/buffers/submodules in dicts and resolves them here first; anything
        # else a pipeline asks its transformer for (cache_context, encoder_hid_proj, ...) goes to the base.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base"), name)

    # ---- settings ---------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        lora = self.adapter_name is not None
        self.evaluation: EvaluationMode = get_rlg_mode(mode, lora=lora).resolve(lora)  # the strategy that runs
        self._mode = mode

    @property
    def max_rows(self) -> int | None:
        return self._max_rows

    @max_rows.setter
    def max_rows(self, max_rows: int | None) -> None:
        if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
            raise ValueError(f"max_rows must be None (no bound) or an integer >= 1, got {max_rows!r}.")
        self._max_rows = max_rows

    @property
    def resolved_mode(self) -> str:
        """The mode actually run: ``exact`` resolves to the fastest exact mode for this fine-tune."""
        return self.evaluation.name

    @property
    def is_exact(self) -> bool:
        return self.evaluation.exact

    def set_rlg_scale(self, rlg_scale: float | torch.Tensor) -> None:
        """Set one w for every row of the next forward calls.

        A number enables the w = 0 / w = 1 shortcuts; a tensor is copied in place (no host sync on
        its device) and every row runs both models.
        """
        if isinstance(rlg_scale, torch.Tensor):
            self.rlg_scale.copy_(rlg_scale.reshape(()))
            self.row_scales = None
            return
        w = _as_scale(rlg_scale, "rlg_scale")
        self.rlg_scale.fill_(w)
        self.row_scales = [w]

    def set_row_scales(self, scales: Sequence[float]) -> None:
        """Set w per row: row r of a forward batch gets ``scales[r % len(scales)]``.

        For a sweep of K scales over B images with CFG, ``[w_1] * B + ... + [w_K] * B``: the pattern repeats
        over the unconditional and the conditional half.
        """
        values = [_as_scale(w, f"row scale {i}") for i, w in enumerate(scales)]
        if not values:
            raise ValueError("set_row_scales needs at least one scale.")
        self.use_row_scales(values)

    def use_row_scales(self, scales: list[float]) -> None:
        """:meth:`set_row_scales` for values already checked (the RLG pipeline's loop: w is checked once per call)."""
        self.row_scales = scales
        if len(set(scales)) == 1:
            self.rlg_scale.fill_(scales[0])

    def check_lora_state(self) -> None:
        """Raise if the LoRA cannot be switched per pass: fused, disabled, a variant (DoRA), or not the only active one."""
        if self.adapter_name is None:
            return
        for layer in self._lora_layers:
            if getattr(layer, "merged", False):
                raise RuntimeError(
                    "The RLG LoRA is fused into the base weights (fuse_lora / merge_adapter), so the base model is gone; "
                    "call pipe.unfuse_lora() first."
                )
            if layer.disable_adapters:
                raise RuntimeError(
                    "LoRA adapters are disabled on the transformer; call transformer.enable_lora() first."
                )
            if self.adapter_name in getattr(layer, "lora_variant", {}):
                raise ValueError(
                    f"Adapter {self.adapter_name!r} is a LoRA variant (e.g. DoRA); RLG supports plain LoRA only."
                )
            active = list(layer.active_adapters)
            if active != [self.adapter_name]:
                raise RuntimeError(
                    f"RLG needs the fine-tuned adapter {self.adapter_name!r} to be the only active LoRA adapter of the "
                    f"transformer, but the active adapters are {active}; call transformer.set_adapter({self.adapter_name!r})."
                )

    def place_buffers(self, device: torch.device | str) -> None:
        """Move only the wrapper's own buffer (w) to ``device``, not the wrapped models."""
        self.rlg_scale = self.rlg_scale.to(device)

    def remove_hooks(self) -> None:
        """Remove the LoRA gate hooks from the base transformer (call before discarding the wrapper)."""
        if self._gate is not None:
            self._gate.remove()
            self._gate = None

    # ---- forward ----------------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, *args: Any, return_dict: bool = True, **kwargs: Any):
        n = hidden_states.shape[0]
        # Inputs nested in containers (e.g. IP-adapter embeddings in joint_attention_kwargs) cannot be row-sliced.
        stackable = not any(_has_nested_tensor(v) for v in (*args, *kwargs.values()))
        scales = None if self.row_scales is None else self._scales_of_rows(n)  # w per row on the host, or a tensor
        # v_base + w (v_ft - v_base): the evaluation mode decides which rows each model runs on, and how
        out = self.evaluation.velocity(self, (hidden_states, args, kwargs), n, stackable, scales)
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)

    def _scales_of_rows(self, n: int) -> list[float]:
        """w of each of the n rows: the pattern of ``row_scales`` repeated."""
        pattern = self.row_scales
        if n % len(pattern):
            raise RuntimeError(
                f"The batch has {n} rows, not a multiple of the {len(pattern)} per-row scales set with set_row_scales."
            )
        return pattern * (n // len(pattern))

    def mixed_velocity(self, inputs, n: int, stackable: bool, plan: RowPlan, one_pass: bool) -> torch.Tensor:
        """``v_base`` on the plan's base rows, ``v_ft`` on its fine-tuned rows, mixed by w (the exact evaluation).

        A row with w = 0 skips the fine-tuned model, a row with w = 1 the base model; ``one_pass``: a LoRA's two
        sets of rows go through one forward. Rows with identical inputs (the scales of a sweep at its first step)
        are evaluated once.
        """
        base_rows, ft_rows = plan.base_rows, plan.finetuned_rows
        if not stackable:  # cannot evaluate a subset of rows: every model on every row it is needed for
            base_rows = list(range(n)) if base_rows else []
            ft_rows = list(range(n)) if ft_rows else []
        sources = self._row_sources(n) if stackable else None
        base_eval = base_rows if sources is None else sorted({sources[r] for r in base_rows})
        ft_eval = ft_rows if sources is None else sorted({sources[r] for r in ft_rows})
        v_base, v_ft = self._evaluate(inputs, n, base_eval, ft_eval, one_pass and stackable)
        # Back to one row per input row; rows that do not need a model get zeros, which lerp ignores (w = 0 or 1).
        v_base = _spread(v_base, base_eval, base_rows, sources, n)
        v_ft = _spread(v_ft, ft_eval, ft_rows, sources, n)
        if not ft_rows:
            return v_base  # w = 0 on every row: the base model's output, untouched
        if not base_rows:
            return v_ft  # w = 1 on every row: the fine-tuned model's output, untouched
        return self.mix_fn(v_base, v_ft, self._mix_weight(plan, n, v_base))  # v_base + w (v_ft - v_base)

    def lora_scaled_velocity(self, inputs, n: int, plan: RowPlan) -> torch.Tensor:
        """ONE forward of the base with the LoRA scaled by w: ``f(W + w * BA)`` (``lora_scaled``, approximate)."""
        if plan.scales is None:
            w = self.rlg_scale.to(inputs[0].device)
        else:
            scales = plan.scales
            w = torch.tensor(scales if len(set(scales)) > 1 else scales[0], device=inputs[0].device)
        return self._run_chunked(self.base, inputs, n, list(range(n)), None, scale=w)

    def _mix_weight(self, plan: RowPlan, n: int, like: torch.Tensor) -> torch.Tensor:
        """w of the mix: 0-d when every row has the same w, else one value per row, shaped ``(n, 1, ..., 1)``."""
        per_row = (n, *([1] * (like.ndim - 1)))
        if plan.scales is None:  # the tensor w on the fine-tuned rows, 0 (the base model) on the others
            w = self.rlg_scale.to(like.device)
            if len(plan.finetuned_rows) == n:
                return w
            mask = torch.zeros(n, dtype=torch.float32, device=like.device)
            mask[plan.finetuned_rows] = 1.0
            return (mask * w).view(per_row)
        if len(set(plan.scales)) == 1:
            return torch.tensor(plan.scales[0], dtype=torch.float32, device=like.device)
        return torch.tensor(plan.scales, dtype=torch.float32, device=like.device).view(per_row)

    def _row_sources(self, n: int) -> list[int] | None:
        """For each row, the first row with the same inputs, or ``None`` (all rows distinct).

        ``shared_blocks = (K, B)``: the rows come in periods of K * B (per CFG half) made of K identical
        blocks of B rows, as in an RLG sweep at its first step (the same x_T at every scale).
        """
        if self.shared_blocks is None:
            return None
        blocks, size = self.shared_blocks
        period = blocks * size
        if blocks < 2 or n % period:
            return None
        return [(r // period) * period + r % size for r in range(n)]

    def _evaluate(self, inputs, n: int, base_rows: list[int], ft_rows: list[int], one_pass: bool):
        """``(v_base on base_rows, v_ft on ft_rows)``: one forward per model, or ONE for both (``one_pass``, LoRA)."""
        if self.adapter_name is not None and one_pass and base_rows and ft_rows:
            # LoRA off for the base rows, on for the fine-tuned rows, in the same pass: [x_base_rows; x_ft_rows].
            names = ["__base__"] * len(base_rows) + [self.adapter_name] * len(ft_rows)
            both = self._run_chunked(self.base, inputs, n, base_rows + ft_rows, names)
            return both[: len(base_rows)], both[len(base_rows) :]
        v_base = v_ft = None
        if base_rows:
            if self.finetuned is not None:
                v_base = self._run_chunked(self.base, inputs, n, base_rows, None)
            else:  # every row "__base__": the LoRA is not computed, the base model
                v_base = self._run_chunked(self.base, inputs, n, base_rows, ["__base__"] * len(base_rows))
        if ft_rows:
            model = self.finetuned if self.finetuned is not None else self.base
            v_ft = self._run_chunked(model, inputs, n, ft_rows, None)  # the LoRA as loaded: the fine-tuned model
        return v_base, v_ft

    def _run_chunked(self, model, inputs, n: int, rows: list[int], names: list[str] | None, scale=None):
        """Forward ``model`` on the given rows of ``inputs`` (at most ``max_rows`` per forward), outputs in row order."""
        step = self._max_rows or len(rows)
        outs = []
        for start in range(0, len(rows), step):
            chunk = rows[start : start + step]
            h, a, k = _take_rows(self.unbatched_inputs, n, chunk, *inputs)
            chunk_scale = scale[start : start + step] if scale is not None and scale.ndim == 1 else scale
            outs.append(
                self._run(model, h, *a, adapter_names=None if names is None else names[start : start + step],
                          scale=chunk_scale, **k)
            )
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)

    def _run(
        self,
        model: nn.Module,
        *args: Any,
        adapter_names: list[str] | None = None,
        scale: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """One forward of ``model``; ``adapter_names``: PEFT's per-row adapters (``None``: as loaded); ``scale``: LoRA times w."""
        if self._gate is not None:
            if adapter_names is not None and all(name == self.adapter_name for name in adapter_names):
                adapter_names = None  # all rows fine-tuned: PEFT's plain forward, as the stock pipeline runs it
            self._gate.set(adapter_names=adapter_names, scale=scale)
        try:
            return model(*args, return_dict=False, **kwargs)[0]
        finally:
            if self._gate is not None:
                self._gate.set()

    # ---- per-step scales with any stock pipeline ------------------------------------------------------
    def follow_schedule(self, scheduler: Any, rlg_scale: RLGScale) -> torch.utils.hooks.RemovableHandle:
        """Set w at each sampling step from ``rlg_scale``, following ``scheduler``'s step index.

        Works with any stock pipeline whose scheduler exposes ``timesteps`` and ``step_index``
        (all diffusers flow-matching schedulers). At the first forward of a run, the schedule is
        resolved for all steps (errors come before any step is taken); at each later step w is
        set. Returns a handle: call ``.remove()`` after sampling.

        Example::

            handle = rlg.follow_schedule(pipe.scheduler, linear_schedule(0.0, 2.0))
            image = pipe(prompt).images[0]
            handle.remove()
        """
        check_rlg_scale(rlg_scale)
        return self.follow_sweep(scheduler, [rlg_scale], rows_per_scale=1)

    def follow_sweep(
        self, scheduler: Any, rlg_sweep: Sequence[RLGScale], rows_per_scale: int, same_start: bool = False
    ) -> torch.utils.hooks.RemovableHandle:
        """Like :meth:`follow_schedule` for a sweep: the batch holds ``len(rlg_sweep)`` blocks of ``rows_per_scale`` rows.

        Block k (per CFG half) gets ``rlg_sweep[k]``, each entry anything ``rlg_scale`` accepts. With
        ``same_start=True`` (the blocks start from the same latents and prompts, as in the RLG pipeline's
        sweep) the first step evaluates each model once per image instead of once per image and scale.
        Example: ``rlg.follow_sweep(pipe.scheduler, [0.0, 1.0, 2.0], rows_per_scale=4)`` for 3 x 4 images.
        """
        entries = check_rlg_sweep(rlg_sweep)
        state: dict[str, Any] = {"scales": None, "step": None, "timesteps": None}

        def before_forward(module: nn.Module, args: Any, kwargs: Any) -> None:
            timesteps = scheduler.timesteps
            index = scheduler.step_index
            step = 0 if index is None else int(index)
            if state["scales"] is None or state["timesteps"] is not timesteps:  # a new sampling run
                values = timesteps.tolist()
                resolved = []
                for k, entry in enumerate(entries):
                    try:
                        resolved.append(resolve_rlg_scales(entry, values))
                    except (TypeError, ValueError) as error:
                        raise type(error)(f"rlg_sweep[{k}]: {error}" if len(entries) > 1 else str(error)) from None
                state["scales"], state["timesteps"], state["step"] = resolved, timesteps, None
            if step != state["step"]:
                if step >= len(state["scales"][0]):
                    raise RuntimeError(
                        f"Step {step} is beyond the {len(state['scales'][0])} steps of the RLG schedule "
                        "(a scheduler that evaluates the model more than once per step is not supported)."
                    )
                pattern = [scales[step] for scales in state["scales"] for _ in range(rows_per_scale)]
                self.set_row_scales(pattern)
                # at the first step every block still holds the same x_T: one evaluation per image
                self.shared_blocks = (len(entries), rows_per_scale) if same_start and step == 0 else None
                state["step"] = step

        return self.register_forward_pre_hook(before_forward, with_kwargs=True)


def _mix(v_base: torch.Tensor, v_ft: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``v_base + w * (v_ft - v_base)`` in float32, cast back (lerp: exact at w = 0 and w = 1)."""
    return torch.lerp(v_base.float(), v_ft.float(), w).to(v_base.dtype)


def _spread(v: torch.Tensor | None, evaluated: list[int], rows: list[int], sources: list[int] | None, n: int):
    """Outputs of the ``evaluated`` rows -> one per row of ``rows`` (via ``sources``), zeros on the other rows of n."""
    if v is None or not rows:
        return v
    if sources is None and len(rows) == n:  # every row evaluated, in order
        return v
    if sources is not None:
        position = {row: i for i, row in enumerate(evaluated)}
        v = v.index_select(0, _index([position[sources[r]] for r in rows], v))
    if len(rows) == n:
        return v
    return v.new_zeros((n, *v.shape[1:])).index_copy_(0, _index(rows, v), v)


def _index(rows: list[int], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=like.device)


def _has_nested_tensor(value: Any) -> bool:
    if isinstance(value, dict):
        return any(isinstance(v, torch.Tensor) or _has_nested_tensor(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(isinstance(v, torch.Tensor) or _has_nested_tensor(v) for v in value)
    return False


def _is_row_tensor(name: str | None, value: Any, n: int, unbatched: tuple[str, ...]) -> bool:
    return isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == n and name not in unbatched


def _map_rows(unbatched, n, fn, hidden_states, args, kwargs):
    """Apply ``fn`` to every per-row tensor input (leading dim n); leave the others alone."""
    new_args = tuple(fn(a) if _is_row_tensor(None, a, n, unbatched) else a for a in args)
    new_kwargs = {k: fn(v) if _is_row_tensor(k, v, n, unbatched) else v for k, v in kwargs.items()}
    return fn(hidden_states), new_args, new_kwargs


def _take_rows(unbatched, n, rows: list[int], hidden_states, args, kwargs):
    """The inputs of the given rows (no copy for all rows in order; ``[x; x]`` for all rows twice)."""
    if len(rows) == n and rows == list(range(n)):
        return hidden_states, args, kwargs
    if len(rows) == 2 * n and rows == list(range(n)) * 2:
        return _stack_rows(unbatched, n, hidden_states, args, kwargs, 2)
    index = _index(rows, hidden_states)
    return _map_rows(unbatched, n, lambda t: t.index_select(0, index.to(t.device)), hidden_states, args, kwargs)


def _stack_rows(unbatched, n, hidden_states, args, kwargs, copies: int):
    return _map_rows(unbatched, n, lambda t: torch.cat([t] * copies, dim=0), hidden_states, args, kwargs)


# =============================================================================================
# 3. The pipeline
# =============================================================================================
# The stock call's parameters, in order (the RLG call repeats them by name; tests/test_rlg.py checks
# that they match the installed diffusers, name, kind and default).
STOCK_CALL_PARAMETERS: tuple[str, ...] = tuple(inspect.signature(StableDiffusion3Pipeline.__call__).parameters)[1:]
RLG_CALL_PARAMETERS: tuple[str, ...] = (
    "rlg_scale", "rlg_sweep", "rlg_mode", "rlg_max_rows", "sampler", "sde_noise_level",
)  # fmt: skip
FINETUNED_LORA_FOLDER = "finetuned_lora"  # where save_pretrained puts a LoRA fine-tune (PEFT format)
RLG_CONFIG_NAME = "rlg_config.json"  # adapter name and mode of the attached fine-tune


class RLGStableDiffusion3Pipeline(StableDiffusion3Pipeline):
    """``StableDiffusion3Pipeline`` (SD3 / SD3.5) with RLG between a base and a fine-tuned transformer.

    Build it like the stock pipeline (``from_pretrained(base, ...)`` or ``from_pipe(pipe)``), attach the
    fine-tuned model with :meth:`load_finetuned` (or set ``pipe.finetuned_transformer`` to a full
    fine-tuned transformer; ``None`` detaches any fine-tune), then call it with every stock argument plus
    ``rlg_scale`` (one scale, possibly per step) or ``rlg_sweep`` (several scales in one call). It returns
    the stock ``StableDiffusion3PipelineOutput``. The sampling loop is the stock one written out
    (:meth:`_denoise`), its velocity the :class:`RLGTransformer`'s; ``self.transformer`` stays the base model.
    Without a fine-tune (``finetuned_transformer=None``, e.g. after diffusers' optional-component round
    trip) the pipeline samples the base model: at ``rlg_scale=0``, and at the default scale with a
    warning; any other w raises.

    ``save_pretrained`` writes the stock folder plus the fine-tune (a full one as the
    ``finetuned_transformer`` component, a LoRA as a PEFT adapter in ``finetuned_lora/``);
    ``from_pretrained`` of that folder attaches it again.

    Example::

        pipe = RLGStableDiffusion3Pipeline.from_pipe(stock_pipe)
        pipe.load_finetuned("flow-grpo-lora/")          # adapter_config.json + adapter_model.safetensors
        images = pipe(["a red circle"], rlg_scale=1.6, num_inference_steps=28, guidance_scale=4.5).images
        sweep = pipe(["a red circle"], rlg_sweep=[0, 1, 2], num_inference_steps=28).images  # 3 images
        pipe.save_pretrained("rlg-pipeline/")
        pipe.enable_compile()                            # torch.compile of every denoising step's work
    """

    _optional_components = StableDiffusion3Pipeline._optional_components + ["finetuned_transformer"]

    def __init__(
        self,
        transformer: SD3Transformer2DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer_2: CLIPTokenizer,
        text_encoder_3: T5EncoderModel,
        tokenizer_3: T5TokenizerFast,
        image_encoder: SiglipVisionModel = None,
        feature_extractor: SiglipImageProcessor = None,
        finetuned_transformer: SD3Transformer2DModel = None,
    ):
        super().__init__(
            transformer=transformer,
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
        )
        self.rlg_transformer: RLGTransformer | None = None
        self._compiled: dict[str, Any] | None = None  # enable_compile's options and compiled functions
        self._rlg_ready = True  # from here on, setting finetuned_transformer attaches / detaches
        self.register_modules(finetuned_transformer=finetuned_transformer)

    # ---- attaching the fine-tuned model ------------------------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        # ``pipe.finetuned_transformer = module`` attaches a full fine-tune, ``= None`` detaches any fine-tune
        # (LoRA included); register_modules, from_pretrained and from_pipe go through here too.
        if name == "finetuned_transformer" and self.__dict__.get("_rlg_ready", False):
            current = self.__dict__.get("finetuned_transformer")
            if value is not current or (value is None and self.__dict__.get("rlg_transformer") is not None):
                if value is not None and not isinstance(value, nn.Module):
                    raise TypeError(
                        f"finetuned_transformer must be a transformer module or None, got {type(value).__name__}; "
                        "for a path use pipe.load_finetuned(path)."
                    )
                if value is not None:
                    check_same_architecture(self.transformer, value)  # before anything changes
                self._detach_finetuned()
                if value is not None:
                    self.__dict__["rlg_transformer"] = RLGTransformer(self.transformer, finetuned=value)
            super().__setattr__(name, value)
            # (DiffusionPipeline.__setattr__ records (None, None) when the previous value was None.)
            self.register_to_config(
                finetuned_transformer=(None, None) if value is None else _fetch_class_library_tuple(value)
            )
            return
        super().__setattr__(name, value)

    def _detach_finetuned(self) -> None:
        rlg = self.__dict__.get("rlg_transformer")
        if rlg is None:
            return
        rlg.remove_hooks()
        if rlg.adapter_name is not None:
            self.transformer.delete_adapters(rlg.adapter_name)
            if not getattr(self.transformer, "peft_config", None):  # no adapter left: drop the empty LoRA wrappers too
                self.transformer.unload_lora()
        self.__dict__["rlg_transformer"] = None

    def load_finetuned(
        self,
        source: str | os.PathLike | nn.Module | dict,
        adapter_name: str = "rlg",
        mode: RLGMode = "exact",
        **kwargs: Any,
    ) -> RLGTransformer:
        """Attach the fine-tuned model; the source type is detected (see ``lora_utils.load_finetuned_model``).

        Args:
            source: one of
                (a) a diffusers LoRA: a ``.safetensors`` file / folder written by ``save_lora_weights``
                    (or its state dict); loaded like ``load_lora_weights`` loads its transformer part;
                (b) a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``), as
                    published by Flow-GRPO and the public RLG release;
                (c) a full fine-tuned transformer: a module, a transformer folder (``config.json``) or a
                    pipeline folder (its ``transformer/``).
                A hub id ``owner/name`` that is not a local folder is downloaded; a missing local path
                raises ``FileNotFoundError`` naming it. For (a) and (b) the base model is the same
                transformer with the adapter skipped (no second copy of the weights).
            adapter_name: name of the LoRA adapter (a, b).
            mode: evaluation mode (see ``RLG_MODES``); can be overridden per call.
            kwargs: passed to ``lora_state_dict`` (a) or ``from_pretrained`` (c), e.g. ``weight_name``.

        Returns the :class:`RLGTransformer` (also ``self.rlg_transformer``).

        Example: ``pipe.load_finetuned("runs/acflow/checkpoints/latest", mode="exact")``.
        """
        if self.rlg_transformer is not None:
            raise RuntimeError("A fine-tuned model is already attached; call unload_finetuned() first.")
        get_rlg_mode(mode)  # a bad name fails before anything loads; the fine-tune's kind is checked once attached
        finetuned = load_finetuned_model(self.transformer, source, adapter_name=adapter_name, pipeline=self, **kwargs)
        if finetuned is not None:
            self.finetuned_transformer = finetuned  # attaches (see __setattr__)
            try:
                self.rlg_transformer.mode = mode
            except ValueError:
                self.unload_finetuned()
                raise
            return self.rlg_transformer
        try:
            self.rlg_transformer = RLGTransformer(self.transformer, adapter_name=adapter_name, mode=mode)
        except (ValueError, RuntimeError):
            self.transformer.delete_adapters(adapter_name)
            if not getattr(self.transformer, "peft_config", None):
                self.transformer.unload_lora()
            raise
        return self.rlg_transformer

    def unload_finetuned(self) -> None:
        """Detach the fine-tuned model (delete its LoRA adapter / drop the full transformer).

        The same as ``pipe.finetuned_transformer = None``.
        """
        self.finetuned_transformer = None

    # ---- torch.compile ---------------------------------------------------------------------------------
    def enable_compile(
        self,
        mode: str | None = None,
        fullgraph: bool = True,
        dynamic: bool | None = False,
        backend: str = "inductor",
    ) -> None:
        """Run what every denoising step runs under ``torch.compile``, with no graph break and no recompilation.

        Compiled: the transformer (base, and a full fine-tuned one), in place as diffusers does it
        (``pipe.transformer.compile(fullgraph=True)``), with the RLG LoRA gate inside its graph; the RLG mix
        ``v_base + w (v_ft - v_base)`` as a function of the two velocities and w as a tensor (a new w, or a
        schedule's next w, reuses the graph); with ``sampler="sde"`` the SDE step and its log-probability
        (``flowalign.compile.compile_sde_step``; the noise still comes from ``generator``). The row
        selection of RLG (which rows need which model) stays eager: it decides, on the host, the shape of
        each forward. The timestep enters as a tensor, so every step of a run reuses the graphs compiled at
        its first step (asserted in ``tests/test_compile.py``); a sweep's first step then evaluates every
        row (the shared-noise saving of an eager sweep would add a graph of another batch size).

        Transformer graphs are compiled per input shape (``dynamic=False``) and per row layout of the
        forward: at most three for a call (w = 0: base rows, w = 1: fine-tuned rows, otherwise both), each
        compiled once, plus one for the mix and one for the SDE step. A fine-tune attached later is compiled
        at the next call. Outputs equal eager sampling to float rounding (the kernels differ; measured in
        docs/benchmarks.md, "Compiled sampling"). The diffusers convention alone,
        ``pipe.transformer.compile(fullgraph=True)``, works too (RLG calls the compiled module) but leaves
        the mix and the SDE step eager.

        Args:
            mode, fullgraph, dynamic, backend: ``torch.compile``'s; ``fullgraph=True`` raises on any graph break.

        Example::

            pipe.load_finetuned("flow-grpo-lora/")
            pipe.enable_compile()                       # the first call compiles; later calls run compiled
            images = pipe("a photo of a cat", rlg_scale=1.5, num_inference_steps=28).images
            pipe.disable_compile()                      # back to eager
        """
        options = {"mode": mode, "fullgraph": fullgraph, "dynamic": dynamic, "backend": backend}
        self._compiled = {
            "options": options,
            "sde_step": compile_sde_step(**options),
            "mix": compile_function(_mix, **options),
        }
        self._compile_transformers()

    def disable_compile(self) -> None:
        """Undo :meth:`enable_compile`: the transformers, the mix and the SDE step run eagerly again.

        Example: ``pipe.enable_compile(); pipe.disable_compile(); assert pipe.compile_options is None``.
        """
        for module in (self.transformer, self.finetuned_transformer):
            if module is not None:
                module._compiled_call_impl = None  # nn.Module.compile's attribute: None is the eager forward
        self._compiled = None

    @property
    def compile_options(self) -> dict[str, Any] | None:
        """The ``torch.compile`` options given to :meth:`enable_compile`, or ``None`` when sampling runs eagerly."""
        return None if self._compiled is None else dict(self._compiled["options"])

    def _compile_transformers(self) -> None:
        """Compile (in place) the base and a full fine-tuned transformer that are not compiled yet."""
        for module in (self.transformer, self.finetuned_transformer):
            if module is not None and getattr(module, "_compiled_call_impl", None) is None:
                compile_transformer(module, in_place=True, **self._compiled["options"])

    # ---- saving and loading -------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """The stock ``save_pretrained`` plus the fine-tune, so that ``from_pretrained`` attaches it again.

        A full fine-tune is the ``finetuned_transformer`` component; a LoRA fine-tune is written as a PEFT
        adapter to ``finetuned_lora/`` (the base ``transformer/`` is saved without it). The adapter name and
        mode go to ``rlg_config.json``.

        Example: ``pipe.save_pretrained("out/rlg"); again = RLGStableDiffusion3Pipeline.from_pretrained("out/rlg")``.
        """
        directory = Path(save_directory)
        rlg = self.rlg_transformer
        if rlg is None or rlg.adapter_name is None:
            super().save_pretrained(save_directory, *args, **kwargs)
            if rlg is not None:
                (directory / RLG_CONFIG_NAME).write_text(json.dumps({"adapter_name": None, "mode": rlg.mode}) + "\n")
            return
        adapter_name, mode, max_rows = rlg.adapter_name, rlg.mode, rlg.max_rows
        directory.mkdir(parents=True, exist_ok=True)
        save_peft_adapter(self.transformer, adapter_name, directory / FINETUNED_LORA_FOLDER)
        self.unload_finetuned()  # the base transformer without LoRA layers
        try:
            super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.load_finetuned(directory / FINETUNED_LORA_FOLDER, adapter_name=adapter_name, mode=mode)
            self.rlg_transformer.max_rows = max_rows
        (directory / RLG_CONFIG_NAME).write_text(json.dumps({"adapter_name": adapter_name, "mode": mode}) + "\n")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any):
        """The stock ``from_pretrained``; a folder written by :meth:`save_pretrained` comes back with its fine-tune.

        Example: ``RLGStableDiffusion3Pipeline.from_pretrained("out/rlg", text_encoder_3=None, tokenizer_3=None)``.
        """
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        path = Path(os.fspath(pretrained_model_name_or_path)).expanduser()
        config = json.loads((path / RLG_CONFIG_NAME).read_text()) if (path / RLG_CONFIG_NAME).is_file() else {}
        if (path / FINETUNED_LORA_FOLDER / "adapter_config.json").is_file() and pipe.rlg_transformer is None:
            pipe.load_finetuned(
                path / FINETUNED_LORA_FOLDER,
                adapter_name=config.get("adapter_name") or "rlg",
                mode=config.get("mode", "exact"),
            )
        elif pipe.rlg_transformer is not None and config.get("mode"):
            pipe.rlg_transformer.mode = config["mode"]
        return pipe

    # ---- input checks ------------------------------------------------------------------------------
    def _check_rlg_call(self, call: dict, rlg: dict) -> tuple[list[RLGScale], bool]:
        """Every check of the call's form before sampling; returns the scales (one entry without a sweep) and
        whether the call asked for RLG at all. The VALUES of w are checked once, by :meth:`_resolve_scales`."""
        attached = self.rlg_transformer
        rlg["sampler"] = check_sampler(rlg["sampler"], stacklevel=4)  # "ode" -> "euler"; 4: past __call__ and no_grad
        if rlg["sampler"] == "sde":
            check_noise_level(rlg["sde_noise_level"], "sde_noise_level")
        steps = call["num_inference_steps"]
        if call["sigmas"] is None and (isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1):
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {steps!r}.")
        asked = rlg["rlg_scale"] is not None or rlg["rlg_sweep"] is not None
        if rlg["rlg_sweep"] is not None:
            if rlg["rlg_scale"] is not None:
                raise ValueError(
                    "Give rlg_scale (one scale, or one value per step) or rlg_sweep (several scales in one call), "
                    f"not both; got rlg_scale={rlg['rlg_scale']!r} and rlg_sweep={rlg['rlg_sweep']!r}."
                )
            entries = _sweep_entries(rlg["rlg_sweep"])
        elif rlg["rlg_scale"] is not None:
            entries = [rlg["rlg_scale"]]
        else:  # the default: the fine-tuned model (w = 1), or the base model when none is attached
            entries = [1.0 if attached is not None else 0.0]
        mode = rlg["rlg_mode"] if rlg["rlg_mode"] is not None else (attached.mode if attached else "exact")
        get_rlg_mode(
            mode, lora=None if attached is None else attached.adapter_name is not None, argument="rlg_mode",
            guidance_scale=call["guidance_scale"], skip_guidance_layers=call["skip_guidance_layers"],
        )  # fmt: skip
        max_rows = rlg["rlg_max_rows"]
        if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
            raise ValueError(f"rlg_max_rows must be None (no bound) or an integer >= 1, got {max_rows!r}.")
        self._check_batch(call)
        return entries, asked

    def _check_stock_inputs(self, call: dict) -> None:
        """The stock call's ``check_inputs``, after filling in its default height / width and callback inputs."""
        call["height"] = call["height"] or self.default_sample_size * self.vae_scale_factor
        call["width"] = call["width"] or self.default_sample_size * self.vae_scale_factor
        if isinstance(call["callback_on_step_end"], (PipelineCallback, MultiPipelineCallbacks)):
            call["callback_on_step_end_tensor_inputs"] = call["callback_on_step_end"].tensor_inputs
        self.check_inputs(
            call["prompt"], call["prompt_2"], call["prompt_3"], call["height"], call["width"],
            negative_prompt=call["negative_prompt"], negative_prompt_2=call["negative_prompt_2"],
            negative_prompt_3=call["negative_prompt_3"], prompt_embeds=call["prompt_embeds"],
            negative_prompt_embeds=call["negative_prompt_embeds"], pooled_prompt_embeds=call["pooled_prompt_embeds"],
            negative_pooled_prompt_embeds=call["negative_pooled_prompt_embeds"],
            callback_on_step_end_tensor_inputs=call["callback_on_step_end_tensor_inputs"],
            max_sequence_length=call["max_sequence_length"],
        )  # fmt: skip

    def _check_batch(self, call: dict) -> None:
        """Batch sizes of prompts, negative prompts, embeddings, generators and latents must agree."""
        prompt, embeds = call["prompt"], call["prompt_embeds"]
        if prompt is None and embeds is None:
            raise ValueError("Give prompt (a string or a list of strings) or prompt_embeds.")
        if isinstance(prompt, str):
            batch = 1
        elif isinstance(prompt, list):
            if not prompt or not all(isinstance(p, str) for p in prompt):
                raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}.")
            batch = len(prompt)
        elif prompt is not None:
            raise TypeError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}.")
        else:
            batch = embeds.shape[0]
        for name in ("prompt_2", "prompt_3", "negative_prompt", "negative_prompt_2", "negative_prompt_3"):
            value = call[name]
            if isinstance(value, list) and len(value) != batch:
                raise ValueError(
                    f"{name} has {len(value)} entries but there are {batch} prompts; give one per prompt (or one "
                    "string for all)."
                )
        for name in ("pooled_prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds"):
            value = call[name]
            if value is not None and embeds is not None and value.shape[0] != embeds.shape[0]:
                raise ValueError(
                    f"{name} has {value.shape[0]} rows but prompt_embeds has {embeds.shape[0]}; give one row per prompt."
                )
        per_prompt = call["num_images_per_prompt"]
        if isinstance(per_prompt, bool) or not isinstance(per_prompt, int) or per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be an integer >= 1, got {per_prompt!r}.")
        images = batch * per_prompt
        generator = call["generator"]
        if isinstance(generator, list) and len(generator) != images:
            raise ValueError(
                f"generator is a list of {len(generator)} generators but the call makes {images} images "
                f"({batch} prompts x num_images_per_prompt={per_prompt}); give one generator per image, or one for all."
            )
        latents = call["latents"]
        if latents is not None and latents.shape[0] != images:
            raise ValueError(
                f"latents has {latents.shape[0]} rows but the call makes {images} images ({batch} prompts x "
                f"num_images_per_prompt={per_prompt}); give one latent per image (a sweep reuses them at every scale)."
            )

    # ---- sampling -----------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(  # the stock signature, grouped: prompts, size and steps, negatives, inputs, outputs, SLG
        self, prompt: str | list[str] | None = None, prompt_2: str | list[str] | None = None,
        prompt_3: str | list[str] | None = None, height: int | None = None, width: int | None = None,
        num_inference_steps: int = 28, sigmas: list[float] | None = None, guidance_scale: float = 7.0,
        negative_prompt: str | list[str] | None = None, negative_prompt_2: str | list[str] | None = None,
        negative_prompt_3: str | list[str] | None = None, num_images_per_prompt: int | None = 1,
        generator: torch.Generator | list[torch.Generator] | None = None, latents: torch.FloatTensor | None = None,
        prompt_embeds: torch.FloatTensor | None = None, negative_prompt_embeds: torch.FloatTensor | None = None,
        pooled_prompt_embeds: torch.FloatTensor | None = None,
        negative_pooled_prompt_embeds: torch.FloatTensor | None = None,
        ip_adapter_image: Image.Image | Any | None = None, ip_adapter_image_embeds: torch.Tensor | None = None,
        output_type: str | None = "pil", return_dict: bool = True, joint_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None, callback_on_step_end: Callable[[int, int], None] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006  (the stock default)
        max_sequence_length: int = 256, skip_guidance_layers: list[int] | None = None,
        skip_layer_guidance_scale: float = 2.8, skip_layer_guidance_stop: float = 0.2,
        skip_layer_guidance_start: float = 0.01, mu: float | None = None,
        *,
        rlg_scale: RLGScale | None = None,
        rlg_sweep: Sequence[RLGScale] | None = None,
        rlg_mode: RLGMode | None = None,
        rlg_max_rows: int | None = None,
        sampler: Literal["euler", "sde"] = "euler",
        sde_noise_level: float = 0.7,
    ):
        """Stock ``StableDiffusion3Pipeline.__call__`` (every argument, same meaning, the same output type) plus RLG.

        Args:
            rlg_scale: w (default 1.0, the fine-tuned model; with no fine-tune attached, 0 and a warning): a number,
                ONE VALUE PER STEP, a schedule (:func:`linear_schedule`, :func:`finetuned_first_schedule`) or a
                callable ``(step_index, timestep) -> float``. w = 0 / 1 run one model (the stock CFG cost and output).
            rlg_sweep: several scales in one call, each anything ``rlg_scale`` accepts, from the same initial (and
                SDE) noise: paired, equal to one call per scale; image i at scale k is ``images[k * n_images + i]``.
            rlg_mode: evaluation mode for this call (default: the one given to ``load_finetuned``).
            rlg_max_rows: the most rows (images x CFG branches x models) per transformer forward (None: no bound).
            sampler: ``"euler"`` (the stock Euler scheduler, an ODE) or ``"sde"`` (the Flow-GRPO SDE, noise from
                ``generator``); ``"ode"``, the old name of ``"euler"``, is deprecated (FutureWarning).
            sde_noise_level: the SDE's ``a`` (Flow-GRPO uses 0.7).

        Every input is checked before the first step, every value of w once (``resolve_rlg_scales``) before the
        first model evaluation; errors name the value and the fix.

        Examples::

            pipe("a red circle", rlg_scale=[2.0] * 10 + [1.0] * 18, num_inference_steps=28)   # per step
            out = pipe(["a red circle", "a square"], rlg_sweep=[0, 0.5, 1, 1.5, 2])            # 10 images
            at_w2 = out.images[4 * 2 : 5 * 2]                                                  # scale 2
        """
        arguments = dict(locals())  # first statement: exactly the call's arguments
        call = {name: arguments[name] for name in STOCK_CALL_PARAMETERS}
        options = {name: arguments[name] for name in RLG_CALL_PARAMETERS}
        entries, asked = self._check_rlg_call(call, options)
        self._check_stock_inputs(call)  # the stock checks (and default size), before anything runs
        self._guidance_scale, self._skip_layer_guidance_scale = guidance_scale, skip_layer_guidance_scale
        self._clip_skip, self._joint_attention_kwargs, self._interrupt = clip_skip, joint_attention_kwargs, False
        device = self._execution_device
        scheduler = self._sampling_scheduler(options, generator, len(entries))

        # 1. Prompt embeddings and initial noise, once per image; a sweep repeats both for each of its scales.
        embeds, latents, n_images = self._prepare(call, len(entries), device)
        # 2. The timesteps, and w at every step for every scale (the one check of every value of w).
        timesteps = self._prepare_timesteps(scheduler, call, latents, device)
        scales = self._resolve_scales(entries, timesteps, options, asked)
        self._prepare_ip_adapter(call, n_images * len(entries), device)
        # 3. The denoising loop: v_rlg = v_base + w_t (v_ft - v_base) per row, then CFG, then the scheduler step.
        with self._rlg_velocity(options) as model:
            latents = self._denoise(model, scheduler, timesteps, scales, n_images, latents, embeds, call)
        # 4. Decode.
        return self._decode(latents, output_type, return_dict)

    def _sampling_scheduler(self, options: dict, generator: Any, copies: int):
        """The stock scheduler (``sampler="euler"``), or the Flow-GRPO SDE scheduler on its timestep grid."""
        if options["sampler"] != "sde":
            return self.scheduler
        scheduler = FlowMatchSDEScheduler.from_scheduler(self.scheduler, options["sde_noise_level"], generator=generator)
        scheduler.noise_copies = copies  # the K copies of an image (a sweep) get the same step noise: paired
        scheduler.compiled_step = None if self._compiled is None else self._compiled["sde_step"]
        return scheduler

    def _prepare(self, call: dict, sweep: int, device: torch.device) -> tuple[dict, torch.Tensor, int]:
        """Encode the prompts and draw x_T as the stock call does, then repeat both ``sweep`` times (sweep-major).

        Returns the transformer's text inputs (``[uncond; cond]`` with CFG, and the conditional ones alone for
        skip-layer guidance), the latents and the number of images of one scale.
        """
        cfg = self.do_classifier_free_guidance
        lora_scale = (self.joint_attention_kwargs or {}).get("scale")
        pe, npe, ppe, nppe = self.encode_prompt(
            prompt=call["prompt"], prompt_2=call["prompt_2"], prompt_3=call["prompt_3"],
            negative_prompt=call["negative_prompt"], negative_prompt_2=call["negative_prompt_2"],
            negative_prompt_3=call["negative_prompt_3"], do_classifier_free_guidance=cfg,
            prompt_embeds=call["prompt_embeds"], negative_prompt_embeds=call["negative_prompt_embeds"],
            pooled_prompt_embeds=call["pooled_prompt_embeds"],
            negative_pooled_prompt_embeds=call["negative_pooled_prompt_embeds"], device=device,
            clip_skip=self.clip_skip, num_images_per_prompt=call["num_images_per_prompt"],
            max_sequence_length=call["max_sequence_length"], lora_scale=lora_scale,
        )  # fmt: skip
        n_images = pe.shape[0]
        latents = self.prepare_latents(
            n_images, self.transformer.config.in_channels, call["height"], call["width"], pe.dtype, device,
            call["generator"], call["latents"],
        )  # fmt: skip
        if sweep > 1:  # the same prompts and the same x_T at every scale
            pe, npe, ppe, nppe, latents = (None if t is None else torch.cat([t] * sweep) for t in (pe, npe, ppe, nppe, latents))
        embeds = {"prompt_embeds": pe, "pooled_prompt_embeds": ppe, "cond_embeds": pe, "cond_pooled": ppe}
        if cfg:
            embeds["prompt_embeds"] = torch.cat([npe, pe], dim=0)
            embeds["pooled_prompt_embeds"] = torch.cat([nppe, ppe], dim=0)
        return embeds, latents, n_images

    def _prepare_timesteps(self, scheduler, call: dict, latents: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The stock timesteps: ``scheduler.set_timesteps`` with ``sigmas`` / ``mu`` (dynamic shifting) as the stock call."""
        kwargs, mu = {}, call["mu"]
        if scheduler.config.get("use_dynamic_shifting", None) and mu is None:
            patch = self.transformer.config.patch_size
            image_seq_len = (latents.shape[2] // patch) * (latents.shape[3] // patch)
            mu = dynamic_shift(scheduler, image_seq_len)
        if mu is not None:
            kwargs["mu"] = mu
        timesteps, _ = retrieve_timesteps(
            scheduler, call["num_inference_steps"], "cpu" if XLA_AVAILABLE else device, sigmas=call["sigmas"], **kwargs
        )
        self._num_timesteps = len(timesteps)
        return timesteps

    def _resolve_scales(self, entries: list, timesteps: torch.Tensor, options: dict, asked: bool) -> list[list[float]]:
        """w of every scale at every step (``resolve_rlg_scales``: THE check of each value, before any model runs)."""
        values = timesteps.tolist()
        sweep = options["rlg_sweep"] is not None
        scales = []
        for k, entry in enumerate(entries):
            try:
                scales.append(resolve_rlg_scales(entry, values))
            except (TypeError, ValueError) as error:
                raise type(error)(f"rlg_sweep[{k}]: {error}" if sweep else str(error)) from None
        if self.rlg_transformer is None:
            if any(w != 0.0 for ws in scales for w in ws):
                raise RuntimeError(
                    "No fine-tuned model attached: RLG at w != 0 needs one; call pipe.load_finetuned(path_or_module) "
                    "first (without one, the pipeline samples the base model, w = 0)."
                )
            if not asked:
                warnings.warn(
                    "No fine-tuned model attached: sampling the base model (w = 0). Attach one with "
                    "pipe.load_finetuned(path_or_module) to sample with RLG.",
                    stacklevel=4,  # the caller of pipe(...): past __call__ and its no_grad wrapper
                )
        return scales

    def _prepare_ip_adapter(self, call: dict, images: int, device: torch.device) -> None:
        """The stock IP-adapter step: image embeddings into ``joint_attention_kwargs``."""
        image, embeds = call["ip_adapter_image"], call["ip_adapter_image_embeds"]
        if (image is not None and self.is_ip_adapter_active) or embeds is not None:
            embeds = self.prepare_ip_adapter_image_embeds(image, embeds, device, images, self.do_classifier_free_guidance)
            if self.joint_attention_kwargs is None:
                self._joint_attention_kwargs = {"ip_adapter_image_embeds": embeds}
            else:
                self._joint_attention_kwargs.update(ip_adapter_image_embeds=embeds)

    @contextlib.contextmanager
    def _rlg_velocity(self, options: dict):
        """The model of the loop: the :class:`RLGTransformer` set up for this call (restored afterwards), or the
        base transformer when no fine-tune is attached (every w is then 0)."""
        if self._compiled is not None:
            self._compile_transformers()  # a fine-tune attached after enable_compile
        rlg = self.rlg_transformer
        if rlg is None:
            yield self.transformer
            return
        rlg.check_lora_state()
        rlg.place_buffers(self._execution_device)
        saved = rlg.mode, rlg.max_rows
        rlg.mode = rlg.mode if options["rlg_mode"] is None else options["rlg_mode"]
        rlg.max_rows = options["rlg_max_rows"]
        rlg.cfg_batch = self.do_classifier_free_guidance  # SD3 stacks [uncond; cond] when guidance_scale > 1
        rlg.mix_fn = _mix if self._compiled is None else self._compiled["mix"]
        try:
            yield rlg
        finally:
            rlg.mode, rlg.max_rows, rlg.mix_fn = *saved, _mix
            rlg.set_rlg_scale(1.0)
            rlg.shared_blocks = None

    def _denoise(self, model, scheduler, timesteps, scales, n_images, latents, embeds, call) -> torch.Tensor:
        """The stock SD3 denoising loop, with w_t of every row set before each velocity evaluation."""
        cfg, steps = self.do_classifier_free_guidance, len(timesteps)
        skip_layers = call["skip_guidance_layers"]
        callback, tensor_inputs = call["callback_on_step_end"], call["callback_on_step_end_tensor_inputs"]
        # compiled: every step forwards the same rows (no smaller first step of a sweep: one graph per run)
        shared_start = len(scales) > 1 and self._compiled is None
        with self.progress_bar(total=steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                if isinstance(model, RLGTransformer):  # w_t of each row: block k of n_images rows has scale k
                    model.use_row_scales([ws[i] for ws in scales for _ in range(n_images)])
                    model.shared_blocks = (len(scales), n_images) if shared_start and i == 0 else None
                x = torch.cat([latents] * 2) if cfg else latents
                # v_rlg = v_base + w_t (v_ft - v_base), row by row (RLGTransformer; w_t = 0 / 1 rows: one model)
                v = model(
                    hidden_states=x, timestep=t.expand(x.shape[0]), encoder_hidden_states=embeds["prompt_embeds"],
                    pooled_projections=embeds["pooled_prompt_embeds"], joint_attention_kwargs=self.joint_attention_kwargs,
                    return_dict=False,
                )[0]  # fmt: skip
                if cfg:  # v = v_u + g (v_c - v_u)
                    v_uncond, v_cond = v.chunk(2)
                    v = classifier_free_guidance(v_uncond, v_cond, self.guidance_scale)
                    if skip_layers is not None and steps * call["skip_layer_guidance_start"] < i < steps * call["skip_layer_guidance_stop"]:
                        v_skip = model(
                            hidden_states=latents, timestep=t.expand(latents.shape[0]),
                            encoder_hidden_states=embeds["cond_embeds"], pooled_projections=embeds["cond_pooled"],
                            joint_attention_kwargs=self.joint_attention_kwargs, return_dict=False, skip_layers=skip_layers,
                        )[0]  # fmt: skip
                        v = v + (v_cond - v_skip) * self._skip_layer_guidance_scale
                latents_dtype = latents.dtype
                latents = scheduler.step(v, t, latents, return_dict=False)[0]  # Euler, or the SDE step
                if latents.dtype != latents_dtype and torch.backends.mps.is_available():
                    latents = latents.to(latents_dtype)
                if callback is not None:
                    local = {"latents": latents, "prompt_embeds": embeds["prompt_embeds"],
                             "pooled_prompt_embeds": embeds["pooled_prompt_embeds"]}  # fmt: skip
                    outputs = callback(self, i, t, {k: local[k] for k in tensor_inputs})
                    latents = outputs.pop("latents", latents)
                    embeds["prompt_embeds"] = outputs.pop("prompt_embeds", embeds["prompt_embeds"])
                    embeds["pooled_prompt_embeds"] = outputs.pop("pooled_prompt_embeds", embeds["pooled_prompt_embeds"])
                progress_bar.update()
                if XLA_AVAILABLE:
                    xm.mark_step()
        return latents

    def _decode(self, latents: torch.Tensor, output_type: str | None, return_dict: bool):
        """The stock end of the call: the VAE decode (or the latents), model hooks freed, the stock output."""
        if output_type == "latent":
            image = latents
        else:
            latents = (latents / self.vae.config.scaling_factor) + self.vae.config.shift_factor
            image = self.vae.decode(latents, return_dict=False)[0]
            image = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return StableDiffusion3PipelineOutput(images=image)
