"""Flow-GRPO (arXiv 2505.05470): a clipped-ratio policy gradient on the SDE rollouts' log-probabilities, with the
Gaussian KL of each step to the reference::

    A       = (r - mean_group r) / (std_group r + eps)             per prompt group, every rank's images
    ratio_k = exp(log p_theta(x_{k+1} | x_k) - log p_old(x_{k+1} | x_k))   per-dimension mean log-probs
    L       = mean_k [ -mean_i min(ratio A, clip(ratio, 1 +- eps) A) + beta KL(p_theta(.|x_k) || p_ref(.|x_k)) ]
    steps   = a random grpo_train_fraction of the SDE steps ("denoising reduction")
    kl_coef: beta = kl_coef (KL as a per-dimension mean: docs/algorithms.md)
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from flowalign import objectives as O
from flowalign.methods.base import Method, Metrics, Rewards, Rollout
from flowalign.sampling import sde_step
from flowalign.seeding import generator


@dataclass
class GRPOSettings:
    """Flow-GRPO's knobs (``ACFlowConfig`` inherits them)."""

    grpo_clip_range: float = field(default=1e-4, metadata={"help": "on per-dimension-mean log-probs, as Flow-GRPO"})
    grpo_kl_weight: float = field(default=0.04, metadata={"help": (
        "coefficient of the per-step Gaussian KL (per-dimension mean, as the log-probs): nats per image, the "
        "kl_coef unit; Flow-GRPO's beta b corresponds to kl_coef ~ b |dt| (docs/algorithms.md)"
    )})
    grpo_train_fraction: float = field(default=0.5, metadata={"help": (
        "fraction of the sampling steps trained on ('denoising reduction')"
    )})
    grpo_learning_rate: float = field(default=3e-4, metadata={"help": "AdamW learning rate of the actor (grpo)"})


class GRPO(Method):
    name = "grpo"
    settings = (GRPOSettings,)
    sampler = "sde"

    def learning_rate(self, cfg: Any) -> float:
        return cfg.grpo_learning_rate

    def update(self, trainer: Any, roll: Rollout, rewards: Rewards) -> dict[str, float]:
        cfg = trainer.config
        adv = O.grpo_advantages(rewards.all, rewards.groups)[rewards.mine]
        n = roll.trajectory.shape[0]
        neg = trainer.policy.encode([""] * n)
        gen = generator(cfg.seed, trainer.iteration, trainer.accelerator.process_index + 1, 3)
        k_train = max(1, round(cfg.grpo_train_fraction * trainer.sde_steps))  # among the noisy steps
        chosen = torch.randperm(trainer.sde_steps, generator=gen)[:k_train].sort().values.tolist()
        metrics = Metrics()
        trainer.transformer.train()
        for start in range(0, n, cfg.minibatch_size):
            idx = slice(start, start + cfg.minibatch_size)
            trainer.optimizer.zero_grad(set_to_none=True)
            for j, k in enumerate(chosen):
                self.accumulate(trainer, roll, adv, neg, idx, k, last=j == len(chosen) - 1, steps=len(chosen),
                                metrics=metrics)
            metrics.add("grad_norm", trainer.optimizer_step())
        n_mb = math.ceil(n / cfg.minibatch_size)  # per-step terms summed / steps, then averaged over minibatches
        return {k: v / n_mb for k, v in metrics.sums.items()}

    def accumulate(self, trainer: Any, roll: Rollout, adv, neg, idx: slice, k: int, last: bool, steps: int,
                   metrics: Metrics) -> None:
        """Backward of one trained step k of minibatch ``idx`` (gradients synchronised at the last one)."""
        cfg, acc = trainer.config, trainer.accelerator
        x, x_next, sigmas = roll.trajectory[idx, k], roll.trajectory[idx, k + 1], roll.sigmas
        s = sigmas[k].expand(x.shape[0])
        args = (roll.embeds[idx], roll.pooled[idx], neg[0][idx], neg[1][idx])
        sync = contextlib.nullcontext() if last else acc.no_sync(trainer.transformer)
        with sync, acc.autocast():
            v = trainer.policy.cfg_velocity(trainer.transformer, x, s, *args, detach_uncond=cfg.detach_uncond)
            _, logp, mean, std = sde_step(x, v, sigmas[k], sigmas[k + 1], noise_level=cfg.noise_level,
                                          prev_sample=x_next, log_prob_reduction="mean")
            with torch.no_grad(), trainer.policy.reference_model() as ref:
                v_ref = trainer.policy.cfg_velocity(ref, x, s, *args)
                _, _, ref_mean, _ = sde_step(x, v_ref, sigmas[k], sigmas[k + 1], noise_level=cfg.noise_level,
                                             prev_sample=x_next)
            policy, clip_frac, approx_kl = O.grpo_policy_loss(logp, roll.log_probs[idx, k], adv[idx],
                                                              cfg.grpo_clip_range)
            kl = O.gaussian_kl_to_reference(mean, ref_mean, std, reduction="mean").mean()
            loss = (policy + cfg.grpo_kl_weight * kl) / steps
        acc.backward(loss)
        metrics.add("policy_loss", policy.item() / steps)
        metrics.add("kl", kl.item() / steps)
        metrics.add("clip_fraction", float(clip_frac) / steps)
        metrics.add("approx_kl", float(approx_kl) / steps)


METHOD = GRPO()
