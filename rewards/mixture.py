"""A weighted sum of rewards, optionally z-scored per reward over the batch or with fixed statistics.

    total_i = sum_k  w_k * norm(r_k)_i,    norm(r)_i = (r_i - mean_B(r)) / (std_B(r) + eps)   ("zscore")
                                                     = (r_i - m_k) / s_k                      ("fixed")
                                                     = r_i                                    (None)

z-scoring puts rewards of different scales (PickScore ~20, HPS ~0.3, JPEG kB ~ tens) on one footing so
that the weights mean what they say. ``"zscore"`` is a statistic of the batch, so such a mixture scores
the whole batch at once (its components still chunk internally) and an image's score depends on its
batch-mates. ``"fixed"`` z-scores with constants ``stats = [(m_k, s_k), ...]`` measured once (e.g. on the
base model's samples), so the total is a fixed function of each image.

Example::

    from flowalign.rewards import Mixture, load
    reward = Mixture([(load("pickscore"), 0.7), (load("aesthetic"), 0.3)], normalize="zscore")
    scores = reward(images, prompts)
    fixed = Mixture([(load("redness"), 0.5), (load("jpeg_compressibility"), 0.5)], normalize="fixed",
                    stats=[(-0.01, 0.03), (-1.5, 0.2)])     # (mean, std) of each component
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from flowalign.rewards.base import Reward, RewardLike
from flowalign.rewards.registry import RewardSpec, as_reward, load, parse_reward_spec
from torch import Tensor, nn

NORMALIZATIONS = (None, "zscore", "fixed")


def zscore(scores: Tensor, eps: float = 1e-6) -> Tensor:
    """``(r - mean) / (std + eps)`` over the batch (population std, so one image gives 0, not NaN)."""
    return (scores - scores.mean()) / (scores.std(unbiased=False) + eps)


def check_stats(stats: Sequence[tuple[float, float]] | None, n: int) -> list[tuple[float, float]]:
    """``stats`` of ``normalize="fixed"`` as a list of ``n`` float pairs ``(mean, std)``, std finite and > 0."""
    if stats is None:
        raise ValueError(f'normalize="fixed" needs stats=[(mean, std), ...], one pair per reward ({n}).')
    pairs = [tuple(float(v) for v in pair) for pair in stats]
    if len(pairs) != n or any(len(pair) != 2 for pair in pairs):
        raise ValueError(f'normalize="fixed": stats must be {n} (mean, std) pairs, one per reward; got {list(stats)}.')
    for mean, std in pairs:
        if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
            raise ValueError(f'normalize="fixed": every (mean, std) needs a finite mean and a finite std > 0; '
                             f"got ({mean}, {std}).")
    return pairs


def combine(
    scores: Mapping[str, Tensor] | Sequence[Tensor],
    weights: Sequence[float],
    normalize: str | None = None,
    eps: float = 1e-6,
    stats: Sequence[tuple[float, float]] | None = None,
) -> Tensor:
    """Weighted sum of per-reward scores ``[B]``; see the module docstring for the formula (``stats``: the
    ``(mean, std)`` of every reward for ``normalize="fixed"``)."""
    values = list(scores.values()) if isinstance(scores, Mapping) else list(scores)
    if len(values) != len(weights):
        raise ValueError(f"combine: {len(values)} score tensors but {len(weights)} weights.")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}; got {normalize!r}.")
    pairs = check_stats(stats, len(values)) if normalize == "fixed" else [(0.0, 1.0)] * len(values)
    dtype = torch.promote_types(values[0].dtype, torch.float32)  # at least float32; float64 stays float64
    total = torch.zeros_like(values[0], dtype=dtype)
    for value, weight, (mean, std) in zip(values, weights, pairs):
        value = value.to(dtype)
        if normalize == "zscore":
            value = zscore(value, eps)
        elif normalize == "fixed":
            value = (value - mean) / std  # (r - m_k) / s_k
        total = total + weight * value
    return total


class Mixture(Reward):
    """Weighted mixture of rewards.

    Args:
        components: ``[(reward, weight), ...]`` or ``{reward: weight}``; a reward may be a
            :class:`Reward`, a registered name, or a plain callable ``f(images, prompts)``.
        normalize: ``None`` (raw scores), ``"zscore"`` (per reward, over the batch) or ``"fixed"`` (per reward,
            with the constants ``stats``).
        eps: added to the standard deviation in ``"zscore"``.
        stats: ``[(mean, std), ...]``, one pair per component, for ``"fixed"`` (std > 0).

    Attributes:
        names: one unique name per component (``"clipscore"``, ``"clipscore_2"``, ...).
        weights: the weights, in order.

    :meth:`components` returns the raw score of every component, e.g. to log them next to the total.
    """

    name = "mixture"

    def __init__(
        self,
        components: Sequence[tuple[RewardLike, float]] | Mapping[Any, float],
        normalize: str | None = None,
        eps: float = 1e-6,
        stats: Sequence[tuple[float, float]] | None = None,
    ):
        super().__init__(batch_size=None)  # z-scores are batch statistics: never split the batch here
        items = list(components.items()) if isinstance(components, Mapping) else list(components)
        if not items:
            raise ValueError("Mixture needs at least one (reward, weight) pair.")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}; got {normalize!r}.")
        rewards, weights = [], []
        for item in items:
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise TypeError(f"Mixture components are (reward, weight) pairs; got {item!r}.")
            reward, weight = item
            rewards.append(as_reward(reward))
            weights.append(float(weight))
        if stats is not None and normalize != "fixed":
            raise ValueError(f'Mixture: stats apply to normalize="fixed" only; got normalize={normalize!r}.')
        self.rewards = nn.ModuleList(rewards)
        self.weights = weights
        self.normalize = normalize
        self.eps = eps
        self.stats = check_stats(stats, len(rewards)) if normalize == "fixed" else None
        self.names = _unique([reward.name for reward in rewards])
        self.differentiable = all(reward.differentiable for reward in rewards)
        self.requires_prompts = any(reward.requires_prompts for reward in rewards)
        self.name = "+".join(f"{w:g}*{n}" for n, w in zip(self.names, weights))

    def components(self, images: Tensor, prompts: Sequence[str] | str | None) -> dict[str, Tensor]:
        """Raw scores of every component, ``{name: Tensor[B]}`` (each checked by its own reward)."""
        return {name: reward(images, prompts) for name, reward in zip(self.names, self.rewards)}

    def score_chunk(self, images: Tensor, prompts: list[str]) -> Tensor:
        return combine(self.components(images, prompts), self.weights, self.normalize, self.eps, self.stats)

    def extra_repr(self) -> str:
        stats = f", stats={self.stats}" if self.stats is not None else ""
        return f"weights={self.weights}, normalize={self.normalize!r}{stats}"


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return out


def load_mixture(specs: Sequence[str | RewardSpec], normalize: str | None = None,
                 stats: Sequence[tuple[float, float]] | None = None, **common: Any):
    """Load a :class:`Mixture` from spec strings (``common`` kwargs, e.g. ``batch_size``, go to every
    loader that the spec does not already configure; ``stats`` are those of ``normalize="fixed"``).

    Example::

        mixture = load_mixture(["pickscore=0.7", "aesthetic=0.3"], normalize="zscore")
    """
    parsed = [parse_reward_spec(s) if isinstance(s, str) else s for s in specs]
    if not parsed:
        raise ValueError("load_mixture needs at least one reward spec.")
    return Mixture([(load(p.name, **{**common, **p.kwargs}), p.weight) for p in parsed], normalize=normalize,
                   stats=stats)
