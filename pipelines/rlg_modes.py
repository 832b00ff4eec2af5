"""The RLG evaluation modes: how one forward of ``RLGTransformer`` obtains ``v_base + w (v_ft - v_base)``.

Each mode is a small strategy, an :class:`EvaluationMode` in :data:`MODES`, and :func:`get_rlg_mode` is the one
check of a mode name (the pipeline's ``load_finetuned(mode=)`` and ``rlg_mode=``, ``RLGTransformer.mode``, the
command lines). A strategy decides two things for a forward of n rows whose w is known per row:

- :meth:`EvaluationMode.plan`: which rows need ``v_base`` (w != 1), which need ``v_ft`` (w != 0), and w per row;
- :meth:`EvaluationMode.velocity`: how the two models are run on those rows (by ``RLGTransformer``'s primitives:
  ``mixed_velocity`` evaluates the base and fine-tuned rows, in one forward or two, and mixes them;
  ``lora_scaled_velocity`` runs one forward with the LoRA scaled by w).

Model evaluations per step with CFG at 0 < w != 1 (2 at w = 0 or 1, every mode):

==================  =====  ====  ======================================================================
mode                exact  eval  how
==================  =====  ====  ======================================================================
``exact``           yes    4     the fastest exact mode available (by measurement, ``flowalign bench rlg``):
                                 ``exact_batched`` for a LoRA fine-tune, ``exact_two_pass`` for a full one
``exact_batched``   yes    4     LoRA only: ONE forward on the rows of both models; the LoRA branch is
                                 computed for the fine-tuned rows only, with PEFT's mixed-batch
                                 ``adapter_names`` (``"__base__"`` rows)
``exact_two_pass``  yes    4     one forward per model: base rows, then fine-tuned rows
``lora_scaled``     no     2     LoRA only: ONE forward of the base with the LoRA scaled by w
                                 (``W + w * B A``); exact at w = 0 and w = 1 only
``shared_uncond``   no     3     the unconditional CFG half uses the base model only:
                                 ``v = v_base(u) + g * (v_rlg(c) - v_base(u))``; needs the CFG batch layout
                                 ``[uncond; cond]`` (``cfg_batch=True``, set by the RLG pipeline)
==================  =====  ====  ======================================================================

Example::

    from flowalign.pipelines.rlg_modes import get_rlg_mode

    mode = get_rlg_mode("exact", lora=True).resolve(lora=True)
    mode.name, mode.exact, mode.evaluations                 # ('exact_batched', True, 4)
    get_rlg_mode("lora_scaled", lora=False)                 # ValueError: needs a LoRA fine-tune
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

__all__ = ["MODES", "RLG_MODES", "EvaluationMode", "RLGMode", "RowPlan", "get_rlg_mode"]

RLGMode = Literal["exact", "exact_batched", "exact_two_pass", "lora_scaled", "shared_uncond"]


class RowPlan(NamedTuple):
    """The rows of one forward each model is run on, and w per row.

    ``scales``: w of each row on the host, or ``None`` when w is the transformer's tensor (not read on the
    host): then it applies to ``finetuned_rows`` and the other rows get w = 0 (the base model).
    """

    scales: list[float] | None
    base_rows: list[int]
    finetuned_rows: list[int]


@dataclass(frozen=True)
class EvaluationMode:
    """One evaluation mode: the exact two-model evaluation, run in one forward (``one_pass``) or two.

    Attributes:
        name: the mode's name (``rlg_mode=``).
        exact: whether the velocity is ``v_base + w (v_ft - v_base)`` exactly at every w.
        evaluations: model evaluations per step with CFG at 0 < w != 1.
        lora_only: the mode needs a LoRA fine-tune (a full fine-tuned transformer has no LoRA to gate).
        one_pass: a LoRA's base rows and fine-tuned rows go through ONE forward (PEFT's mixed batch).
    """

    name: str
    exact: bool
    evaluations: int
    lora_only: bool = False
    one_pass: bool = False

    def resolve(self, lora: bool) -> EvaluationMode:
        """The mode actually run for a LoRA (``lora=True``) or a full fine-tune."""
        return self

    def check_call(self, guidance_scale: float, skip_guidance_layers: Any) -> None:
        """Raise if a pipeline call's guidance settings do not fit the mode (nothing to check here)."""

    def plan(self, n: int, scales: list[float] | None, cfg_batch: bool) -> RowPlan:
        """Rows that need v_base (w != 1) and v_ft (w != 0); a tensor w (``scales=None``): both models on every row."""
        if scales is None:
            rows = list(range(n))
            return RowPlan(None, rows, rows)
        base_rows = [r for r, w in enumerate(scales) if w != 1.0]
        finetuned_rows = [r for r, w in enumerate(scales) if w != 0.0]
        return RowPlan(scales, base_rows, finetuned_rows)

    def velocity(self, model: Any, inputs: tuple, n: int, stackable: bool, scales: list[float] | None):
        """``v_base + w (v_ft - v_base)`` for the n rows of ``inputs`` (``model``: the ``RLGTransformer``)."""
        return model.mixed_velocity(inputs, n, stackable, self.plan(n, scales, model.cfg_batch), self.one_pass)


@dataclass(frozen=True)
class FastestExact(EvaluationMode):
    """``exact``: ``exact_batched`` for a LoRA, ``exact_two_pass`` for a full fine-tune."""

    def resolve(self, lora: bool) -> EvaluationMode:
        return MODES["exact_batched" if lora else "exact_two_pass"]


@dataclass(frozen=True)
class LoRAScaled(EvaluationMode):
    """``lora_scaled``: ``f(W + w * BA)`` instead of ``f(W) + w * (f(W + BA) - f(W))``; exact at w = 0 and 1."""

    def velocity(self, model: Any, inputs: tuple, n: int, stackable: bool, scales: list[float] | None):
        plan = self.plan(n, scales, model.cfg_batch)
        if plan.base_rows and plan.finetuned_rows:  # some 0 < w != 1: one forward, the LoRA scaled by w
            return model.lora_scaled_velocity(inputs, n, plan)
        return model.mixed_velocity(inputs, n, stackable, plan, one_pass=False)  # w = 0 or 1 everywhere: one model


@dataclass(frozen=True)
class SharedUncond(EvaluationMode):
    """``shared_uncond``: the unconditional half of a ``[uncond; cond]`` CFG batch runs the base model only."""

    def check_call(self, guidance_scale: float, skip_guidance_layers: Any) -> None:
        if skip_guidance_layers is not None:
            raise ValueError("rlg_mode='shared_uncond' cannot be combined with skip_guidance_layers; use an exact mode.")
        if not guidance_scale > 1:
            raise ValueError(
                f"rlg_mode='shared_uncond' shares the unconditional CFG branch, but guidance_scale={guidance_scale} "
                "turns CFG off; use guidance_scale > 1 or an exact mode."
            )

    def plan(self, n: int, scales: list[float] | None, cfg_batch: bool) -> RowPlan:
        if not cfg_batch or n % 2:
            raise RuntimeError(
                "mode='shared_uncond' needs the CFG batch layout [uncond; cond] (set cfg_batch=True; the RLG "
                "pipeline does it when guidance_scale > 1)."
            )
        m = n // 2
        if scales is None:  # the tensor w on the conditional rows, the base model alone on the unconditional ones
            return RowPlan(None, list(range(n)), list(range(m, n)))
        return super().plan(n, [0.0] * m + list(scales[m:]), cfg_batch)  # unconditional rows: w = 0


MODES: dict[str, EvaluationMode] = {
    "exact": FastestExact("exact", exact=True, evaluations=4),
    "exact_batched": EvaluationMode("exact_batched", exact=True, evaluations=4, lora_only=True, one_pass=True),
    "exact_two_pass": EvaluationMode("exact_two_pass", exact=True, evaluations=4),
    "lora_scaled": LoRAScaled("lora_scaled", exact=False, evaluations=2, lora_only=True),
    "shared_uncond": SharedUncond("shared_uncond", exact=False, evaluations=3, one_pass=True),
}
RLG_MODES: tuple[str, ...] = tuple(MODES)


def get_rlg_mode(
    name: str,
    *,
    lora: bool | None = None,
    guidance_scale: float | None = None,
    skip_guidance_layers: Any = None,
    argument: str = "mode",
) -> EvaluationMode:
    """THE check of an RLG mode: its name, that it fits the fine-tune and (given ``guidance_scale``) the call.

    Args:
        name: one of :data:`RLG_MODES`.
        lora: whether the fine-tune is a LoRA (``False``: a full fine-tuned transformer; ``None``: not known yet).
        guidance_scale, skip_guidance_layers: the pipeline call's, checked when ``guidance_scale`` is given.
        argument: the argument's name in error messages (``"mode"``, ``"rlg_mode"``).

    Returns the mode (``exact`` unresolved: :meth:`EvaluationMode.resolve` picks the mode that runs).

    Example: ``get_rlg_mode("shared_uncond", lora=False, guidance_scale=4.5).evaluations`` is 3.
    """
    if not isinstance(name, str) or name not in MODES:
        raise ValueError(f"Unknown RLG mode {name!r}; choose one of {RLG_MODES}.")
    mode = MODES[name]
    if lora is False and mode.lora_only:
        raise ValueError(
            f"{argument}={name!r} needs a LoRA fine-tune; with a full fine-tuned transformer use 'exact' or "
            "'shared_uncond'."
        )
    if guidance_scale is not None:
        mode.check_call(guidance_scale, skip_guidance_layers)
    return mode
