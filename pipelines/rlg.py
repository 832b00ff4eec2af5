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

What is in this file, top to bottom:

1. Schedules of w over the sampling steps (constant, linear ramp, "fine-tuned only for the first
   k steps", any callable) and :func:`resolve_rlg_scales`.
2. LoRA plumbing: checking that a LoRA fits the base (:func:`check_lora_fits`), loading a PEFT
   adapter directory (:func:`load_peft_adapter`), and the *gate* on each LoRA branch that lets one
   forward pass evaluate base rows (LoRA skipped) and fine-tuned rows (LoRA on) together.
3. :class:`RLGTransformer`, the model-level wrapper, with its evaluation modes.
4. :class:`RLGStableDiffusion3Pipeline`, a ``StableDiffusion3Pipeline`` with ``load_finetuned`` and
   ``rlg_scale``; it runs the stock ``__call__`` with the wrapper swapped in.

Evaluation modes (``mode=``), four model evaluations per step with CFG unless said otherwise:

==================  =====  ==========================================================================
mode                exact  how
==================  =====  ==========================================================================
``exact``           yes    the fastest exact mode available (by measurement, ``flowalign bench rlg``):
                           ``exact_batched`` for a LoRA fine-tune, ``exact_two_pass`` for a full one
``exact_batched``   yes    LoRA only: ONE forward on the doubled batch ``[x; x]``; the LoRA branch is
                           computed for the second half only (fine-tuned), not the first (base), with
                           PEFT's mixed-batch ``adapter_names`` (``"__base__"`` rows)
``exact_two_pass``  yes    two forwards per call: base, then fine-tuned
``lora_scaled``     no     LoRA only: ONE forward of the base with the LoRA scaled by w
                           (``W + w * B A``); exact at w = 0 and w = 1 only; 2 evaluations per step
``shared_uncond``   no     the unconditional CFG half uses the base model only (3 evaluations instead
                           of 4): ``v = v_base(u) + g * (v_rlg(c) - v_base(u))``; needs the CFG batch
                           layout ``[uncond; cond]`` (``cfg_batch=True``, set by the RLG pipeline)
==================  =====  ==========================================================================

Example::

    import torch
    from flowalign.pipelines import RLGStableDiffusion3Pipeline, linear_schedule

    pipe = RLGStableDiffusion3Pipeline.from_pretrained(
        "stabilityai/stable-diffusion-3.5-medium", torch_dtype=torch.bfloat16).to("cuda")
    pipe.load_finetuned("path/to/flow-grpo-lora")      # PEFT dir, diffusers LoRA file or full transformer
    image = pipe("a photo of a cat", rlg_scale=1.6, guidance_scale=4.5).images[0]
    ramp = pipe("a photo of a cat", rlg_scale=linear_schedule(0.0, 2.0)).images[0]
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn
from transformers import (
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    SiglipImageProcessor,
    SiglipVisionModel,
    T5EncoderModel,
    T5TokenizerFast,
)

__all__ = [
    "RLG_MODES",
    "ConstantSchedule",
    "FinetunedFirstSchedule",
    "LinearSchedule",
    "RLGSchedule",
    "RLGStableDiffusion3Pipeline",
    "RLGTransformer",
    "check_lora_fits",
    "check_same_architecture",
    "constant_schedule",
    "finetuned_first_schedule",
    "linear_schedule",
    "load_peft_adapter",
    "resolve_rlg_scales",
]

RLGMode = Literal["exact", "exact_batched", "exact_two_pass", "lora_scaled", "shared_uncond"]
RLG_MODES: tuple[str, ...] = ("exact", "exact_batched", "exact_two_pass", "lora_scaled", "shared_uncond")
APPROXIMATE_MODES: tuple[str, ...] = ("lora_scaled", "shared_uncond")


# =============================================================================================
# 1. Schedules of the RLG scale w over the sampling steps
# =============================================================================================
class RLGSchedule:
    """Base class of the built-in schedules: w for every step of one sampling run.

    Subclasses implement ``scales(timesteps) -> list[float]`` where ``timesteps`` are the
    scheduler's timesteps of the run (SD3: ``1000 * sigma``, from ~1000 down to ~0).
    """

    def scales(self, timesteps: Sequence[float]) -> list[float]:
        raise NotImplementedError


@dataclass(frozen=True)
class ConstantSchedule(RLGSchedule):
    """``w_i = scale`` at every step."""

    scale: float

    def scales(self, timesteps: Sequence[float]) -> list[float]:
        return [float(self.scale)] * len(timesteps)


@dataclass(frozen=True)
class LinearSchedule(RLGSchedule):
    """Linear ramp ``w_i = start + (end - start) * i / (n - 1)`` over the n steps (``start`` if n = 1)."""

    start: float
    end: float

    def scales(self, timesteps: Sequence[float]) -> list[float]:
        n = len(timesteps)
        if n == 1:
            return [float(self.start)]
        return [float(self.start) + (float(self.end) - float(self.start)) * i / (n - 1) for i in range(n)]


@dataclass(frozen=True)
class FinetunedFirstSchedule(RLGSchedule):
    """The fine-tuned model alone (w = 1) for the first ``num_steps`` steps, then ``scale``.

    This is the public reference's option of letting the fine-tuned model lay out the image
    before guiding.
    """

    num_steps: int
    scale: float

    def scales(self, timesteps: Sequence[float]) -> list[float]:
        if self.num_steps < 0:
            raise ValueError(f"FinetunedFirstSchedule.num_steps must be >= 0, got {self.num_steps}.")
        return [1.0 if i < self.num_steps else float(self.scale) for i in range(len(timesteps))]


def constant_schedule(scale: float) -> ConstantSchedule:
    """w = ``scale`` at every step. Example: ``pipe(prompt, rlg_scale=constant_schedule(1.6))``."""
    return ConstantSchedule(scale)


def linear_schedule(start: float, end: float) -> LinearSchedule:
    """w ramps linearly from ``start`` (first step) to ``end`` (last step).

    Example: ``pipe(prompt, rlg_scale=linear_schedule(0.0, 2.0))``.
    """
    return LinearSchedule(start, end)


def finetuned_first_schedule(num_steps: int, scale: float) -> FinetunedFirstSchedule:
    """w = 1 (fine-tuned model only) for the first ``num_steps`` steps, then ``scale``.

    Example: ``pipe(prompt, rlg_scale=finetuned_first_schedule(5, 1.6))``.
    """
    return FinetunedFirstSchedule(num_steps, scale)


RLGScale = Union[float, Sequence[float], Callable[[int, float], float], RLGSchedule]


def resolve_rlg_scales(rlg_scale: RLGScale, timesteps: Sequence[float]) -> list[float]:
    """Turn any accepted ``rlg_scale`` into one finite float per sampling step.

    Accepted: a number (constant), a sequence with one value per step, a built-in
    :class:`RLGSchedule`, or a callable ``f(step_index, timestep) -> float`` (``timestep`` as the
    scheduler gives it, a float in [0, 1000] for SD3).

    >>> resolve_rlg_scales(1.5, [1000.0, 500.0])
    [1.5, 1.5]
    >>> resolve_rlg_scales(lambda i, t: t / 1000, [1000.0, 500.0])
    [1.0, 0.5]
    """
    timesteps = [float(t) for t in timesteps]
    n = len(timesteps)
    if isinstance(rlg_scale, (bool, str, bytes)):
        raise TypeError(
            f"rlg_scale must be a number, a per-step sequence, a schedule or a callable, not {rlg_scale!r}."
        )
    if isinstance(rlg_scale, numbers.Real):
        scales = [float(rlg_scale)] * n
    elif isinstance(rlg_scale, torch.Tensor) and rlg_scale.ndim == 0:
        scales = [float(rlg_scale)] * n
    elif isinstance(rlg_scale, RLGSchedule):
        scales = [float(w) for w in rlg_scale.scales(timesteps)]
    elif callable(rlg_scale):
        scales = [float(rlg_scale(i, t)) for i, t in enumerate(timesteps)]
    elif isinstance(rlg_scale, (Sequence, torch.Tensor)) or hasattr(rlg_scale, "__len__"):
        scales = [float(w) for w in rlg_scale]
        if len(scales) != n:
            raise ValueError(
                f"rlg_scale has {len(scales)} values but this run has {n} sampling steps; give exactly one "
                f"value per step (or a number, a schedule such as linear_schedule(0, 2), or a callable)."
            )
    else:
        raise TypeError(
            f"rlg_scale must be a number, a per-step sequence, an RLGSchedule or a callable "
            f"(step_index, timestep) -> float; got {type(rlg_scale).__name__}."
        )
    for i, w in enumerate(scales):
        if not math.isfinite(w):
            raise ValueError(f"rlg_scale must be finite, got {w} at step {i}; use a finite scale (e.g. 0 to 3).")
    return scales


def _check_finite_scale(rlg_scale: Any) -> None:
    """Early check of the values we can see before sampling (numbers and sequences)."""
    if isinstance(rlg_scale, bool) or rlg_scale is None:
        raise TypeError(
            f"rlg_scale must be a number, a per-step sequence, a schedule or a callable, got {rlg_scale!r}."
        )
    values = []
    if isinstance(rlg_scale, numbers.Real):
        values = [float(rlg_scale)]
    elif isinstance(rlg_scale, (list, tuple)):
        values = [float(w) for w in rlg_scale]
    for w in values:
        if not math.isfinite(w):
            raise ValueError(f"rlg_scale must be finite, got {w}; use a finite scale (e.g. 0 to 3).")


# =============================================================================================
# 2. LoRA plumbing
# =============================================================================================
def _lora_module_name(key: str) -> tuple[str, str] | None:
    """``'a.b.lora_A.weight'`` -> ``('a.b', 'lora_A')``; ``None`` for keys that are not LoRA A/B weights."""
    for part in (".lora_A.", ".lora_B."):
        if part in key:
            module, _, _ = key.partition(part)
            return module, part.strip(".")
    return None


def _strip_lora_prefix(key: str) -> str:
    """Drop the container prefixes of the two file formats (diffusers ``transformer.``, PEFT ``base_model.model.``)."""
    for prefix in ("base_model.model.", "transformer."):
        if key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def check_lora_fits(
    transformer: nn.Module, state_dict: dict[str, torch.Tensor], target_modules: Sequence[str] | str | None = None
) -> None:
    """Raise a ``ValueError`` naming the module if a LoRA does not fit ``transformer``.

    Checks every ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` of ``state_dict`` (keys may
    carry the ``transformer.`` or ``base_model.model.`` prefix): the module must exist, be a
    Linear/Conv layer, and ``lora_A`` must read its ``in_features`` while ``lora_B`` writes its
    ``out_features``. With ``target_modules`` (a PEFT config's list), each name must match a module.

    Example: ``check_lora_fits(pipe.transformer, safetensors.torch.load_file("lora.safetensors"))``.
    """
    cls = type(transformer).__name__
    modules = dict(transformer.named_modules())
    if isinstance(target_modules, (list, tuple, set)):
        for target in target_modules:
            if not any(name == target or name.endswith("." + target) for name in modules):
                raise ValueError(
                    f"The LoRA config targets module {target!r}, which does not exist in {cls}. "
                    "This adapter was trained for another architecture; load it on the matching base model."
                )
    for key, tensor in state_dict.items():
        parsed = _lora_module_name(_strip_lora_prefix(key))
        if parsed is None or not key.endswith(".weight"):
            continue
        name, which = parsed
        if name not in modules:
            raise ValueError(
                f"LoRA weight {key!r} targets module {name!r}, which does not exist in {cls}. "
                "This LoRA was trained for another architecture; load it on the matching base model."
            )
        module = modules[name]
        base = getattr(module, "base_layer", module)  # a module that already carries LoRA layers
        weight = getattr(base, "weight", None)
        if weight is None or weight.ndim < 2:
            raise ValueError(
                f"LoRA weight {key!r} targets module {name!r} ({type(base).__name__}), which has no 2-d weight."
            )
        if which == "lora_A" and tensor.shape[1] != weight.shape[1]:
            raise ValueError(
                f"LoRA weight {key!r} has shape {tuple(tensor.shape)}: it reads {tensor.shape[1]} features, but module "
                f"{name!r} ({type(base).__name__}, weight {tuple(weight.shape)}) takes {weight.shape[1]}. "
                "The LoRA was trained for a base model of another size."
            )
        if which == "lora_B" and tensor.shape[0] != weight.shape[0]:
            raise ValueError(
                f"LoRA weight {key!r} has shape {tuple(tensor.shape)}: it writes {tensor.shape[0]} features, but module "
                f"{name!r} ({type(base).__name__}, weight {tuple(weight.shape)}) outputs {weight.shape[0]}. "
                "The LoRA was trained for a base model of another size."
            )


def load_peft_adapter(transformer: nn.Module, path: str | os.PathLike, adapter_name: str = "rlg") -> None:
    """Load a PEFT LoRA adapter directory into a diffusers transformer, in place.

    The directory holds ``adapter_config.json`` + ``adapter_model.safetensors`` (what
    ``PeftModel.save_pretrained`` writes; the format of Flow-GRPO and the public RLG release). The
    result is what ``PeftModel.from_pretrained(transformer, path)`` injects, without wrapping the
    transformer in a ``PeftModel``: it stays a diffusers model (``enable_lora``/``disable_lora`` work).

    Example: ``load_peft_adapter(pipe.transformer, "flow-grpo-lora/", adapter_name="rlg")``.
    """
    from peft import LoraConfig, PeftConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(path)
    peft_type = PeftConfig.from_pretrained(str(path)).peft_type
    if str(peft_type) not in ("LORA", "PeftType.LORA"):
        raise ValueError(f"{path} holds a {peft_type} adapter; RLG supports LoRA adapters only.")
    config = LoraConfig.from_pretrained(str(path))
    if config.use_dora:
        raise ValueError(f"{path} is a DoRA adapter; RLG supports plain LoRA only (DoRA is not linear in its scale).")
    weights = path / "adapter_model.safetensors"
    if weights.exists():
        state_dict = load_file(str(weights))
    elif (path / "adapter_model.bin").exists():
        state_dict = torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{path} has adapter_config.json but no adapter_model.safetensors (or .bin).")
    state_dict = {_strip_lora_prefix(k): v for k, v in state_dict.items()}
    check_lora_fits(transformer, state_dict, target_modules=config.target_modules)

    if adapter_name in getattr(transformer, "peft_config", {}):
        raise ValueError(f"The transformer already has an adapter named {adapter_name!r}; pick another adapter_name.")
    transformer.add_adapter(
        config, adapter_name=adapter_name
    )  # diffusers PeftAdapterMixin -> peft.inject_adapter_in_model
    result = set_peft_model_state_dict(transformer, state_dict, adapter_name=adapter_name)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    expected = {
        name
        for name, _ in transformer.named_parameters()
        if f".{adapter_name}." in name and ("lora_A" in name or "lora_B" in name)
    }
    loaded = {f"{k.rsplit('.', 1)[0]}.{adapter_name}.{k.rsplit('.', 1)[1]}" for k in state_dict if _lora_module_name(k)}
    missing = sorted(expected - loaded)
    if unexpected or missing:
        transformer.delete_adapters(adapter_name)
        if not getattr(transformer, "peft_config", None):
            transformer.unload_lora()
        raise ValueError(
            f"The adapter in {path} does not match its own config: "
            f"{len(missing)} LoRA weights missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})."
        )


def _tuner_layers(transformer: nn.Module, adapter_name: str) -> list[nn.Module]:
    """The PEFT LoRA layers of ``transformer`` that carry ``adapter_name``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [
        m for m in transformer.modules() if isinstance(m, BaseTunerLayer) and adapter_name in getattr(m, "lora_B", {})
    ]


class _LoRAGate:
    """Controls the LoRA branch of one adapter per forward pass, without replacing any module.

    Hooks installed once on the adapter's LoRA layers read two knobs (``None``: PEFT runs as loaded):

    - ``adapter_names``: one name per row of the batch, passed to every LoRA layer as PEFT's
      mixed-batch argument (what ``PeftModel.forward(..., adapter_names=...)`` does): rows named
      ``"__base__"`` get no LoRA (it is not computed for them), the other rows get the adapter.
      ``["__base__"] * n + [adapter] * n`` evaluates base and fine-tuned model in one pass, with the
      matmuls of the two separate passes; ``["__base__"] * n`` is the base model.
    - ``scale``: a 0-d tensor multiplying the adapter's ``lora_B`` output (``W + w * B A``: weight-space
      scaling of the LoRA, as a tensor so that changing w does not recompile under torch.compile).
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
        return output * self.scale.to(output.dtype)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def check_same_architecture(base: nn.Module, finetuned: nn.Module) -> None:
    """Raise a ``ValueError`` if ``finetuned`` is not the same architecture as ``base``.

    Same class, same architecture config (keys starting with ``_`` ignored) and same parameter shapes.
    Example: ``check_same_architecture(pipe.transformer, SD3Transformer2DModel.from_pretrained(path))``.
    """
    if type(finetuned) is not type(base):
        raise ValueError(
            f"The fine-tuned transformer is a {type(finetuned).__name__} but the base is a {type(base).__name__}; "
            "RLG mixes two versions of the same model: load a fine-tune of this base."
        )
    base_config, ft_config = getattr(base, "config", {}), getattr(finetuned, "config", {})
    keys = sorted({k for k in list(base_config) + list(ft_config) if not k.startswith("_")})
    as_list = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731  (JSON turns tuples into lists)
    diffs = [
        f"{k}: base={base_config.get(k)!r}, fine-tuned={ft_config.get(k)!r}"
        for k in keys
        if as_list(base_config.get(k)) != as_list(ft_config.get(k))
    ]
    if diffs:
        raise ValueError(
            f"The fine-tuned {type(base).__name__} has another architecture than the base ({'; '.join(diffs)}); "
            "load a fine-tune of this base."
        )
    ft_shapes = {k: v.shape for k, v in finetuned.state_dict().items()}
    for k, v in base.state_dict().items():
        if ".lora_" in k or ".base_layer." in k:
            continue
        if k in ft_shapes and ft_shapes[k] != v.shape:
            raise ValueError(
                f"Parameter {k!r} has shape {tuple(ft_shapes[k])} in the fine-tuned model, {tuple(v.shape)} in the base."
            )


# =============================================================================================
# 3. The model-level wrapper
# =============================================================================================
class RLGTransformer(nn.Module):
    """A flow transformer that returns the RLG velocity ``v_base + w * (v_ft - v_base)``.

    Drop it in as ``pipe.transformer`` of a stock diffusers flow pipeline (SD3 / SD3.5, FLUX, ...): it
    takes the wrapped transformer's forward arguments (``hidden_states``, ``encoder_hidden_states``,
    ``pooled_projections``, ``timestep``, ``img_ids``, ``joint_attention_kwargs``, ``return_dict``, ...)
    and exposes its ``config``, ``dtype``, ``device`` and other attributes.

    Args:
        transformer: the base transformer. For a LoRA fine-tune it carries the adapter
            ``adapter_name``: the base model is this same module with that adapter skipped (no second
            copy of the weights); it must be the only active adapter.
        finetuned: a full fine-tuned transformer of the same architecture, or ``None`` for a LoRA.
        adapter_name: the LoRA adapter that makes the fine-tuned model (LoRA only).
        mode: one of ``RLG_MODES`` (see the module docstring); ``"exact"`` by default.
        rlg_scale: the initial w (0-d float32 buffer; change it with :meth:`set_rlg_scale` or
            :meth:`follow_schedule`).

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
    ):
        super().__init__()
        self.base = transformer
        self.finetuned = finetuned
        self.adapter_name = adapter_name
        self.cfg_batch = False  # True when rows are [uncond; cond] halves (SD3 CFG); needed by shared_uncond
        self.register_buffer("rlg_scale", torch.tensor(0.0, dtype=torch.float32), persistent=False)
        self._gate: _LoRAGate | None = None
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
            layers = _tuner_layers(transformer, adapter_name)
            if not layers:
                loaded = sorted(getattr(transformer, "peft_config", {}) or {})
                raise ValueError(f"The transformer has no LoRA adapter named {adapter_name!r} (loaded: {loaded}).")
            self._lora_layers = layers
            self.check_lora_state()
            self._gate = _LoRAGate(layers, adapter_name)
        self.mode = mode
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
        if mode not in RLG_MODES:
            raise ValueError(f"Unknown RLG mode {mode!r}; choose one of {RLG_MODES}.")
        if mode in ("exact_batched", "lora_scaled") and self.adapter_name is None:
            raise ValueError(
                f"mode={mode!r} needs a LoRA fine-tune; with a full fine-tuned transformer use 'exact' or 'shared_uncond'."
            )
        self._mode = mode

    @property
    def resolved_mode(self) -> str:
        """The mode actually run: ``exact`` resolves to the fastest exact mode for this fine-tune."""
        if self._mode == "exact":
            return "exact_batched" if self.adapter_name is not None else "exact_two_pass"
        return self._mode

    @property
    def is_exact(self) -> bool:
        return self._mode not in APPROXIMATE_MODES

    def set_rlg_scale(self, rlg_scale: float | torch.Tensor) -> None:
        """Set w for the next forward calls (in place, no host sync for a tensor on the same device)."""
        if isinstance(rlg_scale, torch.Tensor):
            self.rlg_scale.copy_(rlg_scale.reshape(()))
            return
        w = float(rlg_scale)
        if not math.isfinite(w):
            raise ValueError(f"rlg_scale must be finite, got {w}; use a finite scale (e.g. 0 to 3).")
        self.rlg_scale.fill_(w)

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
        mode = self.resolved_mode
        n = hidden_states.shape[0]
        w = self.rlg_scale.to(hidden_states.device)
        # Inputs nested in containers (e.g. IP-adapter embeddings in joint_attention_kwargs) cannot be row-stacked.
        stackable = not any(_has_nested_tensor(v) for v in (*args, *kwargs.values()))

        if mode == "lora_scaled":
            # Approximate: f(W + w * BA) instead of f(W) + w * (f(W + BA) - f(W)); exact at w = 0 and 1.
            out = self._run(self.base, hidden_states, *args, scale=w, **kwargs)
        elif mode == "exact_batched" and stackable:
            # One pass on [x; x]: LoRA off for the first n rows (base), on for the last n (fine-tuned).
            rows = _stack_rows(self.unbatched_inputs, n, hidden_states, args, kwargs, 2)
            both = self._run(self.base, rows[0], *rows[1], lora_rows=(n, n), **rows[2])
            out = _mix(both[:n], both[n:], w)
        elif mode == "shared_uncond":
            if not self.cfg_batch or n % 2:
                raise RuntimeError(
                    "mode='shared_uncond' needs the CFG batch layout [uncond; cond] (set cfg_batch=True; the RLG "
                    "pipeline does it when guidance_scale > 1)."
                )
            m = n // 2
            cond = _slice_rows(self.unbatched_inputs, n, slice(m, n), hidden_states, args, kwargs)
            if self.adapter_name is not None and stackable:
                # One pass on [x_uncond; x_cond; x_cond], LoRA on for the last m rows only: 3 evaluations.
                rows = _concat_rows(self.unbatched_inputs, n, (hidden_states, args, kwargs), cond)
                out3 = self._run(self.base, rows[0], *rows[1], lora_rows=(n, m), **rows[2])
                v_base, v_ft_cond = out3[:n], out3[n:]
            else:
                v_base = self._eval_base(hidden_states, *args, **kwargs)
                v_ft_cond = self._eval_finetuned(cond[0], *cond[1], **cond[2])
            # uncond rows: base only; cond rows: the RLG mix
            out = torch.cat([v_base[:m], _mix(v_base[m:], v_ft_cond, w)], dim=0)
        else:  # exact_two_pass (or exact_batched with inputs that cannot be stacked)
            v_base = self._eval_base(hidden_states, *args, **kwargs)
            v_ft = self._eval_finetuned(hidden_states, *args, **kwargs)
            out = _mix(v_base, v_ft, w)

        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)

    def _run(
        self,
        model: nn.Module,
        *args: Any,
        lora_rows: tuple[int, int] | None = None,
        scale: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """One forward of ``model``. ``lora_rows=(k, m)``: k base rows then m fine-tuned rows; ``scale``: LoRA times w."""
        if self._gate is not None:
            names = None if lora_rows is None else ["__base__"] * lora_rows[0] + [self.adapter_name] * lora_rows[1]
            self._gate.set(adapter_names=names, scale=scale)
        try:
            return model(*args, return_dict=False, **kwargs)[0]
        finally:
            if self._gate is not None:
                self._gate.set()

    def _eval_base(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.finetuned is not None:
            return self._run(self.base, hidden_states, *args, **kwargs)
        # every row "__base__": the LoRA is not computed, the base model
        return self._run(self.base, hidden_states, *args, lora_rows=(hidden_states.shape[0], 0), **kwargs)

    def _eval_finetuned(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        model = self.finetuned if self.finetuned is not None else self.base
        return self._run(model, *args, **kwargs)

    # ---- per-step scales with any stock pipeline ------------------------------------------------------
    def follow_schedule(self, scheduler: Any, rlg_scale: RLGScale) -> torch.utils.hooks.RemovableHandle:
        """Set w at each sampling step from ``rlg_scale``, following ``scheduler``'s step index.

        Works with any stock pipeline whose scheduler exposes ``timesteps`` and ``step_index``
        (all diffusers flow-matching schedulers). At the first forward of a run, the schedule is
        resolved for all steps (errors come before any step is taken); at each later step w is
        written into the buffer. Returns a handle: call ``.remove()`` after sampling.

        Example::

            handle = rlg.follow_schedule(pipe.scheduler, linear_schedule(0.0, 2.0))
            image = pipe(prompt).images[0]
            handle.remove()
        """
        _check_finite_scale(rlg_scale)
        state: dict[str, Any] = {"scales": None, "step": None, "timesteps": None}

        def before_forward(module: nn.Module, args: Any, kwargs: Any) -> None:
            timesteps = scheduler.timesteps
            index = scheduler.step_index
            step = 0 if index is None else int(index)
            if state["scales"] is None or state["timesteps"] is not timesteps:  # a new sampling run
                state["scales"] = resolve_rlg_scales(rlg_scale, timesteps.tolist())
                state["timesteps"], state["step"] = timesteps, None
            if step != state["step"]:
                if step >= len(state["scales"]):
                    raise RuntimeError(f"Step {step} is beyond the {len(state['scales'])} steps of the RLG schedule.")
                self.set_rlg_scale(state["scales"][step])
                state["step"] = step

        return self.register_forward_pre_hook(before_forward, with_kwargs=True)


def _mix(v_base: torch.Tensor, v_ft: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``v_base + w * (v_ft - v_base)`` in float32, cast back (lerp: exact at w = 0 and w = 1)."""
    return torch.lerp(v_base.float(), v_ft.float(), w).to(v_base.dtype)


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


def _stack_rows(unbatched, n, hidden_states, args, kwargs, copies: int):
    return _map_rows(unbatched, n, lambda t: torch.cat([t] * copies, dim=0), hidden_states, args, kwargs)


def _slice_rows(unbatched, n, rows: slice, hidden_states, args, kwargs):
    return _map_rows(unbatched, n, lambda t: t[rows], hidden_states, args, kwargs)


def _concat_rows(unbatched, n, first, second):
    """Row-concatenate two input sets with the same structure (``first`` has n rows)."""
    h1, a1, k1 = first
    h2, a2, k2 = second
    args = tuple(
        torch.cat([x, y], 0) if _is_row_tensor(None, x, n, unbatched) else x for x, y in zip(a1, a2, strict=True)
    )
    kwargs = {k: torch.cat([v, k2[k]], 0) if _is_row_tensor(k, v, n, unbatched) else v for k, v in k1.items()}
    return torch.cat([h1, h2], 0), args, kwargs


# =============================================================================================
# 4. The pipeline
# =============================================================================================
def _detect_source(source: Any) -> tuple[str, Any]:
    """Classify a fine-tuned source: ('module', nn.Module) | ('peft', dir) | ('full', dir) | ('lora', path)."""
    if isinstance(source, nn.Module):
        return "module", source
    if isinstance(source, dict):
        return "lora", source
    path = Path(os.fspath(source))
    if not path.exists():
        if len(path.parts) == 2 and not str(source).startswith((".", "/")):  # "owner/name": a hub repo
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(str(source), allow_patterns=["*.json", "*.safetensors", "transformer/*"]))
        else:
            raise FileNotFoundError(
                f"Fine-tuned model {str(source)!r} not found (a path, hub id or module was expected)."
            )
    if path.is_file():
        return "lora", path
    if (path / "adapter_config.json").exists():
        return "peft", path
    if (path / "config.json").exists():
        return "full", path
    if (path / "model_index.json").exists() and (path / "transformer" / "config.json").exists():
        return "full", path / "transformer"
    if list(path.glob("*.safetensors")):
        return "lora", path
    raise ValueError(
        f"Cannot tell what {path} holds: expected a PEFT adapter (adapter_config.json), a diffusers LoRA "
        "(*.safetensors from save_lora_weights), or a transformer folder (config.json)."
    )


class RLGStableDiffusion3Pipeline(StableDiffusion3Pipeline):
    """``StableDiffusion3Pipeline`` (SD3 / SD3.5) with RLG between a base and a fine-tuned transformer.

    Build it like the stock pipeline (``from_pretrained(base, ...)`` or ``from_pipe(pipe)``), attach the
    fine-tuned model with :meth:`load_finetuned`, then call it with every stock argument plus
    ``rlg_scale``. It returns the stock ``StableDiffusion3PipelineOutput``. The sampling loop *is* the
    stock one: during the call ``self.transformer`` is an :class:`RLGTransformer`.

    Example::

        pipe = RLGStableDiffusion3Pipeline.from_pipe(stock_pipe)
        pipe.load_finetuned("flow-grpo-lora/")          # adapter_config.json + adapter_model.safetensors
        images = pipe(["a red circle"], rlg_scale=1.6, num_inference_steps=28, guidance_scale=4.5).images
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
        self.register_modules(finetuned_transformer=finetuned_transformer)
        self.rlg_transformer: RLGTransformer | None = None
        if finetuned_transformer is not None:  # e.g. a saved RLG pipeline with a full fine-tune
            self.rlg_transformer = RLGTransformer(transformer, finetuned=finetuned_transformer)

    # ---- attaching the fine-tuned model ------------------------------------------------------------
    def load_finetuned(
        self,
        source: str | os.PathLike | nn.Module | dict,
        adapter_name: str = "rlg",
        mode: RLGMode = "exact",
        **kwargs: Any,
    ) -> RLGTransformer:
        """Attach the fine-tuned model; the source type is detected.

        Args:
            source: one of
                (a) a diffusers LoRA: a ``.safetensors`` file / folder written by ``save_lora_weights``
                    (or its state dict); loaded like ``load_lora_weights`` loads its transformer part;
                (b) a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``), as
                    published by Flow-GRPO and the public RLG release;
                (c) a full fine-tuned transformer: a module, a transformer folder (``config.json``) or a
                    pipeline folder (its ``transformer/``).
                A hub id is downloaded first. For (a) and (b) the base model is the same transformer
                with the adapter skipped (no second copy of the weights).
            adapter_name: name of the LoRA adapter (a, b).
            mode: evaluation mode (see ``RLG_MODES``); can be overridden per call.
            kwargs: passed to ``lora_state_dict`` (a) or ``from_pretrained`` (c), e.g. ``weight_name``.

        Returns the :class:`RLGTransformer` (also ``self.rlg_transformer``).
        """
        if self.rlg_transformer is not None:
            raise RuntimeError("A fine-tuned model is already attached; call unload_finetuned() first.")
        kind, payload = _detect_source(source)
        transformer = self.transformer
        if kind in ("module", "full"):
            if kind == "full":
                config = json.loads((payload / "config.json").read_text())
                class_name = config.get("_class_name")
                if class_name not in (None, type(transformer).__name__):
                    raise ValueError(
                        f"{payload} holds a {class_name} but the base is a {type(transformer).__name__}; "
                        "RLG mixes two versions of the same model: load a fine-tune of this base."
                    )
                kwargs.setdefault("torch_dtype", transformer.dtype)
                payload = type(transformer).from_pretrained(str(payload), **kwargs).to(transformer.device)
            check_same_architecture(transformer, payload)
            self.register_modules(finetuned_transformer=payload)
            self.rlg_transformer = RLGTransformer(transformer, finetuned=payload, mode=mode)
            return self.rlg_transformer

        if kind == "peft":
            load_peft_adapter(transformer, payload, adapter_name=adapter_name)
        else:
            state_dict, metadata = self.lora_state_dict(
                payload if isinstance(payload, dict) else str(payload), return_lora_metadata=True, **kwargs
            )
            text_keys = [k for k in state_dict if k.startswith(("text_encoder", "te_", "lora_te"))]
            if text_keys:
                raise ValueError(
                    f"This LoRA also changes the text encoders ({len(text_keys)} weights, e.g. {text_keys[0]!r}); RLG "
                    "guides the transformer only. Save a LoRA of the transformer alone (transformer_lora_layers=...)."
                )
            check_lora_fits(transformer, state_dict)
            # What load_lora_weights does for the transformer part (the only part here).
            self.load_lora_into_transformer(
                state_dict, transformer=transformer, adapter_name=adapter_name, metadata=metadata, _pipeline=self
            )
        self.rlg_transformer = RLGTransformer(transformer, adapter_name=adapter_name, mode=mode)
        return self.rlg_transformer

    def unload_finetuned(self) -> None:
        """Detach the fine-tuned model (delete its LoRA adapter / drop the full transformer)."""
        rlg = self.rlg_transformer
        if rlg is None:
            return
        rlg.remove_hooks()
        if rlg.adapter_name is not None:
            self.transformer.delete_adapters(rlg.adapter_name)
            if not getattr(self.transformer, "peft_config", None):  # no adapter left: drop the empty LoRA wrappers too
                self.transformer.unload_lora()
        self.register_modules(finetuned_transformer=None)
        self.rlg_transformer = None

    # ---- sampling -----------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        *args: Any,
        rlg_scale: RLGScale = 1.0,
        rlg_mode: RLGMode | None = None,
        sampler: Literal["ode", "sde"] = "ode",
        sde_noise_level: float = 0.7,
        **kwargs: Any,
    ):
        """Stock ``StableDiffusion3Pipeline.__call__`` (every argument) plus RLG.

        Args:
            rlg_scale: w; a number, one value per step, a schedule (:func:`linear_schedule`,
                :func:`finetuned_first_schedule`) or a callable ``(step_index, timestep) -> float``.
            rlg_mode: evaluation mode for this call (default: the one given to ``load_finetuned``).
            sampler: ``"ode"`` (Euler, the stock scheduler) or ``"sde"`` (the Flow-GRPO SDE of
                ``flowalign.sampling.sde_step``; noise drawn from ``generator``).
            sde_noise_level: the SDE's ``a`` (Flow-GRPO uses 0.7).

        Returns the stock ``StableDiffusion3PipelineOutput`` (or a tuple with ``return_dict=False``).

        Example: ``pipe("a red circle", rlg_scale=[2.0] * 10 + [1.0] * 18, num_inference_steps=28)``.
        """
        rlg = self.rlg_transformer
        if rlg is None:
            raise RuntimeError(
                "No fine-tuned model attached: call pipe.load_finetuned(path_or_module) before sampling with RLG."
            )
        if sampler not in ("ode", "sde"):
            raise ValueError(f"sampler must be 'ode' or 'sde', got {sampler!r}.")
        _check_finite_scale(rlg_scale)
        mode = rlg.mode if rlg_mode is None else rlg_mode
        if mode == "shared_uncond" and kwargs.get("skip_guidance_layers") is not None:
            raise ValueError(
                "rlg_mode='shared_uncond' cannot be combined with skip_guidance_layers; use an exact mode."
            )
        rlg.check_lora_state()
        rlg.place_buffers(self._execution_device)

        scheduler = self.scheduler
        if sampler == "sde":
            from flowalign.pipelines.scheduling_flow_match_sde import FlowMatchSDEScheduler

            scheduler = FlowMatchSDEScheduler.from_scheduler(
                scheduler, sde_noise_level, generator=kwargs.get("generator")
            )

        def set_cfg_layout(module: nn.Module, args: Any, kw: Any) -> None:
            module.cfg_batch = self.do_classifier_free_guidance  # SD3 stacks [uncond; cond] when guidance_scale > 1

        saved_mode, rlg.mode = rlg.mode, mode
        handles = [
            rlg.register_forward_pre_hook(set_cfg_layout, with_kwargs=True),
            rlg.follow_schedule(scheduler, rlg_scale),
        ]
        base_transformer, base_scheduler = self.transformer, self.scheduler
        try:
            self.transformer, self.scheduler = rlg, scheduler
            return super().__call__(*args, **kwargs)
        finally:
            self.transformer, self.scheduler = base_transformer, base_scheduler
            rlg.mode = saved_mode
            for handle in handles:
                handle.remove()
