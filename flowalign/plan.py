"""Peak GPU memory of a fine-tuning run, traced on the meta device without weights: ``flowalign plan``.

The real diffusers / transformers modules of the model (SD3.5-Medium's published configs are built in, or a
local diffusers folder) are built on the ``meta`` device, where a tensor has a shape, a dtype and a storage
size but no data. The stages of one training iteration then run as the trainer runs them, and a
``TorchDispatchMode`` (:class:`LiveBytes`) adds the bytes of every storage an operation creates and subtracts
them when the storage dies (a weak reference), which is the GPU caching allocator's ``memory_allocated``
without its rounding. The peak of that count over a stage is the stage's peak, per GPU.

Stages (``docs/memory.md`` says what each holds):

- ``encode``: the text encoders on the GPU encoding every known prompt at start-up (256 prompts per call).
- ``rollout``: ``images_per_rank`` trajectories sampled, ``rollout_batch_size`` images per transformer call
  (CFG: twice the rows), the SDE trajectory, log-probs and velocities kept in fp32.
- ``decode``: the rollout's latents decoded, ``decode_batch_size`` images per VAE call, then the reward.
- ``update``: one optimizer step on ``minibatch_size`` states (forward with grad of the guided field, a no-grad
  reference forward, backward, clip, AdamW step), with the rollout and its images still held.
- ``evaluation``: held-out samples of the policy and the reference (Euler, ``eval_steps``), decoded, and the
  SDE-path KL; the training reward's weights stay on the GPU, the held-out rewards score CPU images.

What the GPU's kernels do that the meta device cannot know is emulated: CUDA autocast's casting policy
(:class:`GpuKernels`: matmuls and convolutions in the low precision, norms, softmax and reductions in fp32) and
scaled-dot-product attention as the fused kernel (output and log-sum-exp, never the L x L matrix).
``legacy=True`` plans the trainer as it was at commit c097f80 (fp32 weights, resident text encoders, the whole
rollout in one transformer call and one VAE call, evaluation in chunks of 64, the prompt cache on the GPU).

Example::

    from flowalign.config import ACFlowConfig
    from flowalign.plan import plan, format_table

    cfg = ACFlowConfig.from_yaml("samples/configs/acflow_sd35m.yaml")
    result = plan(cfg, model="sd3.5-medium", resolution=512, world_size=8)
    print(format_table([result]))
    result.stages["update"].peak / 2**30        # GiB per GPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
import transformers
import diffusers
from peft import LoraConfig
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from flowalign.config import ACFlowConfig, add_config_arguments, config_overrides
from flowalign.critic import Critic
from flowalign.pipelines.guidance import classifier_free_guidance
from flowalign.rewards.preprocess import ImagePreprocess
from flowalign.sampling import sample_latents
from flowalign.tiny import BASE_MODEL_DIR

GiB = 2**30
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STAGES = ("encode", "rollout", "decode", "update", "evaluation")
STRATEGIES = ("ddp", "fsdp", "zero2")

# ----------------------------------------------------------------------------------------------
# SD3.5-Medium, from its published configs (stabilityai/stable-diffusion-3.5-medium: transformer/config.json,
# vae/config.json; text_encoder = CLIP ViT-L/14's text tower, text_encoder_2 = OpenCLIP bigG/14's text tower,
# both CLIPTextModelWithProjection; text_encoder_3 = google/t5-v1_1-xxl's encoder, T5EncoderModel). The
# transformer built from this config has 2,243,171,520 parameters (the 2.5 B of the model card also counts the
# 384 x 384 positional-embedding table, a buffer here).
# ----------------------------------------------------------------------------------------------
SD35_MEDIUM: dict[str, dict[str, Any]] = {
    "transformer": {
        "_class_name": "SD3Transformer2DModel", "sample_size": 128, "patch_size": 2, "in_channels": 16,
        "num_layers": 24, "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
        "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "out_channels": 16,
        "pos_embed_max_size": 384, "dual_attention_layers": list(range(13)), "qk_norm": "rms_norm",
    },
    "vae": {
        "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 16,
        "norm_num_groups": 32, "act_fn": "silu", "sample_size": 1024, "scaling_factor": 1.5305,
        "shift_factor": 0.0609, "force_upcast": True, "use_quant_conv": False, "use_post_quant_conv": False,
    },
    "text_encoder": {  # CLIP ViT-L/14 text tower
        "_class_name": "CLIPTextModelWithProjection", "vocab_size": 49408, "hidden_size": 768,
        "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
        "max_position_embeddings": 77, "projection_dim": 768, "hidden_act": "quick_gelu",
        "model_type": "clip_text_model",
    },
    "text_encoder_2": {  # OpenCLIP ViT-bigG/14 text tower
        "_class_name": "CLIPTextModelWithProjection", "vocab_size": 49408, "hidden_size": 1280,
        "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
        "max_position_embeddings": 77, "projection_dim": 1280, "hidden_act": "gelu",
        "model_type": "clip_text_model",
    },
    "text_encoder_3": {  # T5 v1.1 XXL encoder
        "_class_name": "T5EncoderModel", "vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240,
        "num_layers": 24, "num_heads": 64, "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32,
        "model_type": "t5",
    },
}
MODELS = {"sd3.5-medium": SD35_MEDIUM}

# Reward models with weights, by architecture (laion/CLIP-ViT-H-14-laion2B-s32B-b79K for PickScore;
# openai/clip-vit-large-patch14's vision tower for the LAION aesthetic MLP). Rewards without weights (jpeg_*,
# shapes*) cost nothing; other names are reported as not counted.
CLIP_H = {"text_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                          "num_attention_heads": 16, "hidden_act": "gelu"},
          "vision_config": {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                            "num_attention_heads": 16, "patch_size": 14, "image_size": 224, "hidden_act": "gelu"},
          "projection_dim": 1024}
CLIP_L_VISION = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                 "patch_size": 14, "image_size": 224, "projection_dim": 768, "hidden_act": "quick_gelu"}
WEIGHTLESS_REWARDS = ("jpeg_compressibility", "jpeg_incompressibility", "shapes", "shapes_binary")
LEGACY_EVAL_CHUNK = 64  # c097f80 sampled and decoded held-out images 64 at a time


# ----------------------------------------------------------------------------------------------
# Live-bytes tracking and the GPU's kernels
# ----------------------------------------------------------------------------------------------
class LiveBytes(TorchDispatchMode):
    """Bytes of the live tensor storages created under it (or registered with :meth:`track`), and their peak.

    Each storage is counted once (views share it) and uncounted when it dies (a weak reference's callback).
    ``scale`` counts a storage at a fraction of its size (a shard of a sharded tensor).

    Example::

        with LiveBytes() as live, torch.device("meta"):
            x = torch.empty(1024, 1024)             # 4 MiB
            y = x @ x                               # 4 MiB more
            del y
        live.current, live.peak                     # (4194304, 8388608): x is alive, y was
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, tuple[weakref.ref, int]] = {}

    def track(self, tensor: torch.Tensor, scale: float = 1.0) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._live:
            return
        nbytes = int(storage.nbytes() * scale)

        def gone(_ref, key=key) -> None:
            entry = self._live.pop(key, None)
            if entry is not None:
                self.current -= entry[1]

        self._live[key] = (weakref.ref(storage, gone), nbytes)
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def rescale(self, tensor: torch.Tensor, scale: float) -> None:
        """Count an already tracked ``tensor``'s storage at ``scale`` times its size from now on."""
        storage = tensor.untyped_storage()
        ref, old = self._live[id(storage)]
        new = int(storage.nbytes() * scale)
        self._live[id(storage)] = (ref, new)
        self.current += new - old

    def bump(self, transient: int) -> None:
        """A computation that would hold ``transient`` bytes above the current count at its peak (a replay)."""
        self.peak = max(self.peak, self.current + transient)

    @contextlib.contextmanager
    def extra(self, nbytes: int):
        """``nbytes`` held for the duration (memory the meta device does not see, e.g. FSDP's gathered blocks)."""
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        try:
            yield
        finally:
            self.current -= nbytes

    def reset_peak(self) -> int:
        self.peak = self.current
        return self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


_LOW = {F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose2d, torch.matmul, torch.Tensor.matmul,
        torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm, torch.bmm, torch.Tensor.bmm, torch.baddbmm,
        torch.addmm, torch.einsum}
_FP32 = {F.layer_norm, F.group_norm, F.softmax, torch.softmax, torch.Tensor.softmax, F.log_softmax, torch.pow,
         torch.Tensor.pow, torch.Tensor.__pow__, torch.rsqrt, torch.Tensor.rsqrt, torch.exp, torch.Tensor.exp,
         torch.log, torch.Tensor.log, F.mse_loss, torch.sum, torch.Tensor.sum, torch.cumsum, torch.prod,
         torch.norm, torch.Tensor.norm, F.normalize, F.cosine_similarity}


class GpuKernels(TorchFunctionMode):
    """What a CUDA device does that the meta device does not: CUDA autocast's casting policy (``autocast``: the
    low-precision dtype, or None for no autocast) and attention as the fused memory-efficient kernel.

    Autocast, as torch's CUDA policy lists it: matmuls, linear layers and convolutions run in ``autocast``
    (their floating inputs cast, the casts recorded by autograd); layer / group norm, softmax, pow, exp, log and
    reductions run in fp32. ``F.scaled_dot_product_attention`` without a mask runs as
    ``aten._scaled_dot_product_efficient_attention``: it keeps the output and a log-sum-exp per query (for the
    backward), never the L x L scores; with a mask (the CLIP text towers, 77 tokens) it runs as written.
    """

    def __init__(self, autocast: torch.dtype | None) -> None:
        super().__init__()
        self.autocast = autocast
        self._cache: dict[int, torch.Tensor] = {}  # autocast's cache: leaf fp32 tensors that require grad, cast once

    def __exit__(self, *exc):
        self._cache.clear()  # as autocast's cache, emptied when the region ends
        return super().__exit__(*exc)

    def _cast(self, args, kwargs, dtype, only_from=None):
        def cast(x):
            if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != dtype and (
                    only_from is None or x.dtype in only_from):
                if dtype != torch.float32 and x.requires_grad and x.is_leaf:  # trainable weights: cached
                    if id(x) not in self._cache:
                        self._cache[id(x)] = x.to(dtype)
                    return self._cache[id(x)]
                return x.to(dtype)
            return x

        return [cast(a) for a in args], {k: cast(v) for k, v in kwargs.items()}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self._attention(*args, **kwargs)
        if self.autocast is not None:
            if func in _LOW:
                args, kwargs = self._cast(args, kwargs, self.autocast, (torch.float32, torch.float64))
            elif func in _FP32:
                args, kwargs = self._cast(args, kwargs, torch.float32, (torch.float16, torch.bfloat16))
        return func(*args, **kwargs)

    def _attention(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **rest):
        if self.autocast is not None:
            query, key, value = (t.to(self.autocast) if t.dtype == torch.float32 else t for t in (query, key, value))
        if attn_mask is not None or rest.get("enable_gqa") or query.shape[-1] != value.shape[-1]:
            return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                                  is_causal=is_causal, scale=scale, **rest)
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        out = torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, None, grad, dropout_p,
                                                                     is_causal, scale=scale)
        return out[0]


# ----------------------------------------------------------------------------------------------
# Settings: the memory-relevant part of a config, as the trainer (or c097f80's) resolves it on a GPU
# ----------------------------------------------------------------------------------------------
@dataclass
class Settings:
    """Everything the plan depends on, resolved (see :func:`resolve_settings`)."""

    resolution: int
    world_size: int
    strategy: str
    legacy: bool
    images_per_rank: int
    autocast: str | None  # 'bf16' | 'fp16' | None
    weight_dtype: str
    gradient_checkpointing: bool
    text_encoders_resident: bool
    rollout_batch_size: int
    decode_batch_size: int
    minibatch_size: int
    use_lora: bool
    lora_rank: int
    lora_target_modules: list[str]
    optimizer: str
    algorithm: str
    sampler: str
    fm_states: str
    sample_steps: int
    sde_steps: int
    cfg: bool
    reference_forward: bool
    max_sequence_length: int
    eval_images: int  # held-out images on the busiest rank
    eval_batch_size: int  # images per transformer call in evaluation
    eval_decode_batch_size: int
    eval_steps: int
    eval_kl: bool
    known_prompts: int
    prompt_cache_on_gpu: int  # prompts whose embeddings live on the GPU
    reward: list[str]
    critic: bool
    critic_channels: list[int]
    critic_hidden_dim: int


def _get(cfg: Any, key: str, default: Any) -> Any:
    """``cfg.key``, or ``default`` where the config lacks the key (an older config) or leaves it None."""
    value = getattr(cfg, key, None)
    return default if value is None else value


def _count_prompts(cfg: Any) -> int:
    """Distinct prompts the trainer encodes: the training prompt file's (or P x iterations for a prompt source), the
    held-out ones (the first ``eval_prompts`` lines of ``eval_prompt_file``) and the empty prompt, as a set."""
    def lines(path: Path) -> list[str]:
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]

    source = Path(str(_get(cfg, "prompts", "shapes")))
    train = set(lines(source)) if source.is_file() else None
    eval_file = getattr(cfg, "eval_prompt_file", None)
    n_eval = _get(cfg, "eval_prompts", 48)
    held = set(lines(Path(eval_file))[:n_eval]) if eval_file and Path(eval_file).is_file() else None
    if train is None:
        return _get(cfg, "prompts_per_iteration", 8) * _get(cfg, "iterations", 50) + n_eval + 1
    return len(train | (held if held is not None else set())) + (0 if held is not None else n_eval) + 1


def resolve_settings(cfg: Any, resolution: int | None = None, world_size: int = 1, strategy: str = "ddp",
                     legacy: bool = False, sample_size: int = 128, vae_scale: int = 8, patch: int = 2,
                     has_t5: bool = True, device: str = "cuda") -> Settings:
    """The settings of ``cfg`` (an :class:`ACFlowConfig` or any object with its attributes) on a GPU (or, with
    ``device="cpu"``, as the trainer resolves them on a CPU: no autocast, no checkpointing, encoders in memory).

    ``legacy=True``: as the trainer at c097f80 resolved them (fp32 weights, text encoders resident, the rank's
    whole rollout in one transformer call and one VAE call, evaluation in chunks of 64 on rank 0, every prompt
    embedding cached on the GPU, checkpointing and autocast only where the config says so).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}; choose one of {STRATEGIES}.")
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1.")
    g = _get(cfg, "images_per_prompt", 8)
    if g % world_size:
        raise ValueError(f"images_per_prompt={g} must be divisible by world_size={world_size} (each rank samples "
                         f"images_per_prompt / world_size images of every prompt); pick a divisor of {g}.")
    res = resolution or _get(cfg, "resolution", None) or sample_size * vae_scale
    if res % (vae_scale * patch):
        raise ValueError(f"resolution={res} must be a multiple of {vae_scale * patch} (VAE x patch size).")
    n = _get(cfg, "prompts_per_iteration", 8) * g // world_size
    mixed = _get(cfg, "mixed_precision", "no" if legacy else "auto")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device={device!r}; choose 'cuda' or 'cpu'.")
    gpu = device == "cuda"
    if mixed == "auto":
        mixed = "bf16" if gpu else "no"  # bf16 on a GPU that has it
    autocast = None if mixed == "no" else mixed
    if legacy:
        weight, ckpt = "fp32", bool(_get(cfg, "gradient_checkpointing", False))
    else:
        weight = getattr(cfg, "weight_dtype", None) or (autocast or "fp32")
        ckpt = _get(cfg, "gradient_checkpointing", None)
        ckpt = gpu if ckpt is None else bool(ckpt)
    offload = getattr(cfg, "offload_text_encoders", getattr(cfg, "text_encoder_offload", True))
    algorithm = _get(cfg, "algorithm", "acflow")
    steps = _get(cfg, "sample_steps", 16)
    fraction = _get(cfg, "sde_steps_fraction", 1.0)
    guidance = getattr(cfg, "guidance_scale", None)
    w2 = _get(cfg, "w2_weight", 0.03)
    eval_total = _get(cfg, "eval_prompts", 48) * _get(cfg, "eval_images_per_prompt", 2)
    reward = _get(cfg, "reward", "shapes")
    rewards = [str(r).split("=")[0].split("(")[0] for r in (reward if isinstance(reward, list) else [reward])]
    rollout_bs = n if legacy else min(_get(cfg, "rollout_batch_size", 16), n)
    eval_images = eval_total if legacy or not _get(cfg, "eval_sharded", True) else math.ceil(eval_total / world_size)
    msl = _get(cfg, "max_sequence_length", None) or (256 if has_t5 else 1)
    return Settings(
        resolution=res, world_size=world_size, strategy=strategy, legacy=legacy, images_per_rank=n,
        autocast=autocast, weight_dtype=weight, gradient_checkpointing=ckpt,
        text_encoders_resident=legacy or not offload or not gpu, rollout_batch_size=rollout_bs,
        decode_batch_size=n if legacy else min(_get(cfg, "decode_batch_size", 4), n),
        minibatch_size=_get(cfg, "minibatch_size", 32), use_lora=_get(cfg, "use_lora", True),
        lora_rank=_get(cfg, "lora_rank", 16),
        lora_target_modules=list(_get(cfg, "lora_target_modules", ["to_q", "to_k", "to_v", "to_out.0"])),
        optimizer=_get(cfg, "optimizer", "adamw"), algorithm=algorithm,
        sampler="sde" if algorithm == "grpo" else _get(cfg, "sampler", "sde"),
        fm_states=_get(cfg, "fm_states", "trajectory"), sample_steps=steps,
        sde_steps=max(1, round(fraction * steps)), cfg=guidance is None or guidance != 1.0,
        reference_forward=algorithm == "grpo" or bool(w2),
        max_sequence_length=msl, eval_images=eval_images if _get(cfg, "eval_prompts", 48) else 0,
        eval_batch_size=LEGACY_EVAL_CHUNK if legacy else _get(cfg, "rollout_batch_size", 16),
        eval_decode_batch_size=LEGACY_EVAL_CHUNK if legacy else _get(cfg, "decode_batch_size", 4),
        eval_steps=_get(cfg, "eval_steps", 28), eval_kl=_get(cfg, "eval_kl", True),
        known_prompts=_count_prompts(cfg),
        prompt_cache_on_gpu=_count_prompts(cfg) if legacy else 0, reward=rewards, critic=algorithm == "acflow",
        critic_channels=list(_get(cfg, "critic_channels", [32, 64, 128])),
        critic_hidden_dim=_get(cfg, "critic_hidden_dim", 256),
    )


# ----------------------------------------------------------------------------------------------
# The model, on the meta device
# ----------------------------------------------------------------------------------------------
def model_configs(model: str | Path) -> dict[str, dict[str, Any]]:
    """Component configs (``_class_name`` + constructor arguments) of ``model``: a built-in name
    (``sd3.5-medium``), a local diffusers pipeline folder (``model_index.json`` and each component's
    ``config.json``), or a transformer ``config.json`` (then the VAE and text encoders are SD3.5-Medium's)."""
    if str(model) == "tiny":
        model = BASE_MODEL_DIR
    if str(model) in MODELS:
        return json.loads(json.dumps(MODELS[str(model)]))
    path = Path(model)
    if path.is_file():
        configs = json.loads(json.dumps(SD35_MEDIUM))
        configs["transformer"] = json.loads(path.read_text())
        return configs
    if not (path / "model_index.json").is_file():
        raise ValueError(f"--model {model!r}: not a built-in model ({sorted(MODELS)}), a diffusers pipeline folder "
                         "(with model_index.json) or a transformer config.json.")
    index = json.loads((path / "model_index.json").read_text())
    configs = {}
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        entry = index.get(name)
        if not entry or entry[0] is None:
            continue
        config = json.loads((path / name / "config.json").read_text())
        config["_class_name"] = entry[1]
        configs[name] = config
    tokenizer = path / "tokenizer" / "tokenizer_config.json"  # CLIP's padded length (77; the tiny model's 16)
    if tokenizer.is_file():
        configs["tokenizer"] = {"model_max_length": json.loads(tokenizer.read_text()).get("model_max_length", 77)}
    return configs


def build_module(config: dict[str, Any]) -> torch.nn.Module:
    """A diffusers or transformers module from its config, on the meta device (no weights)."""
    config = dict(config)
    name = config.pop("_class_name")
    with torch.device("meta"):
        if hasattr(diffusers, name):
            cls = getattr(diffusers, name)
            keys = set(cls.extract_init_dict(config)[0])
            return cls.from_config({k: v for k, v in config.items() if k in keys or k.startswith("_")})
        model_type = config.pop("model_type", None) or {"CLIPTextModelWithProjection": "clip_text_model",
                                                        "T5EncoderModel": "t5"}[name]
        for key in ("architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path"):
            config.pop(key, None)
        return getattr(transformers, name)(transformers.AutoConfig.for_model(model_type, **config))


def _reward_module(name: str) -> torch.nn.Module | None:
    with torch.device("meta"):
        if name == "pickscore":
            return transformers.CLIPModel(transformers.CLIPConfig(**CLIP_H))
        if name == "aesthetic":
            vision = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**CLIP_L_VISION))
            head = torch.nn.Sequential(torch.nn.Linear(768, 1024), torch.nn.Linear(1024, 128),
                                       torch.nn.Linear(128, 64), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))
            return torch.nn.ModuleDict({"vision": vision, "head": head})
    return None


def _nbytes(module: torch.nn.Module) -> int:
    storages = {}
    for t in [*module.parameters(), *module.buffers()]:
        storages[id(t.untyped_storage())] = t.untyped_storage().nbytes()
    return sum(storages.values())


# ----------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------
@dataclass
class StagePeak:
    """One stage: ``resident`` bytes (weights, trainable state, caches: what lives across stages), ``carried``
    (tensors handed in by the earlier stages of the iteration), ``peak`` (the most live at once)."""

    resident: int
    carried: int
    peak: int


@dataclass
class Plan:
    """The result of :func:`plan`: per-stage peaks (bytes per GPU), the resident parts, the settings used."""

    model: str
    settings: Settings
    stages: dict[str, StagePeak]
    parts: dict[str, int]  # resident bytes by component
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "settings": asdict(self.settings),
                "stages": {k: {key: round(v / GiB, 3) for key, v in asdict(s).items()} for k, s in self.stages.items()},
                "parts_gib": {k: round(v / GiB, 3) for k, v in self.parts.items()}, "notes": self.notes}


class _Tracer:
    """Runs the trainer's stages on the meta device under :class:`LiveBytes` (one instance per plan)."""

    def __init__(self, configs: dict[str, dict[str, Any]], s: Settings, cfg: Any) -> None:
        self.s, self.cfg = s, cfg
        self.live = LiveBytes()
        self._memo: dict[Any, tuple[int, torch.Size, torch.dtype]] = {}
        self.notes: list[str] = []
        wd = DTYPES[s.weight_dtype]
        self.wd = wd
        self.autocast = DTYPES[s.autocast] if s.autocast else None
        shard = 1.0 / s.world_size if s.strategy == "fsdp" else 1.0
        transformer = build_module(configs["transformer"])
        torch.nn.Module.to(transformer, wd)
        self.tcfg = transformer.config
        self.vae = build_module(configs["vae"])
        torch.nn.Module.to(self.vae, wd)
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent = (self.tcfg.in_channels, s.resolution // self.vae_scale, s.resolution // self.vae_scale)
        self.encoders = [build_module(configs[k]) for k in ("text_encoder", "text_encoder_2", "text_encoder_3")
                         if k in configs]
        for m in self.encoders:
            torch.nn.Module.to(m, wd)
        self.parts: dict[str, int] = {}
        # frozen weights (FSDP: this rank's shard of the transformer's)
        self.parts["transformer (frozen)"] = int(_nbytes(transformer) * shard)
        if s.use_lora:
            transformer.requires_grad_(False)
            transformer.add_adapter(LoraConfig(r=s.lora_rank, lora_alpha=s.lora_rank, init_lora_weights="gaussian",
                                               target_modules=list(s.lora_target_modules)))
            for name, p in transformer.named_parameters():  # cast_training_params: trainable in fp32
                if p.requires_grad:
                    p.data = p.data.float()
            self.reference = None
        else:
            self.reference = transformer
            transformer = build_module(configs["transformer"])
            torch.nn.Module.to(transformer, torch.float32)
        if s.gradient_checkpointing:  # the trainer's checkpointing, its recomputation under the same kernels
            transformer.enable_gradient_checkpointing(self._checkpoint)
        self.transformer = transformer
        self.params = [p for p in transformer.parameters() if p.requires_grad]
        self.parts["trainable"] = int((sum(p.numel() * p.element_size() for p in self.params) if s.use_lora
                                       else _nbytes(transformer)) * shard)
        self.trainable_numel = sum(p.numel() for p in self.params)
        for t in [*transformer.parameters(), *transformer.buffers()]:
            self.live.track(t, shard)
        if self.reference is not None:
            for t in [*self.reference.parameters(), *self.reference.buffers()]:
                self.live.track(t, shard)
            self.parts["transformer (frozen)"] = int(_nbytes(self.reference) * shard)
        for t in [*self.vae.parameters(), *self.vae.buffers()]:
            self.live.track(t)
        self.parts["vae"] = _nbytes(self.vae)
        self.parts["text encoders"] = sum(_nbytes(m) for m in self.encoders) if s.text_encoders_resident else 0
        if s.text_encoders_resident:
            for m in self.encoders:
                for t in [*m.parameters(), *m.buffers()]:
                    self.live.track(t)
        self.rewards = {}
        for name in s.reward:
            module = _reward_module(name)
            if module is None and name not in WEIGHTLESS_REWARDS:
                self.notes.append(f"reward {name!r}: weights and activations not counted (architecture unknown to "
                                  "the planner)")
            if module is not None:
                module.requires_grad_(False)
                self.rewards[name] = module
                for t in [*module.parameters(), *module.buffers()]:
                    self.live.track(t)
        self.parts["reward"] = sum(_nbytes(m) for m in self.rewards.values())
        self.critic = None
        if s.critic:
            with torch.device("meta"):
                self.critic = Critic(in_channels=self.latent[0], pooled_dim=self.tcfg.pooled_projection_dim,
                                     channels=tuple(s.critic_channels), hidden_dim=s.critic_hidden_dim)
            for t in self.critic.parameters():
                self.live.track(t)
        self.parts["critic"] = _nbytes(self.critic) if self.critic is not None else 0
        # the prompt embeddings: L = 77 CLIP tokens + T5 tokens (SD3), width joint_attention_dim
        clip_tokens = min(configs.get("tokenizer", {}).get("model_max_length", 77), 77)
        self.seq = clip_tokens + s.max_sequence_length  # SD3: CLIP tokens, then T5's (zeros without T5)
        self.clip_tokens = clip_tokens
        self.embed_dtype = wd
        self.cache = []
        with self.live, torch.device("meta"):
            if s.prompt_cache_on_gpu:
                self.cache = [torch.empty(s.prompt_cache_on_gpu, self.seq, self.tcfg.joint_attention_dim, dtype=wd),
                              torch.empty(s.prompt_cache_on_gpu, self.tcfg.pooled_projection_dim, dtype=wd)]
            ddp_buckets = s.strategy == "ddp" and s.world_size > 1
            self.buckets = torch.empty(self.trainable_numel if ddp_buckets else 0)  # DDP's gradient buckets (fp32)
        self.parts["prompt cache"] = sum(t.untyped_storage().nbytes() for t in self.cache)
        self.parts["ddp buckets"] = self.buckets.untyped_storage().nbytes()
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4) if s.optimizer == "adamw" else None
        self.critic_optimizer = torch.optim.AdamW(self.critic.parameters()) if self.critic is not None else None
        self.opt8 = []  # adamw8bit: two uint8 states + one fp32 absmax per 256-element block, per state
        with self.live, torch.device("meta"):
            self._warm_up()
        self.gathered = 0
        if s.strategy == "fsdp" and s.world_size > 1:  # one block gathered at a time, and the next prefetched
            blocks = [b for name, b in transformer.named_modules() if name.count(".") == 1 and "blocks." in name]
            self.gathered = 2 * max((_nbytes(b) for b in blocks), default=0)

    def _warm_up(self) -> None:
        """The steady state between iterations: the optimizer states exist and the last step's gradients are still
        allocated (the trainer frees them with ``zero_grad(set_to_none=True)`` before the next backward)."""
        shard = 1.0 / self.s.world_size if self.s.strategy in ("zero2", "fsdp") else 1.0
        for p in self.params:
            p.grad = torch.zeros_like(p)
            if shard != 1.0:
                self.live.rescale(p.grad, shard)
        self._adam_step()
        if self.critic is not None:
            for p in self.critic.parameters():
                p.grad = torch.zeros_like(p)
            self.critic_optimizer.step()
        self.parts["gradients + optimizer states"] = self.live.current - sum(self.parts.values())

    def _checkpoint(self, module, *args):
        """diffusers' default checkpoint function (non-reentrant), with :class:`GpuKernels` around the recomputation
        (a torch-function mode is off while the mode handles ``backward``)."""
        return torch.utils.checkpoint.checkpoint(
            module.__call__, *args, use_reentrant=False,
            context_fn=lambda: (contextlib.nullcontext(), GpuKernels(self.autocast)))

    # -- model calls ---------------------------------------------------------------------------
    def _measured(self, fn: Callable[[], Any]) -> tuple[Any, int]:
        """Run ``fn``, returning its result and its transient peak above the bytes live at its start."""
        outer, start = self.live.peak, self.live.current
        self.live.peak = start
        out = fn()
        transient = self.live.peak - start
        self._last_peak = self.live.peak
        self.live.peak = max(outer, self.live.peak)
        return out, transient

    def _replayed(self, key: Any, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A no-grad call that repeats with the same shapes costs the same: traced once, replayed after. A replay
        allocates the output and holds the bytes the traced call held above what it left behind (what it left
        besides its output, e.g. autocast's cache of cast weights, is already there at a replay)."""
        if key in self._memo:
            above_end, shape, dtype = self._memo[key]
            out = torch.empty(shape, dtype=dtype)
            self.live.bump(above_end)
            return out
        out, _ = self._measured(fn)
        end = self.live.current
        self._memo[key] = (self._last_peak - end, out.shape, out.dtype)
        return out

    def velocity(self, model, x, sigma, embeds, pooled):
        return model(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=embeds,
                     pooled_projections=pooled, return_dict=False)[0]

    def field(self, model, x, sigma, embeds, pooled, neg, neg_pooled, replay=True):
        """The guided velocity ``v_u + g (v_c - v_u)`` in one batched call, as ``Policy.cfg_velocity``."""
        if not self.s.cfg:
            call = lambda: self.velocity(model, x, sigma, embeds, pooled)  # noqa: E731
        else:
            call = lambda: self.velocity(model, torch.cat([x, x]), torch.cat([sigma, sigma]),  # noqa: E731
                                         torch.cat([neg, embeds]), torch.cat([neg_pooled, pooled]))
        if replay and not torch.is_grad_enabled():
            adapters = getattr(model, "_flowalign_adapters_off", False)
            v = self._replayed(("field", id(model), adapters, tuple(x.shape), x.dtype), call)
        else:
            v = call()
        if not self.s.cfg:
            return v
        v_u, v_c = v.chunk(2)
        return classifier_free_guidance(v_u, v_c, 4.5)

    @contextlib.contextmanager
    def reference_model(self):
        if self.reference is not None:
            yield self.reference
            return
        self.transformer.disable_adapters()
        self.transformer._flowalign_adapters_off = True
        try:
            yield self.transformer
        finally:
            self.transformer.enable_adapters()
            self.transformer._flowalign_adapters_off = False

    def embeddings(self, n: int):
        """The prompt (and empty-prompt) embeddings of ``n`` images on the GPU, as ``Policy.encode`` stacks them."""
        d, p = self.tcfg.joint_attention_dim, self.tcfg.pooled_projection_dim
        return (torch.empty(n, self.seq, d, dtype=self.embed_dtype), torch.empty(n, p, dtype=self.embed_dtype),
                torch.empty(n, self.seq, d, dtype=self.embed_dtype), torch.empty(n, p, dtype=self.embed_dtype))

    def sample(self, n: int, batch: int, steps: int, sampler: str, model, trajectory: bool, concat: bool):
        """``Policy.rollout``: ``n`` images, ``batch`` per transformer call, under autocast."""
        s = self.s
        embeds, pooled, neg, neg_pooled = self.embeddings(n)
        sigmas = torch.linspace(1.0, 0.0, steps + 1)
        window = max(1, round(s.sde_steps / s.sample_steps * steps)) if sampler == "sde" else 0
        parts = []
        with GpuKernels(self.autocast), torch.no_grad(), self.live.extra(self.gathered):
            for start in range(0, n, batch):
                i = slice(start, min(n, start + batch))
                rows = i.stop - i.start
                noise = torch.empty(rows, *self.latent)
                z = torch.empty(rows, window, *self.latent) if sampler == "sde" and not s.legacy else None
                parts.append(sample_latents(
                    lambda x, t, i=i: self.field(model, x, t, embeds[i], pooled[i], neg[i], neg_pooled[i]),
                    noise, sigmas, sampler=sampler, sde_steps=window or None, step_noise=z,
                    return_trajectory=trajectory, return_log_probs=trajectory,
                    return_velocities=trajectory and s.fm_states == "trajectory"))
                del noise, z
        if not concat and len(parts) == 1:
            out = parts[0]
            roll = {"latents": out.latents.float(), "trajectory": out.trajectory, "log_probs": out.log_probs,
                    "velocities": out.velocities}
        else:
            def cat(name):
                values = [getattr(part, name) for part in parts]
                return torch.cat(values) if values[0] is not None else None

            roll = {"latents": cat("latents").float(), "trajectory": cat("trajectory"),
                    "log_probs": cat("log_probs"), "velocities": cat("velocities")}
        del parts
        roll.update(embeds=embeds, pooled=pooled)
        return roll

    def decode(self, latents: torch.Tensor, batch: int) -> torch.Tensor:
        """``Policy.decode``: ``batch`` images per VAE call, in the VAE's dtype, no autocast."""
        vae = self.vae
        images = []
        with GpuKernels(None), torch.no_grad():
            for chunk in latents.split(batch):
                def run(chunk=chunk):
                    x = chunk / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
                    return vae.decode(x.to(vae.dtype), return_dict=False)[0]

                out = self._replayed(("decode", tuple(chunk.shape)), run)
                images.append((out.float() / 2 + 0.5).clamp(0, 1))
                del out
        return images[0] if len(images) == 1 and self.s.legacy else torch.cat(images)

    def score(self, images: torch.Tensor) -> None:
        """The training reward on the images (32 per call), weights on the GPU."""
        preprocess = ImagePreprocess()
        with GpuKernels(None), torch.no_grad():
            for name in self.s.reward:
                model = self.rewards.get(name)
                if model is None:
                    continue
                for chunk in images.split(32):
                    def run(chunk=chunk, model=model):
                        pixels = preprocess(chunk)
                        if isinstance(model, transformers.CLIPModel):
                            ids = torch.zeros(chunk.shape[0], 77, dtype=torch.long)
                            return model(input_ids=ids, pixel_values=pixels).logits_per_image
                        return model["head"](model["vision"](pixel_values=pixels).image_embeds)

                    self._replayed(("reward", name, tuple(chunk.shape)), run)

    # -- stages --------------------------------------------------------------------------------
    def stage(self, name: str, fn: Callable[[], Any], carried: int = 0) -> tuple[Any, StagePeak]:
        resident = self.live.current - carried
        self.live.reset_peak()
        out = fn()
        return out, StagePeak(resident=resident, carried=carried, peak=self.live.peak)

    def run(self, stages: tuple[str, ...] = STAGES) -> dict[str, StagePeak]:
        """Trace ``stages`` in the order of an iteration; a stage left out hands on tensors of the shapes it
        would have produced (so ``("decode",)`` decodes the latents of a rollout that was not traced)."""
        unknown = set(stages) - set(STAGES)
        if unknown:
            raise ValueError(f"stages {sorted(unknown)} unknown; choose from {STAGES}.")
        s, live = self.s, self.live
        out: dict[str, StagePeak] = {}
        resident = live.current
        with live, torch.device("meta"):
            if "encode" in stages:
                _, out["encode"] = self.stage("encode", self._encode)
            roll = images = None
            if {"rollout", "decode", "update"} & set(stages):
                if "rollout" in stages:
                    roll, out["rollout"] = self.stage("rollout", lambda: self.sample(
                        s.images_per_rank, s.rollout_batch_size, s.sample_steps, s.sampler, self.transformer,
                        trajectory=s.sampler == "sde", concat=not s.legacy))
                else:
                    roll = self._rollout_outputs()
            if {"decode", "update"} & set(stages):
                if "decode" in stages:
                    images, out["decode"] = self.stage("decode", lambda: self._decode_and_score(roll),
                                                       live.current - resident)
                else:
                    images = torch.empty(s.images_per_rank, 3, s.resolution, s.resolution)
            if "update" in stages:
                _, out["update"] = self.stage("update", lambda: self._update(roll), live.current - resident)
            del roll, images
            if "evaluation" in stages:
                _, out["evaluation"] = self.stage("evaluation", self._evaluate)
        return out

    def _rollout_outputs(self) -> dict[str, torch.Tensor | None]:
        """Tensors of the shapes a rollout returns (its trajectory, log-probs and velocities in fp32)."""
        s, n = self.s, self.s.images_per_rank
        sde = s.sampler == "sde"
        embeds, pooled = self.embeddings(n)[:2]
        return {"latents": torch.empty(n, *self.latent),
                "trajectory": torch.empty(n, s.sample_steps + 1, *self.latent) if sde else None,
                "log_probs": torch.empty(n, s.sample_steps) if sde else None,
                "velocities": torch.empty(n, s.sample_steps, *self.latent) if sde and s.fm_states == "trajectory"
                else None, "embeds": embeds, "pooled": pooled}

    def _encode(self) -> None:
        """The text encoders on the GPU (offloaded ones come for the duration), every known prompt, 256 per call."""
        s = self.s
        if not self.encoders:
            return
        tracked = []
        if not s.text_encoders_resident:
            for m in self.encoders:
                for t in [*m.parameters(), *m.buffers()]:
                    self.live.track(t)
                    tracked.append(t.untyped_storage())
        n = min(256, s.known_prompts)
        outs = []
        with GpuKernels(None), torch.no_grad():
            for m in self.encoders:
                t5 = isinstance(m, transformers.T5EncoderModel)
                ids = torch.zeros(n, s.max_sequence_length if t5 else self.clip_tokens, dtype=torch.long)
                out = m(input_ids=ids, output_hidden_states=not t5)
                outs.append(out[0] if t5 else out.hidden_states[-2])
                del out
        if not s.text_encoders_resident:  # moved back to the CPU: their GPU copies die
            for st in tracked:
                self.live._live.pop(id(st), None)
                self.live.current -= st.nbytes()
        del outs

    def _decode_and_score(self, roll) -> torch.Tensor:
        images = self.decode(roll["latents"], self.s.decode_batch_size)
        self.score(images)
        return images

    def _update(self, roll) -> None:
        """One optimizer step of ``minibatch_size`` states, the optimizer states already there (the steady state),
        with every minibatch's states drawn up front as the trainer draws them."""
        s = self.s
        n = s.images_per_rank
        mb = min(s.minibatch_size, n)
        neg = self.embeddings(n)[2:]
        states = []  # trainer._draw_states for every minibatch of the iteration: x_s, target, (v_old)
        per_iteration = math.ceil(n / mb) * _get(self.cfg, "inner_epochs", 1) * _get(self.cfg, "noise_draws", 1)
        v_old = s.fm_states == "trajectory" and s.algorithm == "acflow" and _get(self.cfg, "centered_weights", True)
        for _ in range(per_iteration):
            states.append([torch.empty(mb, *self.latent) for _ in range(3 if v_old or s.algorithm in ("nft", "awm")
                                                                         else 2)])
        self._optimizer_step(roll, neg, mb)
        del states

    def _optimizer_step(self, roll, neg, mb: int) -> None:
        s = self.s
        x = torch.empty(mb, *self.latent)
        sigma = torch.full((mb,), 0.5)
        embeds, pooled = roll["embeds"][:mb], roll["pooled"][:mb]
        with self.live.extra(self.gathered):
            if self.critic is not None:  # the critic's regression step (small)
                with GpuKernels(self.autocast):
                    v = self.critic(x, sigma, pooled.float()).float().pow(2).mean()
                v.backward()
                self.critic_optimizer.step()
                del v
            self.transformer.train()
            with GpuKernels(self.autocast):  # the trainer's autocast region: the loss, not the backward
                v = self.field(self.transformer, x, sigma, embeds, pooled, neg[0][:mb], neg[1][:mb], replay=False)
                loss = (v.float() - x).pow(2).mean()
                if s.reference_forward:
                    with torch.no_grad(), self.reference_model() as ref:
                        v_ref = self.field(ref, x, sigma, embeds, pooled, neg[0][:mb], neg[1][:mb])
                    loss = loss + (v.float() - v_ref.float()).pow(2).mean()
                    del v_ref
                del v
            for p in self.params:
                p.grad = None  # optimizer.zero_grad(set_to_none=True), between the forward and the backward
            loss.backward()
            del loss
            if s.strategy != "ddp" and s.world_size > 1:  # ZeRO-2 / FSDP: gradients reduce-scattered to a shard
                for p in self.params:
                    self.live.rescale(p.grad, 1.0 / s.world_size)
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self._adam_step()

    def _adam_step(self) -> None:
        s = self.s
        shard = 1.0 / s.world_size if s.strategy in ("zero2", "fsdp") else 1.0
        if self.optimizer is not None:
            fresh = not self.optimizer.state
            self.optimizer.step()
            if fresh and shard != 1.0:
                for state in self.optimizer.state.values():
                    for t in state.values():
                        if isinstance(t, torch.Tensor) and t.numel() > 1:
                            self.live.rescale(t, shard)
            return
        if not self.opt8:  # bitsandbytes AdamW8bit: blockwise-quantised states, 2 x (1 byte + 4 / 256 bytes)
            numel = self.trainable_numel
            self.opt8 = [torch.empty(numel, dtype=torch.uint8), torch.empty(numel, dtype=torch.uint8),
                         torch.empty(2 * math.ceil(numel / 256))]
            for t in self.opt8:
                self.live.rescale(t, shard)

    def _evaluate(self) -> None:
        """Held-out samples of the policy and the reference, decoded; the SDE-path KL (policy and reference)."""
        s = self.s
        total = s.eval_images
        if not total:
            return
        chunk = min(LEGACY_EVAL_CHUNK, total) if s.legacy else total
        batch = min(s.eval_batch_size, chunk)
        for model_ctx in (contextlib.nullcontext(self.transformer), self.reference_model()):
            with model_ctx as model:
                for start in range(0, total, chunk):
                    rows = min(chunk, total - start)
                    roll = self.sample(rows, min(batch, rows), s.eval_steps, "euler", model, trajectory=False,
                                       concat=not s.legacy)
                    images = self.decode(roll["latents"], min(s.eval_decode_batch_size, rows))
                    del roll, images  # to the CPU
        if s.eval_kl and s.sampler == "sde":
            for start in range(0, total, chunk):
                rows = min(chunk, total - start)
                self._eval_kl(rows, min(batch, rows))

    def _eval_kl(self, n: int, batch: int) -> None:
        """``sde_path_kl``: the policy's SDE window with its trajectory and velocities, the reference at each step."""
        s = self.s
        embeds, pooled, neg, neg_pooled = self.embeddings(n)
        sigmas = torch.linspace(1.0, 0.0, s.sample_steps + 1)[: s.sde_steps + 1]
        with GpuKernels(self.autocast), torch.no_grad(), self.live.extra(self.gathered):
            for start in range(0, n, batch):
                i = slice(start, min(n, start + batch))
                noise = torch.empty(i.stop - i.start, *self.latent)
                out = sample_latents(
                    lambda x, t, i=i: self.field(self.transformer, x, t, embeds[i], pooled[i], neg[i], neg_pooled[i]),
                    noise, sigmas, sampler="sde", return_trajectory=True, return_velocities=True)
                with self.reference_model() as ref:
                    for k in range(s.sde_steps):
                        self.field(ref, out.trajectory[:, k], sigmas[k].expand(noise.shape[0]), embeds[i], pooled[i],
                                   neg[i], neg_pooled[i])
                del out, noise


def plan(config: Any = None, model: str | Path = "sd3.5-medium", resolution: int | None = None, world_size: int = 1,
         strategy: str = "ddp", legacy: bool = False, device: str = "cuda", stages: tuple[str, ...] = STAGES,
         **overrides: Any) -> Plan:
    """Trace one training iteration of ``config`` (an :class:`ACFlowConfig`, a YAML path, or None for the
    defaults; ``overrides`` are config keys) on ``model``'s architecture, per GPU, on the meta device.

    ``device="cpu"`` plans the trainer as it runs on a CPU (no autocast, no checkpointing unless set); ``stages``
    picks the stages to trace (the others hand on tensors of their output shapes).

    Example: ``plan("samples/configs/acflow_sd35m.yaml", resolution=512).stages["decode"].peak / 2**30``.
    """
    if config is None or isinstance(config, (str, Path)):
        config = ACFlowConfig.from_yaml(config, overrides) if config else ACFlowConfig.from_dict(overrides)
    elif overrides:
        config = ACFlowConfig.from_dict({**asdict(config), **overrides})
    configs = model_configs(model)
    tcfg, vcfg = configs["transformer"], configs["vae"]
    settings = resolve_settings(
        config, resolution=resolution, world_size=world_size, strategy=strategy, legacy=legacy,
        sample_size=tcfg.get("sample_size", 128), vae_scale=2 ** (len(vcfg.get("block_out_channels", [0] * 4)) - 1),
        patch=tcfg.get("patch_size", 2), has_t5="text_encoder_3" in configs, device=device)
    tracer = _Tracer(configs, settings, config)
    stages = tracer.run(tuple(stages))
    notes = tracer.notes + [
        "bytes allocated (torch.cuda.max_memory_allocated), without the CUDA context (~0.5 GiB) and the caching "
        "allocator's fragmentation (reserved memory is typically 5-15% above)"]
    return Plan(model=str(model), settings=settings, stages=stages, parts=tracer.parts, notes=notes)


def format_table(plans: list[Plan], stages: tuple[str, ...] = STAGES) -> str:
    """A markdown table: one row per plan, each stage's peak in GiB per GPU (and the resident part)."""
    head = "| setting | resident | " + " | ".join(stages) + " |"
    rule = "|---|---:|" + "---:|" * len(stages)
    rows = [head, rule]
    for p in plans:
        s = p.settings
        label = (f"{'today (c097f80)' if s.legacy else 'fixed'}, {s.resolution} px, {s.world_size} GPU"
                 f"{'s' if s.world_size > 1 else ''}" + (f" {s.strategy}" if s.world_size > 1 and s.strategy != "ddp"
                                                         else ""))
        resident = min(st.resident for st in p.stages.values())
        rows.append(f"| {label} | {resident / GiB:.1f} | "
                    + " | ".join(f"{p.stages[k].peak / GiB:.1f}" for k in stages) + " |")
    return "\n".join(rows)


def describe(p: Plan) -> str:
    """The per-stage table of one plan (resident, carried, peak in GiB) and the resident parts."""
    s = p.settings
    lines = [f"{p.model}: {s.resolution} px, {s.images_per_rank} images per rank ({s.world_size} GPU, {s.strategy}), "
             f"{'legacy (c097f80)' if s.legacy else 'fixed'}: weights {s.weight_dtype}, autocast {s.autocast or 'no'}, "
             f"checkpointing {'on' if s.gradient_checkpointing else 'off'}, rollout batch {s.rollout_batch_size}, "
             f"decode batch {s.decode_batch_size}, minibatch {s.minibatch_size}, optimizer {s.optimizer}",
             "", "| stage | resident GiB | carried GiB | peak GiB |", "|---|---:|---:|---:|"]
    for name, st in p.stages.items():
        lines.append(f"| {name} | {st.resident / GiB:.2f} | {st.carried / GiB:.2f} | {st.peak / GiB:.2f} |")
    lines += ["", "resident parts (GiB): " + ", ".join(f"{k} {v / GiB:.2f}" for k, v in p.parts.items() if v)]
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# flowalign plan
# ----------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="sd3.5-medium", help=(
        "'sd3.5-medium' (built in from its published configs), a local diffusers pipeline folder, or a transformer "
        "config.json (default: %(default)s)"))
    parser.add_argument("--config", default=None, help="a training YAML (ACFlowConfig keys); default: the defaults")
    parser.add_argument("--resolutions", type=int, nargs="+", default=None, help=(
        "several image sides in pixels, one plan each (one side: --resolution; default: the config's resolution, "
        "else the transformer's sample_size x 8)"))
    parser.add_argument("--world-size", "--world_size", dest="world_size", type=int, nargs="+", default=[1],
                        help="GPUs (ranks); several give one plan each (default: 1)")
    parser.add_argument("--strategy", choices=STRATEGIES, default="ddp", help=(
        "ddp (replicated), fsdp (the transformer sharded, one block gathered at a time), zero2 (optimizer states "
        "and gradients sharded) (default: %(default)s)"))
    parser.add_argument("--legacy", choices=("no", "yes", "both"), default="no", help=(
        "plan the trainer as it was at c097f80 ('yes'), as it is ('no'), or both side by side (default: no)"))
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help=(
        "plan for a GPU (autocast and checkpointing as the trainer picks them there) or a CPU (default: cuda)"))
    parser.add_argument("--json", default=None, help="also write the plans as JSON to this file ('-' = stdout)")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    overrides = config_overrides(args)
    config = ACFlowConfig.from_yaml(args.config, overrides) if args.config else ACFlowConfig.from_dict(overrides)
    modes = {"no": [False], "yes": [True], "both": [True, False]}[args.legacy]
    plans = [plan(config, model=args.model, resolution=res, world_size=w, strategy=args.strategy, legacy=legacy,
                  device=args.device)
             for res in (args.resolutions or [None]) for w in args.world_size for legacy in modes]
    if args.json != "-":
        for p in plans:
            print(describe(p) + "\n")
        print("Peak GiB per GPU by stage:\n\n" + format_table(plans))
    if args.json:
        text = json.dumps([p.to_dict() for p in plans], indent=1)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text)
    return 0
