"""AC-Flow trainer: online actor-critic fine-tuning of flow-matching models, with its baselines.

One loop, five algorithms selected by ``ACFlowConfig.algorithm``, all regularised on one axis
(``kl_coef``, nats per image; ``docs/algorithms.md``):

- ``"acflow"`` (default): AC-Flow (ideas from "AC-Flow", arXiv 2510.18072; the concrete design is
  ours, see ``flowalign.objectives``): reward shaping, a light critic ``V(x_s, s, c)`` regressed on the
  shaped reward at noised states, clipped advantages, critic warm-up, critic-weighted flow matching
  and the Wasserstein-2 regulariser toward the reference velocity.
- ``"orw"``: ORW-CFM-W2 (Fan et al., ICLR 2025), the special case with no critic and no shaping:
  weights ``exp(beta * r)`` on batch-normalised rewards, self-normalised, on freshly noised states.
- ``"grpo"``: Flow-GRPO (arXiv 2505.05470): SDE rollouts with log-probabilities, per-prompt group
  advantages, the clipped ratio, and a KL to the reference.
- ``"nft"``: DiffusionNFT (arXiv 2509.16117): implicit positive / negative policies around the sampling
  policy (optionally an EMA), regressed on freshly noised states.
- ``"awm"``: Advantage Weighted Matching (arXiv 2509.25050): the flow-matching loss weighted by the group
  advantage, with a ratio clip.

Every iteration (CleanRL-style, top to bottom in ``ACFlowTrainer.step``)::

    prompts  <- P prompts (the same on every rank), G images each, sharded across ranks
    rollout  <- the current policy, frozen (no grad), CFG, Euler or SDE sampler
    reward   <- R(decode(x0), prompt); gathered across ranks for group statistics
    shaping  <- per-prompt z-score, clipped                           (acflow)
    critic   <- regress V(x_s, s, c) on the shaped reward             (acflow)
    actor    <- critic/reward-weighted flow matching + W2 term        (acflow, orw; acflow's "frozen" warm-up skips it)
                on the CFG-guided velocity v_u + g (v_c - v_u) that drew the rollouts (guided_loss),
                at the rollout's SDE states (fm_states="trajectory", default) or fresh noised ones
                clipped-ratio policy gradient + KL                    (grpo)
                implicit-policy / advantage-weighted matching + W2     (nft, awm)

Randomness is a pure function of ``(seed, iteration, rank)``, so a resumed run reproduces an
uninterrupted one. With LoRA (default) the reference model is the same transformer with its adapters
disabled: no second copy of the weights.

Example::

    from flowalign import ACFlowConfig, ACFlowTrainer
    trainer = ACFlowTrainer(ACFlowConfig(iterations=20, output_dir="runs/acflow"))
    trainer.train()
"""

from __future__ import annotations

import collections
import copy
import csv
import importlib.util
import json
import math
import os
import time
import warnings
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.tracking import TensorBoardTracker, WandBTracker
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, InitProcessGroupKwargs, gather_object
from diffusers import StableDiffusion3Pipeline
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor, distribute_tensor
from tqdm.auto import tqdm

from flowalign import objectives as O
from flowalign import rewards as R
from flowalign import seeding
from flowalign.checkpoints import atomic_write_dir, latest_checkpoint, load_state, save_state, write_pointer
from flowalign.compile import compile_transformer
from flowalign.config import ACFlowConfig
from flowalign.critic import Critic, LookaheadCritic
from flowalign.eval import diversity_per_group, eval_features, sde_path_kl
from flowalign.methods import Rewards, get_method
from flowalign.policy import Policy, default_guidance_scale, load_sd3_pipeline
from flowalign.pipelines.lora_utils import load_lora_state
from flowalign.prompts import PromptSource, load_prompts, read_prompt_file
from flowalign.rewards import NonFiniteRewardError
from flowalign.sampling import draw_step_noise, flow_sigmas

# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EVAL_NOISE_BLOCK = 64  # held-out noises are drawn per block of 64 images: the same images at any batch or world size


def make_optimizer(name: str, params: list[torch.nn.Parameter], lr: float, weight_decay: float):
    """AdamW from torch (``"adamw"``) or with 8-bit states from bitsandbytes (``"adamw8bit"``, 1/4 of the memory of
    the two fp32 moments; worth it for full fine-tuning, a LoRA's states are small)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    try:
        import bitsandbytes  # an optional dependency, imported only when asked for
    except ImportError as err:
        raise ImportError("ACFlowConfig.optimizer='adamw8bit' needs bitsandbytes: `pip install bitsandbytes`, or "
                          "set optimizer='adamw'.") from err
    return bitsandbytes.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)


FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)  # rank 0 gets full CPU tensors, others {}


def make_accelerator(cfg: ACFlowConfig) -> Accelerator:
    """The run's ``Accelerator``: ``mixed_precision`` 'auto' is bf16 where the GPU has it and full precision on a CPU
    (usability over speed); collectives wait ``distributed_timeout`` seconds. Launched with an FSDP config
    (``samples/accelerate/fsdp.yaml``) on CPUs, FSDP2 runs over gloo (accelerate would silently fall back to DDP)."""
    on_gpu = torch.cuda.is_available()
    mixed = cfg.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "no"
    if not on_gpu and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise RuntimeError("DeepSpeed needs CUDA GPUs: on a CPU accelerate starts it as independent single processes "
                           "(num_processes=1 on every rank). Use samples/accelerate/fsdp.yaml or multi_gpu.yaml here.")
    fsdp_on_cpu = not on_gpu and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    plugin = FullyShardedDataParallelPlugin() if fsdp_on_cpu else None  # from the launcher's FSDP_* variables
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.distributed_timeout))
    acc = Accelerator(mixed_precision=mixed, cpu=not on_gpu, kwargs_handlers=[timeout], fsdp_plugin=plugin)
    if fsdp_on_cpu and acc.num_processes > 1:
        # accelerate 1.16 enables FSDP on accelerators only (MULTI_CPU is left out) and would run DDP without a word;
        # torch's FSDP2 runs on CPUs over gloo, so accelerate's shared state is told FSDP (CPU runs and tests)
        if plugin.fsdp_version != 2:
            raise ValueError("FSDP on CPUs needs fsdp_version: 2 (FSDP1 refuses the CPU device); see "
                             "samples/accelerate/fsdp.yaml.")
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
        AcceleratorState._shared_state["fsdp_plugin"] = plugin
    return acc


def make_trackers(cfg: ACFlowConfig, output_dir: Path) -> list:
    """accelerate's experiment trackers for ``cfg.log_with`` (main process only): TensorBoard in
    ``output_dir/tensorboard``; W&B in project ``wandb_project``, run named after the output folder."""
    trackers = []
    for name in cfg.log_with:
        if name == "tensorboard":  # the config is beside it, in config.yaml
            tracker = TensorBoardTracker("tensorboard", str(output_dir))
            tracker.start()
        else:  # wandb
            if importlib.util.find_spec("wandb") is None:
                raise ImportError("ACFlowConfig.log_with names 'wandb', which is not installed: pip install wandb (and "
                                  "wandb login), or drop it from log_with.")
            tracker = WandBTracker(cfg.wandb_project, name=output_dir.name, dir=str(output_dir))
            tracker.start()
            tracker.store_init_configuration({k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                              for k, v in asdict(cfg).items()})
        trackers.append(tracker)
    return trackers


def _full(t: torch.Tensor) -> torch.Tensor:
    """A (possibly FSDP-sharded) tensor's full value on the CPU; under FSDP a collective: every rank calls it."""
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu()


def _like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``full`` laid out like ``param`` (sharded the same way under FSDP); every rank calls it."""
    if isinstance(param, DTensor):
        return distribute_tensor(full.to(param.device), param.device_mesh, param.placements)
    return full.to(param.device)


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
        self.config = cfg = config
        self.method = get_method(cfg.algorithm)  # its advantages, loss and update (flowalign.methods)
        self.accelerator = acc = accelerator or make_accelerator(cfg)
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

        self._setup_pipeline(pipeline)  # frozen text encoders and VAE in the weight dtype
        # the transformer's LoRA (or all of it) in fp32, the frozen reference (None: adapters disabled), the optimizer
        transformer, reference, optimizer = self._setup_transformer()
        tcfg = transformer.config
        self.latent_shape = (tcfg.in_channels, *self._latent_size(tcfg))  # latents at the configured resolution
        self.critic = self.critic_optimizer = None
        self.critic_buffer = collections.deque(maxlen=cfg.critic_buffer_iterations)  # critic='lookahead': recent states
        self.critic_has_image = False
        if self.method.uses_critic and cfg.critic != "zero":  # AC-Flow: V(x_k, s_k, pooled prompt embedding)
            torch.manual_seed(cfg.seed)
            if cfg.critic == "latent":
                critic = Critic(in_channels=tcfg.in_channels, pooled_dim=tcfg.pooled_projection_dim,
                                channels=tuple(cfg.critic_channels), hidden_dim=cfg.critic_hidden_dim)
            else:
                critic = LookaheadCritic(in_channels=tcfg.in_channels, pooled_dim=tcfg.pooled_projection_dim,
                                         channels=tuple(cfg.critic_lookahead_channels))
                self.critic_has_image = bool(cfg.critic_lookahead_channels)
            critic_opt = torch.optim.AdamW(critic.parameters(), lr=cfg.critic_lr)
            self.critic, self.critic_optimizer = self._prepare_critic(critic, critic_opt)
        self.transformer, self.optimizer = acc.prepare(transformer, optimizer)
        if cfg.compile and self.sharded:
            raise ValueError("ACFlowConfig.compile=true with FSDP / DeepSpeed is not measured yet (the all-gather hooks"
                             " break the graph); set compile=false, or train with DDP (samples/accelerate/multi_gpu.yaml).")
        # encode, CFG, reference, EMA (nft), rollouts and decoding (flowalign.policy); rollouts and evaluation (no
        # grad) may run a compiled forward of the same module (shared weights)
        self.policy = Policy(
            self.pipe, self.unwrapped, self.guidance_scale, reference=reference, device=self.device,
            max_sequence_length=cfg.max_sequence_length, sample_steps=cfg.sample_steps, noise_level=cfg.noise_level,
            sde_steps_fraction=cfg.sde_steps_fraction, latent_shape=self.latent_shape,
            rollout_batch_size=cfg.rollout_batch_size, decode_batch_size=cfg.decode_batch_size,
            prompt_cache_size=cfg.prompt_cache_size if cfg.cache_prompt_embeddings else 0,
            offload_text_encoders=cfg.offload_text_encoders, keep_velocities=cfg.fm_states == "trajectory",
            autocast=acc.autocast, compiled=compile_transformer(self.unwrapped) if cfg.compile else None,
            ema_decay=cfg.nft_ema_decay if self.method.uses_ema(cfg) else 0.0)
        self.sde_steps = self.policy.sde_steps()  # the rollouts' noisy (trainable) steps

        self.reward = R.as_reward(reward) if reward is not None else self._load_reward(cfg.reward, cfg.reward_normalize)
        # Prompts, and their embeddings (cached on the CPU, least recently used evicted).
        self.prompt_source = load_prompts(prompts if prompts is not None else cfg.prompts)
        self.train_prompts = self.prompt_source.train
        self.prompt_weights = self.prompt_source.sampling_weights()
        unseen = cfg.eval_rewards if cfg.eval_rewards is not None else self.prompt_source.unseen_rewards
        self.eval_rewards = {name: R.load(name) for name in unseen}
        if self.policy.offload_text_encoders:
            self.precompute_embeddings()
        self.running = O.RunningMeanStd()
        self.iteration = 0
        self.counters = {"skipped_updates": 0, "images_seen": 0}
        self.history: list[dict[str, Any]] = []
        self.eval_history: list[dict[str, Any]] = []
        self._ref_eval_features: torch.Tensor | None = None
        self._ref_eval_latents: torch.Tensor | None = None
        self._trackers: list | None = None  # accelerate trackers, made on the first log (log_with)

    @property
    def sharded(self) -> bool:
        """Whether the transformer is sharded across ranks (FSDP) or owned by DeepSpeed."""
        return self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)

    def _prepare_critic(self, critic: torch.nn.Module, optimizer: torch.optim.Optimizer):
        """The critic and its optimizer for this run's engine. accelerate's FSDP2 and DeepSpeed take one model per
        Accelerator (FSDP2 binds its wrap class to the first model prepared): there the critic, < 1% of the
        transformer, is replicated with plain DDP."""
        acc = self.accelerator
        self.critic_prepared = not self.sharded
        if self.critic_prepared:
            return acc.prepare(critic, optimizer)
        critic = critic.to(self.device)
        if acc.num_processes > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            critic = torch.nn.parallel.DistributedDataParallel(critic, device_ids=ids)
        return critic, optimizer

    def _setup_pipeline(self, pipeline: Any) -> None:
        """The SD3 pipeline on the device, frozen weights in ``weight_dtype``; text encoders offloaded if asked."""
        cfg, acc = self.config, self.accelerator
        amp = {"bf16": "bf16", "fp16": "fp16"}.get(acc.mixed_precision, "fp32")
        self.weight_dtype = DTYPES[cfg.weight_dtype or amp]
        if self.weight_dtype != torch.float32 and amp == "fp32":
            raise ValueError(f"ACFlowConfig.weight_dtype={cfg.weight_dtype!r} with mixed_precision "
                             f"{acc.mixed_precision!r}: half-precision frozen weights need autocast to mix them with "
                             f"the fp32 trainable parameters; set mixed_precision to {cfg.weight_dtype!r}, or "
                             "weight_dtype='fp32'.")
        if pipeline is None:
            pipeline = load_sd3_pipeline(cfg.pretrained, dtype=self.weight_dtype)
        self.pipe = pipeline.to(self.device)
        if self.pipe.transformer.dtype != self.weight_dtype:
            self.pipe.to(dtype=self.weight_dtype)
        self.pipe.set_progress_bar_config(disable=True)
        text_encoders = [m for m in (self.pipe.text_encoder, self.pipe.text_encoder_2, self.pipe.text_encoder_3)
                         if m is not None]
        for module in (*text_encoders, self.pipe.vae):
            module.requires_grad_(False)
        if cfg.offload_text_encoders and self.device.type != "cpu":  # on the CPU between encodes (cached embeddings)
            for module in text_encoders:
                module.to("cpu")
        self.guidance_scale = cfg.guidance_scale if cfg.guidance_scale is not None else default_guidance_scale(
            cfg.pretrained)
        # training noise levels warped like the sampling grid (SD3 trains with the shift it samples with)
        self.sigma_shift = cfg.sigma_shift if cfg.sigma_shift is not None else float(
            getattr(self.pipe.scheduler.config, "shift", 1.0) or 1.0)

    def _setup_transformer(self) -> tuple[torch.nn.Module, torch.nn.Module | None, torch.optim.Optimizer]:
        """The trained transformer (a LoRA, or every weight) with its trainable parameters in fp32, the frozen
        reference (the same module with adapters disabled, or a copy), checkpointing, and the optimizer."""
        cfg = self.config
        transformer = self.pipe.transformer
        transformer.requires_grad_(False)
        torch.manual_seed(cfg.seed)  # the LoRA's random init (lora_A) and the critic's depend on the seed only
        if cfg.use_lora:
            self.lora_config = LoraConfig(
                r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian",
                target_modules=list(cfg.lora_target_modules),
            )
            transformer.add_adapter(self.lora_config)
            if cfg.init_lora:  # continue from an existing LoRA (checked against this adapter's config)
                self._load_lora(transformer, load_lora_state(cfg.init_lora, self.lora_config), source=cfg.init_lora)
            cast_training_params(transformer, dtype=torch.float32)  # trainable LoRA weights in fp32
            reference = None  # the same transformer, adapters disabled
        else:
            if cfg.init_lora:
                raise ValueError(f"ACFlowConfig.init_lora={cfg.init_lora!r} needs use_lora=True.")
            reference = copy.deepcopy(transformer).requires_grad_(False).eval()  # frozen, weight dtype
            transformer.to(torch.float32).requires_grad_(True)
        checkpointing = cfg.gradient_checkpointing
        if checkpointing is None:  # on a GPU memory is the limit, on a CPU time is
            checkpointing = self.device.type != "cpu"
        if checkpointing:
            transformer.enable_gradient_checkpointing()
        params = [p for p in transformer.parameters() if p.requires_grad]
        optimizer = make_optimizer(cfg.optimizer, params, lr=self.method.learning_rate(cfg),
                                   weight_decay=cfg.adam_weight_decay)
        return transformer, reference, optimizer

    # -- set-up helpers ---------------------------------------------------------------------------
    @staticmethod
    def _load_reward(spec: Any, normalize: str | None):
        if isinstance(spec, (list, tuple)):
            return R.load_mixture(list(spec), normalize=normalize)
        if "=" in str(spec) and not str(spec).endswith(")"):
            return R.load_mixture([spec], normalize=normalize)
        return R.load(spec)

    def _latent_size(self, tcfg) -> tuple[int, int]:
        """The latent side ``(h, w)`` of ``resolution`` pixels (default: the transformer's ``sample_size``)."""
        down = self.pipe.vae_scale_factor
        if self.config.resolution is None:
            return tcfg.sample_size, tcfg.sample_size
        unit = down * tcfg.patch_size
        if self.config.resolution % unit:
            raise ValueError(f"ACFlowConfig.resolution={self.config.resolution} must be a multiple of {unit} (the VAE "
                             f"downsamples by {down}, the transformer patches {tcfg.patch_size}x{tcfg.patch_size} "
                             f"latents); e.g. {max(unit, round(self.config.resolution / unit) * unit)}.")
        side = self.config.resolution // down
        limit = getattr(tcfg, "pos_embed_max_size", None)
        if limit and side // tcfg.patch_size > limit:
            raise ValueError(f"ACFlowConfig.resolution={self.config.resolution} is larger than this transformer's "
                             f"positional embedding allows ({limit * tcfg.patch_size * down} px); lower it.")
        return side, side

    def load_lora(self, source: Any) -> None:
        """Weights of a LoRA (any source ``flowalign.pipelines.lora_utils.load_lora_state`` reads, with this run's
        rank and alpha) into the trainer's adapter."""
        self._load_lora(self.unwrapped, load_lora_state(source, self.lora_config), source=source)

    @staticmethod
    def _load_lora(model, state_dict: dict[str, torch.Tensor], source: Any) -> None:
        """LoRA weights (keys without prefix, ``a.b.lora_A.weight``) into ``model``'s adapter: every weight of the
        adapter given, and no other."""
        result = set_peft_model_state_dict(model, state_dict)
        unexpected = getattr(result, "unexpected_keys", None) or []
        missing = [k for k in getattr(result, "missing_keys", None) or [] if "lora_" in k]
        if unexpected or missing:
            raise ValueError(f"The LoRA of {source} does not match the trainer's adapter (lora_target_modules): "
                             f"{len(missing)} weights missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                             f"(e.g. {unexpected[:3]}).")

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.transformer)

    def precompute_embeddings(self) -> bool:
        """Encode every training and held-out prompt (and "") now, when they all fit in the cache: the text
        encoders then never come back to the device. Returns whether they fit. (Done at start when the encoders
        are offloaded; on a CPU the encoders are where they run, and prompts are encoded as they come.)"""
        cfg = self.config
        known = list(dict.fromkeys(["", *self.train_prompts, *(self.eval_prompt_list() if cfg.eval_prompts else [])]))
        if not (cfg.cache_prompt_embeddings and len(known) <= cfg.prompt_cache_size):
            return False
        self.policy.encode(known)
        return True

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
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
        pg = seeding.generator(self.config.seed, iteration, 0)
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
            starts = {(j, b): torch.randn(self.latent_shape, generator=seeding.generator(cfg.seed, it, j, b, 4))
                      for j in range(cfg.prompts_per_iteration) for b in branch.unique().tolist()}
            noise = torch.stack([starts[j, b] for j in range(cfg.prompts_per_iteration) for b in branch.tolist()])
            group = group * cfg.initial_noises + branch.repeat(cfg.prompts_per_iteration).to(self.device)
        sampler = self.method.sampler or cfg.sampler
        with self.policy.sampling_policy():
            roll = self.policy.rollout(prompts, seeding.generator(cfg.seed, it, rank + 1, 1), sampler, noise=noise)
        t1 = time.perf_counter()

        # 2. Reward of the decoded images; gather across ranks for group statistics.
        images = self.policy.decode(roll.latents)
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
        else:
            metrics.update(self.method.update(self, roll, Rewards(local=rewards, all=all_rewards, groups=all_groups,
                                                                  mine=mine)))
        self.policy.update_ema()  # nft: the sampling policy follows the trained one, ema <- d ema + (1 - d) theta
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

    def optimizer_step(self) -> torch.Tensor:
        """Clip the actor's gradient to ``max_grad_norm`` and step; a non-finite gradient skips the step (counted).

        Under fp16 the gradient scaler owns the skip: ``optimizer.step()`` must run after every unscale (clipping
        unscales) so the scaler updates; it then skips an overflowing step itself and lowers its scale. Skipping
        the call instead leaves the optimizer "already unscaled" and the next clip raises."""
        grad_norm = self.accelerator.clip_grad_norm_(self.transformer.parameters(), self.config.max_grad_norm)
        finite = bool(torch.isfinite(torch.as_tensor(grad_norm)))
        if finite or self.accelerator.scaler is not None:
            self.optimizer.step()
        if not finite:
            self.counters["skipped_updates"] += 1
            warnings.warn(f"iteration {self.iteration}: non-finite actor gradient (norm {float(grad_norm)}); "
                          "update skipped" + (" by the fp16 gradient scaler." if self.accelerator.scaler else "."))
        return grad_norm

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

        Every rank takes part: each samples, decodes and scores its contiguous share of the held-out prompts, and
        the per-image values are gathered in prompt order (no rank waits on another's evaluation, and a sharded
        model sees every rank in every forward). The prompts and noises depend on ``eval_seed`` and the image's
        index alone, so every run with the same evaluation settings is scored on the same images, at any batch
        size and number of processes, and a fresh trainer's evaluation is the paired no-update control; the
        reference samples (adapters disabled) are computed once. Returns the means and ``per_image``: equal-length
        lists (``reward``, ``eval_<name>``, ``kl_to_reference``) in a fixed order (prompt-major,
        ``eval_images_per_prompt`` images each).
        """
        cfg, acc = self.config, self.accelerator
        base_prompts = self.eval_prompt_list()
        n, k = len(base_prompts), cfg.eval_images_per_prompt
        per_rank = math.ceil(n / acc.num_processes)
        first = acc.process_index * per_rank
        keep = max(0, min(per_rank, n - first)) * k  # this rank's real images; the rest pads the last share
        rows = range(first * k, (first + per_rank) * k)  # the same count on every rank (FSDP: the same forwards)
        padded = [base_prompts[min(j // k, n - 1)] for j in rows]
        prompts, groups = padded[:keep], [j // k for j in rows][:keep]
        latents, images = self._eval_images(padded, rows, model=None)
        latents, images = latents[:keep], images[:keep]
        if self._ref_eval_features is None:
            with self.policy.reference_model() as ref:
                ref_latents, ref_images = self._eval_images(padded, rows, model=ref)
            self._ref_eval_latents, self._ref_eval_features = ref_latents[:keep], eval_features(ref_images[:keep])
        per_image = {"reward": self.reward(images, prompts).float().flatten().tolist() if keep else []}
        for name, reward in self.eval_rewards.items():
            per_image[f"eval_{name}"] = reward(images, prompts).float().flatten().tolist() if keep else []
        # ||x_ft(z) - x_base(z)||^2 of the Euler samples from the same noise z: an upper bound on W2^2 (latent units)
        per_image["coupling_distance"] = (latents - self._ref_eval_latents).pow(2).flatten(1).sum(1).tolist()
        if cfg.eval_kl:
            per_image["kl_to_reference"] = self._eval_kl(padded, rows)[:keep]
        if cfg.eval_path_kl:
            per_image["path_kl"] = self._eval_kl(padded, rows, full_path=True)[:keep]

        per_image = {key: gather_object(values) for key, values in per_image.items()}  # rank order = prompt order
        result: dict[str, Any] = {"iteration": self.iteration, "images_seen": self.counters["images_seen"]}
        result.update({key: sum(values) / len(values) for key, values in per_image.items()})
        group_diversity = gather_object(list(diversity_per_group(images, groups).values()))
        result["diversity"] = sum(group_diversity) / len(group_diversity) if group_diversity else float("nan")
        for name, readout in self.prompt_source.group_readouts.items():  # e.g. colour entropy (shapes_nocolor)
            values = gather_object(list(readout(images, groups).values()))
            result[name] = sum(values) / len(values) if values else float("nan")
        features = torch.cat(gather_object([eval_features(images)]))
        reference = torch.cat(gather_object([self._ref_eval_features]))
        result["w2_to_reference"] = O.w2_distance(reference, features)
        result["per_image"] = per_image
        return result

    def _eval_noise(self, rows: range, purpose: int, sde_steps: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The starting noises (and the first ``sde_steps`` SDE draws) of the held-out images ``rows`` (global
        indices): each block of ``EVAL_NOISE_BLOCK`` images is drawn from its own generator, so an image's noise
        depends on its index alone, not on how the images are batched or sharded. Rows past the last image (a
        rank's padding) get zeros."""
        total = len(self.eval_prompt_list()) * self.config.eval_images_per_prompt
        real = range(rows.start, min(rows.stop, total))
        noises = [torch.zeros((0, *self.latent_shape))]
        draws = [torch.zeros((0, sde_steps, *self.latent_shape))]
        for lo in range(real.start - real.start % EVAL_NOISE_BLOCK, real.stop, EVAL_NOISE_BLOCK):
            hi = min(lo + EVAL_NOISE_BLOCK, total)
            gen = seeding.generator(self.config.eval_seed, purpose, lo)
            block = torch.randn((hi - lo, *self.latent_shape), generator=gen)
            keep = slice(max(real.start, lo) - lo, min(real.stop, hi) - lo)
            noises.append(block[keep])
            if sde_steps:
                draws.append(draw_step_noise(block.shape, sde_steps, gen)[keep])
        pad = len(rows) - len(real)
        noises.append(torch.zeros((pad, *self.latent_shape)))
        draws.append(torch.zeros((pad, sde_steps, *self.latent_shape)))
        return torch.cat(noises), (torch.cat(draws) if sde_steps else None)

    def _eval_images(self, prompts: list[str], rows: range, model) -> tuple[torch.Tensor, torch.Tensor]:
        """Euler samples (``eval_steps``) of the held-out images ``rows``: latents and decoded images, on the CPU."""
        noise, _ = self._eval_noise(rows, 10**6)
        roll = self.policy.rollout(prompts, None, "euler", model=model, steps=self.config.eval_steps, noise=noise)
        return roll.latents.cpu(), self.policy.decode(roll.latents).cpu()

    def _eval_kl(self, prompts: list[str], rows: range, full_path: bool = False) -> list[float]:
        """KL(p_theta || p_ref) of each held-out image in nats, the exact Gaussian KL of each stochastic transition
        summed on the policy's own paths (noise ``noise_level``): of the rollout sampler's window (the first
        ``sde_steps`` of ``sample_steps``; the deterministic steps after it have no density and are not counted),
        or with ``full_path`` of one common sampler with noise at every step but the last (whose std is 0), the
        same for every method whatever its rollout window."""
        cfg, model, policy = self.config, self.unwrapped, self.policy
        n_sde = cfg.sample_steps - 1 if full_path else self.sde_steps
        sigmas = flow_sigmas(self.pipe.scheduler, cfg.sample_steps, self.device)[: n_sde + 1]
        noise, step_noise = self._eval_noise(rows, 10**6 + 1 + full_path, sde_steps=n_sde)
        was_training = model.training
        model.eval()
        out = []
        for start in range(0, len(prompts), cfg.rollout_batch_size):
            i = slice(start, start + cfg.rollout_batch_size)
            embeds, pooled = policy.encode(prompts[i])
            neg = policy.encode([""] * len(prompts[i]))

            def trained(x, s, embeds=embeds, pooled=pooled, neg=neg):
                return policy.cfg_velocity(model, x, s, embeds, pooled, *neg)

            def reference(x, s, embeds=embeds, pooled=pooled, neg=neg):
                with policy.reference_model() as ref:
                    return policy.cfg_velocity(ref, x, s, embeds, pooled, *neg)

            with self.accelerator.autocast():
                out += sde_path_kl(trained, reference, noise[i].to(self.device), sigmas, cfg.noise_level,
                                   step_noise=step_noise[i].to(self.device)).tolist()
        model.train(was_training)
        return out

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        """Write ``output_dir/checkpoints/iter-N`` atomically and point ``latest`` at it (rank 0)."""
        acc = self.accelerator
        acc.wait_for_everyone()
        gathered = self._gather_state()  # collectives on every rank first (FSDP all-gathers the shards)
        root = self.output_dir / "checkpoints"
        target = root / f"iter-{self.iteration:06d}"
        if acc.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            atomic_write_dir(target, lambda folder: self._write_checkpoint(folder, gathered))
            write_pointer(root, target.name)  # last: the pointer names only complete checkpoints
        acc.wait_for_everyone()
        return target

    def _gather_state(self) -> dict[str, Any]:
        """The trained weights (the LoRA, or every weight), the optimizer state (keyed by parameter names, one
        format for 1 process, DDP and FSDP) and the EMA, full, on rank 0's CPU; every rank must call it."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=self.config.use_lora)
        return {"weights": get_model_state_dict(self.transformer, options=options),
                "optimizer": get_optimizer_state_dict(self.transformer, self.optimizer, options=FULL_STATE),
                "ema": [_full(e) for e in self.policy.ema.shadow_params] if self.policy.ema is not None else None,
                "critic_buffer": gather_object([[{k: v.cpu() for k, v in e.items()} for e in self.critic_buffer]])}

    def _write_checkpoint(self, folder: Path, gathered: dict[str, Any]) -> None:
        """Rank 0 writes ``folder`` from ``_gather_state()``'s result (gathered on every rank beforehand)."""
        model = self.unwrapped
        if self.config.use_lora:
            # with the adapter's config (rank, alpha, targets): load_lora_weights then scales by alpha / r as trained
            StableDiffusion3Pipeline.save_lora_weights(
                folder, transformer_lora_layers=get_peft_model_state_dict(model, state_dict=gathered["weights"]),
                transformer_lora_adapter_metadata=model.peft_config["default"].to_dict())
        elif not self.sharded:
            model.save_pretrained(folder / "transformer")
        else:  # FSDP: the gathered full weights, in save_pretrained's layout
            model.save_config(folder / "transformer")
            save_file({k: v.contiguous() for k, v in gathered["weights"].items()},
                      folder / "transformer" / "diffusion_pytorch_model.safetensors")
        if self.critic is not None:
            self.accelerator.unwrap_model(self.critic).save_pretrained(folder / "critic")
        state = {
            "iteration": self.iteration, "counters": self.counters, "running": self.running.state_dict(),
            "optimizer": gathered["optimizer"],
            "critic_optimizer": self.critic_optimizer.state_dict() if self.critic_optimizer is not None else None,
            "torch_rng": torch.get_rng_state(), "config": asdict(self.config), "ema": gathered["ema"],
            "history": self.history, "eval_history": self.eval_history,
            "critic_buffer": gathered["critic_buffer"],  # one list per rank
        }
        save_state(folder / "trainer_state.pt", state)

    def load_checkpoint(self, folder: str | os.PathLike) -> None:
        """Restore weights, critic, optimisers, counters and running statistics from a checkpoint folder; a
        checkpoint of other settings is refused (``ACFlowConfig.changes_from``) unless ``allow_config_change``."""
        folder = Path(folder)
        state = load_state(folder / "trainer_state.pt")  # weights_only: a crafted pickle is refused
        changes = self.config.changes_from(state["config"])
        if changes and not self.config.allow_config_change:
            detail = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
            raise ValueError(f"The checkpoint {folder} was written with other settings ({detail}). Resume with the "
                             "checkpoint's settings, or set allow_config_change=true to continue with these.")
        model = self.unwrapped
        if self.config.use_lora:
            self.load_lora(folder)
        else:
            model.load_state_dict(load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
        if self.critic is not None:
            critic = self.accelerator.unwrap_model(self.critic)
            critic.load_state_dict(type(critic).from_pretrained(folder / "critic").state_dict())
        buffers = state.get("critic_buffer") or []
        if self.accelerator.process_index < len(buffers):  # this rank's replay buffer (critic='lookahead')
            self.critic_buffer.clear()
            self.critic_buffer.extend({k: v.to(self.device) for k, v in e.items()}
                                      for e in buffers[self.accelerator.process_index])
        saved = state["optimizer"]
        if all(isinstance(k, int) for k in saved["state"]):  # a checkpoint written before name-keyed states
            self.optimizer.load_state_dict(saved)
        else:  # every rank; under FSDP each keeps its shard
            set_optimizer_state_dict(self.transformer, self.optimizer, saved,
                                     options=StateDictOptions(full_state_dict=True))
        if self.critic_optimizer is not None and state["critic_optimizer"] is not None:
            self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        torch.set_rng_state(state["torch_rng"])
        if self.policy.ema is not None:
            self.policy.ema.shadow_params = [_like(e, q) for e, q in zip(state["ema"], self.policy.trainable())]
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
        if self._trackers is None:
            self._trackers = make_trackers(self.config, self.output_dir)
        prefix = "eval/" if filename.startswith("eval") else "train/"
        scalars = {prefix + k: v for k, v in metrics.items()
                   if isinstance(v, (int, float)) and math.isfinite(v) and k != "iteration"}
        for tracker in self._trackers:  # accelerate's trackers (TensorBoard flushes after each call)
            tracker.log(scalars, step=int(metrics.get("iteration", self.iteration)))

    # -- the loop ----------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Run ``config.iterations`` iterations (resuming if asked); returns the last evaluation."""
        cfg = self.config
        if cfg.resume and (latest := latest_checkpoint(self.output_dir)) is not None:
            self.load_checkpoint(latest)
            if self.is_main:
                print(f"[flowalign] resumed from {latest} at iteration {self.iteration}")
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            cfg.to_yaml(self.output_dir / "config.yaml")
            info = {**self.parameter_counts(), "distributed_type": str(self.accelerator.distributed_type.value),
                    "num_processes": self.accelerator.num_processes}
            (self.output_dir / "model_info.json").write_text(json.dumps(info, indent=1))
            if cfg.progress:
                print(f"[flowalign] transformer {info['transformer']:,} params, trainable {info['trainable']:,}; "
                      f"critic {info['critic']:,} ({100 * info['critic_fraction_of_transformer']:.1f}% of the transformer)")
        evaluate = bool(cfg.eval_prompts)
        result: dict[str, Any] = {}
        if evaluate and cfg.eval_at_start and not self.eval_history:
            result = self._record_evaluation()
        bar = tqdm(total=cfg.iterations, initial=self.iteration, desc=self.method.name, disable=not (cfg.progress and self.is_main))
        while self.iteration < cfg.iterations:
            metrics = self.step()
            self.history.append(metrics)
            self._log(metrics, "metrics.csv")
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}")
            last = self.iteration == cfg.iterations
            if evaluate and (last or (cfg.eval_every and self.iteration % cfg.eval_every == 0)):
                result = self._record_evaluation()
            if last or (cfg.checkpoint_every and self.iteration % cfg.checkpoint_every == 0):
                self.save_checkpoint()
        bar.close()
        for tracker in self._trackers or []:
            tracker.finish()
        self._trackers = None
        self.accelerator.wait_for_everyone()
        return result or (self.eval_history[-1] if self.eval_history else {})

    def _record_evaluation(self) -> dict[str, Any]:
        """Evaluate; the means go to ``eval_history`` / eval.csv / TensorBoard, the per-image values (for paired
        standard errors) to ``eval_per_image.jsonl``, one line per evaluation. Returns the full evaluation."""
        result = self.evaluate()
        means = {k: v for k, v in result.items() if k != "per_image"}
        self.eval_history.append(means)
        self._log(means, "eval.csv")
        if self.is_main:
            with open(self.output_dir / "eval_per_image.jsonl", "a") as f:
                f.write(json.dumps({"iteration": self.iteration, **result["per_image"]}) + "\n")
        return result
