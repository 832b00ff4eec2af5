"""Objectives for reward fine-tuning of flow models, as small pure functions (math beside the code).

Three methods share these pieces (the trainer picks one by config):

- **AC-Flow** — actor-critic fine-tuning with intermediate feedback. The ideas (a light critic of intermediate
  states, reward shaping, "dual stability" via advantage clipping and critic warm-up, a generalised critic
  weighting of the flow-matching loss that contains reward-weighted fine-tuning as a special case, and
  Wasserstein regularisation) come from *AC-Flow, arXiv 2510.18072*. Its method section is not public: the
  concrete design below (the formulas, the weighting functions, the defaults) is ours, as described in
  ``docs/algorithms.md``::

      shaping     r~_i = clip((r_i - mean_c) / (std_c + eps), -k, k)       per-prompt group (running stats if G = 1)
      noising     x_s = (1 - s) x0_i + s eps,  target u = eps - x0_i
      critic      L_V = mean_i (V(x_s, s, c) - r~_i)^2
      advantage   A_i = clip(r~_i - V(x_s, s, c), -eps_A, eps_A)
      weight      w_i = f(A_i)   (default f = exp(beta A) / mean_batch exp(beta A))
      actor       L = mean_i w_i ||v_theta(x_s, s, c) - u_i||^2 + alpha mean_i ||v_theta - stopgrad(v_ref)||^2

  Two choices of the states (``ACFlowConfig.fm_states``):

  - ``"noised"`` (ORW-CFM-W2's regression): fresh ``x_s = (1 - s) x0_i + s eps``, ``u = eps - x0_i``;
  - ``"trajectory"`` (the shipped tiny-world config): the rollout's own SDE states ``x_k`` (the critic's
    "intermediate states on the generation trajectory"), ``u = (x_{k+1} - c_x x_k) / c_v`` the velocity
    whose SDE step lands on the realised next state (:func:`flowalign.sampling.sde_step_velocity`), the
    residual in units of the step noise (so the term is the transition's negative log-likelihood), and
    centred weights with a proximal term to the rollout velocity ``v_old``::

        L = mean_i (w_i - 1) ||k_i (v_theta - u_i)||^2 + ||k_i (v_theta - v_old_i)||^2
            + alpha ||k_i (v_theta - v_ref_i)||^2,  k = |c_v| / std  (the W2 term in the same units: 2 KL per step)

    The plain weights' update is "fit your own samples" plus the reward tilt; the first part is pure noise
    in expectation, and centring removes it (the measurements: ``docs/benchmarks.md``).

- **ORW-CFM-W2** (Fan et al., "Online Reward-Weighted Fine-Tuning of Flow Matching with Wasserstein
  Regularization", ICLR 2025): the special case V = 0, no shaping, f = exp(beta r) on batch-normalised rewards,
  on freshly noised states — see :func:`orw_weights` and :func:`orw_cfm_w2_loss`.
- **Flow-GRPO** (Liu et al., arXiv 2505.05470): per-prompt group advantages, a PPO-style clipped ratio of
  SDE-step log-probabilities (see :mod:`flowalign.sampling`), and a KL penalty to the reference policy.

Norms ``||.||^2`` are implemented as per-sample *means* over the non-batch dimensions (a resolution-independent
scale); every loss is then a mean over the batch. The regulariser of every method is set on one axis,
``kl_coef`` in nats per image (``docs/algorithms.md``, "One regulariser axis").

POT (Python Optimal Transport) serves two uses: minibatch OT pairing of noise and samples (:func:`ot_pair`)
and the W2 distance between two sample sets for evaluation (:func:`w2_distance`).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Callable, Literal

import numpy as np
import ot
import torch
from diffusers.training_utils import compute_density_for_timestep_sampling

__all__ = [
    "RunningMeanStd",
    "awm_loss",
    "nft_loss",
    "nft_optimality",
    "WEIGHTINGS",
    "acflow_actor_loss",
    "advantages",
    "step_advantages",
    "critic_loss",
    "effective_sample_size",
    "exp_weights",
    "explained_variance",
    "gaussian_kl_to_reference",
    "group_mean_std",
    "grpo_advantages",
    "grpo_policy_loss",
    "linear_weights",
    "noised_states",
    "orw_cfm_w2_loss",
    "orw_weights",
    "ot_pair",
    "per_sample_mse",
    "rank_weights",
    "sample_sigmas",
    "shape_rewards",
    "uniform_weights",
    "w2_distance",
    "w2_regulariser",
    "weighted_flow_matching_loss",
]


# ----------------------------------------------------------------------------------------------------------
# Reward shaping
# ----------------------------------------------------------------------------------------------------------


class RunningMeanStd:
    """Running mean / variance of a scalar stream (Chan et al. parallel update), for shaping when G = 1.

    Distributed use: every rank computes its batch moments, the trainer all-reduces them into global
    ``(mean, var, count)`` and calls :meth:`update_from_moments` on every rank, so all ranks hold the same stats.
    Checkpoint with :meth:`state_dict` / :meth:`load_state_dict`.

    Example::

        rms = RunningMeanStd()
        rms.update(torch.tensor([1.0, 2.0, 3.0]))     # mean 2.0, var 2/3, count 3
    """

    def __init__(self) -> None:
        self.mean = 0.0
        self.var = 1.0
        self.count = 0.0

    @property
    def std(self) -> float:
        """sqrt(var)."""
        return math.sqrt(self.var)

    def update(self, values: torch.Tensor) -> None:
        """Fold a batch of values in: ``update_from_moments(values.mean(), values.var(population), len)``."""
        values = values.detach().double().flatten()
        if values.numel() == 0:
            return
        self.update_from_moments(values.mean().item(), values.var(unbiased=False).item(), values.numel())

    def update_from_moments(self, mean: float, var: float, count: float) -> None:
        """Merge a batch with population moments (mean, var) of ``count`` values.

        ``delta = m_b - m``, ``n = n_a + n_b``, ``m' = m + delta n_b / n``,
        ``var' = (var n_a + var_b n_b + delta^2 n_a n_b / n) / n``.
        """
        mean, var, count = float(mean), float(var), float(count)
        if count <= 0:
            return
        if var < 0 or not math.isfinite(var) or not math.isfinite(mean):
            raise ValueError(f"update_from_moments got mean={mean}, var={var}: need finite values and var >= 0.")
        total = self.count + count
        delta = mean - self.mean
        new_mean = self.mean + delta * count / total
        m2 = self.var * self.count + var * count + delta**2 * self.count * count / total
        self.mean, self.var, self.count = new_mean, m2 / total, total

    def state_dict(self) -> dict[str, float]:
        """``{"mean": ..., "var": ..., "count": ...}`` (plain floats, safe for ``torch.save(weights_only=True)``)."""
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore from :meth:`state_dict`."""
        missing = {"mean", "var", "count"} - set(state)
        if missing:
            raise KeyError(f"RunningMeanStd state is missing {sorted(missing)}; got keys {sorted(state)}.")
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), float(state["count"])

    def __repr__(self) -> str:
        return f"RunningMeanStd(mean={self.mean:.4g}, std={self.std:.4g}, count={self.count:g})"


def _group_index(group_ids: torch.Tensor | Sequence[Hashable], device: torch.device) -> torch.Tensor:
    """Map arbitrary group labels (ints, prompts) to contiguous indices 0..G-1: ``["a", "b", "a"] -> [0, 1, 0]``."""
    if isinstance(group_ids, torch.Tensor):
        return torch.unique(group_ids.flatten(), return_inverse=True)[1].to(device)
    lookup: dict[Hashable, int] = {}
    return torch.tensor([lookup.setdefault(g, len(lookup)) for g in group_ids], dtype=torch.long, device=device)


def group_mean_std(
    values: torch.Tensor, group_ids: torch.Tensor | Sequence[Hashable]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample mean, population std and size of each sample's group.

    Example: ``group_mean_std(tensor([1., 3., 10.]), [0, 0, 1])`` -> means ``[2, 2, 10]``, stds ``[1, 1, 0]``,
    counts ``[2, 2, 1]``.
    """
    if values.ndim != 1:
        raise ValueError(f"values must be a [B] tensor, got shape {tuple(values.shape)}.")
    index = _group_index(group_ids, values.device)
    if index.shape[0] != values.shape[0]:
        raise ValueError(f"group_ids has {index.shape[0]} entries but values has {values.shape[0]}.")
    n_groups = int(index.max().item()) + 1 if index.numel() else 0
    values = values.float()
    counts = torch.zeros(n_groups, device=values.device).index_add_(0, index, torch.ones_like(values))
    mean = torch.zeros(n_groups, device=values.device).index_add_(0, index, values) / counts
    sq = torch.zeros(n_groups, device=values.device).index_add_(0, index, (values - mean[index]) ** 2)
    std = torch.sqrt(sq / counts)
    return mean[index], std[index], counts[index]


def shape_rewards(
    rewards: torch.Tensor,
    group_ids: torch.Tensor | Sequence[Hashable] | None,
    clip: float | None = 3.0,
    eps: float = 1e-6,
    running: RunningMeanStd | None = None,
    update_running: bool = True,
) -> torch.Tensor:
    """Well-normalised learning signal: per-prompt z-score, clipped (AC-Flow's reward shaping; our design).

    ``r~_i = clip((r_i - mean_c(i)) / (std_c(i) + eps), -clip, clip)`` with population statistics of the G
    samples of prompt c. With one sample per prompt (G = 1) pass ``running``: the statistics then come from the
    running stream (updated with ``rewards`` first unless ``update_running=False``, for a trainer that already
    merged all-reduced moments) and ``group_ids`` is ignored.

    Example: ``shape_rewards(tensor([1., 3., 0., 4.]), [0, 0, 1, 1], clip=None)`` -> ``[-1, 1, -1, 1]``.
    """
    rewards = rewards.float()
    if running is not None:
        if update_running:
            running.update(rewards)
        shaped = (rewards - running.mean) / (running.std + eps)
    else:
        if group_ids is None:
            raise ValueError("shape_rewards needs group_ids (one label per sample) or running=RunningMeanStd().")
        mean, std, counts = group_mean_std(rewards, group_ids)
        if bool((counts < 2).any()):
            raise ValueError(
                "shape_rewards got a prompt group of size 1 (its z-score is undefined). Sample G >= 2 images per "
                "prompt, gather whole groups across ranks, or pass running=RunningMeanStd() for G = 1."
            )
        shaped = (rewards - mean) / (std + eps)
    if clip is not None:
        shaped = shaped.clamp(-clip, clip)
    return shaped


def advantages(
    shaped: torch.Tensor, values: torch.Tensor, clip: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Intermediate-feedback advantage ``A = clip(r~ - V(x_s, s, c), -clip, clip)`` and the clipped fraction.

    ``values`` is detached: the advantage weights the actor; the critic learns from :func:`critic_loss`.

    Example: ``advantages(tensor([2., -1.]), tensor([0.5, 0.5]), clip=1.0)`` -> ``([1.0, -1.0], 0.5)``.
    """
    adv = shaped.float() - values.detach().float()
    if clip is None:
        return adv, torch.zeros((), device=adv.device)
    clip_fraction = (adv.abs() > clip).float().mean()
    return adv.clamp(-clip, clip), clip_fraction


def step_advantages(values: torch.Tensor, final: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """Per-step advantages of a K-step stochastic window, ``[B, K]``: GAE(lambda) with no intermediate reward and
    no discount, bootstrapped by the final (shaped) reward after the window::

        V_K = r~ (the path after the window is deterministic)      delta_k = V_{k+1} - V_k
        A_k = sum_{j >= k} lambda^(j - k) delta_j

    ``lam = 1`` telescopes to the Monte Carlo form ``A_k = r~ - V_k``; ``lam = 0`` is the TD difference
    ``A_k = V_{k+1} - V_k`` (each transition credited with what it changed). ``values`` [B, K] are V(x_0..x_{K-1}).

    Example: ``step_advantages(tensor([[0., .5]]), tensor([1.]), lam=0)`` -> ``[[0.5, 0.5]]``; with ``lam=1``
    ``[[1.0, 0.5]]``.
    """
    values, final = values.detach().float(), final.detach().float()
    v_next = torch.cat([values[:, 1:], final[:, None]], dim=1)  # V_{k+1}, with V_K = r~
    delta = v_next - values
    adv = torch.empty_like(delta)
    running = torch.zeros_like(final)
    for k in reversed(range(values.shape[1])):  # A_k = delta_k + lambda A_{k+1}
        running = delta[:, k] + lam * running
        adv[:, k] = running
    return adv


# ----------------------------------------------------------------------------------------------------------
# Weighting functions f(A) -> w, each with mean_batch(w) = 1 (so sum(w) = B)
# ----------------------------------------------------------------------------------------------------------


def exp_weights(adv: torch.Tensor, beta: float) -> torch.Tensor:
    """Self-normalised exponential weights ``w_i = exp(beta A_i) / mean_j exp(beta A_j)`` (the default).

    Computed as ``exp(beta A_i - logsumexp(beta A) + log B)``: no overflow for any ``beta * A``.
    Example: ``exp_weights(tensor([0., log(3)]), 1.0)`` -> ``[0.5, 1.5]``.
    """
    z = beta * adv.float()
    return torch.exp(z - torch.logsumexp(z, dim=0) + math.log(z.shape[0]))


def linear_weights(adv: torch.Tensor, beta: float) -> torch.Tensor:
    """Clipped-linear weights ``w_i = max(0, 1 + beta A_i)``, normalised to mean 1 (uniform if all are 0).

    Milder than :func:`exp_weights` for large advantages; samples with ``A <= -1/beta`` get weight 0.
    Example: ``linear_weights(tensor([-2., 0., 1.]), 1.0)`` -> ``[0, 1, 2] / 1 = [0., 1., 2.]``.
    """
    w = torch.clamp(1.0 + beta * adv.float(), min=0.0)
    mean = w.mean()
    return torch.where(mean > 0, w / mean.clamp(min=torch.finfo(w.dtype).tiny), torch.ones_like(w))


def rank_weights(adv: torch.Tensor, beta: float) -> torch.Tensor:
    """Rank-based weights: exp weights of the centred rank ``u_i = 2 rank_i / (B - 1) - 1`` in [-1, 1].

    Invariant to the scale of A (robust to reward outliers); ties are broken by order.
    Example: ``rank_weights(tensor([5., -1., 0.]), 0.0)`` -> ``[1., 1., 1.]``.
    """
    n = adv.shape[0]
    ranks = torch.argsort(torch.argsort(adv.float(), dim=0), dim=0).float()
    centred = 2.0 * ranks / max(n - 1, 1) - 1.0
    return exp_weights(centred, beta)


def uniform_weights(adv: torch.Tensor, beta: float) -> torch.Tensor:
    """All ones: plain flow matching on the policy's own samples (``beta`` ignored). Example: ``[1., 1.]``."""
    return torch.ones_like(adv, dtype=torch.float32)


WEIGHTINGS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "exp": exp_weights,
    "linear": linear_weights,
    "rank": rank_weights,
    "uniform": uniform_weights,
}
"""Weighting functions by name; each maps (advantages [B], beta) to weights [B] with mean 1."""


def effective_sample_size(weights: torch.Tensor) -> torch.Tensor:
    """Kish effective sample size ``(sum w)^2 / sum w^2``, in [1, B]; B for uniform weights.

    Example: ``effective_sample_size(tensor([2., 0.]))`` -> ``1.0``.
    """
    w = weights.float()
    return w.sum() ** 2 / (w**2).sum()


# ----------------------------------------------------------------------------------------------------------
# Flow-matching losses
# ----------------------------------------------------------------------------------------------------------


def per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``mean_d (a - b)^2`` over the non-batch dims, shape [B]. Example: ``per_sample_mse(x, x) == zeros(B)``."""
    return ((a.float() - b.float()) ** 2).mean(dim=tuple(range(1, a.ndim)))


def weighted_flow_matching_loss(v_pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``mean_i w_i ||v_pred_i - u_i||^2`` with ``u = eps - x0``; the weights are constants (detached).

    Example: with ``weights = ones(B)`` this is the plain conditional flow-matching loss.
    """
    return (weights.detach().float() * per_sample_mse(v_pred, target)).mean()


def w2_regulariser(v_pred: torch.Tensor, v_ref: torch.Tensor) -> torch.Tensor:
    """ORW-CFM-W2's Wasserstein term ``mean_i ||v_pred_i - stopgrad(v_ref_i)||^2`` at the same (x_s, s, c).

    A Gronwall-type bound on W2 between the fine-tuned and the reference model's sample distributions, not an
    OT solve. Gradients flow to ``v_pred`` only. Example: ``w2_regulariser(v, v) == 0``.
    """
    return per_sample_mse(v_pred, v_ref.detach()).mean()


def acflow_actor_loss(
    v_pred: torch.Tensor,
    target: torch.Tensor,
    advantages: torch.Tensor,
    beta: float = 1.0,
    weighting: str = "exp",
    v_ref: torch.Tensor | None = None,
    w2_weight: float = 0.0,
    fm_scale: torch.Tensor | None = None,
    v_old: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """AC-Flow actor loss (our design after arXiv 2510.18072): critic-weighted flow matching + W2 term.

    ``L = mean_i f(A_i) ||v_theta - u_i||^2 + w2_weight * mean_i ||v_theta - stopgrad(v_ref)||^2``
    with ``f = WEIGHTINGS[weighting]`` and ``u = eps - x0`` (noised states). ``fm_scale`` (optional, [B]
    or broadcastable to ``v``) multiplies the flow-matching residual, ``||fm_scale (v_theta - u)||^2``:
    on SDE trajectory states :func:`flowalign.sampling.sde_step_velocity` gives the scale that makes the
    term the transition's negative log-likelihood.

    ``v_old`` (optional): the velocity that drew the rollout at the same state, when ``u = v_old + noise``
    (trajectory states). The weights are then centred (a baseline) and the uniform part is replaced by its
    expectation over the noise, a proximal term to the rollout velocity::

        FM = mean_i (w_i - 1) ||s_i (v_theta - u_i)||^2 + ||s_i (v_theta - v_old_i)||^2

    Its gradient is the plain weighted one minus ``mean_i grad ||s_i (v_theta - u_i)||^2 - ||s_i (v_theta -
    v_old_i)||^2``, whose expectation is zero: the same update in expectation with the pure-noise part
    removed; ``w = 1`` (no reward information) gives no update at all. Per sample the quadratic keeps the
    coefficient ``w_i > 0``, so the loss stays bounded below.

    With ``fm_scale`` the W2 term is scaled the same way, ``||fm_scale (v_theta - v_ref)||^2``: on trajectory
    states that is twice the per-dimension ``KL(p_theta(x_{k+1} | x_k) || p_ref(x_{k+1} | x_k))`` (the two
    step kernels share their std), so both terms weigh every step alike. In velocity units instead, the
    regulariser would outweigh the reward term by ``1 / fm_scale^2`` (~1000 at the first steps of a shift-3
    grid, where the layout is decided) and pin the early steps to the reference.

    Returns ``(loss, metrics)``; metrics are detached scalars: ``fm_loss`` (weighted), ``w2``, ``ess``.

    Example: ``loss, m = acflow_actor_loss(v, eps - x0, adv, beta=1.0, v_ref=v_ref, w2_weight=1.0)``.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"Unknown weighting {weighting!r}; choose one of {sorted(WEIGHTINGS)}.")
    if w2_weight != 0.0 and v_ref is None:
        raise ValueError(f"w2_weight={w2_weight} needs v_ref (the reference model's velocity at the same x_s, s).")
    weights = WEIGHTINGS[weighting](advantages.detach(), beta)
    scale = fm_scale if fm_scale is not None else 1.0
    fm = weighted_flow_matching_loss(v_pred.float() * scale, target.float() * scale, weights)
    if v_old is not None:  # centred weights + proximal term: same expected gradient, no pure-noise part
        fm = fm - weighted_flow_matching_loss(v_pred.float() * scale, target.float() * scale, torch.ones_like(weights))
        fm = fm + per_sample_mse(v_pred.float() * scale, v_old.float() * scale).mean()
    # With fm_scale the W2 term is measured in the same units: on trajectory states ||s (v - v_ref)||^2 is twice
    # the per-dimension KL between the policy's and the reference's step kernels (Flow-GRPO's KL term).
    w2 = (w2_regulariser(v_pred.float() * scale, v_ref.float() * scale) if v_ref is not None
          else torch.zeros((), device=fm.device))
    loss = fm + w2_weight * w2 if w2_weight != 0.0 else fm
    metrics = {
        "fm_loss": fm.detach(),
        "w2": w2.detach(),
        "ess": effective_sample_size(weights).detach(),
    }
    return loss, metrics


def critic_loss(values: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Critic regression ``L_V = mean_i (V(x_s, s, c) - r~_i)^2`` (targets detached).

    Example: ``critic_loss(tensor([0., 1.]), tensor([1., 1.]))`` -> ``0.5``.
    """
    return ((values.float() - targets.detach().float()) ** 2).mean()


def explained_variance(values: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``1 - Var(r~ - V) / Var(r~)``: 1 for a perfect critic, 0 for a constant one (NaN if Var(r~) = 0).

    Example: ``explained_variance(t, t) == 1``.
    """
    values, targets = values.detach().float(), targets.detach().float()
    var_t = targets.var(unbiased=False)
    ev = 1.0 - (targets - values).var(unbiased=False) / var_t
    return torch.where(var_t > 0, ev, torch.full_like(ev, float("nan")))


# ----------------------------------------------------------------------------------------------------------
# ORW-CFM-W2 (Fan et al., ICLR 2025): the special case V = 0, no shaping, f = exp(beta r)
# ----------------------------------------------------------------------------------------------------------


def orw_weights(rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """ORW-CFM-W2 weights ``w_i = exp(beta r_i) / mean_j exp(beta r_j)`` (max-subtracted for stability).

    Example: ``orw_weights(tensor([0., log(3)]), 1.0)`` -> ``[0.5, 1.5]``.
    """
    z = beta * rewards.float()
    e = torch.exp(z - z.max())
    return e / e.mean()


def orw_cfm_w2_loss(
    v_pred: torch.Tensor,
    target: torch.Tensor,
    v_ref: torch.Tensor,
    rewards: torch.Tensor,
    beta: float = 0.5,
    alpha: float = 1.0,
) -> torch.Tensor:
    """ORW-CFM-W2 loss ``mean_i w_i ||v_theta - u_i||^2 + alpha mean_i ||v_theta - stopgrad(v_ref)||^2``.

    Public-code defaults beta = 0.5, alpha = 1.0. Equals :func:`acflow_actor_loss` with zero critic, no shaping,
    no advantage clipping and ``weighting="exp"`` (tested).
    Example: ``orw_cfm_w2_loss(v, eps - x0, v_ref, rewards, beta=0.5, alpha=1.0)``.
    """
    weights = orw_weights(rewards, beta).detach()
    fm = (weights * per_sample_mse(v_pred, target)).mean()
    return fm + alpha * per_sample_mse(v_pred, v_ref.detach()).mean()


# ----------------------------------------------------------------------------------------------------------
# Flow-GRPO (arXiv 2505.05470)
# ----------------------------------------------------------------------------------------------------------


def grpo_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor | Sequence[Hashable], eps: float = 1e-4
) -> torch.Tensor:
    """Group-relative advantages ``A_i = (r_i - mean_c) / (std_c + eps)`` (population std, eps as Flow-GRPO).

    Example: ``grpo_advantages(tensor([1., 3.]), [0, 0])`` -> ``[-1, 1] / (1 + 1e-4)``.
    """
    mean, std, counts = group_mean_std(rewards, group_ids)
    if bool((counts < 2).any()):
        raise ValueError("grpo_advantages needs G >= 2 samples per prompt group; got a group of size 1.")
    return (rewards.float() - mean) / (std + eps)


def grpo_policy_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO-clipped policy loss on SDE-step log-probabilities; returns ``(loss, clip_fraction, approx_kl)``.

    ``ratio = exp(log p - log p_old)``; ``loss = mean max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps))``;
    ``clip_fraction = mean(|ratio - 1| > eps)``; ``approx_kl = mean((log p - log p_old)^2) / 2``.
    Example: log-ratio 0, A = [1, -1] -> loss 0, clip fraction 0, approx KL 0.
    """
    log_ratio = log_prob.float() - old_log_prob.detach().float()
    ratio = torch.exp(log_ratio)
    adv = advantages.detach().float()
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    clip_fraction = ((ratio - 1.0).abs() > clip_range).float().mean().detach()
    approx_kl = (0.5 * log_ratio**2).mean().detach()
    return loss, clip_fraction, approx_kl


def gaussian_kl_to_reference(
    mean: torch.Tensor,
    ref_mean: torch.Tensor,
    std: torch.Tensor | float,
    reduction: Literal["sum", "mean"] = "sum",
) -> torch.Tensor:
    """KL(N(mean, std^2 I) || N(ref_mean, std^2 I)) of one SDE step, per sample [B].

    ``KL = ||mean - ref_mean||^2 / (2 std^2)`` (``reduction="sum"``, the exact KL with ``std`` from
    :func:`flowalign.sampling.sde_step`); ``"mean"`` averages over dimensions as the Flow-GRPO code does.
    ``std`` must be > 0 (an SDE step with noise_level > 0); ``ref_mean`` is detached.
    Example: ``gaussian_kl_to_reference(ones(1, 4), zeros(1, 4), 2.0)`` -> ``[4 / 8] = [0.5]``.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}.")
    std = torch.as_tensor(std, dtype=torch.float32, device=mean.device)
    per_dim = (mean.float() - ref_mean.detach().float()) ** 2 / (2.0 * std**2)
    dims = tuple(range(1, mean.ndim))
    return per_dim.sum(dim=dims) if reduction == "sum" else per_dim.mean(dim=dims)


# ----------------------------------------------------------------------------------------------------------
# Forward-process methods: DiffusionNFT and Advantage Weighted Matching (baselines)
# ----------------------------------------------------------------------------------------------------------


def nft_optimality(advantages: torch.Tensor, clip: float) -> torch.Tensor:
    """DiffusionNFT's optimality probability ``r = clip(A, -c, c) / (2 c) + 1/2`` in [0, 1] from group advantages.

    Example: ``nft_optimality(tensor([-5., 0., 1.]), 2.0)`` -> ``[0., 0.5, 0.75]``.
    """
    if not clip > 0:
        raise ValueError(f"nft_optimality needs clip > 0 (the advantage that maps to r = 1), got {clip}.")
    return advantages.detach().float().clamp(-clip, clip) / (2.0 * clip) + 0.5


def nft_loss(
    v_pred: torch.Tensor, v_old: torch.Tensor, target: torch.Tensor, r: torch.Tensor, beta: float = 1.0
) -> torch.Tensor:
    """DiffusionNFT (Zheng et al., arXiv 2509.16117) on freshly noised states, velocity form.

    Implicit positive and negative policies around the sampling policy ``v_old``::

        v+ = (1 - b) v_old + b v_theta,      v- = (1 + b) v_old - b v_theta
        L  = mean_i [ r_i ||v+_i - u_i||^2 + (1 - r_i) ||v-_i - u_i||^2 ] / b

    Pointwise its minimiser is ``v_theta = v_old + (2 r - 1)(u - v_old) / b``: good samples (r > 1/2) pull
    the policy toward their regression target, bad ones push it away. With ``r = 1`` it is flow matching on
    ``v+`` (tested); ``v_old`` is detached.
    Example: ``nft_loss(v, v_old, eps - x0, nft_optimality(adv, 2.0), beta=1.0)``.
    """
    if not beta > 0:
        raise ValueError(f"nft_loss needs beta > 0 (the step of the implicit policies), got {beta}.")
    v_old = v_old.detach().float()
    v = v_pred.float()
    positive = per_sample_mse((1.0 - beta) * v_old + beta * v, target)
    negative = per_sample_mse((1.0 + beta) * v_old - beta * v, target)
    r = r.detach().float()
    return ((r * positive + (1.0 - r) * negative) / beta).mean()


def awm_loss(
    v_pred: torch.Tensor,
    target: torch.Tensor,
    advantages: torch.Tensor,
    old_log_prob: torch.Tensor | None = None,
    clip_range: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantage Weighted Matching (AWM, arXiv 2509.25050): the pretraining flow-matching loss weighted by the
    group advantage, with a PPO-style ratio clip.

    ``log p_i = -||v_theta - u_i||^2`` (the matching loss as a log-likelihood surrogate, per-dimension mean);
    ``ratio = exp(log p - log p_old)``; ``L = mean max(-A ratio, -A clip(ratio, 1 +- eps))``. Its gradient at
    ``ratio = 1`` is ``mean A grad ||v - u||^2``: advantage-weighted flow matching. Equal advantages (all 0
    after group normalisation) give no update. Returns ``(loss, clip_fraction)``.
    Example: ``loss, frac = awm_loss(v, eps - x0, adv, old_log_prob=-per_sample_mse(v_old, eps - x0), clip_range=0.01)``.
    """
    log_prob = -per_sample_mse(v_pred, target)
    old = log_prob.detach() if old_log_prob is None else old_log_prob.detach().float()
    ratio = torch.exp(log_prob - old)
    adv = advantages.detach().float()
    unclipped = -adv * ratio
    if clip_range is None:
        return unclipped.mean(), torch.zeros((), device=v_pred.device)
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    frac = ((ratio - 1.0).abs() > clip_range).float().mean().detach()
    return torch.maximum(unclipped, clipped).mean(), frac


# ----------------------------------------------------------------------------------------------------------
# Noising, noise-level sampling, optimal transport
# ----------------------------------------------------------------------------------------------------------


def noised_states(
    x0: torch.Tensor, sigmas: torch.Tensor, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rectified-flow interpolation ``x_s = (1 - s) x0 + s eps`` and the velocity target ``u = eps - x0``.

    ``sigmas`` is [B] in [0, 1]. Example: ``noised_states(x0, ones(B), eps)`` -> ``(eps, eps - x0)``.
    """
    if sigmas.ndim != 1 or sigmas.shape[0] != x0.shape[0]:
        raise ValueError(f"sigmas must be [B] with B = {x0.shape[0]}, got shape {tuple(sigmas.shape)}.")
    s = sigmas.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
    return (1.0 - s) * x0 + s * noise, noise - x0


def sample_sigmas(
    n: int,
    generator: torch.Generator | None = None,
    scheme: Literal["logit_normal", "uniform", "mode"] = "logit_normal",
    mean: float = 0.0,
    std: float = 1.0,
    mode_scale: float = 1.29,
    shift: float = 1.0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Training noise levels s in (0, 1), [n]: SD3's logit-normal ``s = sigmoid(N(mean, std))``, uniform or "mode".

    Uses ``diffusers.training_utils.compute_density_for_timestep_sampling``; ``shift`` (1.0 = none) then warps
    ``s -> shift s / (1 + (shift - 1) s)`` like the scheduler's grid.
    Example: ``sample_sigmas(4, torch.Generator().manual_seed(0))`` -> four values in (0, 1) centred near 0.5.
    """
    if scheme not in ("logit_normal", "uniform", "mode"):
        raise ValueError(f"Unknown sigma sampling scheme {scheme!r}; choose 'logit_normal', 'uniform' or 'mode'.")
    u = compute_density_for_timestep_sampling(
        scheme, n, logit_mean=mean, logit_std=std, mode_scale=mode_scale, device=device, generator=generator
    )
    return shift * u / (1.0 + (shift - 1.0) * u)


def _as_numpy_2d(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Flatten to [N, D] float64 numpy (POT works in float64 on the CPU)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(x.shape[0], -1)


def ot_pair(
    x0: torch.Tensor, noise: torch.Tensor, return_permutation: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Minibatch OT coupling: reorder ``noise`` so that ``sum_i ||x0_i - noise_i||^2`` is minimal.

    Exact assignment with POT (``ot.emd`` on the squared-euclidean cost, uniform weights); the optimal plan of
    a square uniform problem is a permutation. Straighter pairs make lower-variance flow-matching targets.
    Example: ``noise = ot_pair(x0, torch.randn_like(x0))``; with ``return_permutation=True`` also ``perm`` such
    that the result is ``noise[perm]``.
    """
    if x0.shape[0] != noise.shape[0]:
        raise ValueError(f"ot_pair needs as many noise draws as samples, got {noise.shape[0]} and {x0.shape[0]}.")
    n = x0.shape[0]
    cost = ot.dist(_as_numpy_2d(x0), _as_numpy_2d(noise), metric="sqeuclidean")
    uniform = np.full(n, 1.0 / n)
    plan = ot.emd(uniform, uniform, cost)
    perm = plan.argmax(axis=1)
    if np.unique(perm).size != n:
        raise RuntimeError("ot.emd returned a plan that is not a permutation; cannot pair noise and samples.")
    perm_t = torch.as_tensor(perm, dtype=torch.long, device=noise.device)
    paired = noise[perm_t]
    return (paired, perm_t) if return_permutation else paired


def w2_distance(
    features_a: torch.Tensor | np.ndarray, features_b: torch.Tensor | np.ndarray, num_iter_max: int = 1_000_000
) -> float:
    """Exact 2-Wasserstein distance between two empirical sets (uniform weights), ``sqrt(ot.emd2(a, b, M))``.

    ``M_ij = ||a_i - b_j||^2``; sets may have different sizes; rows are flattened to vectors.
    Example: ``w2_distance(x, x + c)`` -> ``||c||`` for a constant shift ``c``.
    """
    a, b = _as_numpy_2d(features_a), _as_numpy_2d(features_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"w2_distance needs features of the same dimension, got {a.shape[1]} and {b.shape[1]}.")
    cost = ot.dist(a, b, metric="sqeuclidean")
    squared = ot.emd2(np.full(a.shape[0], 1.0 / a.shape[0]), np.full(b.shape[0], 1.0 / b.shape[0]), cost,
                      numItermax=num_iter_max)
    return math.sqrt(max(float(squared), 0.0))
