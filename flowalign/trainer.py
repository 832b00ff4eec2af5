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

import contextlib
import copy
import csv
import json
import math
import os
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from diffusers import StableDiffusion3Pipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from flowalign import objectives as O
from flowalign import rewards as R
from flowalign.checkpoints import atomic_write_dir, latest_checkpoint, load_state, save_state, write_pointer
from flowalign.config import ACFlowConfig
from flowalign.critic import Critic
from flowalign.eval import diversity, eval_features, sde_path_kl
from flowalign.prompts import PromptSource, load_prompts, read_prompt_file
from flowalign.rewards import NonFiniteRewardError
from flowalign.sampling import flow_sigmas, sample_latents, sde_step, sde_step_velocity
from flowalign.tiny import EVAL_CFG, MAX_SEQUENCE_LENGTH, encode_prompts, load_base_pipeline, load_pipeline

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
            critic = Critic(in_channels=latent_shape[0], pooled_dim=tcfg.pooled_projection_dim,
                            channels=tuple(cfg.critic_channels), hidden_dim=cfg.critic_hidden_dim)
            critic_opt = torch.optim.AdamW(critic.parameters(), lr=cfg.critic_lr)
            self.critic, self.critic_optimizer = acc.prepare(critic, critic_opt)
        self.transformer, self.optimizer = acc.prepare(transformer, optimizer)
        # nft: the sampling policy, an EMA of the trained parameters (None: the trained policy itself)
        self.ema = ([q.detach().clone() for q in self._trainable()]
                    if cfg.algorithm == "nft" and cfg.nft_ema_decay > 0 else None)
        self.latent_shape = latent_shape
        self.sde_steps = cfg.sde_steps(cfg.sample_steps)  # the rollouts' noisy (trainable) steps

        # Reward(s).
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

    def cfg_velocity(self, model, x, sigma, embeds, pooled, neg_embeds, neg_pooled, detach_uncond: bool = False):
        """Classifier-free guidance in one batched call: ``v_u + g (v_c - v_u)``; ``detach_uncond`` stops the
        gradient through the unconditional branch (the value is unchanged)."""
        g = self.guidance_scale
        v = self.velocity(model, torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([neg_embeds, embeds]),
                          torch.cat([neg_pooled, pooled]))
        v_u, v_c = v.chunk(2)
        if detach_uncond:
            v_u = v_u.detach()
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
        with self.sampling_policy():
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
        if self.ema is not None:  # nft: the sampling policy follows the trained one, ema <- d ema + (1 - d) theta
            with torch.no_grad():
                for e, q in zip(self.ema, self._trainable()):
                    e.mul_(cfg.nft_ema_decay).add_(q.detach(), alpha=1.0 - cfg.nft_ema_decay)
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
        """AC-Flow / ORW-CFM-W2 / DiffusionNFT / AWM: (critic,) weighted regression + W2 on the policy's own samples.

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
                return self.cfg_velocity(model, x_s, sigma, embeds[idx], pooled[idx], neg_embeds[idx], neg_pooled[idx],
                                         detach_uncond=cfg.detach_uncond and model is self.transformer)
            return self.velocity(model, x_s, sigma, embeds[idx], pooled[idx])

        if cfg.algorithm == "orw":  # ORW-CFM-W2: rewards normalised over the batch (all ranks), no critic
            targets = ((all_rewards - all_rewards.mean()) / (all_rewards.std(unbiased=False) + 1e-6))[mine]
        elif cfg.algorithm in ("nft", "awm"):  # group advantages, clipped (the implicit policies' / AWM's scale)
            targets = O.grpo_advantages(all_rewards, all_groups)[mine].clamp(-cfg.advantage_clip, cfg.advantage_clip)
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

        # The sampling policy at the same states, before any update: nft's v_old, awm's old log-probabilities.
        if cfg.algorithm in ("nft", "awm"):
            with torch.no_grad(), acc.autocast(), self.sampling_policy():
                for b in batches:
                    b["v_old"] = field(self.unwrapped, b["x_s"], b["sigma"], b["idx"]).float()  # nft's v_old
                    if cfg.algorithm == "awm":  # awm's log p_old = -||v_old - u||^2
                        b["old_log_prob"] = -O.per_sample_mse(b["v_old"], b["target"])

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
                if cfg.algorithm in ("nft", "awm"):
                    loss, m = self._forward_process_loss(v, b, v_ref)
                else:
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
            for k in m:
                if k in ("fm_loss", "w2", "ess", "clip_fraction"):
                    add(k, m[k])
            timing["time_actor"] += time.perf_counter() - ta
        return {**{k: sums[k] / counts[k] for k in sums}, **timing}

    def _forward_process_loss(self, v, b, v_ref) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """DiffusionNFT or AWM on freshly noised states, plus ``w2_weight ||v - v_ref||^2`` (the anchor)."""
        cfg = self.config
        if cfg.algorithm == "nft":  # r = clip(A)/(2c) + 1/2; implicit policies v+- around the sampling policy
            loss = O.nft_loss(v, b["v_old"], b["target"], O.nft_optimality(b["adv"], cfg.advantage_clip),
                              beta=cfg.nft_beta)
            metrics = {"fm_loss": loss.detach()}
        else:  # awm: advantage-weighted matching with a ratio clip
            loss, frac = O.awm_loss(v, b["target"], b["adv"], old_log_prob=b["old_log_prob"],
                                    clip_range=cfg.awm_clip_range)
            metrics = {"fm_loss": loss.detach(), "clip_fraction": frac}
        w2 = O.w2_regulariser(v, v_ref) if v_ref is not None else torch.zeros((), device=v.device)
        metrics["w2"] = w2.detach()
        return (loss + cfg.w2_weight * w2 if cfg.w2_weight else loss), metrics

    def _trainable(self) -> list[torch.nn.Parameter]:
        return [q for q in self.unwrapped.parameters() if q.requires_grad]

    @contextlib.contextmanager
    def sampling_policy(self):
        """The policy that draws the rollouts: the trained one, or (nft with ``nft_ema_decay > 0``) its EMA,
        swapped into the trainable parameters for the duration."""
        if self.ema is None:
            yield
            return
        params = self._trainable()
        with torch.no_grad():
            saved = [q.detach().clone() for q in params]
            for q, e in zip(params, self.ema):
                q.copy_(e)
        try:
            yield
        finally:
            with torch.no_grad():
                for q, t in zip(params, saved):
                    q.copy_(t)

    def _draw_states(self, roll, idx: torch.Tensor, gen: torch.Generator) -> dict[str, Any]:
        """The states of one minibatch ``idx`` where the critic and the actor are evaluated, with the regression
        target: a random SDE step of each rollout (``fm_states="trajectory"``) or freshly noised samples."""
        cfg = self.config
        if cfg.fm_states == "trajectory" and cfg.algorithm == "acflow":  # a random step k: x_k -> x_{k+1}
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
                    v = self.cfg_velocity(self.transformer, x, s, embeds[idx], pooled[idx], neg_embeds[idx],
                                          neg_pooled[idx], detach_uncond=cfg.detach_uncond)
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
        """KL(p_theta || p_ref) of each held-out image in nats: the rollout sampler's stochastic transitions (the
        first ``sde_steps`` of ``sample_steps``, noise ``noise_level``) on the policy's own paths, the exact
        Gaussian KL of each transition summed. The deterministic steps after the window have no density and
        are not counted (only the window's grid is sampled)."""
        cfg, model = self.config, self.unwrapped
        sigmas = flow_sigmas(self.pipe.scheduler, cfg.sample_steps, self.device)[: self.sde_steps + 1]
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
            StableDiffusion3Pipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(model))
        else:
            model.save_pretrained(folder / "transformer")
        if self.critic is not None:
            self.accelerator.unwrap_model(self.critic).save_pretrained(folder / "critic")
        state = {
            "iteration": self.iteration, "counters": self.counters, "running": self.running.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "critic_optimizer": self.critic_optimizer.state_dict() if self.critic_optimizer is not None else None,
            "torch_rng": torch.get_rng_state(), "config": asdict(self.config), "ema": self.ema,
            "history": self.history, "eval_history": self.eval_history,
        }
        save_state(folder / "trainer_state.pt", state)

    def load_checkpoint(self, folder: str | os.PathLike) -> None:
        """Restore weights, critic, optimisers, counters and running statistics from a checkpoint folder."""
        folder = Path(folder)
        model = self.unwrapped
        if self.config.use_lora:
            state_dict = StableDiffusion3Pipeline.lora_state_dict(folder)
            state_dict = {k.removeprefix("transformer."): v for k, v in state_dict.items() if k.startswith("transformer.")}
            result = set_peft_model_state_dict(model, state_dict)
            if getattr(result, "unexpected_keys", None):
                raise ValueError(f"Checkpoint {folder} has LoRA keys the model does not: {result.unexpected_keys[:5]}")
        else:
            model.load_state_dict(load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
        if self.critic is not None:
            loaded = Critic.from_pretrained(folder / "critic")
            self.accelerator.unwrap_model(self.critic).load_state_dict(loaded.state_dict())
        state = load_state(folder / "trainer_state.pt")  # weights_only: a crafted pickle is refused
        self.optimizer.load_state_dict(state["optimizer"])
        if self.critic_optimizer is not None and state["critic_optimizer"] is not None:
            self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        torch.set_rng_state(state["torch_rng"])
        if self.ema is not None:
            self.ema = [e.to(self.device) for e in state["ema"]]
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
            self._tb = SummaryWriter(str(self.output_dir / "tensorboard"))
        prefix = "eval/" if filename.startswith("eval") else "train/"
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and math.isfinite(v) and k != "iteration":
                self._tb.add_scalar(prefix + k, v, metrics.get("iteration", self.iteration))
        self._tb.flush()

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
