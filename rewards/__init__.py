"""Reward-model plug-ins (installed as ``flowalign.rewards``).

One protocol: ``reward(images, prompts) -> Tensor[B]``, images a float tensor ``[B, 3, H, W]`` in
[0, 1] (lists of PIL images accepted), one prompt per image. Every reward declares ``differentiable``
(torch end to end; otherwise it runs under ``no_grad``), chunks batches to ``batch_size``, follows the
images' device and dtype, and raises clear errors on bad inputs and NaN scores. Any plain callable
``f(images, prompts) -> scores`` is accepted wherever a reward is (:func:`as_reward`).

Built-in rewards (``load(name, **kwargs)``; each model loads from a hub id or a local path):

==========================  =====================================================  ==============
name                        what                                                   differentiable
==========================  =====================================================  ==============
``pickscore``               PickScore v1, transformers CLIP-H: logit_scale * cos   yes
``hpsv2`` / ``hpsv2.1``     HPS v2 / v2.1, open_clip ViT-H-14 + HPS state dict     yes
``imagereward``             ImageReward, BLIP ViT + med BERT + MLP (no package)    yes
``aesthetic``               LAION aesthetic MLP on CLIP ViT-L/14 embeddings        yes
``clipscore``               CLIPScore 2.5 * max(cos, 0), any open_clip model       yes
``jpeg_compressibility``    minus JPEG size in kB (quality 95)                     no
``jpeg_incompressibility``  JPEG size in kB (quality 95)                           no
``shapes`` / ``shapes_binary``  shapes-world verifier: fraction / all satisfied    no
``redness``                 mean over pixels of R - max(G, B)                      yes
``png_compressibility``     minus lossless PNG size in kB                          no
``red_jpeg``                0.5 z(redness) + 0.5 z(jpeg_compressibility), fixed    no
                            base-model means / stds (the credit-assignment task)
==========================  =====================================================  ==============

Mixtures: ``Mixture([(reward, weight), ...], normalize="zscore")`` or
``load_mixture(["pickscore=0.7", "aesthetic=0.3"])``; your own rewards: ``register(name, factory)``.

Example::

    import torch
    from flowalign import rewards

    pick = rewards.load("pickscore")                               # hub id by default
    hps = rewards.load("hpsv2.1", checkpoint="/ckpt/HPS_v2.1_compressed.pt")
    mix = rewards.Mixture([(pick, 0.5), (hps, 0.5)], normalize="zscore")
    scores = mix(images, prompts)                                  # images: [B, 3, H, W] in [0, 1]

    rewards.register("mean_red", lambda: rewards.as_reward(lambda x, p: x[:, 0].mean((1, 2))))
    red = rewards.load("mean_red")
"""

from __future__ import annotations

import importlib
from typing import Any

from flowalign.rewards.base import FunctionReward, NonFiniteRewardError, Reward
from flowalign.rewards.hub import CheckpointNotFoundError
from flowalign.rewards.mixture import Mixture, combine, load_mixture, zscore
from flowalign.rewards.preprocess import ImagePreprocess
from flowalign.rewards.registry import RewardSpec, as_reward, available, load, parse_reward_spec, register

# Built-in reward classes import transformers / open_clip: loaded on first access.
_LAZY = {
    "PickScore": "flowalign.rewards.pickscore",
    "HPSv2": "flowalign.rewards.hps",
    "ImageReward": "flowalign.rewards.image_reward",
    "AestheticScore": "flowalign.rewards.aesthetic",
    "CLIPScore": "flowalign.rewards.clip_score",
    "JpegCompressibility": "flowalign.rewards.jpeg",
    "JpegIncompressibility": "flowalign.rewards.jpeg",
    "ShapesVerifier": "flowalign.rewards.shapes",
    "Redness": "flowalign.rewards.credit",
    "PngCompressibility": "flowalign.rewards.credit",
}

__all__ = [
    "NonFiniteRewardError",
    "Reward",
    "FunctionReward",
    "as_reward",
    "Mixture",
    "combine",
    "zscore",
    "ImagePreprocess",
    "load",
    "register",
    "available",
    "load_mixture",
    "parse_reward_spec",
    "RewardSpec",
    "CheckpointNotFoundError",
    "PickScore",
    "HPSv2",
    "ImageReward",
    "AestheticScore",
    "CLIPScore",
    "JpegCompressibility",
    "JpegIncompressibility",
    "ShapesVerifier",
    "Redness",
    "PngCompressibility",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flowalign.rewards' has no attribute {name!r}")
