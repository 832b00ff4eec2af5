"""Held-out evaluation measures shared by the trainer, the frontier bench and the probe (pure functions).

- :func:`diversity` and :func:`eval_features`: the trainer's image diversity and the W2 feature space
  (moved here from ``flowalign.trainer`` unchanged, so its numbers do not change).
- :func:`w2_distance`: the exact W2 between two feature sets (POT), re-exported from
  :mod:`flowalign.objectives`.
- :func:`sde_path_kl`: the KL of a fine-tuned SDE sampler to a reference sampler along the fine-tuned
  sampler's own trajectory, in nats per image: the project's one regulariser unit.
- :func:`paired_difference` and :func:`mean_se`: a paired mean difference with its standard error, and a
  mean with its standard error over seeds.

Conventions (``docs/algorithms.md``): noise level ``s`` from 1 (noise) to 0 (data); the SDE step
(:func:`flowalign.sampling.sde_step`) with noise level ``a`` has ``mean = c_x x + c_v v`` and
``std = sigma_t sqrt(-dt)``, ``sigma_t = a sqrt(s / (1 - s))``. Two models' step kernels at the same state
``x`` share the std, so ``KL = ||mean_ft - mean_ref||^2 / (2 std^2) = c_v^2 ||v_ft - v_ref||^2 / (2 std^2)``
summed over the latent dimensions; an image's KL is the sum over its SDE steps.

Example::

    from flowalign.eval import mean_se, paired_difference, sde_path_kl
    from flowalign.sampling import flow_sigmas

    sigmas = flow_sigmas(pipe.scheduler, 16)
    kl = sde_path_kl(v_finetuned, v_base, noise, sigmas, noise_level=0.7, sde_steps=4,
                     generator=torch.Generator().manual_seed(0))      # [B] nats per image
    gain, se = paired_difference(rewards_finetuned, rewards_base)       # same prompts and noises
    mean, se_over_seeds = mean_se([0.12, 0.08, 0.10])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Callable

import numpy as np
import torch

from flowalign.objectives import gaussian_kl_to_reference, w2_distance
from flowalign.sampling import sample_latents, sde_step

__all__ = ["diversity", "diversity_per_group", "eval_features", "mean_se", "paired_difference", "sde_path_kl", "w2_distance"]


def diversity(images: torch.Tensor, groups: list[int]) -> float:
    """Mean pairwise RMS pixel distance between images of the same prompt, averaged over prompts."""
    values = list(diversity_per_group(images, groups).values())
    return float(sum(values) / len(values)) if values else float("nan")


def diversity_per_group(images: torch.Tensor, groups: list[int]) -> dict[int, float]:
    """``{group: mean pairwise RMS pixel distance between its images}`` for every group of two or more images (the
    terms :func:`diversity` averages; a sharded evaluation gathers them)."""
    feats = images.flatten(1).float()
    values = {}
    for g in sorted(set(groups)):
        idx = [i for i, x in enumerate(groups) if x == g]
        if len(idx) < 2:
            continue
        d = torch.cdist(feats[idx], feats[idx]) / math.sqrt(feats.shape[1])
        n = len(idx)
        values[g] = d.sum().item() / (n * (n - 1))
    return values


def eval_features(images: torch.Tensor) -> torch.Tensor:
    """The fixed feature space of the W2 evaluation: images average-pooled to 8x8, flattened."""
    return torch.nn.functional.adaptive_avg_pool2d(images.float(), 8).flatten(1)


Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def sde_path_kl(
    velocity: Velocity,
    ref_velocity: Velocity,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    noise_level: float,
    generator: torch.Generator | list[torch.Generator] | None = None,
    sde_steps: int | None = None,
    step_noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-image KL (nats) of the SDE sampler of ``velocity`` to that of ``ref_velocity``, on ``velocity``'s paths.

    Samples with :func:`flowalign.sampling.sample_latents` (``sampler="sde"``, so the trajectory is exactly the
    one a rollout with the same ``noise``, ``generator`` and ``sde_steps`` draws) and at each SDE step ``k``
    (the first ``sde_steps``, default all) adds the exact Gaussian KL between the two step kernels at the
    policy's own state ``x_k``::

        KL_k = sum_d (mean_ft - mean_ref)_d^2 / (2 std_k^2),   mean = c_x x_k + c_v v(x_k, s_k)

    The Euler steps after the window are deterministic under both models and add nothing. The sum over steps
    is the KL between the two path measures, ``E_ft[log p_ft(path) / p_ref(path)]`` estimated on one path.

    Args:
        velocity: the fine-tuned policy's guided field ``velocity(x, s) -> v`` with ``s`` a [B] tensor of noise
            levels (as ``sample_latents`` passes it).
        ref_velocity: the reference (base) model's field, same signature; evaluated only at the SDE steps.
        noise: starting latents ``x_1`` [B, ...] at ``sigmas[0]``.
        sigmas: the sampling grid [N + 1] (``flowalign.sampling.flow_sigmas``).
        noise_level: the SDE noise level ``a`` (> 0: at ``a = 0`` the steps have no density and no KL).
        generator: the SDE noise's generator(s).
        sde_steps: how many of the first steps inject noise (None = every step).
        step_noise: the SDE draws given up front instead of ``generator`` (``flowalign.sampling.draw_step_noise``).

    Returns:
        ``[B]`` float32, the KL of each image in nats.

    Example: ``sde_path_kl(v, v, noise, sigmas, 0.7)`` is all zeros (identical fields).
    """
    if not noise_level > 0:
        raise ValueError(f"sde_path_kl needs noise_level > 0 (the SDE step's density), got {noise_level}; with "
                         "a = 0 the sampler is the deterministic Euler ODE and the per-step KL is undefined.")
    n_steps = sigmas.shape[0] - 1
    window = n_steps if sde_steps is None else min(int(sde_steps), n_steps)
    ref_velocities: list[torch.Tensor] = []

    def field(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        if len(ref_velocities) < window:  # the reference at the same state x_k, only where the step is noisy
            ref_velocities.append(ref_velocity(x, s).float())
        return velocity(x, s)

    out = sample_latents(field, noise, sigmas, sampler="sde", noise_level=noise_level, generator=generator,
                         return_trajectory=True, return_velocities=True, sde_steps=sde_steps, step_noise=step_noise)
    kl = torch.zeros(noise.shape[0], dtype=torch.float32, device=noise.device)
    for k in range(window):
        x, x_next = out.trajectory[:, k], out.trajectory[:, k + 1]
        # mean = c_x x + c_v v, std = sigma_t sqrt(-dt): the same std under both models at the same x
        _, _, mean, std = sde_step(x, out.velocities[:, k], sigmas[k], sigmas[k + 1], noise_level, prev_sample=x_next)
        _, _, ref_mean, _ = sde_step(x, ref_velocities[k], sigmas[k], sigmas[k + 1], noise_level, prev_sample=x_next)
        kl = kl + gaussian_kl_to_reference(mean, ref_mean, std, reduction="sum")  # ||dmean||^2 / (2 std^2), summed
    return kl


def _as_vector(values: Sequence[float] | np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    """Flatten to a float64 numpy vector; non-finite entries raise naming their index."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        raise ValueError(f"{name} has non-finite values at index {bad[:5].tolist()} ({array[bad[:5]].tolist()}); "
                         "drop those items from both sides or fix the reward that produced them.")
    return array


def paired_difference(
    a: Sequence[float] | np.ndarray | torch.Tensor, b: Sequence[float] | np.ndarray | torch.Tensor
) -> tuple[float, float]:
    """Mean of ``a_i - b_i`` over paired items and its standard error ``std(a - b, ddof=1) / sqrt(n)``.

    ``a`` and ``b`` are the same items (prompt, seed, starting noise) measured under two models, so the
    item-to-item variation cancels in the difference.

    Example: ``paired_difference([3, 5, 4], [1, 2, 3])`` -> differences ``[2, 3, 1]``: ``(2.0, 1 / sqrt(3))``.
    """
    x, y = _as_vector(a, "a"), _as_vector(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"paired_difference needs the same items on both sides, got {x.size} and {y.size} values; "
                         "evaluate both models on the same prompts and noises.")
    if x.size < 2:
        raise ValueError(f"paired_difference needs at least 2 pairs for a standard error, got {x.size}.")
    d = x - y
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(d.size))  # se = s_d / sqrt(n)


def mean_se(values: Sequence[float] | np.ndarray | torch.Tensor) -> tuple[float, float]:
    """Mean over seeds and its standard error ``std(ddof=1) / sqrt(n)`` (NaN for a single value).

    Example: ``mean_se([1.0, 2.0, 3.0])`` -> ``(2.0, 1 / sqrt(3))``; ``mean_se([4.0])`` -> ``(4.0, nan)``.
    """
    x = _as_vector(values, "values")
    if x.size == 0:
        raise ValueError("mean_se got no values; pass one value per seed.")
    se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else float("nan")
    return float(x.mean()), se
