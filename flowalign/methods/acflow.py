"""AC-Flow: actor-critic flow matching with intermediate feedback (ideas from "AC-Flow", arXiv 2510.18072; the
concrete design is ours, docs/algorithms.md)::

    shaping    r~ = clip((r - mean_c) / (std_c + eps), -k, k)     per prompt group, statistics over all ranks
    critic     L_V = mean (V(x_s, s, c) - r~)^2                    one step per minibatch
    advantage  A = clip(r~ - V(x_s, s, c), -eps_A, eps_A)          V = 0 during the warm-up
    actor      L = mean_i f(A_i) ||v_theta - u_i||^2 + alpha ||v_theta - stopgrad(v_ref)||^2
    kl_coef    alpha = kl_coef * beta                              (the KL coefficient alpha / beta)
"""

from __future__ import annotations

from typing import Any

import torch

from flowalign import objectives as O
from flowalign.methods.base import Metrics, Rewards, StateBatch
from flowalign.methods.flow_matching import FlowMatchingMethod


class ACFlow(FlowMatchingMethod):
    name = "acflow"
    uses_critic = True

    def targets(self, trainer: Any, rewards: Rewards) -> torch.Tensor:
        cfg = trainer.config
        if not cfg.shaping:
            return rewards.local
        if trainer.group_size >= 2:  # r~ = clip((r - mean_c) / (std_c + eps), -k, k), statistics over all ranks
            return O.shape_rewards(rewards.all, rewards.groups, clip=cfg.shaping_clip)[rewards.mine]
        # one image per group: running statistics (identical on every rank: fed the gathered rewards)
        return O.shape_rewards(rewards.all, None, clip=cfg.shaping_clip, running=trainer.running)[rewards.mine]

    def warming_up(self, trainer: Any) -> bool:
        return trainer.iteration < trainer.config.critic_warmup_iterations

    def advantages(self, trainer: Any, batches: list[StateBatch], targets: torch.Tensor, metrics: Metrics) -> None:
        """A = clip(r~ - V(x_s, s, c), +-eps_A) with the critic as it was before this iteration (scored after its
        updates, the critic would have fit these very samples and the advantages shrink); V = 0 while warming up."""
        cfg, acc = trainer.config, trainer.accelerator
        warm = self.warming_up(trainer)
        for b in batches:
            tgt = targets[b.idx]
            with torch.no_grad(), acc.autocast():
                b.values = trainer.critic(b.x_s, b.sigma, b.pooled).float()
            b.adv, clip_frac = O.advantages(tgt, torch.zeros_like(tgt) if warm else b.values, clip=cfg.advantage_clip)
            metrics.add("advantage_clip_fraction", clip_frac)
            metrics.add("explained_variance", O.explained_variance(b.values, tgt))

    def critic_step(self, trainer: Any, b: StateBatch, targets: torch.Tensor, metrics: Metrics) -> bool:
        """L_V = mean (V(x_s, s, c) - r~)^2; during a "frozen" warm-up the actor waits."""
        acc = trainer.accelerator
        with acc.autocast():
            lv = O.critic_loss(trainer.critic(b.x_s, b.sigma, b.pooled).float(), targets[b.idx])
        trainer.critic_optimizer.zero_grad(set_to_none=True)
        if trainer.critic_prepared:
            acc.backward(lv)
        else:  # replicated beside a sharded transformer: its own backward (no fp16 scaler of the transformer's)
            lv.backward()
        trainer.critic_optimizer.step()
        metrics.add("critic_loss", lv.detach())
        return not (self.warming_up(trainer) and trainer.config.warmup_actor == "frozen")

    def loss(self, trainer: Any, v: torch.Tensor, b: StateBatch, v_ref: torch.Tensor | None):
        cfg = trainer.config
        return O.acflow_actor_loss(v, b.target, b.adv, beta=cfg.beta, weighting=cfg.weighting, v_ref=v_ref,
                                   w2_weight=cfg.w2_weight, fm_scale=b.fm_scale, v_old=b.v_old)


METHOD = ACFlow()
