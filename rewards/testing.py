"""Tiny random-weight checkpoints of every model-based reward, saved in the official file layouts.

Tests and ``flowalign bench rewards`` cannot download the real models, so they build tiny ones of
the same architectures, save them exactly as the official releases are laid out (same file names,
same key names) and load them through the public ``from_pretrained`` path:

==============  =====================================================================================
reward          what is written under ``root/<name>/``
==============  =====================================================================================
pickscore       ``model/`` transformers ``CLIPModel`` (config.json + model.safetensors);
                ``processor/`` CLIP tokenizer + ``preprocessor_config.json``
aesthetic       ``clip/`` transformers CLIP with a 768-d projection + processor files;
                ``sac+logos+ava1-l14-linearMSE.pth`` (state dict ``layers.{0,2,4,6,7}``) unless a real
                head file is given
hpsv2.1         ``HPS_v2.1_compressed.pt`` = ``{"state_dict": open_clip state dict}``;
                ``architecture/open_clip_config.json`` (the tiny stand-in for ``ViT-H-14``)
clipscore       open_clip hub layout: ``open_clip_config.json`` + ``open_clip_model.safetensors``
imagereward     ``ImageReward.pt`` with the official keys (``blip.visual_encoder.*`` from a timm-layout
                ViT, ``blip.text_encoder.*`` med BERT, ``mlp.layers.*``, unused ``blip.*_proj``) +
                ``med_config.json``; ``tokenizer/`` BERT ``vocab.txt`` + ``tokenizer_config.json``
==============  =====================================================================================

Example::

    from flowalign.rewards import load
    from flowalign.rewards.testing import save_tiny_checkpoints
    kwargs = save_tiny_checkpoints("/tmp/tiny-rewards")     # {name: from_pretrained kwargs}
    reward = load("pickscore", **kwargs["pickscore"])
"""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path
from typing import Any

import torch
from flowalign.rewards.aesthetic import AestheticHead
from flowalign.rewards.hps import CHECKPOINT_FILES
from flowalign.rewards.image_reward import text_config_from_med_config
from flowalign.tiny import clip_tokenizer
from safetensors.torch import save_file
from torch import nn

TINY_IMAGE_SIZE = 32
SHAPES_WORDS = (
    "a an the photo of one two three four five red green blue yellow purple orange white black circle circles square "
    "squares triangle triangles left right above below on top next to and"
).split()


def _tiny_clip_processor_files(directory: Path, image_size: int = TINY_IMAGE_SIZE) -> None:
    from transformers import CLIPImageProcessor, CLIPProcessor  # heavy: only when a tiny CLIP checkpoint is built

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=clip_tokenizer(model_max_length=77)).save_pretrained(
        directory
    )
    image_processor.save_pretrained(directory)  # preprocessor_config.json, as in the hub repos


def _tiny_hf_clip(projection_dim: int, seed: int):
    from transformers import CLIPConfig, CLIPModel  # heavy: only when a tiny CLIP checkpoint is built

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=TINY_IMAGE_SIZE,
            patch_size=8,
        ),
        projection_dim=projection_dim,
    )
    return CLIPModel(config)


def save_tiny_pickscore(root: str | os.PathLike, seed: int = 0) -> dict[str, str]:
    """Tiny PickScore: ``model/`` (CLIPModel) and ``processor/``; returns ``from_pretrained`` kwargs."""
    root = Path(root)
    _tiny_hf_clip(projection_dim=16, seed=seed).save_pretrained(root / "model")
    _tiny_clip_processor_files(root / "processor")
    return {"model": str(root / "model"), "processor": str(root / "processor")}


def _spread_out(head: nn.Module) -> nn.Module:
    """Variance-preserving init of the MLP head (weights ~ N(0, 1/fan_in)), so tiny scores spread out."""
    for layer in head.modules():
        if isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, std=layer.in_features**-0.5)
    return head


def save_tiny_aesthetic(root: str | os.PathLike, head: str | None = None, seed: int = 0) -> dict[str, str]:
    """Tiny CLIP (768-d projection, as ViT-L/14) plus a random head in the LAION layout, or the real
    head file ``head`` if given; returns ``AestheticScore.from_pretrained`` kwargs."""
    root = Path(root)
    _tiny_hf_clip(projection_dim=768, seed=seed).save_pretrained(root / "clip")
    _tiny_clip_processor_files(root / "clip")
    if head is None:
        torch.manual_seed(seed + 1)
        head = str(root / "sac+logos+ava1-l14-linearMSE.pth")
        torch.save(_spread_out(AestheticHead(768)).state_dict(), head)
    return {"clip": str(root / "clip"), "head": str(head)}


TINY_OPEN_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": TINY_IMAGE_SIZE, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def _tiny_open_clip(directory: Path, seed: int):
    import open_clip  # heavy: only when a tiny open_clip checkpoint is built

    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "open_clip_config.json", "w") as f:
        json.dump({"model_cfg": TINY_OPEN_CLIP_CONFIG, "preprocess_cfg": {}}, f, indent=2)
    torch.manual_seed(seed)
    return open_clip.create_model(f"local-dir:{directory}", load_weights=False)


def save_tiny_clipscore(root: str | os.PathLike, seed: int = 0) -> dict[str, str]:
    """Tiny open_clip model in open_clip's hub layout; returns ``CLIPScore.from_pretrained`` kwargs."""
    root = Path(root)
    model = _tiny_open_clip(root, seed)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, root / "open_clip_model.safetensors")
    return {"model": f"local-dir:{root}"}


def save_tiny_hps(root: str | os.PathLike, version: str = "v2.1", seed: int = 0) -> dict[str, str]:
    """Tiny HPS checkpoint ``{"state_dict": ...}`` under the official file name of ``version``."""
    root = Path(root)
    model = _tiny_open_clip(root / "architecture", seed)
    torch.save({"state_dict": model.state_dict()}, root / CHECKPOINT_FILES[version])
    return {"checkpoint": str(root), "version": version, "architecture": f"local-dir:{root / 'architecture'}"}


def _tiny_bert_tokenizer_files(directory: Path) -> int:
    """BERT WordPiece files (``vocab.txt`` + ``tokenizer_config.json``); returns the vocabulary size."""
    directory.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    vocab = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        ",",
        ".",
        *SHAPES_WORDS,
        *letters,
        *[f"##{c}" for c in letters],
    ]
    vocab = list(dict.fromkeys(vocab))
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    with open(directory / "tokenizer_config.json", "w") as f:
        json.dump({"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512}, f)
    return len(vocab)


def tiny_blip_vit(seed: int = 0, image_size: int = TINY_IMAGE_SIZE, width: int = 128, depth: int = 2, heads: int = 2):
    """BLIP's vision transformer at toy size, as a timm ``VisionTransformer`` (the same module and key
    layout as BLIP's ``vit.py``: ``cls_token``, ``pos_embed``, ``blocks.i.attn.qkv``, ..., LayerNorm eps 1e-6)."""
    from timm.models.vision_transformer import VisionTransformer  # heavy, and only ImageReward's tests need timm

    torch.manual_seed(seed)
    vit = VisionTransformer(
        img_size=image_size,
        patch_size=8,
        embed_dim=width,
        depth=depth,
        num_heads=heads,
        mlp_ratio=4.0,
        qkv_bias=True,
        num_classes=0,
        global_pool="",
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    )
    with torch.no_grad():  # timm initialises position/class embeddings near zero; make them matter
        vit.pos_embed.normal_(0, 0.5)
        vit.cls_token.normal_(0, 0.5)
    return vit.eval()


def save_tiny_image_reward(root: str | os.PathLike, seed: int = 0) -> dict[str, str]:
    """Tiny ImageReward with the official ``ImageReward.pt`` keys and ``med_config.json``."""
    from transformers import BlipTextModel  # heavy: only when a tiny ImageReward checkpoint is built

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    vocab_size = _tiny_bert_tokenizer_files(root / "tokenizer") + 2  # + [DEC], [ENC] as in BLIP (30522 + 2)
    vit = tiny_blip_vit(seed)
    med = {  # the official med_config.json fields, at toy size
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": 32,
        "initializer_range": 0.02,
        "intermediate_size": 64,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": 64,
        "model_type": "bert",
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
        "pad_token_id": 0,
        "type_vocab_size": 2,
        "vocab_size": vocab_size,
        "encoder_width": vit.embed_dim,
        "add_cross_attention": True,
    }
    (root / "med_config.json").write_text(json.dumps(med, indent=2))
    torch.manual_seed(seed + 1)
    text = BlipTextModel(text_config_from_med_config(med, vit.embed_dim), add_pooling_layer=False)
    head = _spread_out(AestheticHead(med["hidden_size"]))
    state: dict[str, Any] = {}
    state.update({f"blip.visual_encoder.{k}": v for k, v in vit.state_dict().items()})
    state.update({f"blip.text_encoder.{k}": v for k, v in text.state_dict().items()})
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(med["max_position_embeddings"])[None]
    state.update({f"mlp.{k}": v for k, v in head.state_dict().items()})
    state["blip.vision_proj.weight"] = torch.randn(16, vit.embed_dim)  # BLIP contrastive projections, unused
    state["blip.vision_proj.bias"] = torch.zeros(16)
    state["blip.text_proj.weight"] = torch.randn(16, med["hidden_size"])
    state["blip.text_proj.bias"] = torch.zeros(16)
    torch.save(state, root / "ImageReward.pt")
    return {"checkpoint": str(root), "tokenizer": str(root / "tokenizer")}


TINY_BUILDERS = {
    "pickscore": save_tiny_pickscore,
    "hpsv2": partial(save_tiny_hps, version="v2.0"),
    "hpsv2.1": partial(save_tiny_hps, version="v2.1"),
    "imagereward": save_tiny_image_reward,
    "aesthetic": save_tiny_aesthetic,
    "clipscore": save_tiny_clipscore,
}
"""Registry name -> builder ``f(root) -> load() kwargs`` for every model-based reward."""


def save_tiny_checkpoints(
    root: str | os.PathLike, names: list[str] | None = None, aesthetic_head: str | None = None
) -> dict[str, dict[str, str]]:
    """Tiny checkpoints under ``root/<name>`` for ``names`` (default: one of each model-based reward;
    names without weights are skipped); returns ``{registry name: load() kwargs}``."""
    root = Path(root)
    names = [n for n in TINY_BUILDERS if n != "hpsv2"] if names is None else [n for n in names if n in TINY_BUILDERS]
    out = {}
    for name in names:
        kwargs = {"head": aesthetic_head} if name == "aesthetic" else {}
        out[name] = TINY_BUILDERS[name](root / name, **kwargs)
    return out
