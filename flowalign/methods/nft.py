"""DiffusionNFT (arXiv 2509.16117): implicit positive / negative policies around the sampling policy, regressed on
freshly noised states (docs/algorithms.md)::

    A      = clip(group advantage, -c, c),   r = A / (2c) + 1/2 in [0, 1]
    v+     = (1 - b) v_old + b v_theta,      v- = (1 + b) v_old - b v_theta
    L      = mean_i r_i ||v+ - u_i||^2 + (1 - r_i) ||v- - u_i||^2 + alpha ||v_theta - stopgrad(v_ref)||^2
    v_old  = the sampling policy: the trained one, or an EMA of it (nft_ema_decay > 0)
    kl_coef: alpha = kl_coef / c   (the implicit step is c b: docs/algorithms.md)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from flowalign import objectives as O
from flowalign.methods.base import Rewards, StateBatch
from flowalign.methods.flow_matching import Field, FlowMatchingMethod, FlowMatchingSettings, w2_term


@dataclass
class NFTSettings:
    """DiffusionNFT's knobs (``ACFlowConfig`` inherits them; its clip c is ``advantage_clip``)."""

    nft_beta: float = field(default=1.0, metadata={"help": (
        "b of DiffusionNFT's implicit policies v+ = (1 - b) v_old + b v, v- = (1 + b) v_old - b v"
    )})
    nft_ema_decay: float = field(default=0.0, metadata={"help": (
        "DiffusionNFT's sampling policy: an EMA of the trained parameters with this decay per iteration "
        "(0 = the trained policy itself, on-policy)"
    )})


def clipped_group_advantages(trainer: Any, rewards: Rewards) -> torch.Tensor:
    """Group advantages (z-scores within each prompt group, every rank's images), clipped to +-advantage_clip."""
    clip = trainer.config.advantage_clip
    return O.grpo_advantages(rewards.all, rewards.groups)[rewards.mine].clamp(-clip, clip)


def old_field(trainer: Any, batches: list[StateBatch], fitted: Field) -> None:
    """``v_old``: the sampling policy's field at every state, before any update of the iteration."""
    with torch.no_grad(), trainer.accelerator.autocast(), trainer.policy.sampling_policy():
        for b in batches:
            b.v_old = fitted(trainer.unwrapped, b.x_s, b.sigma, b.idx).float()


class NFT(FlowMatchingMethod):
    name = "nft"
    settings = (FlowMatchingSettings, NFTSettings)
    fm_states = "noised"

    def kl_knobs(self, cfg: Any, kl_coef: float) -> dict[str, float]:
        return {**super().kl_knobs(cfg, kl_coef), "w2_weight": kl_coef / cfg.advantage_clip}

    def uses_ema(self, cfg: Any) -> bool:
        return cfg.nft_ema_decay > 0

    def targets(self, trainer: Any, rewards: Rewards) -> torch.Tensor:
        return clipped_group_advantages(trainer, rewards)

    def prepare(self, trainer: Any, batches: list[StateBatch], fitted: Field) -> None:
        old_field(trainer, batches, fitted)

    def loss(self, trainer: Any, v: torch.Tensor, b: StateBatch, v_ref: torch.Tensor | None):
        cfg = trainer.config
        loss = O.nft_loss(v, b.v_old, b.target, O.nft_optimality(b.adv, cfg.advantage_clip), beta=cfg.nft_beta)
        w2 = w2_term(cfg, v, v_ref)
        return (loss + cfg.w2_weight * w2 if cfg.w2_weight else loss), {"fm_loss": loss.detach(), "w2": w2.detach()}


METHOD = NFT()
