"""JPEG (in)compressibility: the size of the image encoded as JPEG, a reward with no weights.

The DDPO paper's pair of "free" rewards: incompressibility rewards detail and texture, compressibility
rewards flat, simple images. Both encode with PIL at a fixed quality (default 95, as DDPO):

    incompressibility = size_kB(JPEG_q(image))          (1 kB = 1000 bytes)
    compressibility   = -incompressibility

Images are rounded to uint8 first (the encoder needs bytes), so these rewards are not differentiable.

Example::

    from flowalign.rewards import load
    reward = load("jpeg_compressibility")        # or JpegCompressibility(quality=95)
    scores = reward(images)                      # prompts are not needed
"""

from __future__ import annotations

import io

import torch
from flowalign.rewards.base import Reward
from PIL import Image
from torch import Tensor


def encoded_size_kb(images: Tensor, format: str, **save_options) -> Tensor:
    """Size in kB (1000 bytes) of each image of a float batch ``[B, 3, H, W]`` in [0, 1], rounded to uint8 and
    encoded by PIL in ``format`` with ``save_options`` (e.g. ``quality=95`` for JPEG)."""
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()  # NCHW -> NHWC for PIL
    sizes = []
    for array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format=format, **save_options)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


def jpeg_size_kb(images: Tensor, quality: int = 95) -> Tensor:
    """Encoded JPEG size in kB (1000 bytes) of each image of a float batch ``[B, 3, H, W]`` in [0, 1]."""
    return encoded_size_kb(images, "JPEG", quality=quality)


class JpegIncompressibility(Reward):
    """Reward = JPEG size in kB at ``quality`` (bigger files score higher).

    Args:
        quality: JPEG quality passed to PIL (1-95; DDPO uses 95).
        batch_size: images per chunk (encoding is per image; chunking only bounds memory).
    """

    name = "jpeg_incompressibility"
    differentiable = False
    requires_prompts = False
    sign = 1.0

    def __init__(self, quality: int = 95, batch_size: int | None = 32):
        super().__init__(batch_size=batch_size)
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"JPEG quality must be in [1, 100]; got {quality}.")
        self.quality = int(quality)

    def score_chunk(self, images: Tensor, prompts: list[str]) -> Tensor:
        return self.sign * jpeg_size_kb(images, self.quality)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, quality={self.quality}"


class JpegCompressibility(JpegIncompressibility):
    """Reward = minus the JPEG size in kB at ``quality`` (smaller files score higher)."""

    name = "jpeg_compressibility"
    sign = -1.0
