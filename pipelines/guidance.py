"""Classifier-free guidance (CFG), written once for every sampler of the package.

The guided velocity of a conditional flow model, from its unconditional and conditional velocities::

    v = v_u + g * (v_c - v_u)

g = 1 is the conditional model, g = 0 the unconditional one, g > 1 guides. The expression is the stock
diffusers one (``noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)``), in the
same order of operations, so a pipeline that uses it draws the stock pipeline's images bit for bit.

Example::

    import torch
    from flowalign.pipelines.guidance import classifier_free_guidance

    v = torch.randn(2 * 4, 16, 64, 64)           # a CFG batch: [uncond; cond]
    v_uncond, v_cond = v.chunk(2)
    guided = classifier_free_guidance(v_uncond, v_cond, 4.5)
"""

from __future__ import annotations

import torch

__all__ = ["classifier_free_guidance"]


def classifier_free_guidance(
    v_uncond: torch.Tensor, v_cond: torch.Tensor, guidance_scale: float | torch.Tensor
) -> torch.Tensor:
    """``v_u + g * (v_c - v_u)``: the CFG-guided velocity (or noise prediction).

    Args:
        v_uncond: the velocity of the unconditional (negative-prompt) branch, ``[B, ...]``.
        v_cond: the velocity of the conditional branch, the same shape.
        guidance_scale: g (a number, or a tensor that broadcasts against the velocities).

    Example: ``classifier_free_guidance(torch.zeros(1), torch.ones(1), 4.5)`` is ``tensor([4.5])``.
    """
    return v_uncond + guidance_scale * (v_cond - v_uncond)  # v = v_u + g (v_c - v_u)
