"""Human Preference Score v2 / v2.1 (Wu et al., 2023): open_clip ViT-H/14 fine-tuned on HPD v2.

The official release (``xswu/HPSv2``: ``HPS_v2_compressed.pt``, ``HPS_v2.1_compressed.pt``) is a
torch file ``{"state_dict": ...}`` of an open_clip ``ViT-H-14`` model. The score is the plain cosine
(no logit scale), ~0.2-0.35 for real images:

    HPS(image, prompt) = cos(E_image(image), E_text(prompt))

HPS evaluates with open_clip's ``resize_mode="longest"`` (longest side to 224, center pad with
black), which we reproduce in torch; the reward is differentiable. The ``hpsv2`` package itself pins
old dependencies, so the architecture comes from open_clip and only the state dict is read
(``torch.load(weights_only=True)``).

Example::

    from flowalign.rewards import HPSv2
    reward = HPSv2.from_pretrained(version="v2.1")                      # hub, or a local file:
    reward = HPSv2.from_pretrained(checkpoint="/ckpt/HPS_v2.1_compressed.pt")
    scores = reward(images, prompts)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from flowalign.rewards.clip_score import CLIPScore
from flowalign.rewards.hub import hub_errors, resolve_file
from flowalign.rewards.preprocess import ImagePreprocess
from torch import Tensor

DEFAULT_REPO = "xswu/HPSv2"
CHECKPOINT_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


@contextlib.contextmanager
def _no_random_init_warning() -> Iterator[None]:
    """open_clip warns that the architecture is "initialized randomly"; the HPS weights follow at once."""

    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            message = record.getMessage()
            return "initialized randomly" not in message and "no CLIP weights found" not in message

    root, drop = logging.getLogger(), _Filter()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


class HPSv2(CLIPScore):
    """HPS v2 / v2.1: the cosine between image and prompt embeddings of the HPS-tuned open_clip model.

    Args:
        model, tokenizer, preprocess, batch_size: as :class:`~flowalign.rewards.clip_score.CLIPScore`.
        version: ``"v2.0"`` or ``"v2.1"`` (only names the reward).
    """

    def __init__(
        self, model, tokenizer, preprocess: ImagePreprocess, version: str = "v2.1", batch_size: int | None = 32
    ):
        super().__init__(model, tokenizer, preprocess, weight=1.0, batch_size=batch_size)
        self.version = version
        self.name = "hpsv2.1" if version == "v2.1" else "hpsv2"

    @classmethod
    def from_pretrained(
        cls,
        checkpoint: str = DEFAULT_REPO,
        version: str = "v2.1",
        architecture: str = "ViT-H-14",
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int | None = 32,
    ) -> HPSv2:
        """Build the open_clip ``architecture`` (no pretrained download) and load the HPS state dict.

        ``checkpoint`` is the HPS ``.pt`` file, a folder holding the official file name of ``version``,
        or a hub repo id. ``architecture`` is an open_clip model name or ``local-dir:DIR`` holding an
        ``open_clip_config.json``.
        """
        import open_clip  # heavy: only when the HPS model is built

        if version not in CHECKPOINT_FILES:
            raise ValueError(f"HPS version must be one of {sorted(CHECKPOINT_FILES)}; got {version!r}.")
        how = "HPSv2.from_pretrained(checkpoint=PATH_TO_PT), or --reward 'hpsv2.1(checkpoint=PATH)'"
        path = resolve_file(checkpoint, CHECKPOINT_FILES[version], f"HPS {version}", how)
        with hub_errors(architecture, f"HPS {version} architecture", how), _no_random_init_warning():
            model = open_clip.create_model(architecture, pretrained=None, load_weights=False)
            tokenizer = open_clip.get_tokenizer(architecture)
        # {"state_dict": ...} of the open_clip model; open_clip strips a DDP "module." prefix if present.
        open_clip.load_checkpoint(model, path, strict=True, weights_only=True)
        preprocess = ImagePreprocess.from_open_clip(model, resize_mode="longest")
        reward = cls(model.to(dtype), tokenizer, preprocess, version=version, batch_size=batch_size)
        return reward.to(device) if device is not None else reward

    def score_chunk(self, images: Tensor, prompts: list[str]) -> Tensor:
        return self.cosine(images, prompts)
