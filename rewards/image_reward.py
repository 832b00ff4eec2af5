"""ImageReward (Xu et al., 2023): BLIP image-text encoder + MLP head, trained on human rankings.

Architecture of the official model (``THUDM/ImageReward``: ``ImageReward.pt`` + ``med_config.json``):

    v = ViT-L/16(image)                                   BLIP vision transformer, 224 px, all tokens
    h = BERT(prompt tokens, cross-attending to v)         BLIP "med" BERT, cross-attention in every layer
    r = MLP(h[CLS])                                       768 -> 1024 -> 128 -> 64 -> 16 -> 1, no activations
    ImageReward = (r - 0.16717362830052426) / 1.0333394966054072

The ``image-reward`` package pins old dependencies, so the same modules are built from transformers:
BLIP's vision transformer is ``BlipVisionModel`` and the med BERT with cross-attention is
``BlipTextModel`` (transformers' port of BLIP's ``med.py``), run bidirectionally
(``is_decoder=False``). The official state dict's keys are mapped onto them (see
:func:`convert_official_state_dict`); the vision architecture is read from the checkpoint's shapes.
Differentiable (torch preprocessing: resize 224 bicubic, center crop, CLIP normalisation).

Example::

    from flowalign.rewards import ImageReward
    reward = ImageReward.from_pretrained()                 # hub, or local folders:
    reward = ImageReward.from_pretrained(checkpoint="/ckpt/ImageReward", tokenizer="/ckpt/bert-base-uncased")
    scores = reward(images, prompts)
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from flowalign.rewards.aesthetic import AestheticHead
from flowalign.rewards.base import Reward
from flowalign.rewards.hub import hub_errors, resolve_file
from flowalign.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImagePreprocess
from torch import Tensor, nn

DEFAULT_REPO = "THUDM/ImageReward"
DEFAULT_TOKENIZER = "bert-base-uncased"
CHECKPOINT_FILE = "ImageReward.pt"
MED_CONFIG_FILE = "med_config.json"
REWARD_MEAN = 0.16717362830052426  # official normalisation of the MLP output
REWARD_STD = 1.0333394966054072
MAX_PROMPT_TOKENS = 35

# BLIP ViT (timm layout) -> transformers BlipVisionModel
_VISION_RENAMES = [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.fc(\d)\.", r"encoder.layers.\1.mlp.fc\2."),
    (r"^norm\.", "post_layernorm."),
]
# Parts of the official checkpoint that scoring does not use (BLIP's contrastive projections, buffers).
_UNUSED_PREFIXES = ("blip.vision_proj.", "blip.text_proj.", "blip.text_encoder.embeddings.position_ids")


def convert_official_state_dict(state: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """Split and rename an official ``ImageReward.pt`` state dict into
    ``{"vision": BlipVisionModel keys, "text": BlipTextModel keys, "head": AestheticHead-layout keys}``.

    Keys outside ``blip.visual_encoder.``, ``blip.text_encoder.`` and ``mlp.`` are dropped when they are
    known to be unused (``blip.vision_proj``, ``blip.text_proj``), otherwise reported.
    """
    parts: dict[str, dict[str, Tensor]] = {"vision": {}, "text": {}, "head": {}}
    unknown = []
    for key, value in state.items():
        if key.startswith(_UNUSED_PREFIXES):
            continue
        if key.startswith("blip.visual_encoder."):
            name = key[len("blip.visual_encoder.") :]
            for pattern, replacement in _VISION_RENAMES:
                name, count = re.subn(pattern, replacement, name)
                if count:
                    break
            else:
                unknown.append(key)
                continue
            parts["vision"][name] = value
        elif key.startswith("blip.text_encoder."):
            parts["text"][key[len("blip.text_encoder.") :]] = value
        elif key.startswith("mlp."):
            parts["head"][key[len("mlp.") :]] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"ImageReward checkpoint has keys this loader does not know: {unknown[:10]}.")
    return parts


def vision_config_from_state_dict(vision: dict[str, Tensor], num_heads: int | None = None):
    """``BlipVisionConfig`` of BLIP's ViT, read from the (converted) weights' shapes.

    The head count is not in the shapes: BLIP's ViTs use 64-dimensional heads (ViT-L: 1024 / 16).
    """
    from transformers import BlipVisionConfig  # heavy: only when a BLIP model is built

    hidden = vision["embeddings.class_embedding"].shape[-1]
    patch = vision["embeddings.patch_embedding.weight"].shape[-1]
    positions = vision["embeddings.position_embedding"].shape[1] - 1
    depth = len({k.split(".")[2] for k in vision if k.startswith("encoder.layers.")})
    return BlipVisionConfig(
        hidden_size=hidden,
        intermediate_size=vision["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=depth,
        num_attention_heads=num_heads or max(hidden // 64, 1),
        image_size=math.isqrt(positions) * patch,
        patch_size=patch,
        layer_norm_eps=1e-6,  # BLIP's ViT: partial(nn.LayerNorm, eps=1e-6)
        hidden_act="gelu",
    )


def text_config_from_med_config(med: dict, encoder_width: int):
    """``BlipTextConfig`` from BLIP's ``med_config.json`` (a BERT config with cross-attention)."""
    from transformers import BlipTextConfig  # heavy: only when a BLIP model is built

    return BlipTextConfig(
        vocab_size=med["vocab_size"],
        hidden_size=med["hidden_size"],
        encoder_hidden_size=encoder_width,  # ImageReward sets encoder_width to the ViT width
        intermediate_size=med["intermediate_size"],
        num_hidden_layers=med["num_hidden_layers"],
        num_attention_heads=med["num_attention_heads"],
        max_position_embeddings=med["max_position_embeddings"],
        hidden_act=med.get("hidden_act", "gelu"),
        layer_norm_eps=med.get("layer_norm_eps", 1e-12),
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=med.get("pad_token_id", 0),
        bos_token_id=None,
        eos_token_id=None,
        sep_token_id=None,
        is_decoder=True,  # builds the cross-attention blocks; forward runs with is_decoder=False
    )


def _load_strict(module: nn.Module, state: dict[str, Tensor], part: str) -> None:
    result = module.load_state_dict(state, strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        raise ValueError(
            f"ImageReward checkpoint does not match the {part} architecture: "
            f"missing {missing[:10]}, unexpected {unexpected[:10]}."
        )


class ImageReward(Reward):
    """ImageReward score (see the module docstring).

    Args:
        vision: ``transformers.BlipVisionModel`` (BLIP ViT).
        text: ``transformers.BlipTextModel`` with cross-attention (BLIP med BERT).
        head: the MLP head (same layout as the LAION aesthetic head).
        tokenizer: BERT tokenizer (``bert-base-uncased`` plus BLIP's ``[DEC]`` / ``[ENC]`` tokens).
        preprocess: torch image preprocessing.
        batch_size: images per forward pass.
    """

    name = "imagereward"
    differentiable = True
    requires_prompts = True

    def __init__(
        self, vision, text, head: AestheticHead, tokenizer, preprocess: ImagePreprocess, batch_size: int | None = 32
    ):
        super().__init__(batch_size=batch_size)
        self.vision = vision.eval().requires_grad_(False)
        self.text = text.eval().requires_grad_(False)
        self.head = head.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.preprocess = preprocess

    @classmethod
    def from_pretrained(
        cls,
        checkpoint: str = DEFAULT_REPO,
        tokenizer: str = DEFAULT_TOKENIZER,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int | None = 32,
        vision_num_heads: int | None = None,
    ) -> ImageReward:
        """Load ``ImageReward.pt`` and ``med_config.json`` from ``checkpoint`` (a folder, the ``.pt``
        file with ``med_config.json`` beside it, or a hub repo id) and the BERT tokenizer from
        ``tokenizer`` (hub id or folder). Weights load with ``torch.load(weights_only=True)``."""
        from transformers import AutoTokenizer, BlipTextModel, BlipVisionModel  # heavy: only when the model is loaded

        how = "ImageReward.from_pretrained(checkpoint=DIR_WITH_ImageReward.pt_AND_med_config.json, tokenizer=BERT_DIR)"
        weights = resolve_file(checkpoint, CHECKPOINT_FILE, "ImageReward", how)
        config_source = (
            str(Path(checkpoint).expanduser().parent) if Path(checkpoint).expanduser().is_file() else checkpoint
        )
        with open(resolve_file(config_source, MED_CONFIG_FILE, "ImageReward med_config", how)) as f:
            med = json.load(f)
        state = torch.load(weights, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        parts = convert_official_state_dict(state)

        vision = BlipVisionModel(vision_config_from_state_dict(parts["vision"], vision_num_heads))
        _load_strict(vision, parts["vision"], "vision transformer")
        text = BlipTextModel(text_config_from_med_config(med, vision.config.hidden_size), add_pooling_layer=False)
        _load_strict(text, parts["text"], "text encoder")
        head = AestheticHead(parts["head"]["layers.0.weight"].shape[1])
        _load_strict(head, parts["head"], "MLP head")

        with hub_errors(tokenizer, "ImageReward tokenizer", how):
            bert_tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        # BLIP's init_tokenizer: [DEC] as bos, [ENC] as an extra special token (ids of plain text unchanged).
        bert_tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        bert_tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})

        size = vision.config.image_size
        preprocess = ImagePreprocess(
            size=(size, size), mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, resize_mode="shortest"
        )
        reward = cls(
            vision.to(dtype), text.to(dtype), head.to(dtype), bert_tokenizer, preprocess, batch_size=batch_size
        )
        return reward.to(device) if device is not None else reward

    def score_chunk(self, images: Tensor, prompts: list[str]) -> Tensor:
        dtype = self.head.layers[0].weight.dtype
        image_embeds = self.vision(pixel_values=self.preprocess(images, dtype=dtype)).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        tokens = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=MAX_PROMPT_TOKENS, return_tensors="pt"
        )
        text = self.text(
            input_ids=tokens["input_ids"].to(image_embeds.device),
            attention_mask=tokens["attention_mask"].to(image_embeds.device),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
            is_decoder=False,  # bidirectional self-attention, as BLIP's "multimodal" mode
        )
        rewards = self.head(text.last_hidden_state[:, 0]).squeeze(-1)  # [CLS] feature -> MLP
        return (rewards - REWARD_MEAN) / REWARD_STD
