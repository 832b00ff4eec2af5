"""Torch preprocessing vs the libraries' PIL processors, on a real photo.

Tolerance: the library processors resize PIL images, which PIL does in two passes (width, then
height) rounding to uint8 after each; our torch version uses the same antialiased bicubic kernel
and pass order without the rounding. That leaves at most ~1/255 per pixel (two roundings of
<= 0.5/255) and ~0.3/255 on average; after normalisation (divide by std >= 0.26) we allow
1.5/255 / 0.26 at worst and 0.5/255 / 0.26 on average. Crop placement is exact: an off-by-one crop
fails by orders of magnitude (checked below with the other library's rounding convention).
"""

from __future__ import annotations

import dataclasses

import matplotlib.cbook
import pytest
import torch
from flowalign.rewards.base import pil_to_tensor
from flowalign.rewards.preprocess import ImagePreprocess
from PIL import Image

MAX_TOLERANCE = 1.5 / 255 / 0.26
MEAN_TOLERANCE = 0.5 / 255 / 0.26


@pytest.fixture(scope="module")
def photos():
    """A real photo (matplotlib's sample Grace Hopper portrait, 512x600) at several sizes and aspects.

    (303, 200) resizes to 339x224: the 115-pixel margin puts transformers' floor and torchvision's
    round crop offsets one pixel apart; (131, 97) needs upsampling.
    """
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        photo = Image.open(f).convert("RGB")
    return [
        photo,
        photo.crop((0, 0, 512, 300)),
        photo.resize((131, 97), Image.BICUBIC),
        photo.resize((303, 200), Image.BICUBIC),
        photo.crop((10, 10, 234, 234)),  # already 224 x 224: no resize at all
    ]


def _assert_close(reference: torch.Tensor, ours: torch.Tensor) -> None:
    assert reference.shape == ours.shape
    difference = (reference - ours).abs()
    assert difference.max() <= MAX_TOLERANCE and difference.mean() <= MEAN_TOLERANCE, (
        difference.max(),
        difference.mean(),
    )


def _hf_processors():
    from transformers import CLIPImageProcessor

    processors = [CLIPImageProcessor()]  # laion/CLIP-ViT-H-14 and openai/clip-vit-large-patch14 settings
    try:  # transformers >= 5 keeps the PIL implementation as a separate class
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        processors.append(CLIPImageProcessorPil())
    except ImportError:
        pass
    return processors


@pytest.mark.parametrize("processor", _hf_processors(), ids=lambda p: type(p).__name__)
def test_matches_transformers_clip_image_processor(processor, photos):
    ours = ImagePreprocess.from_hf_image_processor(processor)
    assert ours.size == (224, 224) and ours.crop_offset == "floor"
    for photo in photos:
        reference = processor(images=photo, return_tensors="pt")["pixel_values"]
        _assert_close(reference, ours(pil_to_tensor(photo)[None]))
    wrong = dataclasses.replace(ours, crop_offset="round")(pil_to_tensor(photos[3])[None])
    assert (processor(images=photos[3], return_tensors="pt")["pixel_values"] - wrong).abs().max() > 10 * MAX_TOLERANCE


@pytest.mark.parametrize("resize_mode", ["shortest", "longest"])
def test_matches_open_clip_preprocess(resize_mode, photos):
    import open_clip

    transform = open_clip.image_transform(224, is_train=False, resize_mode=resize_mode)
    ours = ImagePreprocess(size=(224, 224), resize_mode=resize_mode)
    for photo in photos:
        _assert_close(transform(photo)[None], ours(pil_to_tensor(photo)[None]))


def test_from_open_clip_reads_the_model_config_and_is_differentiable():
    import open_clip

    model = open_clip.create_model("ViT-B-32", load_weights=False)
    ours = ImagePreprocess.from_open_clip(model)
    assert ours.size == (224, 224) and ours.resize_mode == "shortest" and ours.crop_offset == "round"
    assert ImagePreprocess.from_open_clip(model, resize_mode="longest").resize_mode == "longest"
    images = torch.rand(2, 3, 100, 150, requires_grad=True)
    out = ours(images)
    assert out.shape == (2, 3, 224, 224)
    out.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_resized_sizes_follow_each_library():
    hf = ImagePreprocess(resize_to=224, crop_offset="floor")
    assert hf.resized_size(600, 512) == (262, 224)  # int(224 * 600 / 512) = 262
    assert hf.resized_size(200, 303) == (224, 339)
    longest = ImagePreprocess(resize_mode="longest")
    assert longest.resized_size(600, 512) == (224, 191)  # round(512 * 224 / 600) = 191, then padded
    assert ImagePreprocess(resize_mode="squash").resized_size(10, 999) == (224, 224)
    with pytest.raises(ValueError, match="resize_mode must be"):
        ImagePreprocess(resize_mode="fit")
