"""CLIPScore (Hessel et al., 2021) with any open_clip model and pretrained tag.

    CLIP-S(image, prompt) = w * max(cos(E_image(image), E_text(prompt)), 0),    w = 2.5

Any open_clip architecture works: a built-in name with a pretrained tag or weights file
(``model="ViT-B-32", pretrained="openai"``), a hub model (``model="hf-hub:org/repo"``) or a local
folder in open_clip's hub layout (``model="local-dir:/path"`` with ``open_clip_config.json`` and
``open_clip_model.safetensors``). Preprocessing follows the model's own open_clip preprocess
configuration, in torch, so the reward is differentiable.

Example::

    from flowalign.rewards import CLIPScore
    reward = CLIPScore.from_pretrained(model="ViT-L-14", pretrained="openai")
    scores = reward(images, prompts)
"""

from __future__ import annotations

import torch
from flowalign.rewards.base import Reward
from flowalign.rewards.hub import hub_errors, is_local
from flowalign.rewards.preprocess import ImagePreprocess
from torch import Tensor


def create_open_clip_model(model: str, pretrained: str | None, what: str, how: str, dtype: torch.dtype = torch.float32):
    """``open_clip.create_model`` with hub failures turned into one clear error, the QuickGELU setting
    of the pretrained tag (OpenAI weights need it) and weights loaded with ``weights_only=True``."""
    import open_clip  # heavy: only when a CLIP model is built

    force_quick_gelu = False
    remote = model.startswith("hf-hub:")
    source = model.removeprefix("hf-hub:")
    if pretrained and not is_local(pretrained):
        tag = open_clip.get_pretrained_cfg(model, pretrained)  # {} when not a known tag
        force_quick_gelu = bool(tag.get("quick_gelu", False))
        remote = remote or bool(tag)
        source = tag.get("hf_hub", "").strip("/").split("/")
        source = "/".join(source[:2]) if len(source) >= 2 else f"{model} ({pretrained})"
    with hub_errors(source, what, how, remote=remote):
        net = open_clip.create_model(
            model,
            pretrained=pretrained,
            force_quick_gelu=force_quick_gelu,
            weights_only=True,
            require_pretrained=bool(pretrained) or model.startswith(("hf-hub:", "local-dir:")),
        )
        tokenizer = open_clip.get_tokenizer(model)
    return net.to(dtype), tokenizer


class CLIPScore(Reward):
    """``weight * max(cosine(image, prompt), 0)`` of an open_clip model (see the module docstring).

    Args:
        model: an open_clip CLIP model (``encode_image`` / ``encode_text``).
        tokenizer: its open_clip tokenizer.
        preprocess: torch image preprocessing from the model's preprocess configuration.
        weight: ``w`` of CLIP-S (2.5 in the paper).
        batch_size: images per forward pass.
    """

    name = "clipscore"
    differentiable = True
    requires_prompts = True

    def __init__(self, model, tokenizer, preprocess: ImagePreprocess, weight: float = 2.5, batch_size: int | None = 32):
        super().__init__(batch_size=batch_size)
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.weight = float(weight)

    @classmethod
    def from_pretrained(
        cls,
        model: str = "ViT-B-32",
        pretrained: str | None = "openai",
        weight: float = 2.5,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int | None = 32,
    ) -> CLIPScore:
        """Create the open_clip ``model`` with weights from ``pretrained`` (a tag such as ``"openai"`` or
        ``"laion2b_s34b_b79k"``, or a weights file); ``hf-hub:`` / ``local-dir:`` models carry their own
        weights (``pretrained`` is then ignored)."""
        if model.startswith(("hf-hub:", "local-dir:")):
            pretrained = None
        how = (
            "CLIPScore.from_pretrained(model='local-dir:DIR') or pretrained=PATH_TO_WEIGHTS, "
            "or --reward 'clipscore(model=local-dir:DIR)'"
        )
        net, tokenizer = create_open_clip_model(model, pretrained, "CLIPScore", how, dtype)
        reward = cls(net, tokenizer, ImagePreprocess.from_open_clip(net), weight=weight, batch_size=batch_size)
        return reward.to(device) if device is not None else reward

    def _model_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def cosine(self, images: Tensor, prompts: list[str]) -> Tensor:
        """Cosine similarity ``[b]`` between each image and its prompt."""
        position = {prompt: i for i, prompt in enumerate(dict.fromkeys(prompts))}  # embed each prompt once
        index = torch.tensor([position[p] for p in prompts], device=images.device)
        tokens = self.tokenizer(list(position)).to(images.device)
        text = self.model.encode_text(tokens, normalize=True)[index]
        image = self.model.encode_image(self.preprocess(images, dtype=self._model_dtype()), normalize=True)
        return (image * text).sum(dim=-1)

    def score_chunk(self, images: Tensor, prompts: list[str]) -> Tensor:
        return self.weight * self.cosine(images, prompts).clamp(min=0)
