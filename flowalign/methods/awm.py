"""Advantage Weighted Matching (arXiv 2509.25050): the flow-matching loss on freshly noised states weighted by the
clipped group advantage, with a ratio clip against the sampling policy (docs/algorithms.md)::

    log p   = -||v - u||^2 (per-dimension mean),   ratio = exp(log p_theta - log p_old)
    L       = -mean_i min(ratio_i A_i, clip(ratio_i, 1 +- eps) A_i) + alpha ||v_theta - stopgrad(v_ref)||^2
    kl_coef: alpha = kl_coef
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from flowalign import objectives as O
from flowalign.methods.base import Rewards, StateBatch
from flowalign.methods.flow_matching import Field, FlowMatchingMethod, FlowMatchingSettings, w2_term
from flowalign.methods.nft import clipped_group_advantages, old_field


@dataclass
class AWMSettings:
    """Advantage Weighted Matching's knobs (``ACFlowConfig`` inherits them)."""

    awm_clip_range: float = field(default=0.01, metadata={"help": (
        "AWM's ratio clip on exp(log p - log p_old), log p = -||v - u||^2 (per-dimension mean)"
    )})


class AWM(FlowMatchingMethod):
    name = "awm"
    settings = (FlowMatchingSettings, AWMSettings)
    fm_states = "noised"

    def kl_knobs(self, cfg: Any, kl_coef: float) -> dict[str, float]:
        return {**super().kl_knobs(cfg, kl_coef), "w2_weight": kl_coef}

    def targets(self, trainer: Any, rewards: Rewards) -> torch.Tensor:
        return clipped_group_advantages(trainer, rewards)

    def prepare(self, trainer: Any, batches: list[StateBatch], fitted: Field) -> None:
        old_field(trainer, batches, fitted)
        for b in batches:  # log p_old = -||v_old - u||^2
            b.old_log_prob = -O.per_sample_mse(b.v_old, b.target)

    def loss(self, trainer: Any, v: torch.Tensor, b: StateBatch, v_ref: torch.Tensor | None):
        cfg = trainer.config
        loss, frac = O.awm_loss(v, b.target, b.adv, old_log_prob=b.old_log_prob, clip_range=cfg.awm_clip_range)
        w2 = w2_term(cfg, v, v_ref)
        metrics = {"fm_loss": loss.detach(), "clip_fraction": frac, "w2": w2.detach()}
        return (loss + cfg.w2_weight * w2 if cfg.w2_weight else loss), metrics


METHOD = AWM()
