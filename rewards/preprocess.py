"""Image preprocessing in torch: resize, center crop (or pad), normalise, with gradients.

Reward models ship a PIL-based processor (transformers ``CLIPImageProcessor``, open_clip's
``preprocess`` transform). Those break the graph, so a differentiable reward needs the same steps in
torch. :class:`ImagePreprocess` reads the numbers from the library's own configuration (sizes,
interpolation, normalisation constants, crop/pad convention) and applies them to a float batch
``[B, 3, H, W]`` in [0, 1].

What differs from the PIL path, and by how much (checked in ``tests/test_rewards_preprocess.py``):
torch's antialiased bicubic filter uses PIL's kernel (a = -0.5) and we resize in PIL's order (width,
then height, clipping between the passes); what is left is PIL rounding each pass to ``uint8``,
at most ~1/255 on a pixel and ~0.3/255 on average (x 1/std ~ 3.7 after normalisation).

Example::

    from transformers import CLIPImageProcessor
    preprocess = ImagePreprocess.from_hf_image_processor(CLIPImageProcessor())
    pixel_values = preprocess(images)          # [B, 3, 224, 224], differentiable in images
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL.Image.Resampling values used by transformers


def _size_value(size: Any, key: str) -> int | None:
    """Read ``key`` from a transformers size dict (plain dict or ``SizeDict``)."""
    if size is None:
        return None
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return None if value is None else int(value)


@dataclass(frozen=True)
class ImagePreprocess:
    """CLIP-style preprocessing of float images in [0, 1], in torch.

    Attributes:
        size: ``(height, width)`` of the model input.
        mean, std: per-channel normalisation constants (``(x - mean) / std``).
        resize_mode: ``"shortest"``: scale so the shortest side matches ``resize_to`` (or ``size``), then
            center crop; ``"longest"``: scale so the longest side fits ``size``, then center pad with
            ``fill``; ``"squash"``: resize to ``size`` ignoring the aspect ratio; ``"none"``: no resize.
        resize_to: target of the shortest side in ``"shortest"`` mode (transformers' ``shortest_edge``,
            which may differ from the crop size); defaults to ``size``.
        interpolation: ``"bicubic"`` or ``"bilinear"`` (antialiased, as PIL).
        crop_offset: ``"round"`` (torchvision / open_clip: ``round((H - h) / 2)``) or ``"floor"``
            (transformers: ``(H - h) // 2``) for the top-left corner of the center crop.
        fill: pad value (in [0, 1] pixel units) used where the image is smaller than ``size``.
    """

    size: tuple[int, int] = (224, 224)
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    resize_mode: str = "shortest"
    resize_to: int | None = None
    interpolation: str = "bicubic"
    crop_offset: str = "round"
    fill: float = 0.0

    def __post_init__(self) -> None:
        if self.resize_mode not in ("shortest", "longest", "squash", "none"):
            raise ValueError(f"resize_mode must be shortest/longest/squash/none; got {self.resize_mode!r}.")
        if self.interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"interpolation must be 'bicubic' or 'bilinear'; got {self.interpolation!r}.")
        if self.crop_offset not in ("round", "floor"):
            raise ValueError(f"crop_offset must be 'round' or 'floor'; got {self.crop_offset!r}.")

    # -- construction from the libraries' configurations ---------------------------------------
    @classmethod
    def from_hf_image_processor(cls, processor: Any) -> ImagePreprocess:
        """Read a transformers image processor (e.g. ``CLIPImageProcessor``; PIL or torchvision backend)."""
        processor = getattr(processor, "image_processor", processor)  # a CLIPProcessor holds one
        crop = getattr(processor, "crop_size", None)
        size = getattr(processor, "size", None)
        shortest = _size_value(size, "shortest_edge")
        height, width = _size_value(size, "height"), _size_value(size, "width")
        if getattr(processor, "do_center_crop", False) and crop is not None:
            out = (_size_value(crop, "height"), _size_value(crop, "width"))
        elif height and width:
            out = (height, width)
        elif shortest:
            out = (shortest, shortest)
        else:
            raise ValueError(
                f"Cannot read the input size of {type(processor).__name__}: size={size}, crop_size={crop}."
            )
        if not getattr(processor, "do_resize", True):
            mode, resize_to = "none", None
        elif shortest:
            mode, resize_to = "shortest", shortest
        else:
            mode, resize_to = "squash", None
        resample = getattr(processor, "resample", 3)
        resample = int(getattr(resample, "value", resample)) if not isinstance(resample, str) else resample
        interpolation = _PIL_RESAMPLE.get(resample, resample if isinstance(resample, str) else "bicubic")
        normalize = getattr(processor, "do_normalize", True)
        mean = tuple(processor.image_mean) if normalize else (0.0, 0.0, 0.0)
        std = tuple(processor.image_std) if normalize else (1.0, 1.0, 1.0)
        return cls(
            size=out,
            mean=mean,
            std=std,
            resize_mode=mode,
            resize_to=resize_to,
            interpolation=str(interpolation).lower(),
            crop_offset="floor",
        )

    @classmethod
    def from_open_clip(cls, model: Any, resize_mode: str | None = None) -> ImagePreprocess:
        """Read an open_clip model's preprocessing configuration (``open_clip.get_model_preprocess_cfg``).

        ``resize_mode`` overrides the model's (HPS evaluates with ``"longest"``).
        """
        import open_clip  # heavy, and `import flowalign.rewards` loads this module: only for open_clip presets

        cfg = open_clip.get_model_preprocess_cfg(model)
        size = cfg.get("size", 224)
        size = (size, size) if isinstance(size, int) else tuple(size)
        fill = cfg.get("fill_color", 0)
        return cls(
            size=(int(size[0]), int(size[1])),
            mean=tuple(cfg.get("mean", OPENAI_CLIP_MEAN)),
            std=tuple(cfg.get("std", OPENAI_CLIP_STD)),
            resize_mode=resize_mode or cfg.get("resize_mode", "shortest"),
            interpolation="bilinear" if cfg.get("interpolation") == "bilinear" else "bicubic",
            crop_offset="round",
            fill=float(fill) / 255.0,
        )

    # -- the transform --------------------------------------------------------------------------
    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """Size after the resize step, with the library's rounding."""
        th, tw = self.size
        if self.resize_mode == "none":
            return height, width
        if self.resize_mode == "squash":
            return th, tw
        if self.resize_mode == "shortest" and (self.resize_to is not None or th == tw):
            # torchvision Resize(int) / transformers shortest_edge: the long side is truncated.
            short = self.resize_to or th
            if width <= height:
                return int(short * height / width), short
            return short, int(short * width / height)
        # open_clip ResizeKeepRatio: one ratio for both sides, rounded.
        ratio_h, ratio_w = height / th, width / tw
        ratio = max(ratio_h, ratio_w) if self.resize_mode == "longest" else min(ratio_h, ratio_w)
        return round(height / ratio), round(width / ratio)

    def __call__(self, images: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """``images`` float ``[B, 3, H, W]`` in [0, 1] -> normalised model input ``[B, 3, *size]``."""
        x = images.float()
        height, width = x.shape[-2:]
        new_h, new_w = self.resized_size(height, width)
        # Separable resize as PIL does it: width first, then height, clipping to [0, 1] after each
        # pass (PIL keeps uint8 between the passes, which clips the bicubic overshoot at edges).
        if new_w != width:
            x = self._resize(x, (height, new_w))
        if new_h != height:
            x = self._resize(x, (new_h, new_w))
        x = self._center_crop_or_pad(x)
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        x = (x - mean) / std
        return x if dtype is None else x.to(dtype)

    def _resize(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        x = F.interpolate(x, size=size, mode=self.interpolation, align_corners=False, antialias=True)
        return x.clamp(0.0, 1.0)

    def _center_crop_or_pad(self, x: Tensor) -> Tensor:
        th, tw = self.size
        height, width = x.shape[-2:]
        if th > height or tw > width:
            # pad left/top by floor(d / 2), right/bottom by ceil(d / 2), as torchvision and open_clip
            pad_w, pad_h = max(tw - width, 0), max(th - height, 0)
            x = F.pad(x, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2), value=self.fill)
            height, width = x.shape[-2:]
        if (height, width) == (th, tw):
            return x
        if self.crop_offset == "round":
            top, left = (
                round((height - th) / 2.0),
                round((width - tw) / 2.0),
            )  # Python rounds half to even, as torchvision
        else:
            top, left = (height - th) // 2, (width - tw) // 2
        return x[..., top : top + th, left : left + tw]
