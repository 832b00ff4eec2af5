"""The shapes-world verifier as a reward: exact, prompt-aware, no weights.

``flowalign.shapes.verify_batch(images, prompts)`` checks every clause of a shapes prompt (object,
colour, count, position) on the rendered image and returns, per image, the fraction of satisfied
checks and whether all are satisfied. This reward exposes either one:

    dense  (``ShapesVerifier()``, registered as ``"shapes"``):        fraction of checks satisfied, in [0, 1]
    binary (``ShapesVerifier(binary=True)``, ``"shapes_binary"``):    1 if all checks are satisfied, else 0

Example::

    from flowalign.rewards import load
    reward = load("shapes")
    scores = reward(images, ["a red circle above a blue square", ...])
"""

from __future__ import annotations

from flowalign.rewards.base import Reward
from flowalign.shapes import verify_batch
from torch import Tensor


class ShapesVerifier(Reward):
    """Shapes-world verifier reward (see the module docstring).

    Args:
        binary: score ``all_satisfied`` (0/1) instead of the fraction of satisfied checks.
        batch_size: images per chunk.
    """

    differentiable = False
    requires_prompts = True

    def __init__(self, binary: bool = False, batch_size: int | None = 256):
        super().__init__(batch_size=batch_size)
        self.binary = bool(binary)
        self.name = "shapes_binary" if self.binary else "shapes"

    def score_chunk(self, images: Tensor, prompts: list[str]) -> Tensor:
        fraction, all_satisfied = verify_batch(images, prompts)
        scores = all_satisfied if self.binary else fraction
        return scores.to(device=images.device, dtype=images.dtype).reshape(-1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, binary={self.binary}"
