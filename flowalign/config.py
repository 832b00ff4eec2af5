"""The typed configuration of a fine-tuning run: :class:`ACFlowConfig`.

Every knob is a dataclass field with a default and a one-line help (``field(metadata={"help": ...})``); the
field types drive the coercion of YAML and command-line values (:func:`coerce`), and
:func:`add_config_arguments` turns the fields into ``flowalign train`` options, so ``flowalign train --help``
lists every key with its help and default.

Example::

    from flowalign.config import ACFlowConfig

    cfg = ACFlowConfig.from_yaml("samples/configs/acflow_jpeg.yaml", {"iterations": 5, "kl_coef": 0.3})
    cfg.w2_weight                  # 0.3: kl_coef * beta (docs/algorithms.md, "One regulariser axis")
    cfg.to_yaml("/tmp/run.yaml")
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from flowalign.methods import METHODS
from flowalign.methods.acflow import ACFlowSettings
from flowalign.methods.awm import AWMSettings
from flowalign.methods.flow_matching import FlowMatchingSettings
from flowalign.methods.grpo import GRPOSettings
from flowalign.methods.nft import NFTSettings
from flowalign.pipelines.lora_utils import FLOW_GRPO_SD3_TARGET_MODULES
from flowalign.sampling import sde_window

ALGORITHMS = tuple(METHODS)


@dataclass
class RunSettings:
    """What every run has: the run, the model, prompts and rollouts, the reward, the regulariser axis and the actor's
    optimizer. The methods' own knobs are in their sections (``flowalign.methods``), the evaluation's below."""

    # --- run -----------------------------------------------------------------------------------
    algorithm: str = field(default="acflow", metadata={"choices": ALGORITHMS, "help": (
        "'acflow' | 'orw' (ORW-CFM-W2) | 'grpo' (Flow-GRPO) | 'nft' (DiffusionNFT) | 'awm' (Advantage Weighted Matching)"
    )})
    output_dir: str = field(default="runs/acflow", metadata={"help": (
        "checkpoints, metrics.csv, TensorBoard logs (rank 0 writes)"
    )})
    seed: int = field(default=0, metadata={"help": (
        "seed of everything random: LoRA and critic init, prompts, rollout noise (a pure function of (seed, "
        "iteration, rank))"
    )})
    iterations: int = field(default=50, metadata={"minimum": 1, "help": "outer iterations (rollout + update)"})
    resume: bool = field(default=False, metadata={"help": (
        "continue from output_dir/checkpoints/latest if present; a checkpoint written with other settings (other "
        "than the run-control keys: iterations, output_dir, checkpoint_every, eval_every, progress, ...) is refused, "
        "naming the keys that differ"
    )})
    allow_config_change: bool = field(default=False, metadata={"help": (
        "resume even when the checkpoint's settings differ from this config (the run then is not one run)"
    )})
    checkpoint_every: int = field(default=10, metadata={"help": "iterations between checkpoints (and one at the end)"})
    progress: bool = field(default=True, metadata={"help": "tqdm progress bar on rank 0"})
    distributed_timeout: int = field(default=3600, metadata={"help": (
        "seconds a rank waits in a collective before the run fails (torch's default is 600 s for NCCL; rank 0 "
        "alone writes checkpoints, which for a full fine-tune of a large model can take minutes)"
    )})
    # --- model ---------------------------------------------------------------------------------
    pretrained: str | None = field(default=None, metadata={"help": (
        "SD3 pipeline folder or hub id; None = the embedded tiny base model"
    )})
    use_lora: bool = field(default=True, metadata={"help": "LoRA (peft) on the transformer; False = full fine-tuning"})
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank r"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (scale alpha / r)"})
    lora_target_modules: list[str] = field(default_factory=lambda: list(FLOW_GRPO_SD3_TARGET_MODULES), metadata={
        "help": (
            "transformer modules that get LoRA adapters: Flow-GRPO's SD3 list (the joint attention's projections, "
            "'attn.to_q' ...; pipelines.lora_utils.FLOW_GRPO_SD3_TARGET_MODULES). On SD3.5 it leaves the second "
            "self-attention of the dual-attention blocks (attn2) frozen, as Flow-GRPO's LoRAs do; add 'attn2.to_q' "
            "... to train it. Runs written before this list was shared used the bare names ('to_q' ...), which also "
            "match attn2: resume those with that list"
        )})
    init_lora: str | None = field(default=None, metadata={"help": (
        "start from an existing LoRA (a flowalign checkpoint, a diffusers LoRA file or folder, a PEFT adapter "
        "folder, or a hub id); its rank, alpha and target modules must equal lora_rank, lora_alpha and "
        "lora_target_modules"
    )})
    mixed_precision: str = field(default="auto", metadata={"choices": ("auto", "no", "fp16", "bf16"), "help": (
        "'auto' (bf16 on a GPU, 'no' on a CPU) | 'no' | 'fp16' | 'bf16' (accelerate autocast; fp16 adds a "
        "gradient scaler)"
    )})
    weight_dtype: str | None = field(default=None, metadata={"choices": (None, "fp32", "bf16", "fp16"), "help": (
        "dtype of the frozen weights (base transformer, text encoders, VAE): 'fp32' | 'bf16' | 'fp16'; None = the"
        " mixed-precision dtype. Trainable parameters (LoRA, or the full transformer) stay fp32"
    )})
    gradient_checkpointing: bool | None = field(default=None, metadata={"help": (
        "recompute activations in the backward pass (a fraction of the activation memory, ~30% slower); None ="
        " on a GPU, off on a CPU"
    )})
    optimizer: str = field(default="adamw", metadata={"choices": ("adamw", "adamw8bit"), "help": (
        "'adamw' (torch) | 'adamw8bit' (bitsandbytes: the optimizer states in 8 bits, needs `pip install "
        "bitsandbytes`)"
    )})
    compile: bool = field(default=False, metadata={"help": (
        "run the transformer of the rollouts and the evaluation under torch.compile (flowalign.compile)"
    )})
    cache_prompt_embeddings: bool = field(default=True, metadata={"help": (
        "encode each distinct prompt once (frozen text encoders); the cache lives on the CPU"
    )})
    prompt_cache_size: int = field(default=1024, metadata={"minimum": 1, "help": (
        "most prompts whose embeddings are cached (least recently used evicted; ~5 MiB per prompt for SD3 in "
        "fp32, 256 T5 tokens); when every training and held-out prompt fits, all are encoded once at start"
    )})
    offload_text_encoders: bool = field(default=True, metadata={"help": (
        "keep the text encoders on the CPU and move them to the accelerator only to encode prompts missing from "
        "the cache (a no-op on a CPU)"
    )})
    max_sequence_length: int | None = field(default=None, metadata={"help": (
        "T5 tokens; None = 1 for the tiny model (no T5), else 256"
    )})
    # --- prompts and rollouts -------------------------------------------------------------------
    prompts: str = field(default="shapes", metadata={"help": (
        "a registered prompt source ('shapes': the tiny world's train split, families balanced as the world draws"
        " them; held out: its held-out split) or a text file, one prompt a line (drawn uniformly; held out: its "
        "first eval_prompts lines); see flowalign.prompts"
    )})
    prompts_per_iteration: int = field(default=8, metadata={"minimum": 1, "help": "P, identical on all ranks"})
    images_per_prompt: int = field(default=8, metadata={"minimum": 1, "help": (
        "G, split across ranks (must be divisible by the number of processes)"
    )})
    initial_noises: int | None = field(default=None, metadata={"help": (
        "distinct starting noises x_1 per prompt: the G images branch from them (G / initial_noises SDE branches "
        "each) and are shaped within (prompt, x_1) groups, so the advantage holds only what the policy's own "
        "noise did; None = G (every image its own x_1)"
    )})
    sample_steps: int = field(default=16, metadata={"minimum": 1, "help": "sampling steps of the rollouts"})
    resolution: int | None = field(default=None, metadata={"help": (
        "image side in pixels of rollouts and evaluation (a multiple of the VAE's downsampling times the "
        "transformer's patch size); None = the transformer's sample_size times the VAE's downsampling"
    )})
    rollout_batch_size: int = field(default=16, metadata={"minimum": 1, "help": (
        "images per transformer call in rollouts and evaluation (CFG doubles the rows); the results do not "
        "depend on it"
    )})
    decode_batch_size: int = field(default=8, metadata={"minimum": 1, "help": "images per VAE decode"})
    guidance_scale: float | None = field(default=None, metadata={"help": (
        "CFG of rollouts and evaluation; None = 2.0 for the embedded tiny model (its card), else 4.5"
    )})
    sampler: str = field(default="sde", metadata={"choices": ("euler", "sde"), "help": (
        "'euler' | 'sde' (grpo always uses 'sde'; fm_states='trajectory' needs 'sde')"
    )})
    noise_level: float = field(default=0.7, metadata={"help": "SDE noise level a"})
    sde_steps_fraction: float = field(default=1.0, metadata={"help": (
        "SDE noise on this fraction of the earliest (highest-noise) steps, Euler on the rest (a fixed window; "
        "MixGRPO, arXiv 2507.21802, slides one): exploration and credit where the layout is decided; the actor "
        "trains on those steps only"
    )})
    # --- reward --------------------------------------------------------------------------------
    reward: str | list = field(default="shapes", metadata={"help": (
        "a flowalign.rewards spec, or a list of 'name=weight' for a mixture"
    )})
    reward_normalize: str | None = field(default=None, metadata={"help": "mixture normalisation: None | 'zscore'"})
    # --- the regulariser: one axis for every method ----------------------------------------------
    kl_coef: float | None = field(default=None, metadata={"help": (
        "lambda of max E[A] - lambda KL(p_theta || p_ref): A the group-normalised (z-scored) reward, KL in nats "
        "per image (the Gaussian KL of every SDE transition, summed over transitions and latent dimensions). Set,"
        " it overrides each method's own knob: acflow / orw w2_weight = kl_coef * beta, grpo grpo_kl_weight = "
        "kl_coef (derivation and conversions to Flow-GRPO's beta and ORW-CFM-W2's (alpha, beta): "
        "docs/algorithms.md, 'One regulariser axis'); None = the method knobs as given"
    )})
    # --- actor update (every method) -------------------------------------------------------------
    learning_rate: float = field(default=3e-4, metadata={"help": "AdamW learning rate of the actor (grpo: grpo_learning_rate)"})
    adam_weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay of the actor"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient-norm clip of the actor"})
    inner_epochs: int = field(default=2, metadata={"minimum": 1, "help": (
        "passes over the rollout batch per iteration (Adam steps per iteration = inner_epochs x noise_draws x "
        "batch / minibatch_size: with a noisy reward gradient fewer, larger steps spend less KL per unit of reward;"
        " AC-Flow on JPEG: 1 pass of 64-state minibatches, docs/algorithms.md)"
    )})
    minibatch_size: int = field(default=32, metadata={"minimum": 1, "help": "states (or images, grpo) per optimizer step"})
    detach_uncond: bool = field(default=False, metadata={"help": (
        "stop the actor's gradient through the unconditional CFG branch (as Flow-GRPO's code does): the loss "
        "still fits the guided velocity, but only the conditional branch learns; see docs/benchmarks.md for the "
        "measurement that chose the default"
    )})


@dataclass
class EvaluationSettings:
    """The held-out evaluation and the logs."""

    eval_every: int = field(default=10, metadata={"help": "iterations between evaluations (0 = only at start and end)"})
    eval_prompts: int = field(default=48, metadata={"help": (
        "held-out prompts (flowalign.shapes.heldout_prompts) or the first N of eval_prompt_file"
    )})
    eval_prompt_file: str | None = field(default=None, metadata={"help": (
        "held-out prompts from this text file instead of the prompt source's held-out set"
    )})
    eval_images_per_prompt: int = field(default=2, metadata={"help": "for diversity"})
    eval_steps: int = field(default=28, metadata={"help": (
        "Euler steps of the evaluation samples (as the base model card)"
    )})
    eval_seed: int = field(default=0, metadata={"help": (
        "held-out prompts and noises: independent of the training seed, so every run of a comparison (and the no-"
        "update control) is scored on the same images"
    )})
    eval_at_start: bool = field(default=True, metadata={"help": (
        "evaluate before the first update (the no-update control of the run)"
    )})
    log_with: list[str] = field(default_factory=lambda: ["tensorboard"], metadata={"help": (
        "experiment trackers (accelerate's): 'tensorboard' (output_dir/tensorboard) and/or 'wandb' (pip install "
        "wandb; project wandb_project, run named after output_dir); [] = the CSV files only"
    )})
    wandb_project: str = field(default="flowalign", metadata={"help": "W&B project of log_with: [wandb]"})
    eval_kl: bool = field(default=True, metadata={"help": (
        "measure KL(p_theta || p_ref) in nats per image on held-out rollouts: the exact Gaussian KL of every "
        "stochastic transition of the rollout sampler (the first sde_steps_fraction of sample_steps, noise_level), "
        "summed (flowalign.eval.sde_path_kl); the Euler steps after the window have no density and are not counted"
    )})
    eval_path_kl: bool = field(default=True, metadata={"help": (
        "also measure path_kl: KL(p_theta || p_ref) in nats per image on one common sampler with noise "
        "(noise_level) at every step but the last, the same for every method whatever its rollout window; and "
        "coupling_distance, ||x_theta(z) - x_ref(z)||^2 of the held-out Euler samples from the same noise z "
        "(summed over latent dimensions; an upper bound on W2^2) is measured always: it reuses the samples"
    )})
    eval_rewards: list[str] | None = field(default=None, metadata={"help": (
        "unseen rewards scored on the held-out images; None = the prompt source's own (shapes: shapes_binary and "
        "jpeg_compressibility), else jpeg_compressibility, which reads any prompt"
    )})


@dataclass
class ACFlowConfig(EvaluationSettings, AWMSettings, NFTSettings, GRPOSettings, FlowMatchingSettings, ACFlowSettings,
                   RunSettings):
    """Every knob of a fine-tuning run, one flat namespace of typed, documented fields (as YAML and the command line
    give them) made of sections: :class:`RunSettings`, each method's own (``ACFlowSettings``,
    ``FlowMatchingSettings``, ``GRPOSettings``, ``NFTSettings``, ``AWMSettings``, in ``flowalign/methods/``) and
    :class:`EvaluationSettings`. The chosen method resolves and checks its own settings
    (``Method.resolve`` / ``Method.validate``). Load from YAML with ``ACFlowConfig.from_yaml``."""

    # ------------------------------------------------------------------------------------------

    def __post_init__(self) -> None:
        for f in fields(self):  # values as the field types say (YAML reads "1e-4" as a string)
            setattr(self, f.name, coerce(f.name, getattr(self, f.name)))
        for f in fields(self):  # each section's declared choices and minimums
            value, allowed, low = getattr(self, f.name), f.metadata.get("choices"), f.metadata.get("minimum")
            if allowed is not None and value not in allowed:
                raise ValueError(f"ACFlowConfig.{f.name}={value!r}; choose one of {allowed}.")
            if low is not None and value < low:
                raise ValueError(f"ACFlowConfig.{f.name}={value} must be >= {low}.")
        bad = [t for t in self.log_with if t not in ("tensorboard", "wandb")]
        if bad:
            raise ValueError(f"ACFlowConfig.log_with={self.log_with!r}: {bad} unknown; choose from 'tensorboard', 'wandb'.")
        if self.kl_coef is not None and not (math.isfinite(self.kl_coef) and self.kl_coef >= 0):
            raise ValueError(f"ACFlowConfig.kl_coef={self.kl_coef} must be a finite number >= 0 (nats per image), "
                             "or None to use w2_weight / grpo_kl_weight as given.")
        method = METHODS[self.algorithm]
        method.resolve(self)  # its kl_coef mapping and its states (flowalign.methods)
        if self.critic is None:
            self.critic = "latent" if self.fm_states == "trajectory" else "zero"
        method.validate(self)  # the method's own refusals
        own_sampler = method.sampler is None  # grpo samples with the SDE whatever `sampler` says
        if self.initial_noises is not None and (self.initial_noises < 1 or (self.sampler != "sde" and own_sampler)):
            raise ValueError(f"ACFlowConfig.initial_noises={self.initial_noises} needs an integer >= 1 and sampler='sde' "
                             "(branches of one starting noise differ only by the SDE noise); or set it to None.")
        if self.initial_noises and self.images_per_prompt % self.initial_noises:
            raise ValueError(f"ACFlowConfig.images_per_prompt={self.images_per_prompt} must be divisible by "
                             f"initial_noises={self.initial_noises}: every starting noise gets the same number of "
                             "SDE branches.")
        if not 0.0 < self.sde_steps_fraction <= 1.0:
            raise ValueError(f"ACFlowConfig.sde_steps_fraction={self.sde_steps_fraction} must be in (0, 1]: the "
                             "fraction of the earliest sampling steps that inject SDE noise (1.0 = every step).")

    def sde_steps(self, steps: int) -> int:
        """How many of ``steps`` sampling steps inject SDE noise (the first ones): ``sde_steps_fraction`` of them."""
        return sde_window(self.sde_steps_fraction, steps)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ACFlowConfig":
        """Build from a dict; unknown keys raise ``ValueError`` naming them (with the closest valid key)."""
        check_keys(values)
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> "ACFlowConfig":
        """Load a YAML file (a flat mapping of ACFlowConfig keys), then apply ``overrides``."""
        values = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of ACFlowConfig keys, got {type(values).__name__}.")
        values.update(overrides or {})
        return cls.from_dict(values)

    def to_yaml(self, path: str | os.PathLike) -> None:
        Path(path).write_text(yaml.safe_dump(asdict(self), sort_keys=False))

    def changes_from(self, saved: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """``{key: (saved value, this value)}`` for every setting that differs from ``saved`` (a checkpoint's
        ``asdict(config)``) in alphabetical order, the run-control keys (:data:`RUN_CONTROL_KEYS`) aside. A key
        the checkpoint predates counts as its default."""
        defaults = {f.name: _field_default(f) for f in fields(self)}
        now = asdict(self)
        return {k: (saved.get(k, defaults[k]), now[k]) for k in sorted(now)
                if k not in RUN_CONTROL_KEYS and saved.get(k, defaults[k]) != now[k]}


RUN_CONTROL_KEYS = frozenset({
    "iterations", "resume", "allow_config_change", "output_dir", "checkpoint_every", "progress", "eval_every",
    "eval_at_start", "distributed_timeout", "log_with", "wandb_project",
})
"""Settings a resumed run may change: how long it runs and where and how often it writes, not what it learns."""


_HINTS = typing.get_type_hints(ACFlowConfig)


def _field_default(f: dataclasses.Field) -> Any:
    """A field's default value (its ``default``, or a fresh ``default_factory()``)."""
    return f.default if f.default_factory is dataclasses.MISSING else f.default_factory()


def check_keys(values: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming every key of ``values`` that is not an ``ACFlowConfig`` field."""
    known = set(_HINTS)
    unknown = sorted(set(values) - known)
    if unknown:
        hints = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
        detail = ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items())
        raise ValueError(f"Unknown ACFlowConfig key(s): {detail}. Valid keys: {sorted(known)}.")


def coerce(key: str, value: Any) -> Any:
    """``value`` as the type of the field ``key``: numbers from strings (YAML 1.1 reads "1e-4" as one), bools from
    "true"/"false", lists from "[a, b]", None for optional fields. Raises ``ValueError`` naming the key.

    Example: ``coerce("learning_rate", "1e-4") == 1e-4``; ``coerce("use_lora", "false") is False``.
    """
    check_keys({key: value})
    hint = _HINTS[key]
    options = [a for a in typing.get_args(hint) if a is not type(None)] if isinstance(hint, types.UnionType) else [hint]
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
        if isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint):
            return None
        raise ValueError(f"ACFlowConfig.{key} cannot be None; give a {hint}.")
    for option in options:
        base = typing.get_origin(option) or option
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.strip().lower() in ("true", "yes", "1")
        elif base in (int, float):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if base is int and float(value) != int(value):
                    continue
                return base(value)
            if isinstance(value, str):
                try:
                    return base(value) if base is float else int(value)
                except ValueError:
                    continue
        elif base is list:
            if isinstance(value, (list, tuple)):
                return list(value)
            if isinstance(value, str) and value.strip().startswith("["):
                return list(yaml.safe_load(value))
        elif base is str and isinstance(value, str):
            return value
    if str in options and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"ACFlowConfig.{key}={value!r} is not a {hint}.")


def parse_override(key: str, text: str) -> Any:
    """Cast a ``--key value`` command-line override to the type of the field ``key``.

    Example: ``parse_override("iterations", "20") == 20``.
    """
    try:
        return coerce(key, text)
    except ValueError:
        if key in _HINTS and not text.strip().startswith("["):
            value = yaml.safe_load(text)  # e.g. a bare word list element; let the field decide
            return coerce(key, value)
        raise


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--key`` option (also ``--key-with-dashes``) per field, with its help and default; unset options are
    absent from the parsed namespace, so a YAML file's values are overridden only by what the user typed."""
    group = parser.add_argument_group("ACFlowConfig keys (override the --config file)")
    for f in fields(ACFlowConfig):
        default = _field_default(f)
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        group.add_argument(*names, dest=f.name, default=argparse.SUPPRESS, metavar=_metavar(_HINTS[f.name]),
                           help=f"{f.metadata['help']} (default: {default!r})")


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config keys a parsed namespace holds, coerced to their field types."""
    try:
        return {k: parse_override(k, v) if isinstance(v, str) else v for k, v in vars(args).items() if k in _HINTS}
    except ValueError as err:
        raise SystemExit(f"flowalign train: {err}") from None


def _metavar(hint: Any) -> str:
    """``float | None`` -> ``FLOAT|NONE``, ``int`` -> ``INT``, ``list[str]`` -> ``LIST[STR]``."""
    name = getattr(hint, "__name__", None) if not isinstance(hint, types.UnionType) and not typing.get_args(hint) else None
    return (name or str(hint)).upper().replace(" ", "")
