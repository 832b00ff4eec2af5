"""Schedules of the RLG scale w over the sampling steps, and THE validation of every w.

A scale (``rlg_scale``) is a number (w at every step), a sequence with one value per step, an
:class:`RLGSchedule` (``constant_schedule``, ``linear_schedule``, ``finetuned_first_schedule``) or a
callable ``f(step_index, timestep) -> float``. :func:`resolve_rlg_scales` turns any of them into one
finite float per step: the RLG pipeline calls it once per call, when the timesteps exist and before the
first model evaluation, and uses the floats as they are from then on. :func:`check_rlg_scale` and
:func:`check_rlg_sweep` check what can be checked without the timesteps (command lines, benchmarks).

Example::

    from flowalign.pipelines import linear_schedule, resolve_rlg_scales

    resolve_rlg_scales(linear_schedule(0.0, 2.0), [1000.0, 750.0, 500.0])   # [0.0, 1.0, 2.0]
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch

__all__ = [
    "ConstantSchedule",
    "FinetunedFirstSchedule",
    "LinearSchedule",
    "RLGScale",
    "RLGSchedule",
    "check_rlg_scale",
    "check_rlg_sweep",
    "constant_schedule",
    "finetuned_first_schedule",
    "linear_schedule",
    "resolve_rlg_scales",
]


class RLGSchedule:
    """Base class of schedules: w for every step of one sampling run.

    Subclasses implement ``scales(timesteps) -> list[float]`` with exactly one finite value per
    timestep, where ``timesteps`` are the scheduler's timesteps of the run (SD3: ``1000 * sigma``, from
    ~1000 down to ~0). The pipeline checks the count and the values before the first step.
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
    before guiding (those steps cost what the stock pipeline costs: only the fine-tuned model runs).
    """

    num_steps: int
    scale: float

    def __post_init__(self):
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, numbers.Integral) or self.num_steps < 0:
            raise ValueError(f"FinetunedFirstSchedule.num_steps must be an integer >= 0, got {self.num_steps!r}.")

    def scales(self, timesteps: Sequence[float]) -> list[float]:
        return [1.0 if i < self.num_steps else float(self.scale) for i in range(len(timesteps))]


def constant_schedule(scale: float) -> ConstantSchedule:
    """w = ``scale`` at every step. Example: ``pipe(prompt, rlg_scale=constant_schedule(1.6))``."""
    return ConstantSchedule(_as_scale(scale, "constant_schedule(scale)"))


def linear_schedule(start: float, end: float) -> LinearSchedule:
    """w ramps linearly from ``start`` (first step) to ``end`` (last step).

    Example: ``pipe(prompt, rlg_scale=linear_schedule(0.0, 2.0))``.
    """
    return LinearSchedule(_as_scale(start, "linear_schedule(start)"), _as_scale(end, "linear_schedule(end)"))


def finetuned_first_schedule(num_steps: int, scale: float) -> FinetunedFirstSchedule:
    """w = 1 (fine-tuned model only) for the first ``num_steps`` steps, then ``scale``.

    Example: ``pipe(prompt, rlg_scale=finetuned_first_schedule(5, 1.6))``.
    """
    return FinetunedFirstSchedule(num_steps, _as_scale(scale, "finetuned_first_schedule(scale)"))


RLGScale = Union[float, Sequence[float], Callable[[int, float], float], RLGSchedule]


def _as_scale(value: Any, where: str) -> float:
    """THE check of one w value (every other check calls it): a real number, finite. Returns it as a float."""
    if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 0:
        value = value.item()
    if isinstance(value, (bool, str, bytes)) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{where} must be a real number, got {value!r} ({type(value).__name__}); use a finite scale such as 1.5."
        )
    w = float(value)
    if not math.isfinite(w):
        raise ValueError(f"{where} must be finite, got {w}; use a finite scale (e.g. 0 to 3).")
    return w


def _scale_kind(rlg_scale: Any) -> str:
    """``'number' | 'schedule' | 'callable' | 'sequence'``; a ``TypeError`` naming the value otherwise."""
    if isinstance(rlg_scale, (bool, str, bytes)) or rlg_scale is None:
        raise TypeError(
            f"rlg_scale must be a number, a per-step sequence, an RLGSchedule or a callable "
            f"(step_index, timestep) -> float; got {rlg_scale!r}."
        )
    if isinstance(rlg_scale, numbers.Real) or (isinstance(rlg_scale, torch.Tensor) and rlg_scale.ndim == 0):
        return "number"
    if isinstance(rlg_scale, RLGSchedule):
        return "schedule"
    if callable(rlg_scale):
        return "callable"
    if isinstance(rlg_scale, (Sequence, torch.Tensor)) or hasattr(rlg_scale, "__len__"):
        return "sequence"
    raise TypeError(
        f"rlg_scale must be a number, a per-step sequence, an RLGSchedule or a callable "
        f"(step_index, timestep) -> float; got {type(rlg_scale).__name__}."
    )


def _check_count(values: Any, num_steps: int, source: str) -> list:
    """THE check of a per-step list's length: exactly one value per sampling step."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise TypeError(f"{source} must give a list of numbers (one per sampling step), got {values!r}.")
    values = list(values)
    if len(values) != num_steps:
        raise ValueError(
            f"{source} has {len(values)} values but this run has {num_steps} sampling steps; give exactly one value "
            "per step (or a number, a schedule such as linear_schedule(0, 2), or a callable)."
        )
    return values


def check_rlg_scale(rlg_scale: RLGScale, num_steps: int | None = None) -> None:
    """Check an ``rlg_scale`` before sampling: its type, its values and (with ``num_steps``) its length.

    Schedules and callables are checked where their values exist, in :func:`resolve_rlg_scales` (the
    RLG pipeline calls it before the first denoising step).

    >>> check_rlg_scale([1.0, float("nan")])
    Traceback (most recent call last):
    ...
    ValueError: rlg_scale[1] must be finite, got nan; use a finite scale (e.g. 0 to 3).
    """
    kind = _scale_kind(rlg_scale)
    if kind == "number":
        _as_scale(rlg_scale, "rlg_scale")
    elif kind == "sequence":
        values = list(rlg_scale)
        for i, w in enumerate(values):
            _as_scale(w, f"rlg_scale[{i}]")
        if num_steps is not None:
            _check_count(values, num_steps, "rlg_scale")


def check_rlg_sweep(rlg_sweep: Sequence[RLGScale], num_steps: int | None = None) -> list[RLGScale]:
    """Check a sweep (a non-empty list of scales, each anything ``rlg_scale`` accepts); returns it as a list.

    >>> check_rlg_sweep([0, 0.5, 1])
    [0, 0.5, 1]
    """
    entries = _sweep_entries(rlg_sweep)
    for k, entry in enumerate(entries):
        try:
            check_rlg_scale(entry, num_steps)
        except (TypeError, ValueError) as error:
            raise type(error)(f"rlg_sweep[{k}]: {error}") from None
    return entries


def _sweep_entries(rlg_sweep: Any) -> list:
    """THE check of a sweep's form (a non-empty list; its entries are scales, checked where they are resolved)."""
    if isinstance(rlg_sweep, (str, bytes, numbers.Real, RLGSchedule)) or callable(rlg_sweep) or rlg_sweep is None:
        raise TypeError(
            f"rlg_sweep must be a list of scales (e.g. [0, 0.5, 1, 1.5, 2]), got {rlg_sweep!r}; for a single scale "
            "or per-step values use rlg_scale."
        )
    entries = list(rlg_sweep)
    if not entries:
        raise ValueError("rlg_sweep is empty; give at least one scale, e.g. rlg_sweep=[0, 1, 2].")
    return entries


def resolve_rlg_scales(rlg_scale: RLGScale, timesteps: Sequence[float]) -> list[float]:
    """Turn any accepted ``rlg_scale`` into one finite float per sampling step.

    Accepted: a number (constant), a sequence with one value per step, an :class:`RLGSchedule`
    (``scales(timesteps)`` must return one value per timestep), or a callable
    ``f(step_index, timestep) -> float`` (``timestep`` as the scheduler gives it, a float in
    [0, 1000] for SD3). Wrong counts, non-numeric and non-finite values raise, naming the value.

    >>> resolve_rlg_scales(1.5, [1000.0, 500.0])
    [1.5, 1.5]
    >>> resolve_rlg_scales(lambda i, t: t / 1000, [1000.0, 500.0])
    [1.0, 0.5]
    """
    timesteps = [float(t) for t in timesteps]
    n = len(timesteps)
    kind = _scale_kind(rlg_scale)
    if kind == "number":
        return [_as_scale(rlg_scale, "rlg_scale")] * n
    if kind == "schedule":
        name = f"{type(rlg_scale).__name__}.scales()"
        values = _check_count(rlg_scale.scales(timesteps), n, name)
        return [_as_scale(w, f"{name}[{i}]") for i, w in enumerate(values)]
    if kind == "callable":
        return [_as_scale(rlg_scale(i, t), f"rlg_scale({i}, {t:g}) (the callable's value at step {i})") for i, t in enumerate(timesteps)]
    values = _check_count(rlg_scale, n, "rlg_scale")
    return [_as_scale(w, f"rlg_scale[{i}]") for i, w in enumerate(values)]
