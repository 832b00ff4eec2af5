"""The tiny world's credit-assignment task: ``redness``, the fixed z-scored mixture ``red_jpeg`` and its unseen
JPEG-side read-out ``png_compressibility``.

The task (``samples/configs/credit_red_jpeg.yaml``) trains on shapes prompts that name no colour
(``prompts: shapes_nocolor``) with a mixture of two rewards that pull different ways: redness wants red, and
more of it; JPEG compressibility wants flat, simple images. Every reward here is a fixed function of one image,
with no weights:

    redness_i   = mean over pixels of  R - max(G, B)                       (in [-1, 1]; any grey, white included: 0)
    red_jpeg_i  = 0.5 (redness_i - m_r) / s_r  +  0.5 (jpeg_i - m_j) / s_j    (jpeg = jpeg_compressibility, q 95)
    png_i       = - size_kB(PNG(image))                                    (lossless, zlib level 6)

Redness is the red chroma of a pixel: how far its red channel rises above the larger of the other two. On the
shapes palette (``flowalign.shapes.COLORS``): red 0.902, yellow 0.118, white 0, green -0.745, blue -0.902, so
only red objects raise it, and yellow (a red-green mix) barely. ``R - (G + B) / 2`` would give yellow 0.55,
half a red. Images are float ``[B, 3, H, W]`` in [0, 1]; the score is torch end to end (differentiable almost
everywhere).

``red_jpeg``'s means and stds ``(m_r, s_r)``, ``(m_j, s_j)`` are constants (``RED_JPEG_STATS``): the population
mean and std of each component over the embedded base model's training rollouts of the no-colour prompts, as
the credit config samples them. A batch z-score (``Mixture(normalize="zscore")``) would make an image's score
depend on its batch-mates; with fixed constants the reward is a function of the image alone, and 0 is the base
model's average.

``png_compressibility`` measures the same "simple image" preference with another coder (lossless DEFLATE of
the uint8 pixels instead of the JPEG's quantised DCT blocks); a policy that games the JPEG coder's block
structure gains less on it. It is one of the no-colour source's unseen evaluation rewards.

Example::

    from flowalign.rewards import load
    scores = load("red_jpeg")(images)          # images: float [B, 3, H, W] in [0, 1]; prompts not needed
    red = load("redness")(images)
"""

from __future__ import annotations

from flowalign.rewards.base import Reward
from flowalign.rewards.jpeg import JpegCompressibility, encoded_size_kb
from flowalign.rewards.mixture import Mixture
from torch import Tensor

# (mean, std) of each red_jpeg component on the embedded base model's rollouts of the no-colour training prompts
# (population std over images). Measured with
#   python -c "from flowalign.shapes_eval import reward_statistics; print(reward_statistics(
#       'samples/configs/credit_red_jpeg.yaml', ['redness', 'jpeg_compressibility'], n_images=1024))"
# (seed 0: the trainer's iteration prompts of iterations 0-15, 8 prompts x 8 SDE rollouts each, decoded; 193 s on
# one CPU thread): redness mean -0.023209 std 0.082637, jpeg_compressibility mean -1.235209 std 0.199272 (kB).
# tests/test_rewards.py re-measures them on 128 rollouts of other seeds.
RED_JPEG_STATS = {
    "redness": (-0.023209, 0.082637),
    "jpeg_compressibility": (-1.235209, 0.199272),
}
RED_JPEG_WEIGHTS = {"redness": 0.5, "jpeg_compressibility": 0.5}


def redness_score(images: Tensor) -> Tensor:
    """Mean over pixels of ``R - max(G, B)`` of each image of a float batch ``[B, 3, H, W]`` in [0, 1].

    Example: a pure red image (1, 0, 0) scores 1, a white or grey one 0, a pure blue one -1.
    """
    return (images[:, 0] - images[:, 1:].amax(dim=1)).mean(dim=(1, 2))  # R - max(G, B), averaged over pixels


class Redness(Reward):
    """Reward = mean over pixels of ``R - max(G, B)`` (see the module docstring); no prompts, differentiable."""

    name = "redness"
    differentiable = True
    requires_prompts = False

    def __init__(self, batch_size: int | None = None):
        super().__init__(batch_size=batch_size)

    def score_chunk(self, images: Tensor, prompts: list[str]) -> Tensor:
        return redness_score(images)


def png_size_kb(images: Tensor, compress_level: int = 6) -> Tensor:
    """Lossless PNG size in kB (1000 bytes) of each image of a float batch ``[B, 3, H, W]`` in [0, 1]
    (rounded to uint8 first, as :func:`flowalign.rewards.jpeg.jpeg_size_kb`)."""
    return encoded_size_kb(images, "PNG", compress_level=compress_level)


class PngCompressibility(Reward):
    """Reward = minus the lossless PNG size in kB (zlib ``compress_level`` 0-9, default 6): flat images score higher.

    Args:
        compress_level: PIL's PNG ``compress_level``.
        batch_size: images per chunk (encoding is per image; chunking only bounds memory).
    """

    name = "png_compressibility"
    differentiable = False
    requires_prompts = False

    def __init__(self, compress_level: int = 6, batch_size: int | None = 32):
        super().__init__(batch_size=batch_size)
        if not 0 <= int(compress_level) <= 9:
            raise ValueError(f"PNG compress_level must be in [0, 9]; got {compress_level}.")
        self.compress_level = int(compress_level)

    def score_chunk(self, images: Tensor, prompts: list[str]) -> Tensor:
        return -png_size_kb(images, self.compress_level)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, compress_level={self.compress_level}"


def red_jpeg(redness_weight: float = RED_JPEG_WEIGHTS["redness"],
             jpeg_weight: float = RED_JPEG_WEIGHTS["jpeg_compressibility"]) -> Mixture:
    """The credit task's reward: ``w_r (redness - m_r) / s_r + w_j (jpeg_compressibility - m_j) / s_j`` with the
    fixed ``RED_JPEG_STATS`` (default weights 0.5 and 0.5; registered as ``"red_jpeg"``).

    Example::

        reward = red_jpeg()                       # or flowalign.rewards.load("red_jpeg")
        reward.components(images, None)          # {"redness": ..., "jpeg_compressibility": ...}, raw
    """
    names = list(RED_JPEG_WEIGHTS)
    mixture = Mixture([(Redness(), redness_weight), (JpegCompressibility(), jpeg_weight)], normalize="fixed",
                      stats=[RED_JPEG_STATS[n] for n in names])
    mixture.name = "red_jpeg"
    return mixture
