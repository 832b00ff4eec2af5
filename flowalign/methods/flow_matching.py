"""The weighted flow-matching update that AC-Flow, ORW-CFM-W2, DiffusionNFT and AWM share.

Each of them regresses the policy's velocity onto a target at states drawn from the rollout, with per-state
advantages, plus ``w2_weight ||v - stopgrad(v_ref)||^2`` toward the reference; they differ in the advantages
(``targets``, ``advantages``), in what they precompute (``prepare``) and in the loss (``loss``)::

    targets   <- the method's normalised rewards (shaped, z-scored or group advantages), per image
    states    <- inner_epochs x noise_draws draws per image, in minibatches:
                 trajectory: a random SDE step x_k -> x_{k+1}, u the velocity whose step lands on x_{k+1}
                 noised:     x_s = (1 - s) x0 + s eps, u = eps - x0
    prepare   <- what the method needs of the sampling policy at those states, before any update
    advantages<- per state, once, before the iteration's updates (PPO-style)
    for each minibatch: (critic step,) actor step on loss(v, batch, v_ref)

Example::

    class MyMethod(FlowMatchingMethod):
        name = "mine"
        def targets(self, trainer, rewards):
            return rewards.local
        def loss(self, trainer, v, batch, v_ref):
            return O.weighted_flow_matching_loss(v, batch.target, batch.adv.exp()), {}
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from flowalign import objectives as O
from flowalign.methods.base import Method, Metrics, Rewards, Rollout, StateBatch
from flowalign.sampling import sde_step_velocity
from flowalign.seeding import generator


@dataclass
class FlowMatchingSettings:
    """The knobs of the weighted flow-matching update that acflow, orw, nft and awm share: the advantages' clip and
    temperature, the W2 weight toward the reference, and where the states are drawn."""

    advantage_clip: float = field(default=2.0, metadata={"help": "eps_A: advantages are clipped to [-eps_A, eps_A]"})
    beta: float = field(default=1.0, metadata={"help": (
        "temperature of the weighting exp(beta A) on normalised advantages (1 / beta: the per-iteration KL "
        "coefficient to the rollout policy, a trust region)"
    )})
    w2_weight: float = field(default=0.03, metadata={"help": (
        "alpha of the W2 regulariser ||v - stopgrad(v_ref)||^2; acts as the KL coefficient alpha / beta (set "
        "kl_coef instead); on trajectory states in units of the step noise (W2 = 2 KL per step), on noised states"
        " (orw) in velocity units"
    )})
    noise_draws: int = field(default=2, metadata={"minimum": 1, "help": (
        "states per sample per pass: (s, eps) draws, or trajectory steps k"
    )})
    sigma_sampling: str = field(default="logit_normal", metadata={"choices": ("logit_normal", "uniform"), "help": (
        "'logit_normal' | 'uniform' (fm_states='noised')"
    )})
    fm_states: str = field(default="trajectory", metadata={"choices": ("noised", "trajectory"), "help": (
        "(acflow; orw always uses 'noised', as published) where the critic and the weighted loss are evaluated: "
        "'noised' = fresh x_s = (1 - s) x0 + s eps with target eps - x0 (ORW-CFM-W2's regression); 'trajectory' ="
        " the rollout's own SDE states x_k with target the velocity whose step lands on the realised x_{k+1} "
        "(needs sampler: sde)"
    )})
    centered_weights: bool = field(default=True, metadata={"help": (
        "fm_states='trajectory': weights w - 1 plus a proximal term to the rollout velocity (the pure-noise part "
        "of the weighted regression removed; see objectives.acflow_actor_loss)"
    )})
    guided_loss: bool = field(default=True, metadata={"help": (
        "fit the CFG-guided velocity v_u + g (v_c - v_u), the field that drew the rollouts and samples at test "
        "time; False = the conditional velocity only (then guidance piles up on itself: the conditional branch "
        "learns guided samples and is guided again when sampling)"
    )})
    sigma_shift: float | None = field(default=None, metadata={"help": (
        "s = k u / (1 + (k-1) u) on the sampled u; None = the scheduler's shift (noised)"
    )})
    ot_pairing: bool = field(default=False, metadata={"help": (
        "minibatch OT coupling of noise and samples (POT; fm_states='noised')"
    )})


Field = Callable[[Any, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def fitted_field(trainer: Any, roll: Rollout) -> Field:
    """``fitted(model, x_s, sigma, idx)``: the velocity the loss fits, the CFG-guided ``v_u + g (v_c - v_u)`` that
    drew the rollouts (``guided_loss``), or the conditional velocity."""
    cfg, policy = trainer.config, trainer.policy
    embeds, pooled = roll.embeds, roll.pooled
    guided = cfg.guided_loss and policy.guidance_scale != 1.0
    if guided:
        neg_embeds, neg_pooled = policy.encode([""] * roll.latents.shape[0])

    def fitted(model, x_s, sigma, idx):
        if guided:
            return policy.cfg_velocity(model, x_s, sigma, embeds[idx], pooled[idx], neg_embeds[idx], neg_pooled[idx],
                                       detach_uncond=cfg.detach_uncond and model is trainer.transformer)
        return policy.velocity(model, x_s, sigma, embeds[idx], pooled[idx])

    return fitted


def draw_states(trainer: Any, roll: Rollout, idx: torch.Tensor, gen: torch.Generator) -> StateBatch:
    """The states of minibatch ``idx`` with their regression target: a random SDE step of each rollout
    (``fm_states="trajectory"``) or freshly noised samples (``"noised"``)."""
    cfg, device = trainer.config, trainer.device
    if cfg.fm_states == "trajectory":  # a random step k: x_k -> x_{k+1}
        traj, grid = roll.trajectory, roll.sigmas
        k = torch.randint(trainer.sde_steps, (idx.numel(),), generator=gen).to(device)
        x_s, sigma = traj[idx, k], grid[k]
        # u = (x_{k+1} - c_x x_k) / c_v: the velocity whose SDE mean hits the realised next state;
        # fm_scale = |c_v| / std puts the residual in units of the step noise (weighted log-likelihood)
        target, fm_scale = sde_step_velocity(x_s, traj[idx, k + 1], sigma, grid[k + 1], cfg.noise_level)
        v_old = roll.velocities[idx, k] if cfg.centered_weights else None
        return StateBatch(idx=idx, x_s=x_s, sigma=sigma, target=target, pooled=roll.pooled[idx], fm_scale=fm_scale,
                          v_old=v_old, step=k)
    x0 = roll.latents[idx]
    sigma = O.sample_sigmas(idx.numel(), generator=gen, scheme=cfg.sigma_sampling, shift=trainer.sigma_shift).to(device)
    eps = torch.randn(x0.shape, generator=gen).to(device)
    if cfg.ot_pairing:
        eps = O.ot_pair(x0, eps)
    x_s, target = O.noised_states(x0, sigma, eps)  # x_s = (1 - s) x0 + s eps, u = eps - x0
    return StateBatch(idx=idx, x_s=x_s, sigma=sigma, target=target, pooled=roll.pooled[idx])


def draw_state_batches(trainer: Any, roll: Rollout) -> list[StateBatch]:
    """Every minibatch of the iteration, drawn up front: ``inner_epochs`` passes over a random order of the
    images, each image ``noise_draws`` times, split into ``minibatch_size`` states."""
    cfg = trainer.config
    n = roll.latents.shape[0]
    gen = generator(cfg.seed, trainer.iteration, trainer.accelerator.process_index + 1, 2)
    return [draw_states(trainer, roll, idx.to(trainer.device), gen)
            for _ in range(cfg.inner_epochs)
            for order in [torch.randperm(n, generator=gen).repeat(cfg.noise_draws)]
            for idx in order.split(cfg.minibatch_size)]


class FlowMatchingMethod(Method):
    """A weighted flow-matching method: subclasses define ``targets`` and ``loss`` (and may define ``prepare``,
    ``advantages`` and ``critic_step``)."""

    settings = (FlowMatchingSettings,)

    def validate(self, cfg: Any) -> None:
        if cfg.fm_states == "trajectory" and cfg.sampler != "sde":
            raise ValueError(f"ACFlowConfig.sampler={cfg.sampler!r} with fm_states='trajectory': the actor learns "
                             "from the exploration noise of SDE rollouts; set sampler='sde', or fm_states='noised' "
                             "to regress on freshly noised samples (ORW-CFM-W2's form) with Euler rollouts.")
        if cfg.fm_states == "trajectory" and not cfg.guided_loss:
            raise ValueError("ACFlowConfig.guided_loss=False with fm_states='trajectory': the trajectory's step "
                             "velocities are the CFG-guided field's, so the loss must fit that field; set "
                             "guided_loss=True, or fm_states='noised'.")

    def targets(self, trainer: Any, rewards: Rewards) -> torch.Tensor:
        """The per-image normalised rewards of this rank's images."""
        raise NotImplementedError

    def prepare(self, trainer: Any, batches: list[StateBatch], fitted: Field) -> None:
        """Precompute what the loss needs of the sampling policy at the states (before any update)."""

    def advantages(self, trainer: Any, batches: list[StateBatch], targets: torch.Tensor, metrics: Metrics,
                   roll: Rollout, rewards: Rewards) -> None:
        """Each state's advantage: its image's target (``roll`` / ``rewards``: the iteration's, for a critic)."""
        for b in batches:
            b.adv = targets[b.idx]

    def critic_step(self, trainer: Any, b: StateBatch, targets: torch.Tensor, metrics: Metrics) -> bool:
        """Train a critic on the minibatch, if the method has one; returns whether the actor steps too."""
        return True

    def loss(self, trainer: Any, v: torch.Tensor, b: StateBatch, v_ref: torch.Tensor | None):
        """``(loss, metrics)`` of the actor at the minibatch; ``v_ref`` the reference field (``w2_weight`` > 0)."""
        raise NotImplementedError

    def update(self, trainer: Any, roll: Rollout, rewards: Rewards) -> dict[str, float]:
        fitted = fitted_field(trainer, roll)
        targets = self.targets(trainer, rewards)
        batches = draw_state_batches(trainer, roll)
        metrics, timing = Metrics(), {"time_critic": 0.0, "time_actor": 0.0}
        self.prepare(trainer, batches, fitted)
        tc = time.perf_counter()
        self.advantages(trainer, batches, targets, metrics, roll, rewards)  # once, with the critic before this iteration
        timing["time_critic"] += time.perf_counter() - tc
        trainer.transformer.train()
        for b in batches:
            tc = time.perf_counter()
            actor = self.critic_step(trainer, b, targets, metrics)
            timing["time_critic"] += time.perf_counter() - tc
            if actor:
                ta = time.perf_counter()
                self.actor_step(trainer, b, fitted, metrics)
                timing["time_actor"] += time.perf_counter() - ta
        return {**metrics.means(), **timing}

    def actor_step(self, trainer: Any, b: StateBatch, fitted: Field, metrics: Metrics) -> None:
        """One optimizer step on ``loss(v_theta, b, v_ref)``; a non-finite loss on any rank skips it on all."""
        cfg, acc = trainer.config, trainer.accelerator
        with acc.autocast():
            v = fitted(trainer.transformer, b.x_s, b.sigma, b.idx)
            v_ref = None
            if cfg.w2_weight:
                with torch.no_grad(), trainer.policy.reference_model() as ref:
                    v_ref = fitted(ref, b.x_s, b.sigma, b.idx)
            loss, m = self.loss(trainer, v, b, v_ref)
        # All ranks agree on skipping, or DDP would wait forever for the rank that skipped.
        if acc.gather(torch.isfinite(loss.detach()).float().view(1)).min() < 1:
            trainer.counters["skipped_updates"] += 1
            warnings.warn(f"iteration {trainer.iteration}: non-finite actor loss; minibatch skipped.")
            return
        trainer.optimizer.zero_grad(set_to_none=True)
        acc.backward(loss)
        grad_norm = trainer.optimizer_step()
        metrics.add("actor_loss", loss.detach())
        metrics.add("grad_norm", grad_norm)
        for k in m:
            if k in ("fm_loss", "w2", "ess", "clip_fraction"):
                metrics.add(k, m[k])


def w2_term(cfg: Any, v: torch.Tensor, v_ref: torch.Tensor | None) -> torch.Tensor:
    """``||v - v_ref||^2`` (per-sample mean over the batch), 0 without a reference."""
    return O.w2_regulariser(v, v_ref) if v_ref is not None else torch.zeros((), device=v.device)
