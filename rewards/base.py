"""The reward protocol: ``reward(images, prompts) -> Tensor[B]``, and the small base class behind it.

A reward maps a batch of images and their prompts to one float per image::

    scores = reward(images, prompts)   # images: float [B, 3, H, W] in [0, 1] (or a list of PIL images)
                                       # prompts: list of B strings (or one string for the whole batch)
                                       # scores: float [B], on images.device, in images.dtype

:class:`Reward` does everything that is the same for every reward, so that a subclass only writes
``score_chunk`` (the model call on one already-checked chunk):

- input checks with errors that name the bad value and the fix (shape, dtype, range, prompt count);
- PIL lists are converted to tensors (images of different sizes are scored in same-size groups);
- batches are split into chunks of ``batch_size`` images (memory) and the scores concatenated;
- ``torch.no_grad()`` unless the reward is ``differentiable`` (torch preprocessing end to end);
- the reward's weights follow the images' device (moved once, on the first call from a new device),
  and the scores come back in the images' dtype;
- a NaN score is an error, never a silent training signal.

Any plain callable ``f(images, prompts) -> scores`` is a reward too: ``flowalign.rewards.as_reward``
(defined in :mod:`flowalign.rewards.registry`, since it also resolves registered names) wraps it in a
:class:`FunctionReward` wherever flowalign accepts a reward. This module imports no other reward module.

Example::

    import torch
    from flowalign.rewards import Reward, as_reward

    class Brightness(Reward):
        name = "brightness"
        differentiable = True
        requires_prompts = False

        def score_chunk(self, images, prompts):
            return images.mean(dim=(1, 2, 3))

    reward = Brightness(batch_size=8)
    reward(torch.rand(20, 3, 32, 32), None).shape          # torch.Size([20])
    redness = as_reward(lambda images, prompts: images[:, 0].mean(dim=(1, 2)))
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

RANGE_TOLERANCE = 1e-3
"""How far outside [0, 1] pixel values may stray (rounding of ``(x + 1) / 2`` in half precision)."""

ImagesLike = Tensor | Sequence[Any]  # a float tensor [B, 3, H, W] or a list of PIL images / arrays
PromptsLike = Sequence[str] | str | None


def pil_to_tensor(image: Any) -> Tensor:
    """One PIL image (or an ``uint8`` array ``[H, W, 3]``) -> float tensor ``[3, H, W]`` in [0, 1]."""
    if hasattr(image, "convert"):  # PIL.Image.Image
        array = np.array(image.convert("RGB"))  # a writable copy
    elif isinstance(image, np.ndarray):
        array = image
        if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
            raise ValueError(f"numpy images must be uint8 [H, W, 3]; got dtype {array.dtype} and shape {array.shape}.")
    elif isinstance(image, Tensor):
        raise TypeError(
            "Got a list of tensors: stack them into one float tensor [B, 3, H, W] in [0, 1] "
            "(torch.stack(images)) or pass PIL images."
        )
    else:
        raise TypeError(f"Cannot read an image of type {type(image).__name__}; pass PIL images or a tensor.")
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float().div_(255.0)


def check_images(images: Tensor, name: str) -> None:
    """Raise a clear error unless ``images`` is a float tensor ``[B, 3, H, W]`` with values in [0, 1]."""
    if not isinstance(images, Tensor):
        raise TypeError(f"{name}: images must be a tensor or a list of PIL images; got {type(images).__name__}.")
    if images.ndim != 4 or images.shape[1] != 3:
        hint = " (channels last? use images.permute(0, 3, 1, 2))" if images.ndim == 4 and images.shape[-1] == 3 else ""
        raise ValueError(
            f"{name}: images must have shape [B, 3, H, W]; got {tuple(images.shape)}{hint}. "
            "A single image needs a batch dimension: images[None]."
        )
    if not images.is_floating_point():
        raise ValueError(
            f"{name}: images must be a float tensor in [0, 1]; got dtype {images.dtype}. "
            "Convert uint8 images with images.float() / 255."
        )
    if images.numel() == 0:
        return
    low, high = torch.aminmax(images.detach())
    low, high = float(low), float(high)  # one device sync for both
    if math.isnan(low) or math.isnan(high):
        raise ValueError(f"{name}: images contain NaN values.")
    if low < -RANGE_TOLERANCE or high > 1.0 + RANGE_TOLERANCE:
        raise ValueError(
            f"{name}: images must be in [0, 1]; got values in [{low:.4g}, {high:.4g}]. "
            "Images in [-1, 1] (VAE output) need (images + 1) / 2; uint8 images need images / 255."
        )


def check_prompts(prompts: PromptsLike, n: int, name: str, required: bool) -> list[str]:
    """One prompt per image: a list of ``n`` strings, or one string repeated; ``None`` if not required."""
    if prompts is None:
        if required:
            raise ValueError(f"{name} scores images against their prompts; got prompts=None for {n} images.")
        return [""] * n
    if isinstance(prompts, str):
        return [prompts] * n
    prompts = list(prompts)
    if len(prompts) != n:
        raise ValueError(
            f"{name}: got {len(prompts)} prompts for {n} images; pass one prompt per image "
            "(or a single string used for every image)."
        )
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"{name}: prompt {i} is a {type(prompt).__name__}, not a string: {prompt!r}.")
    return prompts


class NonFiniteRewardError(ValueError):
    """A reward returned NaN scores. Trainers catch it to skip the update; elsewhere it is an error."""


class Reward(nn.Module):
    """Base class of reward plug-ins: subclasses implement :meth:`score_chunk`.

    Class attributes a subclass sets:

    - ``name``: short name used in tables and files (``"pickscore"``).
    - ``differentiable``: True when preprocessing and model are torch end to end, so gradients reach
      the images (direct reward backpropagation). False runs the model under ``torch.no_grad()``.
    - ``requires_prompts``: False for prompt-free rewards (aesthetic, JPEG size), which then accept
      ``prompts=None``.

    Args:
        batch_size: largest number of images given to the model at once; ``None`` scores the whole
            batch in one call. Chunking changes memory, never the scores.
    """

    name: str = "reward"
    differentiable: bool = False
    requires_prompts: bool = True

    def __init__(self, batch_size: int | None = 32):
        super().__init__()
        if batch_size is not None and int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer or None; got {batch_size}.")
        self.batch_size = None if batch_size is None else int(batch_size)

    # -- what a subclass writes ---------------------------------------------------------------
    def score_chunk(self, images: Tensor, prompts: list[str]) -> Tensor:
        """Scores ``[b]`` of one checked chunk: ``images`` float ``[b, 3, H, W]`` in [0, 1] on the
        reward's device, ``prompts`` a list of ``b`` strings. Called under ``no_grad`` unless
        ``differentiable``."""
        raise NotImplementedError(f"{type(self).__name__} must implement score_chunk(images, prompts).")

    # -- the shared path ----------------------------------------------------------------------
    def _weights_device(self) -> torch.device | None:
        for tensor in self.parameters():
            return tensor.device
        for tensor in self.buffers():
            return tensor.device
        return None

    @property
    def device(self) -> torch.device:
        """Device of the reward's weights (CPU for rewards without weights)."""
        return self._weights_device() or torch.device("cpu")

    def forward(self, images: ImagesLike, prompts: PromptsLike = None) -> Tensor:
        """Score ``images`` against ``prompts``; see the module docstring for the contract."""
        if isinstance(images, Tensor):
            return self._score_tensor(images, prompts)
        return self._score_pil(list(images), prompts)

    def _score_tensor(self, images: Tensor, prompts: PromptsLike) -> Tensor:
        check_images(images, self.name)
        prompts = check_prompts(prompts, images.shape[0], self.name, self.requires_prompts)
        if images.shape[0] == 0:
            return images.new_zeros(0)
        weights_device = self._weights_device()
        if weights_device is not None and weights_device != images.device:
            self.to(images.device)  # the weights follow the caller's images (once per new device)
        step = self.batch_size or images.shape[0]
        grad = contextlib.nullcontext() if self.differentiable else torch.no_grad()
        with grad:
            chunks = [
                self._checked(
                    self.score_chunk(images[i : i + step], prompts[i : i + step]), min(step, len(prompts) - i)
                )
                for i in range(0, images.shape[0], step)
            ]
        scores = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        if torch.isnan(scores).any():
            bad = torch.nonzero(torch.isnan(scores)).flatten().tolist()
            raise NonFiniteRewardError(
                f"{self.name} returned NaN for {len(bad)} of {scores.numel()} images (indices {bad[:10]}). "
                "Check the inputs, and the model dtype (float16 overflow?)."
            )
        return scores.to(images.dtype)

    def _checked(self, scores: Any, n: int) -> Tensor:
        if not isinstance(scores, Tensor) or scores.shape != (n,):
            shape = tuple(scores.shape) if hasattr(scores, "shape") else type(scores).__name__
            raise ValueError(f"{self.name}: score_chunk must return a tensor of shape ({n},); got {shape}.")
        return scores

    def _score_pil(self, images: list, prompts: PromptsLike) -> Tensor:
        prompts = check_prompts(prompts, len(images), self.name, self.requires_prompts)
        tensors = [pil_to_tensor(image) for image in images]
        if not tensors:
            return torch.zeros(0)
        # Images of one size are stacked and scored together; a folder of mixed sizes becomes a few groups.
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, tensor in enumerate(tensors):
            groups.setdefault(tuple(tensor.shape), []).append(i)
        scores = torch.empty(len(tensors))
        for indices in groups.values():
            batch = torch.stack([tensors[i] for i in indices]).to(self.device)
            scores[indices] = self._score_tensor(batch, [prompts[i] for i in indices]).float().cpu()
        return scores

    def extra_repr(self) -> str:
        return f"name={self.name!r}, differentiable={self.differentiable}, batch_size={self.batch_size}"


class FunctionReward(Reward):
    """A plain callable ``fn(images, prompts) -> scores`` behind the :class:`Reward` checks.

    ``fn`` receives a float tensor ``[b, 3, H, W]`` in [0, 1] and a list of ``b`` prompts and returns
    ``b`` scores (tensor, array or list; ``[b, 1]`` is flattened).

    Args:
        fn: the callable.
        name: name in tables (default: ``fn.__name__``).
        differentiable: set True if ``fn`` is torch end to end and you want gradients (default: the
            callable's own ``differentiable`` attribute, else False, i.e. run under ``no_grad``).
        requires_prompts: set False if ``fn`` ignores prompts, so ``prompts=None`` is allowed.
        batch_size: chunk size; ``None`` (default) passes the whole batch to ``fn`` as given.
    """

    def __init__(
        self,
        fn: Callable[[Tensor, list[str]], Any],
        name: str | None = None,
        differentiable: bool | None = None,
        requires_prompts: bool = True,
        batch_size: int | None = None,
    ):
        super().__init__(batch_size=batch_size)
        if not callable(fn):
            raise TypeError(f"FunctionReward needs a callable; got {type(fn).__name__}.")
        self.fn = fn
        self.name = name or getattr(fn, "name", None) or getattr(fn, "__name__", "function")
        self.differentiable = bool(getattr(fn, "differentiable", False) if differentiable is None else differentiable)
        self.requires_prompts = requires_prompts

    def score_chunk(self, images: Tensor, prompts: list[str]) -> Tensor:
        scores = self.fn(images, prompts)
        scores = torch.as_tensor(scores, device=images.device)
        if scores.ndim == 2 and scores.shape[1] == 1:
            scores = scores[:, 0]
        return scores.float() if not scores.is_floating_point() else scores


RewardLike = Reward | Callable[[Tensor, list[str]], Any] | str
