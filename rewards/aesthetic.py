"""LAION aesthetic predictor ("improved aesthetic predictor", linear-MSE head on CLIP ViT-L/14).

An MLP head reads the unit-norm CLIP ViT-L/14 image embedding and predicts a 1-10 aesthetic rating:

    e = E_image(image) / ||E_image(image)||                       (768-d, CLIP ViT-L/14 projection)
    score = W5 (W4 (W3 (W2 (W1 e + b1) + b2) + b3) + b4) + b5      (dropouts between, no activations)

The official head file ``sac+logos+ava1-l14-linearMSE.pth`` (LAION; also redistributed as
``trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth``) is a state dict with keys
``layers.{0,2,4,6,7}.{weight,bias}`` (768 -> 1024 -> 128 -> 64 -> 16 -> 1). The CLIP tower is the
transformers ``openai/clip-vit-large-patch14``. Differentiable (torch preprocessing).

Example::

    from flowalign.rewards import AestheticScore
    reward = AestheticScore.from_pretrained()    # hub, or local files:
    reward = AestheticScore.from_pretrained(head="/ckpt/sac+logos+ava1-l14-linearMSE.pth", clip="/ckpt/clip-l14")
    scores = reward(images)                        # prompts are not needed
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from flowalign.rewards.base import Reward
from flowalign.rewards.hub import hub_errors, resolve_file
from flowalign.rewards.preprocess import ImagePreprocess
from safetensors.torch import load_file
from torch import Tensor, nn

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
DEFAULT_HEAD = "trl-lib/ddpo-aesthetic-predictor"
DEFAULT_HEAD_FILENAME = "aesthetic-model.pth"
HEAD_LINEAR_KEYS = ("layers.0", "layers.2", "layers.4", "layers.6", "layers.7")


class AestheticHead(nn.Module):
    """The LAION MLP head, with the official module layout (so the official state dict loads as is)."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    @classmethod
    def from_file(cls, path: str) -> AestheticHead:
        """Load an official head file (checked by :func:`load_head_state_dict`)."""
        state = load_head_state_dict(path)
        head = cls(state["layers.0.weight"].shape[1])
        head.load_state_dict(state)
        return head.eval()

    def forward(self, embeddings: Tensor) -> Tensor:
        """``[b, input_size]`` unit-norm embeddings -> ``[b, 1]`` ratings."""
        return self.layers(embeddings)


def load_head_state_dict(path: str) -> dict[str, Tensor]:
    """Read an aesthetic-head file (``torch.load(weights_only=True)`` or safetensors) and check its
    keys and shapes against the official layout; the error names what differs."""
    if str(path).endswith(".safetensors"):
        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise TypeError(f"Aesthetic head {path}: expected a state dict, got {type(state).__name__}.")
    expected = {f"{k}.{p}" for k in HEAD_LINEAR_KEYS for p in ("weight", "bias")}
    if set(state) != expected:
        raise ValueError(
            f"Aesthetic head {path}: keys differ from the LAION layout; "
            f"missing {sorted(expected - set(state))}, unexpected {sorted(set(state) - expected)[:10]}."
        )
    input_size = state["layers.0.weight"].shape[1]
    reference = AestheticHead(input_size).state_dict()
    for key, value in state.items():
        if value.shape != reference[key].shape:
            raise ValueError(
                f"Aesthetic head {path}: {key} has shape {tuple(value.shape)}, expected {tuple(reference[key].shape)}."
            )
    return state


def load_clip_vision(source: str, dtype: torch.dtype = torch.float32):
    """The vision tower + projection of a transformers CLIP checkpoint (full ``CLIPModel`` or vision-only).

    Loading only the vision half skips the text tower (~120M parameters for ViT-L/14); transformers
    reports the skipped text weights as "unexpected", so its report is silenced and the vision
    weights are checked here instead: any missing or mismatched one is an error.
    """
    # heavy: transformers only when a CLIP model is built (AestheticHead alone needs torch)
    from transformers import AutoConfig, CLIPVisionModelWithProjection
    from transformers.utils import logging as hf_logging

    config = AutoConfig.from_pretrained(source)
    if hasattr(config, "vision_config"):  # a full CLIPConfig: the projection size lives at the top level
        vision_config = config.vision_config
        vision_config.projection_dim = config.projection_dim
    else:
        vision_config = config
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        vision, info = CLIPVisionModelWithProjection.from_pretrained(
            source, config=vision_config, dtype=dtype, output_loading_info=True
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    problems = list(info.get("missing_keys", [])) + [str(k) for k in info.get("mismatched_keys", [])]
    if problems:
        raise ValueError(f"CLIP checkpoint {source} lacks vision weights: {sorted(problems)[:10]}.")
    return vision


class AestheticScore(Reward):
    """LAION aesthetic score of the CLIP image embedding (see the module docstring).

    Args:
        vision: a ``transformers.CLIPVisionModelWithProjection``.
        head: the :class:`AestheticHead`.
        preprocess: torch image preprocessing matching the CLIP image processor.
        batch_size: images per forward pass.
    """

    name = "aesthetic"
    differentiable = True
    requires_prompts = False

    def __init__(self, vision, head: AestheticHead, preprocess: ImagePreprocess, batch_size: int | None = 32):
        super().__init__(batch_size=batch_size)
        projection = vision.config.projection_dim
        if projection != head.input_size:
            raise ValueError(
                f"The CLIP image embedding has {projection} dimensions but the aesthetic head expects "
                f"{head.input_size}; the LAION head sits on CLIP ViT-L/14 (768)."
            )
        self.vision = vision.eval().requires_grad_(False)
        self.head = head.eval().requires_grad_(False)
        self.preprocess = preprocess

    @classmethod
    def from_pretrained(
        cls,
        head: str = DEFAULT_HEAD,
        clip: str = DEFAULT_CLIP,
        head_filename: str = DEFAULT_HEAD_FILENAME,
        processor: str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int | None = 32,
    ) -> AestheticScore:
        """Load the head from ``head`` (a ``.pth`` file, a folder holding ``head_filename``, or a hub repo
        id) and the CLIP vision tower + image processor from ``clip`` (hub id or transformers folder;
        ``processor`` overrides where the image-processor settings come from)."""
        from transformers import CLIPImageProcessor  # heavy: only when the model is loaded

        how = (
            "AestheticScore.from_pretrained(head=PATH_TO_PTH, clip=CLIP_DIR), "
            "or --reward 'aesthetic(head=PATH,clip=DIR)'"
        )
        head_path = resolve_file(head, head_filename, "Aesthetic head", how)
        mlp = AestheticHead.from_file(head_path)
        with hub_errors(clip, "Aesthetic CLIP model", how):
            vision = load_clip_vision(clip, dtype)
        with hub_errors(processor or clip, "Aesthetic CLIP processor", how):
            image_processor = CLIPImageProcessor.from_pretrained(processor or clip)
        reward = cls(
            vision, mlp.to(dtype), ImagePreprocess.from_hf_image_processor(image_processor), batch_size=batch_size
        )
        return reward.to(device) if device is not None else reward

    def image_embeddings(self, images: Tensor) -> Tensor:
        """Unit-norm CLIP image embeddings ``[b, 768]``."""
        pixels = self.preprocess(images, dtype=self.vision.visual_projection.weight.dtype)
        return F.normalize(self.vision(pixel_values=pixels).image_embeds, dim=-1)

    def score_chunk(self, images: Tensor, prompts: list[str]) -> Tensor:
        return self.head(self.image_embeddings(images)).squeeze(-1)
