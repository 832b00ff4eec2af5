"""A weighted sum of rewards, optionally z-scored per reward over the batch.

    total_i = sum_k  w_k * norm(r_k)_i,    norm(r)_i = (r_i - mean_B(r)) / (std_B(r) + eps)   ("zscore")
                                                     = r_i                                    (None)

z-scoring puts rewards of different scales (PickScore ~20, HPS ~0.3, JPEG kB ~ tens) on one footing so
that the weights mean what they say. It is a statistic of the batch, so a mixture with
``normalize="zscore"`` scores the whole batch at once (its components still chunk internally).

Example::

    from flowalign.rewards import Mixture, load
    reward = Mixture([(load("pickscore"), 0.7), (load("aesthetic"), 0.3)], normalize="zscore")
    scores = reward(images, prompts)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from flowalign.rewards.base import Reward, RewardLike
from flowalign.rewards.registry import RewardSpec, as_reward, load, parse_reward_spec
from torch import Tensor, nn

NORMALIZATIONS = (None, "zscore")


def zscore(scores: Tensor, eps: float = 1e-6) -> Tensor:
    """``(r - mean) / (std + eps)`` over the batch (population std, so one image gives 0, not NaN)."""
    return (scores - scores.mean()) / (scores.std(unbiased=False) + eps)


def combine(
    scores: Mapping[str, Tensor] | Sequence[Tensor],
    weights: Sequence[float],
    normalize: str | None = None,
    eps: float = 1e-6,
) -> Tensor:
    """Weighted sum of per-reward scores ``[B]``; see the module docstring for the formula."""
    values = list(scores.values()) if isinstance(scores, Mapping) else list(scores)
    if len(values) != len(weights):
        raise ValueError(f"combine: {len(values)} score tensors but {len(weights)} weights.")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}; got {normalize!r}.")
    dtype = torch.promote_types(values[0].dtype, torch.float32)  # at least float32; float64 stays float64
    total = torch.zeros_like(values[0], dtype=dtype)
    for value, weight in zip(values, weights):
        value = value.to(dtype)
        total = total + weight * (zscore(value, eps) if normalize == "zscore" else value)
    return total


class Mixture(Reward):
    """Weighted mixture of rewards.

    Args:
        components: ``[(reward, weight), ...]`` or ``{reward: weight}``; a reward may be a
            :class:`Reward`, a registered name, or a plain callable ``f(images, prompts)``.
        normalize: ``None`` (raw scores) or ``"zscore"`` (per reward, over the batch).
        eps: added to the standard deviation in ``"zscore"``.

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
        self.rewards = nn.ModuleList(rewards)
        self.weights = weights
        self.normalize = normalize
        self.eps = eps
        self.names = _unique([reward.name for reward in rewards])
        self.differentiable = all(reward.differentiable for reward in rewards)
        self.requires_prompts = any(reward.requires_prompts for reward in rewards)
        self.name = "+".join(f"{w:g}*{n}" for n, w in zip(self.names, weights))

    def components(self, images: Tensor, prompts: Sequence[str] | str | None) -> dict[str, Tensor]:
        """Raw scores of every component, ``{name: Tensor[B]}`` (each checked by its own reward)."""
        return {name: reward(images, prompts) for name, reward in zip(self.names, self.rewards)}

    def score_chunk(self, images: Tensor, prompts: list[str]) -> Tensor:
        return combine(self.components(images, prompts), self.weights, self.normalize, self.eps)

    def extra_repr(self) -> str:
        return f"weights={self.weights}, normalize={self.normalize!r}"


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return out


def load_mixture(specs: Sequence[str | RewardSpec], normalize: str | None = None, **common: Any):
    """Load a :class:`Mixture` from spec strings (``common`` kwargs, e.g. ``batch_size``, go to every
    loader that the spec does not already configure).

    Example::

        mixture = load_mixture(["pickscore=0.7", "aesthetic=0.3"], normalize="zscore")
    """
    parsed = [parse_reward_spec(s) if isinstance(s, str) else s for s in specs]
    if not parsed:
        raise ValueError("load_mixture needs at least one reward spec.")
    return Mixture([(load(p.name, **{**common, **p.kwargs}), p.weight) for p in parsed], normalize=normalize)
