"""AC-Flow trainer: online actor-critic fine-tuning of flow-matching models, with its baselines.

One loop, three algorithms selected by ``ACFlowConfig.algorithm``:

- ``"acflow"`` (default): AC-Flow (ideas from "AC-Flow", arXiv 2510.18072; the concrete design is
  ours, see ``flowalign.objectives``): reward shaping, a light critic ``V(x_s, s, c)`` regressed on the
  shaped reward at noised states, clipped advantages, critic warm-up, critic-weighted flow matching
  and the Wasserstein-2 regulariser toward the reference velocity.
- ``"orw"``: ORW-CFM-W2 (Fan et al., ICLR 2025), the special case with no critic and no shaping:
  weights ``exp(beta * r)`` self-normalised.
- ``"grpo"``: Flow-GRPO (arXiv 2505.05470): SDE rollouts with log-probabilities, per-prompt group
  advantages, the clipped ratio, and a KL to the reference.

Every iteration (CleanRL-style, top to bottom in ``ACFlowTrainer.step``)::

    prompts  <- P prompts (the same on every rank), G images each, sharded across ranks
    rollout  <- the current policy, frozen (no grad), CFG, Euler or SDE sampler
    reward   <- R(decode(x0), prompt); gathered across ranks for group statistics
    shaping  <- per-prompt z-score, clipped                           (acflow)
    critic   <- regress V(x_s, s, c) on the shaped reward             (acflow)
    actor    <- critic/reward-weighted flow matching + W2 term        (acflow, orw; skipped in warm-up)
                on the CFG-guided velocity v_u + g (v_c - v_u) that drew the rollouts (guided_loss),
                at the rollout's SDE states (fm_states="trajectory", default) or fresh noised ones
                clipped-ratio policy gradient + KL                    (grpo)

Randomness is a pure function of ``(seed, iteration, rank)``, so a resumed run reproduces an
uninterrupted one. With LoRA (default) the reference model is the same transformer with its adapters
disabled: no second copy of the weights.

Example::

    from flowalign import ACFlowConfig, ACFlowTrainer
    trainer = ACFlowTrainer(ACFlowConfig(iterations=20, output_dir="runs/acflow"))
    trainer.train()
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch

from flowalign import objectives as O
from flowalign.checkpoints import atomic_write_dir, latest_checkpoint, load_state, save_state, write_pointer
from flowalign.eval import diversity, eval_features, sde_path_kl
from flowalign.prompts import PromptSource, load_prompts, read_prompt_file
from flowalign.sampling import flow_sigmas, sample_latents, sde_step, sde_step_velocity

ALGORITHMS = ("acflow", "orw", "grpo")
LORA_TARGETS_SD3 = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


@dataclass
class ACFlowConfig:
    """Every knob of a fine-tuning run. Load from YAML with ``ACFlowConfig.from_yaml``."""

    # --- run -----------------------------------------------------------------------------------
    algorithm: str = "acflow"  # "acflow" | "orw" (ORW-CFM-W2) | "grpo" (Flow-GRPO)
    output_dir: str = "runs/acflow"  # checkpoints, metrics.csv, TensorBoard logs (rank 0 writes)
    seed: int = 0
    iterations: int = 50  # outer iterations (rollout + update)
    resume: bool = False  # continue from output_dir/checkpoints/latest if present
    checkpoint_every: int = 10  # iterations between checkpoints (and one at the end)
    progress: bool = True  # tqdm progress bar on rank 0
    # --- model ---------------------------------------------------------------------------------
    pretrained: str | None = None  # SD3 pipeline folder or hub id; None = the embedded tiny base model
    use_lora: bool = True  # LoRA (peft) on the transformer; False = full fine-tuning
    lora_rank: int = 16
    lora_alpha: float = 16.0
    lora_target_modules: list = field(default_factory=lambda: list(LORA_TARGETS_SD3))
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16" (accelerate autocast)
    gradient_checkpointing: bool = False
    cache_prompt_embeddings: bool = True  # encode each distinct prompt once (frozen text encoders)
    max_sequence_length: int | None = None  # T5 tokens; None = 1 for the tiny model (no T5), else 256
    # --- prompts and rollouts -------------------------------------------------------------------
    prompts: str = "shapes"  # a registered prompt source ("shapes": the tiny world's train split, families balanced
    #   as the world draws them; held out: its held-out split) or a text file, one prompt a line (drawn uniformly;
    #   held out: its first eval_prompts lines); see flowalign.prompts
    prompts_per_iteration: int = 8  # P, identical on all ranks
    images_per_prompt: int = 8  # G, split across ranks (must be divisible by the number of processes)
    initial_noises: int | None = None  # distinct starting noises x_1 per prompt: the G images branch from them
    #   (G / initial_noises SDE branches each) and are shaped within (prompt, x_1) groups, so the advantage
    #   holds only what the policy's own noise did; None = G (every image its own x_1)
    sample_steps: int = 16  # sampling steps of the rollouts
    guidance_scale: float | None = None  # CFG of rollouts and evaluation; None = 2.0 for the embedded tiny model (its card), else 4.5
    sampler: str = "sde"  # "euler" | "sde" (grpo always uses "sde"; fm_states="trajectory" needs "sde")
    noise_level: float = 0.7  # SDE noise level a
    sde_steps_fraction: float = 1.0  # SDE noise on this fraction of the earliest (highest-noise) steps, Euler on
    #   the rest (a fixed window; MixGRPO, arXiv 2507.21802, slides one): exploration and credit where the layout
    #   is decided; the actor trains on those steps only
    # --- reward --------------------------------------------------------------------------------
    reward: str = "shapes"  # a flowalign.rewards spec, or a list of "name=weight" for a mixture
    reward_normalize: str | None = None  # mixture normalisation: None | "zscore"
    # --- the regulariser: one axis for every method ----------------------------------------------
    kl_coef: float | None = None  # lambda of  max E[A] - lambda KL(p_theta || p_ref): A the group-normalised
    #   (z-scored) reward, KL in nats per image (the Gaussian KL of every SDE transition, summed over transitions and
    #   latent dimensions). Set, it overrides each method's own knob: acflow / orw w2_weight = kl_coef * beta,
    #   grpo grpo_kl_weight = kl_coef (derivation and conversions to Flow-GRPO's beta and ORW-CFM-W2's
    #   (alpha, beta): docs/algorithms.md, "One regulariser axis"); None = the method knobs as given
    # --- shaping, critic, advantages (acflow) --------------------------------------------------
    shaping: bool = True  # z-score within each prompt's group (each (prompt, x_1) group with initial_noises);
    #   running statistics over all images only when a group has one image
    shaping_clip: float = 3.0
    critic_lr: float = 1e-3
    critic_warmup_iterations: int = 3  # iterations before the critic's values enter the advantages
    warmup_actor: str = "shaped"  # during the critic warm-up the actor "shaped": learns from the shaped rewards
    #   (advantage r~, i.e. V = 0), or "frozen": does not move (those rollouts only train the critic)
    advantage_clip: float = 2.0
    critic_channels: list = field(default_factory=lambda: [32, 64, 128])  # CNN widths (stride 2 after the first)
    critic_hidden_dim: int = 256  # width of the critic's MLP head
    # --- actor update (acflow, orw) ------------------------------------------------------------
    weighting: str = "exp"  # see flowalign.objectives.WEIGHTINGS (orw: always exp, as published)
    beta: float = 1.0  # temperature of the weighting exp(beta A) on normalised advantages (1 / beta: the
    #   per-iteration KL coefficient to the rollout policy, a trust region)
    w2_weight: float = 0.03  # alpha of the W2 regulariser ||v - stopgrad(v_ref)||^2; acts as the KL coefficient
    #   alpha / beta (set kl_coef instead); on trajectory states in units of the step noise (W2 = 2 KL per step),
    #   on noised states (orw) in velocity units
    learning_rate: float = 3e-4
    adam_weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    inner_epochs: int = 2  # passes over the rollout batch per iteration
    noise_draws: int = 2  # states per sample per pass: (s, eps) draws, or trajectory steps k
    minibatch_size: int = 32
    sigma_sampling: str = "logit_normal"  # "logit_normal" | "uniform" (fm_states="noised")
    fm_states: str = "trajectory"  # (acflow; orw always uses "noised", as published) where the critic and the
    #   weighted loss are evaluated: "noised" = fresh
    #   x_s = (1 - s) x0 + s eps with target eps - x0 (ORW-CFM-W2's regression); "trajectory" = the rollout's
    #   own SDE states x_k with target the velocity whose step lands on the realised x_{k+1} (needs sampler: sde)
    centered_weights: bool = True  # fm_states="trajectory": weights w - 1 plus a proximal term to the rollout
    #   velocity (the pure-noise part of the weighted regression removed; see objectives.acflow_actor_loss)
    guided_loss: bool = True  # fit the CFG-guided velocity v_u + g (v_c - v_u), the field that drew the rollouts
    #   and samples at test time; False = the conditional velocity only (then guidance piles up on
    #   itself: the conditional branch learns guided samples and is guided again when sampling)
    sigma_shift: float | None = None  # s = k u / (1 + (k-1) u) on the sampled u; None = the scheduler's shift (noised)
    ot_pairing: bool = False  # minibatch OT coupling of noise and samples (POT; fm_states="noised")
    # --- Flow-GRPO ----------------------------------------------------------------------------
    grpo_clip_range: float = 1e-4  # on per-dimension-mean log-probs, as Flow-GRPO
    grpo_kl_weight: float = 0.04  # coefficient of the per-step Gaussian KL (per-dimension mean, as the log-probs):
    #   nats per image, the kl_coef unit; Flow-GRPO's beta b corresponds to kl_coef ~ b |dt| (docs/algorithms.md)
    grpo_train_fraction: float = 0.5  # fraction of the sampling steps trained on ("denoising reduction")
    grpo_learning_rate: float = 3e-4
    # --- evaluation ----------------------------------------------------------------------------
    eval_every: int = 10  # iterations between evaluations (0 = only at start and end)
    eval_prompts: int = 48  # held-out prompts (flowalign.shapes.heldout_prompts) or the first N of eval_prompt_file
    eval_prompt_file: str | None = None
    eval_images_per_prompt: int = 2  # for diversity
    eval_steps: int = 28  # Euler steps of the evaluation samples (as the base model card)
    eval_seed: int = 0  # held-out prompts and noises: independent of the training seed, so every run of a
    #   comparison (and the no-update control) is scored on the same images
    eval_at_start: bool = True  # evaluate before the first update (the no-update control of the run)
    eval_kl: bool = True  # measure KL(p_theta || p_ref) in nats per image on held-out SDE rollouts (noise_level,
    #   sample_steps, every step stochastic): flowalign.eval.sde_path_kl
    eval_rewards: list = field(default_factory=lambda: ["shapes_binary", "jpeg_compressibility"])  # unseen rewards

    # ------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        for f in fields(self):  # YAML reads "1e-4" as a string: cast numbers to the field's type
            value = getattr(self, f.name)
            if f.type in ("float", "int", "float | None", "int | None") and isinstance(value, str):
                try:
                    setattr(self, f.name, (float if f.type.startswith("float") else int)(value))
                except ValueError:
                    raise ValueError(f"ACFlowConfig.{f.name}={value!r} is not a number.") from None
        choices = {"algorithm": ALGORITHMS, "sampler": ("euler", "sde"),
                   "mixed_precision": ("no", "fp16", "bf16"), "sigma_sampling": ("logit_normal", "uniform"),
                   "fm_states": ("noised", "trajectory"), "warmup_actor": ("shaped", "frozen")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"ACFlowConfig.{key}={getattr(self, key)!r}; choose one of {allowed}.")
        if self.kl_coef is not None:  # the one regulariser axis, mapped onto each method's knob
            if not (math.isfinite(self.kl_coef) and self.kl_coef >= 0):
                raise ValueError(f"ACFlowConfig.kl_coef={self.kl_coef} must be a finite number >= 0 (nats per image), "
                                 "or None to use w2_weight / grpo_kl_weight as given.")
            self.w2_weight = self.kl_coef * self.beta  # alpha / beta = kl_coef
            self.grpo_kl_weight = self.kl_coef
        if self.algorithm == "orw":  # ORW-CFM-W2 as published: freshly noised states of its own samples
            self.fm_states = "noised"
        if self.fm_states == "trajectory" and self.sampler != "sde" and self.algorithm != "grpo":
            raise ValueError(f"ACFlowConfig.sampler={self.sampler!r} with fm_states='trajectory': the actor learns "
                             "from the exploration noise of SDE rollouts; set sampler='sde', or fm_states='noised' "
                             "to regress on freshly noised samples (ORW-CFM-W2's form) with Euler rollouts.")
        if self.fm_states == "trajectory" and not self.guided_loss and self.algorithm != "grpo":
            raise ValueError("ACFlowConfig.guided_loss=False with fm_states='trajectory': the trajectory's step "
                             "velocities are the CFG-guided field's, so the loss must fit that field; set "
                             "guided_loss=True, or fm_states='noised'.")
        if self.initial_noises is not None and (self.initial_noises < 1 or (self.sampler != "sde" and self.algorithm != "grpo")):
            raise ValueError(f"ACFlowConfig.initial_noises={self.initial_noises} needs an integer >= 1 and sampler='sde' "
                             "(branches of one starting noise differ only by the SDE noise); or set it to None.")
        if self.initial_noises and self.images_per_prompt % self.initial_noises:
            raise ValueError(f"ACFlowConfig.images_per_prompt={self.images_per_prompt} must be divisible by "
                             f"initial_noises={self.initial_noises}: every starting noise gets the same number of "
                             "SDE branches.")
        if not 0.0 < self.sde_steps_fraction <= 1.0:
            raise ValueError(f"ACFlowConfig.sde_steps_fraction={self.sde_steps_fraction} must be in (0, 1]: the "
                             "fraction of the earliest sampling steps that inject SDE noise (1.0 = every step).")
        if self.weighting not in O.WEIGHTINGS:
            raise ValueError(f"ACFlowConfig.weighting={self.weighting!r}; choose one of {sorted(O.WEIGHTINGS)}.")
        for key in ("iterations", "prompts_per_iteration", "images_per_prompt", "sample_steps", "minibatch_size",
                    "inner_epochs", "noise_draws"):
            if getattr(self, key) < 1:
                raise ValueError(f"ACFlowConfig.{key}={getattr(self, key)} must be >= 1.")

    def sde_steps(self, steps: int) -> int:
        """How many of ``steps`` sampling steps inject SDE noise (the first ones): ``sde_steps_fraction`` of them."""
        return max(1, round(self.sde_steps_fraction * steps))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ACFlowConfig":
        """Build from a dict; unknown keys raise ``ValueError`` naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            import difflib

            hints = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
            detail = ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items())
            raise ValueError(f"Unknown ACFlowConfig key(s): {detail}. Valid keys: {sorted(known)}.")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> "ACFlowConfig":
        """Load a YAML file (a flat mapping of ACFlowConfig keys), then apply ``overrides``."""
        import yaml

        values = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of ACFlowConfig keys, got {type(values).__name__}.")
        values.update(overrides or {})
        return cls.from_dict(values)

    def to_yaml(self, path: str | os.PathLike) -> None:
        import yaml

        Path(path).write_text(yaml.safe_dump(asdict(self), sort_keys=False))


def parse_override(key: str, text: str) -> Any:
    """Cast a ``--key value`` command-line override to the type of the field ``key``."""
    import yaml

    types = {f.name: f.type for f in fields(ACFlowConfig)}
    if key not in types:
        ACFlowConfig.from_dict({key: None})  # raises the unknown-key error with suggestions
    value = yaml.safe_load(text)  # "3" -> 3, "true" -> True, "[a, b]" -> list, "null" -> None
    if types[key].startswith("float") and isinstance(value, (str, int)) and not isinstance(value, bool):
        try:
            value = float(value)  # YAML 1.1 reads "1e-4" as a string
        except ValueError:
            raise ValueError(f"--{key} expects a number, got {text!r}.") from None
    return value


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------
def _generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded by a tuple of integers (seed, iteration, rank, purpose)."""
    seed = 0
    for k in keys:
        seed = (seed * 1_000_003 + int(k)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------
class ACFlowTrainer:
    """Online fine-tuning of an SD3 transformer with AC-Flow, ORW-CFM-W2 or Flow-GRPO.

    ``reward`` may be passed directly (any ``flowalign.rewards`` reward or callable
    ``f(images, prompts) -> Tensor[B]``); otherwise ``config.reward`` is loaded by name. ``prompts`` likewise
    (a :class:`flowalign.prompts.PromptSource` or a list); otherwise ``config.prompts``.
    Run under ``accelerate launch`` for several processes; plain ``python`` is one process.
    """

    def __init__(self, config: ACFlowConfig, reward: Any = None, pipeline: Any = None, accelerator: Any = None,
                 prompts: PromptSource | list[str] | None = None):
        from accelerate import Accelerator

        from flowalign.critic import Critic, CriticConfig
        from flowalign.tiny import EVAL_CFG, MAX_SEQUENCE_LENGTH, load_base_pipeline, load_pipeline

        self.config = cfg = config
        self.accelerator = accelerator or Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
        acc = self.accelerator
        self.device = acc.device
        if cfg.images_per_prompt % acc.num_processes:
            raise ValueError(
                f"images_per_prompt={cfg.images_per_prompt} must be divisible by the number of processes "
                f"({acc.num_processes}): each rank samples images_per_prompt / num_processes images of every prompt."
            )
        self.local_g = cfg.images_per_prompt // acc.num_processes
        self.branches = cfg.images_per_prompt // (cfg.initial_noises or cfg.images_per_prompt)  # per (prompt, x_1)
        # images per shaping / advantage group: a prompt's G images, or one (prompt, x_1)'s branches
        self.group_size = self.branches if cfg.initial_noises else cfg.images_per_prompt
        self.output_dir = Path(cfg.output_dir)

        # Pipeline: frozen text encoders and VAE; the transformer is the policy.
        if pipeline is None:
            pipeline = load_base_pipeline() if cfg.pretrained is None else load_pipeline(cfg.pretrained)
        self.pipe = pipeline.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        for module in (self.pipe.text_encoder, self.pipe.text_encoder_2, self.pipe.text_encoder_3, self.pipe.vae):
            if module is not None:
                module.requires_grad_(False)
        no_t5 = self.pipe.text_encoder_3 is None
        self.max_sequence_length = cfg.max_sequence_length or (MAX_SEQUENCE_LENGTH if no_t5 else 256)
        self.guidance_scale = cfg.guidance_scale if cfg.guidance_scale is not None else (
            EVAL_CFG if cfg.pretrained is None else 4.5)
        # training noise levels warped like the sampling grid (SD3 trains with the shift it samples with)
        self.sigma_shift = cfg.sigma_shift if cfg.sigma_shift is not None else float(
            getattr(self.pipe.scheduler.config, "shift", 1.0) or 1.0)
        transformer = self.pipe.transformer
        transformer.requires_grad_(False)
        torch.manual_seed(cfg.seed)  # the LoRA's random init (lora_A) and the critic's depend on the seed only
        if cfg.use_lora:
            from peft import LoraConfig

            transformer.add_adapter(LoraConfig(
                r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian",
                target_modules=list(cfg.lora_target_modules),
            ))
            self.reference = None  # the same transformer, adapters disabled
        else:
            transformer.requires_grad_(True)
            self.reference = copy.deepcopy(transformer).requires_grad_(False).eval()
        if cfg.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        params = [p for p in transformer.parameters() if p.requires_grad]
        lr = cfg.grpo_learning_rate if cfg.algorithm == "grpo" else cfg.learning_rate
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.adam_weight_decay)

        # The critic (AC-Flow only): V(x_s, s, pooled prompt embedding).
        tcfg = transformer.config
        latent_shape = (tcfg.in_channels, tcfg.sample_size, tcfg.sample_size)
        self.critic = self.critic_optimizer = None
        if cfg.algorithm == "acflow":
            torch.manual_seed(cfg.seed)
            critic = Critic.from_critic_config(CriticConfig(
                in_channels=latent_shape[0], pooled_dim=tcfg.pooled_projection_dim,
                channels=tuple(cfg.critic_channels), hidden_dim=cfg.critic_hidden_dim,
            ))
            critic_opt = torch.optim.AdamW(critic.parameters(), lr=cfg.critic_lr)
            self.critic, self.critic_optimizer = acc.prepare(critic, critic_opt)
        self.transformer, self.optimizer = acc.prepare(transformer, optimizer)
        self.latent_shape = latent_shape
        self.sde_steps = cfg.sde_steps(cfg.sample_steps)  # the rollouts' noisy (trainable) steps

        # Reward(s).
        from flowalign import rewards as R

        self.reward = R.as_reward(reward) if reward is not None else self._load_reward(cfg.reward, cfg.reward_normalize)
        self.eval_rewards = {name: R.load(name) for name in cfg.eval_rewards}

        # Prompts, and their embeddings (cached).
        self.prompt_source = load_prompts(prompts if prompts is not None else cfg.prompts)
        self.train_prompts = self.prompt_source.train
        self.prompt_weights = self.prompt_source.sampling_weights()
        self._embed_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.running = O.RunningMeanStd()
        self.iteration = 0
        self.counters = {"skipped_updates": 0, "images_seen": 0}
        self.history: list[dict[str, Any]] = []
        self.eval_history: list[dict[str, Any]] = []
        self._ref_eval_images: torch.Tensor | None = None
        self._tb = None

    # -- set-up helpers ---------------------------------------------------------------------------
    @staticmethod
    def _load_reward(spec: Any, normalize: str | None):
        from flowalign import rewards as R

        if isinstance(spec, (list, tuple)):
            return R.load_mixture(list(spec), normalize=normalize)
        if "=" in str(spec) and not str(spec).endswith(")"):
            return R.load_mixture([spec], normalize=normalize)
        return R.load(spec)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.transformer)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt embeddings ``[N, L, D]`` and pooled embeddings ``[N, P]`` (cached per prompt)."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._embed_cache]
        if missing:
            from flowalign.pretrain import encode_prompts

            pe, pp = encode_prompts(self.pipe, missing, max_sequence_length=self.max_sequence_length, device=self.device)
            for i, p in enumerate(missing):
                self._embed_cache[p] = (pe[i], pp[i])
        embeds = torch.stack([self._embed_cache[p][0] for p in prompts])
        pooled = torch.stack([self._embed_cache[p][1] for p in prompts])
        if not self.config.cache_prompt_embeddings:
            self._embed_cache.clear()
        return embeds, pooled

    # -- model evaluations ----------------------------------------------------------------------
    def velocity(self, model, x, sigma, embeds, pooled):
        """``v_theta(x, s, c)``; the transformer takes ``timestep = 1000 s``."""
        return model(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=embeds,
                     pooled_projections=pooled, return_dict=False)[0]

    @contextlib.contextmanager
    def reference_model(self):
        """The frozen reference: the same transformer with LoRA disabled, or the full-FT copy."""
        if self.reference is not None:
            yield self.reference
            return
        model = self.unwrapped
        model.disable_adapters()
        try:
            yield model
        finally:
            model.enable_adapters()

    def cfg_velocity(self, model, x, sigma, embeds, pooled, neg_embeds, neg_pooled):
        """Classifier-free guidance in one batched call: ``v_u + g (v_c - v_u)``."""
        g = self.guidance_scale
        v = self.velocity(model, torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([neg_embeds, embeds]),
                          torch.cat([neg_pooled, pooled]))
        v_u, v_c = v.chunk(2)
        return v_u + g * (v_c - v_u)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1], exactly as the stock pipeline's ``output_type="pt"``."""
        vae = self.pipe.vae
        x = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        return (vae.decode(x.to(vae.dtype), return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def rollout(self, prompts: list[str], generator: torch.Generator, sampler: str, model=None,
                steps: int | None = None, noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Sample one image per entry of ``prompts`` with the frozen current policy (or ``model``), from
        ``noise`` (drawn from ``generator`` when None; the SDE noise always comes from ``generator``)."""
        cfg = self.config
        model = model if model is not None else self.unwrapped
        was_training = model.training
        model.eval()
        embeds, pooled = self.encode(prompts)
        neg_embeds, neg_pooled = self.encode([""] * len(prompts))
        if noise is None:
            noise = torch.randn((len(prompts), *self.latent_shape), generator=generator)
        noise = noise.to(self.device)
        n_steps = steps or cfg.sample_steps
        sigmas = flow_sigmas(self.pipe.scheduler, n_steps, self.device)
        with self.accelerator.autocast():
            out = sample_latents(
                lambda x, s: self.cfg_velocity(model, x, s, embeds, pooled, neg_embeds, neg_pooled),
                noise, sigmas, sampler=sampler, noise_level=cfg.noise_level,
                sde_steps=cfg.sde_steps(n_steps),
                generator=generator if sampler == "sde" else None,
                return_trajectory=sampler == "sde", return_log_probs=sampler == "sde",
                return_velocities=sampler == "sde" and cfg.fm_states == "trajectory",
                log_prob_reduction="mean",  # per-dimension mean, the scale Flow-GRPO's clip range is set for
            )
        model.train(was_training)
        return {"latents": out.latents.float(), "trajectory": out.trajectory, "log_probs": out.log_probs,
                "velocities": out.velocities,
                "sigmas": sigmas, "embeds": embeds, "pooled": pooled}

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        from flowalign.rewards import NonFiniteRewardError

        try:
            r = self.reward(images, prompts)
        except NonFiniteRewardError:  # NaN scores: the update is skipped (step() warns and counts)
            return torch.full((len(prompts),), float("nan"), device=self.device)
        except Exception as err:  # a reward that raises stops the run, with the checkpoint saved
            self.save_checkpoint()
            raise RuntimeError(
                f"The reward raised at iteration {self.iteration}: {err!r}. A checkpoint was saved in "
                f"{self.output_dir / 'checkpoints'}; fix the reward and rerun with resume=true."
            ) from err
        return torch.as_tensor(r, dtype=torch.float32, device=self.device).flatten()

    # -- one iteration ---------------------------------------------------------------------------
    def iteration_prompts(self, iteration: int) -> list[str]:
        """The P prompts of an iteration (the same on every rank), drawn with ``self.prompt_weights``."""
        pg = _generator(self.config.seed, iteration, 0)
        pick = torch.multinomial(self.prompt_weights, self.config.prompts_per_iteration, replacement=True, generator=pg)
        return [self.train_prompts[i] for i in pick.tolist()]

    def step(self) -> dict[str, float]:
        """One outer iteration: rollout, reward, (critic,) actor. Returns its metrics."""
        cfg, acc = self.config, self.accelerator
        it, rank = self.iteration, acc.process_index
        t0 = time.perf_counter()

        # 1. Prompts: the same P prompts on every rank; this rank draws G / world images of each.
        prompts = [p for p in self.iteration_prompts(it) for _ in range(self.local_g)]
        group = torch.tensor([j for j in range(cfg.prompts_per_iteration) for _ in range(self.local_g)], device=self.device)
        noise = None
        if cfg.initial_noises:  # branches of one x_1 (seeded by prompt slot and branch group, the same on every rank)
            branch = (rank * self.local_g + torch.arange(self.local_g)) // self.branches  # global image index -> x_1
            starts = {(j, b): torch.randn(self.latent_shape, generator=_generator(cfg.seed, it, j, b, 4))
                      for j in range(cfg.prompts_per_iteration) for b in branch.unique().tolist()}
            noise = torch.stack([starts[j, b] for j in range(cfg.prompts_per_iteration) for b in branch.tolist()])
            group = group * cfg.initial_noises + branch.repeat(cfg.prompts_per_iteration).to(self.device)
        sampler = "sde" if cfg.algorithm == "grpo" else cfg.sampler
        roll = self.rollout(prompts, _generator(cfg.seed, it, rank + 1, 1), sampler, noise=noise)
        t1 = time.perf_counter()

        # 2. Reward of the decoded images; gather across ranks for group statistics.
        images = self.decode(roll["latents"])
        rewards = self.score(images, prompts)
        t2 = time.perf_counter()
        all_rewards, all_groups = acc.gather(rewards), acc.gather(group)
        n_local = rewards.shape[0]
        mine = slice(rank * n_local, (rank + 1) * n_local)
        metrics: dict[str, float] = {
            "iteration": it, "reward_mean": all_rewards.mean().item(), "reward_std": all_rewards.std().item(),
        }
        finite = bool(torch.isfinite(all_rewards).all())
        if not finite:
            self.counters["skipped_updates"] += 1
            warnings.warn(f"iteration {it}: non-finite rewards {all_rewards.tolist()}; update skipped.")
            metrics.update(skipped=1.0)
        elif cfg.algorithm == "grpo":
            adv = O.grpo_advantages(all_rewards, all_groups)[mine]
            metrics.update(self._grpo_update(roll, adv))
        else:
            metrics.update(self._flow_matching_update(roll, rewards, all_rewards, all_groups, mine))
        t3 = time.perf_counter()

        n_images = all_rewards.numel()
        self.counters["images_seen"] += n_images
        metrics.update(
            images_seen=self.counters["images_seen"], skipped_updates=self.counters["skipped_updates"],
            time_sampling=t1 - t0, time_reward=t2 - t1, time_update=t3 - t2,
            images_per_second=n_images / (t3 - t0),
        )
        self.iteration += 1
        return metrics

    def _flow_matching_update(self, roll, rewards, all_rewards, all_groups, mine) -> dict[str, float]:
        """AC-Flow / ORW-CFM-W2: (critic,) weighted flow matching + W2 on the policy's own samples.

        PPO-style, every state of the iteration is drawn up front and the critic scores them once, before it
        trains on this batch: the advantages the actor sees do not depend on the critic's updates within the
        iteration (scored after, the critic would have fit these very samples and the advantages shrink).
        """
        cfg, acc = self.config, self.accelerator
        it, rank = self.iteration, acc.process_index
        embeds, pooled = roll["embeds"], roll["pooled"]
        n = roll["latents"].shape[0]
        guided = cfg.guided_loss and self.guidance_scale != 1.0
        if guided:
            neg_embeds, neg_pooled = self.encode([""] * n)

        def field(model, x_s, sigma, idx):  # the velocity the loss fits (guided or conditional)
            if guided:
                return self.cfg_velocity(model, x_s, sigma, embeds[idx], pooled[idx], neg_embeds[idx], neg_pooled[idx])
            return self.velocity(model, x_s, sigma, embeds[idx], pooled[idx])

        if cfg.algorithm == "orw":  # ORW-CFM-W2: rewards normalised over the batch (all ranks), no critic
            targets = ((all_rewards - all_rewards.mean()) / (all_rewards.std(unbiased=False) + 1e-6))[mine]
        elif cfg.shaping:  # r~ = clip((r - mean_c) / (std_c + eps), -k, k), statistics over all ranks
            if self.group_size >= 2:
                targets = O.shape_rewards(all_rewards, all_groups, clip=cfg.shaping_clip)[mine]
            else:  # one image per group: running statistics (identical on every rank: fed the gathered rewards)
                targets = O.shape_rewards(all_rewards, None, clip=cfg.shaping_clip, running=self.running)[mine]
        else:
            targets = rewards
        gen = _generator(cfg.seed, it, rank + 1, 2)
        batches = [self._draw_states(roll, idx.to(self.device), gen)
                   for _ in range(cfg.inner_epochs)
                   for order in [torch.randperm(n, generator=gen).repeat(cfg.noise_draws)]
                   for idx in order.split(cfg.minibatch_size)]
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        timing = {"time_critic": 0.0, "time_actor": 0.0}

        def add(key: str, value: torch.Tensor | float) -> None:
            sums[key] = sums.get(key, 0.0) + float(value)
            counts[key] = counts.get(key, 0) + 1

        # Advantages, once: A = clip(r~ - V(x_s, s, c), +-eps_A) with the critic as it was before this iteration;
        # during warm-up V = 0 ("shaped") or the actor waits ("frozen").
        warm = self.critic is not None and it < cfg.critic_warmup_iterations
        tc = time.perf_counter()
        for b in batches:
            tgt = targets[b["idx"]]
            if self.critic is None:  # ORW-CFM-W2: the normalised reward itself
                b["adv"] = tgt
                continue
            with torch.no_grad(), acc.autocast():
                b["values"] = self.critic(b["x_s"], b["sigma"], pooled[b["idx"]]).float()
            b["adv"], clip_frac = O.advantages(tgt, torch.zeros_like(tgt) if warm else b["values"],
                                               clip=cfg.advantage_clip)
            add("advantage_clip_fraction", clip_frac)
            add("explained_variance", O.explained_variance(b["values"], tgt))
        timing["time_critic"] += time.perf_counter() - tc

        self.transformer.train()
        for b in batches:
            idx, x_s, sigma = b["idx"], b["x_s"], b["sigma"]
            # Critic: L_V = mean (V(x_s, s, c) - r~)^2.
            if self.critic is not None:
                tc = time.perf_counter()
                with acc.autocast():
                    lv = O.critic_loss(self.critic(x_s, sigma, pooled[idx]).float(), targets[idx])
                self.critic_optimizer.zero_grad(set_to_none=True)
                acc.backward(lv)
                self.critic_optimizer.step()
                add("critic_loss", lv.detach())
                timing["time_critic"] += time.perf_counter() - tc
                if warm and cfg.warmup_actor == "frozen":
                    continue

            # Actor: L = mean_i f(A_i) ||v_theta - u_i||^2 + alpha ||v_theta - stopgrad(v_ref)||^2, v = the fitted field.
            ta = time.perf_counter()
            with acc.autocast():
                v = field(self.transformer, x_s, sigma, idx)
                v_ref = None
                if cfg.w2_weight:
                    with torch.no_grad(), self.reference_model() as ref:
                        v_ref = field(ref, x_s, sigma, idx)
                loss, m = O.acflow_actor_loss(v, b["target"], b["adv"], beta=cfg.beta,
                                              weighting="exp" if cfg.algorithm == "orw" else cfg.weighting,
                                              v_ref=v_ref, w2_weight=cfg.w2_weight, fm_scale=b["fm_scale"],
                                              v_old=b["v_old"])
            # All ranks agree on skipping, or DDP would wait forever for the rank that skipped.
            if acc.gather(torch.isfinite(loss.detach()).float().view(1)).min() < 1:
                self.counters["skipped_updates"] += 1
                warnings.warn(f"iteration {it}: non-finite actor loss; minibatch skipped.")
                continue
            self.optimizer.zero_grad(set_to_none=True)
            acc.backward(loss)
            grad_norm = acc.clip_grad_norm_(self.transformer.parameters(), cfg.max_grad_norm)
            self.optimizer.step()
            add("actor_loss", loss.detach())
            add("grad_norm", grad_norm)
            for k in ("fm_loss", "w2", "ess"):
                add(k, m[k])
            timing["time_actor"] += time.perf_counter() - ta
        return {**{k: sums[k] / counts[k] for k in sums}, **timing}

    def _draw_states(self, roll, idx: torch.Tensor, gen: torch.Generator) -> dict[str, Any]:
        """The states of one minibatch ``idx`` where the critic and the actor are evaluated, with the regression
        target: a random SDE step of each rollout (``fm_states="trajectory"``) or freshly noised samples."""
        cfg = self.config
        if cfg.fm_states == "trajectory" and cfg.algorithm != "orw":  # a random step k: x_k -> x_{k+1}
            traj, grid = roll["trajectory"], roll["sigmas"]
            k = torch.randint(self.sde_steps, (idx.numel(),), generator=gen).to(self.device)
            x_s, sigma = traj[idx, k], grid[k]
            # u = (x_{k+1} - c_x x_k) / c_v: the velocity whose SDE mean hits the realised next state;
            # fm_scale = |c_v| / std puts the residual in units of the step noise (weighted log-likelihood)
            target, fm_scale = sde_step_velocity(x_s, traj[idx, k + 1], sigma, grid[k + 1], cfg.noise_level)
            v_old = roll["velocities"][idx, k] if cfg.centered_weights else None
        else:
            x0, fm_scale, v_old = roll["latents"][idx], None, None
            sigma = O.sample_sigmas(idx.numel(), generator=gen, scheme=cfg.sigma_sampling,
                                    shift=self.sigma_shift).to(self.device)
            eps = torch.randn(x0.shape, generator=gen).to(self.device)
            if cfg.ot_pairing:
                eps = O.ot_pair(x0, eps)
            x_s, target = O.noised_states(x0, sigma, eps)  # x_s = (1 - s) x0 + s eps, u = eps - x0
        return {"idx": idx, "x_s": x_s, "sigma": sigma, "target": target, "fm_scale": fm_scale, "v_old": v_old}

    def _grpo_update(self, roll, adv: torch.Tensor) -> dict[str, float]:
        """Flow-GRPO: clipped-ratio policy gradient on SDE log-probs, KL to the reference."""
        cfg, acc = self.config, self.accelerator
        traj, old_logp, sigmas = roll["trajectory"], roll["log_probs"], roll["sigmas"]
        embeds, pooled = roll["embeds"], roll["pooled"]
        n = traj.shape[0]
        neg_embeds, neg_pooled = self.encode([""] * n)
        gen = _generator(cfg.seed, self.iteration, acc.process_index + 1, 3)
        k_train = max(1, round(cfg.grpo_train_fraction * self.sde_steps))  # among the noisy steps
        chosen = torch.randperm(self.sde_steps, generator=gen)[:k_train].sort().values.tolist()
        sums = {"policy_loss": 0.0, "kl": 0.0, "clip_fraction": 0.0, "approx_kl": 0.0, "grad_norm": 0.0}
        self.transformer.train()
        for start in range(0, n, cfg.minibatch_size):
            idx = slice(start, start + cfg.minibatch_size)
            self.optimizer.zero_grad(set_to_none=True)
            for j, k in enumerate(chosen):
                x, x_next = traj[idx, k], traj[idx, k + 1]
                s = sigmas[k].expand(x.shape[0])
                sync = contextlib.nullcontext() if j == len(chosen) - 1 else acc.no_sync(self.transformer)
                with sync, acc.autocast():
                    v = self.cfg_velocity(self.transformer, x, s, embeds[idx], pooled[idx], neg_embeds[idx], neg_pooled[idx])
                    _, logp, mean, std = sde_step(x, v, sigmas[k], sigmas[k + 1], noise_level=cfg.noise_level,
                                                  prev_sample=x_next, log_prob_reduction="mean")
                    with torch.no_grad(), self.reference_model() as ref:
                        v_ref = self.cfg_velocity(ref, x, s, embeds[idx], pooled[idx], neg_embeds[idx], neg_pooled[idx])
                        _, _, ref_mean, _ = sde_step(x, v_ref, sigmas[k], sigmas[k + 1], noise_level=cfg.noise_level,
                                                     prev_sample=x_next)
                    policy, clip_frac, approx_kl = O.grpo_policy_loss(logp, old_logp[idx, k], adv[idx], cfg.grpo_clip_range)
                    kl = O.gaussian_kl_to_reference(mean, ref_mean, std, reduction="mean").mean()
                    loss = (policy + cfg.grpo_kl_weight * kl) / len(chosen)
                acc.backward(loss)
                sums["policy_loss"] += policy.item() / len(chosen)
                sums["kl"] += kl.item() / len(chosen)
                sums["clip_fraction"] += float(clip_frac) / len(chosen)
                sums["approx_kl"] += float(approx_kl) / len(chosen)
            grad_norm = acc.clip_grad_norm_(self.transformer.parameters(), cfg.max_grad_norm)
            if torch.isfinite(torch.as_tensor(grad_norm)):
                self.optimizer.step()
            else:
                self.counters["skipped_updates"] += 1
                warnings.warn(f"iteration {self.iteration}: non-finite GRPO gradient; update skipped.")
            sums["grad_norm"] += float(grad_norm)
        n_mb = math.ceil(n / cfg.minibatch_size)
        return {k: v / n_mb for k, v in sums.items()}

    # -- evaluation ----------------------------------------------------------------------------
    def eval_prompt_list(self) -> list[str]:
        """The held-out prompts: the first ``eval_prompts`` of ``eval_prompt_file``, or the prompt source's."""
        cfg = self.config
        if cfg.eval_prompt_file:
            return read_prompt_file(cfg.eval_prompt_file)[: cfg.eval_prompts]
        return self.prompt_source.heldout_prompts(cfg.eval_prompts, seed=cfg.eval_seed)

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Training reward, unseen rewards, diversity, W2 and KL to the reference on held-out prompts.

        Runs on rank 0 only (the evaluation set is small). The prompts and noises depend on ``eval_seed`` alone,
        so every run with the same evaluation settings is scored on the same images, and a fresh trainer's
        evaluation is the paired no-update control; the reference samples (adapters disabled) are computed
        once. Returns the means and ``per_image``: equal-length lists (``reward``, ``eval_<name>``,
        ``kl_to_reference``) in a fixed order (prompt-major, ``eval_images_per_prompt`` images each).
        """
        cfg = self.config
        base_prompts = self.eval_prompt_list()
        k = cfg.eval_images_per_prompt
        prompts = [p for p in base_prompts for _ in range(k)]
        groups = [i for i in range(len(base_prompts)) for _ in range(k)]
        images = self._eval_images(prompts, model=None)
        if self._ref_eval_images is None:
            with self.reference_model() as ref:
                self._ref_eval_images = self._eval_images(prompts, model=ref)
        per_image = {"reward": self.reward(images, prompts).float().flatten().tolist()}
        for name, reward in self.eval_rewards.items():
            per_image[f"eval_{name}"] = reward(images, prompts).float().flatten().tolist()
        if cfg.eval_kl:
            per_image["kl_to_reference"] = self._eval_kl(prompts)
        result: dict[str, Any] = {"iteration": self.iteration, "images_seen": self.counters["images_seen"]}
        result.update({key: sum(values) / len(values) for key, values in per_image.items()})
        result["diversity"] = diversity(images, groups)
        result["w2_to_reference"] = O.w2_distance(eval_features(self._ref_eval_images), eval_features(images))
        result["per_image"] = per_image
        return result

    def _eval_images(self, prompts: list[str], model) -> torch.Tensor:
        out = []
        for start in range(0, len(prompts), 64):
            chunk = prompts[start : start + 64]
            roll = self.rollout(chunk, _generator(self.config.eval_seed, 10**6, start), "euler", model=model,
                                steps=self.config.eval_steps)
            out.append(self.decode(roll["latents"]).cpu())
        return torch.cat(out)

    def _eval_kl(self, prompts: list[str]) -> list[float]:
        """KL(p_theta || p_ref) of each held-out image in nats: the SDE sampler (``noise_level``, ``sample_steps``,
        every step stochastic) on the policy's own paths, the exact Gaussian KL of each transition summed."""
        cfg, model = self.config, self.unwrapped
        sigmas = flow_sigmas(self.pipe.scheduler, cfg.sample_steps, self.device)
        was_training = model.training
        model.eval()
        out = []
        for start in range(0, len(prompts), 64):
            chunk = prompts[start : start + 64]
            embeds, pooled = self.encode(chunk)
            neg = self.encode([""] * len(chunk))
            gen = _generator(cfg.eval_seed, 10**6 + 1, start)
            noise = torch.randn((len(chunk), *self.latent_shape), generator=gen).to(self.device)

            def policy(x, s):
                return self.cfg_velocity(model, x, s, embeds, pooled, *neg)

            def reference(x, s):
                with self.reference_model() as ref:
                    return self.cfg_velocity(ref, x, s, embeds, pooled, *neg)

            with self.accelerator.autocast():
                out += sde_path_kl(policy, reference, noise, sigmas, cfg.noise_level, generator=gen).tolist()
        model.train(was_training)
        return out

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        """Write ``output_dir/checkpoints/iter-N`` atomically and point ``latest`` at it (rank 0)."""
        acc = self.accelerator
        acc.wait_for_everyone()
        root = self.output_dir / "checkpoints"
        target = root / f"iter-{self.iteration:06d}"
        if acc.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            atomic_write_dir(target, self._write_checkpoint)
            write_pointer(root, target.name)  # last: the pointer names only complete checkpoints
        acc.wait_for_everyone()
        return target

    def _write_checkpoint(self, folder: Path) -> None:
        model = self.unwrapped
        if self.config.use_lora:
            from peft.utils import get_peft_model_state_dict
            from diffusers import StableDiffusion3Pipeline

            StableDiffusion3Pipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(model))
        else:
            model.save_pretrained(folder / "transformer")
        if self.critic is not None:
            self.accelerator.unwrap_model(self.critic).save_pretrained(folder / "critic")
        state = {
            "iteration": self.iteration, "counters": self.counters, "running": self.running.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "critic_optimizer": self.critic_optimizer.state_dict() if self.critic_optimizer is not None else None,
            "torch_rng": torch.get_rng_state(), "config": asdict(self.config),
            "history": self.history, "eval_history": self.eval_history,
        }
        save_state(folder / "trainer_state.pt", state)

    def load_checkpoint(self, folder: str | os.PathLike) -> None:
        """Restore weights, critic, optimisers, counters and running statistics from a checkpoint folder."""
        folder = Path(folder)
        model = self.unwrapped
        if self.config.use_lora:
            from peft.utils import set_peft_model_state_dict
            from diffusers import StableDiffusion3Pipeline

            state_dict = StableDiffusion3Pipeline.lora_state_dict(folder)
            state_dict = {k.removeprefix("transformer."): v for k, v in state_dict.items() if k.startswith("transformer.")}
            result = set_peft_model_state_dict(model, state_dict)
            if getattr(result, "unexpected_keys", None):
                raise ValueError(f"Checkpoint {folder} has LoRA keys the model does not: {result.unexpected_keys[:5]}")
        else:
            from safetensors.torch import load_file

            model.load_state_dict(load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
        if self.critic is not None:
            from flowalign.critic import Critic

            loaded = Critic.from_pretrained(folder / "critic")
            self.accelerator.unwrap_model(self.critic).load_state_dict(loaded.state_dict())
        state = load_state(folder / "trainer_state.pt")  # weights_only: a crafted pickle is refused
        self.optimizer.load_state_dict(state["optimizer"])
        if self.critic_optimizer is not None and state["critic_optimizer"] is not None:
            self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        torch.set_rng_state(state["torch_rng"])
        self.iteration, self.counters = state["iteration"], state["counters"]
        self.running.load_state_dict(state["running"])
        self.history, self.eval_history = state["history"], state["eval_history"]

    def parameter_counts(self) -> dict[str, float]:
        """Parameters of the transformer (all / trainable) and of the critic, and the critic's fraction."""
        model = self.unwrapped
        total = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        critic = sum(p.numel() for p in self.critic.parameters()) if self.critic is not None else 0
        return {"transformer": total, "trainable": trainable, "critic": critic,
                "critic_fraction_of_transformer": critic / total}

    # -- logging ---------------------------------------------------------------------------------
    def _log(self, metrics: dict[str, float], filename: str) -> None:
        if not self.is_main:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / filename
        rows = self.eval_history if filename.startswith("eval") else self.history
        keys = list(dict.fromkeys(k for row in rows for k in row))
        with open(path, "w", newline="") as f:  # rewritten whole: columns may appear later (e.g. after warm-up)
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.output_dir / "tensorboard"))
        prefix = "eval/" if filename.startswith("eval") else "train/"
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and math.isfinite(v) and k != "iteration":
                self._tb.add_scalar(prefix + k, v, metrics.get("iteration", self.iteration))
        self._tb.flush()

    # -- the loop ----------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Run ``config.iterations`` iterations (resuming if asked); returns the last evaluation."""
        from tqdm.auto import tqdm

        cfg = self.config
        if cfg.resume and (latest := latest_checkpoint(self.output_dir)) is not None:
            self.load_checkpoint(latest)
            if self.is_main:
                print(f"[flowalign] resumed from {latest} at iteration {self.iteration}")
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            cfg.to_yaml(self.output_dir / "config.yaml")
            info = self.parameter_counts()
            (self.output_dir / "model_info.json").write_text(json.dumps(info, indent=1))
            if cfg.progress:
                print(f"[flowalign] transformer {info['transformer']:,} params, trainable {info['trainable']:,}; "
                      f"critic {info['critic']:,} ({100 * info['critic_fraction_of_transformer']:.1f}% of the transformer)")
        evaluate = bool(cfg.eval_prompts)
        result: dict[str, Any] = {}
        if evaluate and self.is_main and cfg.eval_at_start and not self.eval_history:
            result = self._record_evaluation()
        bar = tqdm(total=cfg.iterations, initial=self.iteration, desc=f"{cfg.algorithm}", disable=not (cfg.progress and self.is_main))
        while self.iteration < cfg.iterations:
            metrics = self.step()
            self.history.append(metrics)
            self._log(metrics, "metrics.csv")
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}")
            last = self.iteration == cfg.iterations
            if evaluate and self.is_main and (last or (cfg.eval_every and self.iteration % cfg.eval_every == 0)):
                result = self._record_evaluation()
            if last or (cfg.checkpoint_every and self.iteration % cfg.checkpoint_every == 0):
                self.save_checkpoint()
        bar.close()
        if self._tb is not None:
            self._tb.close()
        self.accelerator.wait_for_everyone()
        return result or (self.eval_history[-1] if self.eval_history else {})

    def _record_evaluation(self) -> dict[str, Any]:
        """Evaluate; the means go to ``eval_history`` / eval.csv / TensorBoard, the per-image values (for paired
        standard errors) to ``eval_per_image.jsonl``, one line per evaluation. Returns the full evaluation."""
        result = self.evaluate()
        means = {k: v for k, v in result.items() if k != "per_image"}
        self.eval_history.append(means)
        self._log(means, "eval.csv")
        with open(self.output_dir / "eval_per_image.jsonl", "a") as f:
            f.write(json.dumps({"iteration": self.iteration, **result["per_image"]}) + "\n")
        return result
