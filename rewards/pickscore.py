"""PickScore (Kirstain et al., 2023): a CLIP ViT-H/14 fine-tuned on Pick-a-Pic human preferences.

The model is a stock transformers ``CLIPModel`` (``yuvalkirstain/PickScore_v1``) used with the
processor of the CLIP it started from (``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``). The score of an
image for a prompt is the CLIP logit:

    score = exp(logit_scale) * cos(E_image(image), E_text(prompt))        (~ 18-23 for real images)

Preprocessing runs in torch (:class:`~flowalign.rewards.preprocess.ImagePreprocess` configured from
the processor), so the reward is differentiable in the images.

Example::

    from flowalign.rewards import PickScore
    reward = PickScore.from_pretrained()                 # hub ids, or local folders:
    reward = PickScore.from_pretrained(model="/ckpt/PickScore_v1", processor="/ckpt/CLIP-ViT-H-14")
    scores = reward(images, prompts)                     # [B]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from flowalign.rewards.base import Reward
from flowalign.rewards.hub import hub_errors
from flowalign.rewards.preprocess import ImagePreprocess
from torch import Tensor

DEFAULT_MODEL = "yuvalkirstain/PickScore_v1"
DEFAULT_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class PickScore(Reward):
    """PickScore reward: ``exp(logit_scale) * cosine(image, prompt)`` of a transformers ``CLIPModel``.

    Args:
        model: a ``transformers.CLIPModel``.
        tokenizer: its CLIP tokenizer.
        preprocess: torch image preprocessing matching the model's image processor.
        batch_size: images per forward pass.
        max_length: prompt tokens kept (CLIP's 77).
    """

    name = "pickscore"
    differentiable = True
    requires_prompts = True

    def __init__(
        self, model, tokenizer, preprocess: ImagePreprocess, batch_size: int | None = 32, max_length: int = 77
    ):
        super().__init__(batch_size=batch_size)
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.max_length = max_length

    @classmethod
    def from_pretrained(
        cls,
        model: str = DEFAULT_MODEL,
        processor: str = DEFAULT_PROCESSOR,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int | None = 32,
    ) -> PickScore:
        """Load the CLIP model from ``model`` and tokenizer + image-processor settings from ``processor``.

        Each is a hub id or a local folder in the transformers layout (``config.json`` +
        ``model.safetensors``; ``tokenizer*`` + ``preprocessor_config.json``). Weights load with
        safetensors or ``torch.load(weights_only=True)``; remote code is never run.
        """
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel  # heavy: only when the model is loaded

        how = (
            "PickScore.from_pretrained(model=DIR, processor=PROCESSOR_DIR), "
            "or --reward 'pickscore(model=DIR,processor=PROCESSOR_DIR)'"
        )
        with hub_errors(model, "PickScore model", how):
            clip = CLIPModel.from_pretrained(model, dtype=dtype)
        with hub_errors(processor, "PickScore processor", how):
            tokenizer = AutoTokenizer.from_pretrained(processor)
            image_processor = CLIPImageProcessor.from_pretrained(processor)
        reward = cls(clip, tokenizer, ImagePreprocess.from_hf_image_processor(image_processor), batch_size=batch_size)
        return reward.to(device) if device is not None else reward

    def text_embeddings(self, prompts: list[str]) -> Tensor:
        """Unit-norm text embeddings ``[n, d]`` of ``prompts``."""
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        device = self.model.logit_scale.device
        text = self.model.text_model(
            input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)
        )
        return F.normalize(self.model.text_projection(text.pooler_output), dim=-1)

    def image_embeddings(self, images: Tensor) -> Tensor:
        """Unit-norm image embeddings ``[b, d]`` of float images in [0, 1]."""
        pixels = self.preprocess(images, dtype=self.model.logit_scale.dtype)
        vision = self.model.vision_model(pixel_values=pixels)
        return F.normalize(self.model.visual_projection(vision.pooler_output), dim=-1)

    def score_chunk(self, images: Tensor, prompts: list[str]) -> Tensor:
        # Prompts repeat inside a batch (several samples per prompt): embed each distinct one once.
        position = {prompt: i for i, prompt in enumerate(dict.fromkeys(prompts))}
        unique = list(position)
        index = torch.tensor([position[p] for p in prompts], device=images.device)
        text = self.text_embeddings(unique)[index]
        image = self.image_embeddings(images)
        return self.model.logit_scale.exp() * (image * text).sum(dim=-1)  # logit_scale * cosine
