"""Prompt sources: the training prompts a trainer draws from, their sampling weights, and held-out prompts.

A :class:`PromptSource` is plain data (a list of prompts, optional weights, an optional held-out generator),
so the trainer never needs to know which world the prompts come from. :func:`load_prompts` builds one from
what a config holds: a registered name (``BUILTIN_SOURCES``: ``"shapes"``, the embedded tiny world, and
``"shapes_nocolor"``, its prompts that name no colour; resolved by import path so that no module imports the
shapes world unless it is used), a text file (one prompt a line, ``#`` comments), or a list of prompts.

A source may also carry per-group read-outs of the held-out images (``group_readouts``,
``{name: fn(images, groups) -> {group: value}}``, a group being the images of one held-out prompt):
``shapes_nocolor`` reads out the entropy of the colours the model picks
(:func:`flowalign.shapes_eval.colour_entropy_per_group`), the diversity that a reward favouring one colour erodes.

Example::

    from flowalign.prompts import PromptSource, load_prompts

    source = load_prompts("samples/prompts/drawbench_mini.txt")
    source.train[:2], source.heldout_prompts(4, seed=0)      # held out: the first 4 (no other split given)
    custom = PromptSource(["a cat", "a dog"], weights=[0.9, 0.1])
    load_prompts("shapes_nocolor").group_readouts     # {"colour_entropy": colour_entropy_per_group}
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

# name -> "module:function" returning a PromptSource (imported only when the name is used)
BUILTIN_SOURCES = {
    "shapes": "flowalign.shapes:prompt_source",
    "shapes_nocolor": "flowalign.shapes_eval:nocolor_prompt_source",
}

GroupReadout = Callable[[torch.Tensor, Sequence[int]], dict[int, float]]
"""``fn(images [N, 3, H, W] in [0, 1], groups [N]) -> {group: value}``: one value per group of held-out images."""


@dataclass
class PromptSource:
    """Training prompts, their sampling weights (None = uniform), a held-out generator ``(n, seed) -> list``
    (None = the first ``n`` training prompts), the unseen rewards a training run scores its held-out images
    with by default (rewards that read these prompts; the default reads any prompt) and per-group read-outs of
    the held-out images (``{name: fn(images, groups) -> {group: value}}``, :data:`GroupReadout`; none by default)."""

    train: list[str]
    weights: Sequence[float] | None = None
    heldout: Callable[[int, int], list[str]] | None = None
    unseen_rewards: list[str] = field(default_factory=lambda: ["jpeg_compressibility"])
    group_readouts: dict[str, GroupReadout] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.train = list(self.train)
        if not self.train:
            raise ValueError("PromptSource needs at least one training prompt.")
        if self.weights is not None and len(self.weights) != len(self.train):
            raise ValueError(f"PromptSource: {len(self.weights)} weights for {len(self.train)} prompts; give one "
                             "weight per prompt, or weights=None for uniform sampling.")
        self.group_readouts = dict(self.group_readouts)
        for name, fn in self.group_readouts.items():
            if not callable(fn):
                raise TypeError(f"PromptSource.group_readouts[{name!r}] is a {type(fn).__name__}, not a function "
                                "fn(images, groups) -> {group: value}.")

    def sampling_weights(self) -> torch.Tensor:
        """The probability of each training prompt (float64, sums to 1)."""
        if self.weights is None:
            return torch.full((len(self.train),), 1.0 / len(self.train), dtype=torch.float64)
        w = torch.as_tensor(list(self.weights), dtype=torch.float64)
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ValueError(f"PromptSource weights must be finite, >= 0 and not all 0; got {list(self.weights)[:8]}.")
        return w / w.sum()

    def heldout_prompts(self, n: int, seed: int = 0) -> list[str]:
        """``n`` held-out prompts (the same for the same ``seed``)."""
        return self.heldout(n, seed) if self.heldout is not None else self.train[:n]


def read_prompt_file(path: str | Path) -> list[str]:
    """The prompts of a text file: one a line, blank lines and ``#`` comments skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No prompt file {str(path)!r}. Give a text file with one prompt a line, or one of "
                                f"the registered prompt sources {sorted(BUILTIN_SOURCES)}.")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"The prompt file {path} has no prompts.")
    return prompts


def load_prompts(spec: str | Path | Sequence[str] | PromptSource) -> PromptSource:
    """A :class:`PromptSource` from a registered name, a prompt file, a list of prompts, or a source itself."""
    if isinstance(spec, PromptSource):
        return spec
    if isinstance(spec, (list, tuple)):
        return PromptSource(list(spec))
    if str(spec) in BUILTIN_SOURCES:
        module, _, function = BUILTIN_SOURCES[str(spec)].partition(":")
        return getattr(importlib.import_module(module), function)()
    return PromptSource(read_prompt_file(spec))
