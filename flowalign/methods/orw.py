"""ORW-CFM-W2 (Fan et al., ICLR 2025): online reward-weighted conditional flow matching with a W2 bound, AC-Flow's
special case with no critic and no shaping, on freshly noised samples::

    A      = (r - mean_batch r) / (std_batch r + 1e-6)             over every rank's images
    L      = mean_i w_i ||v_theta(x_s, s, c) - (eps - x0_i)||^2 + alpha ||v_theta - stopgrad(v_ref)||^2
    w_i    = exp(beta A_i) / mean_batch exp(beta A)
    kl_coef: alpha = kl_coef * beta
"""

from __future__ import annotations

from typing import Any

import torch

from flowalign import objectives as O
from flowalign.methods.base import Rewards, StateBatch
from flowalign.methods.flow_matching import FlowMatchingMethod


class ORW(FlowMatchingMethod):
    name = "orw"
    fm_states = "noised"

    def targets(self, trainer: Any, rewards: Rewards) -> torch.Tensor:
        r = rewards.all  # normalised over the batch of all ranks, population std
        return ((r - r.mean()) / (r.std(unbiased=False) + 1e-6))[rewards.mine]

    def loss(self, trainer: Any, v: torch.Tensor, b: StateBatch, v_ref: torch.Tensor | None):
        cfg = trainer.config  # exp weights, as published
        return O.acflow_actor_loss(v, b.target, b.adv, beta=cfg.beta, weighting="exp", v_ref=v_ref,
                                   w2_weight=cfg.w2_weight, fm_scale=b.fm_scale, v_old=b.v_old)


METHOD = ORW()
