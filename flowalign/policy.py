"""The model being aligned, as a sampler: :class:`Policy`.

One object answers every question the trainer, the methods, the probe, the demo and the benchmarks ask of the
model, so each is computed one way::

    embeds, pooled = policy.encode(prompts)                 # cached prompt embeddings (frozen text encoders)
    v   = policy.velocity(model, x, s, embeds, pooled)      # v_theta(x, s, c): the transformer at timestep 1000 s
    v_g = policy.cfg_velocity(model, x, s, embeds, pooled, *policy.encode([""] * n))   # v_u + g (v_c - v_u)
    with policy.reference_model() as ref: ...               # the frozen reference (LoRA disabled, or a copy)
    with policy.sampling_policy(): ...                      # the EMA swapped in (DiffusionNFT's option)
    roll   = policy.rollout(prompts, generator, "sde")      # Euler or SDE samples, trajectory and log-probs
    images = policy.decode(roll.latents)                    # [0, 1], as the stock pipeline's output_type="pt"

``model`` is any transformer with SD3's call signature: the policy's own (``policy.model``), the reference, a
DDP-wrapped copy for gradients, or an RLG transformer (the demo measures RLG's KL with it). Tests replace
``policy.velocity`` to put a known field under every caller.

The embedded tiny model is the default when no checkpoint is named (:func:`load_sd3_pipeline`,
:func:`default_guidance_scale`): that is the one place this module knows of the tiny world.

Example::

    from flowalign.policy import Policy, load_sd3_pipeline
    pipe = load_sd3_pipeline(None)                          # the embedded tiny base model
    policy = Policy(pipe, pipe.transformer, guidance_scale=2.0)
    roll = policy.rollout(["a red circle"] * 2, torch.Generator().manual_seed(0), "euler")
    images = policy.decode(roll.latents)
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from diffusers.training_utils import EMAModel

from flowalign.methods.base import Rollout
from flowalign.pipelines.guidance import classifier_free_guidance
from flowalign.sampling import draw_step_noise, flow_sigmas, sample_latents, sde_window
from flowalign.tiny import EVAL_CFG, MAX_SEQUENCE_LENGTH, encode_prompts, load_base_pipeline, load_pipeline

__all__ = ["Policy", "default_guidance_scale", "load_sd3_pipeline"]

SD3_GUIDANCE_SCALE = 4.5  # the SD3 / SD3.5 model cards' CFG
SD3_MAX_SEQUENCE_LENGTH = 256  # T5 tokens of SD3's training and of Flow-GRPO


def load_sd3_pipeline(pretrained: str | None, dtype: torch.dtype = torch.float32):
    """An SD3 pipeline from a folder or hub id (``pretrained``), or the embedded tiny base model for None."""
    return load_base_pipeline(dtype=dtype) if pretrained is None else load_pipeline(pretrained, dtype=dtype)


def default_guidance_scale(pretrained: str | None) -> float:
    """The CFG of the model's card: 2.0 for the embedded tiny model, 4.5 for SD3 / SD3.5."""
    return EVAL_CFG if pretrained is None else SD3_GUIDANCE_SCALE


class Policy:
    """The pipeline's frozen parts and the transformer being aligned, as one sampler.

    Args:
        pipe: the SD3 pipeline (text encoders, VAE, scheduler), already on ``device``.
        model: the trained transformer (its LoRA, or all of it); rollouts and the EMA use it.
        guidance_scale: CFG g of rollouts and of the guided velocity.
        reference: the frozen reference transformer; None = ``model`` with its adapters disabled (LoRA).
        device: where the latents live (default: the transformer's device).
        max_sequence_length: T5 tokens (default: 1 without T5, as the tiny model; else 256).
        sample_steps, noise_level, sde_steps_fraction: the rollout sampler's grid, SDE noise level a and the
            fraction of early steps that are stochastic.
        latent_shape: (C, H, W) of the latents (default: the transformer's sample size).
        rollout_batch_size, decode_batch_size: images per transformer call / VAE decode (results do not depend
            on them).
        prompt_cache_size: most prompts whose embeddings are kept (0 = none; least recently used evicted).
        offload_text_encoders: keep the text encoders on the CPU between encodes.
        keep_velocities: SDE rollouts also return the guided field that drew each step.
        autocast: a context manager factory for mixed precision (the trainer's ``accelerator.autocast``).
        compiled: a compiled forward of ``model`` (same weights) used for rollouts.
        ema_decay: > 0 keeps an EMA of the trainable parameters that draws the rollouts (:meth:`sampling_policy`).
    """

    def __init__(self, pipe: Any, model: torch.nn.Module, guidance_scale: float, *, reference: Any = None,
                 device: torch.device | str | None = None, max_sequence_length: int | None = None,
                 sample_steps: int = 16, noise_level: float = 0.7, sde_steps_fraction: float = 1.0,
                 latent_shape: tuple[int, int, int] | None = None, rollout_batch_size: int = 16,
                 decode_batch_size: int = 8, prompt_cache_size: int = 1024, offload_text_encoders: bool = False,
                 keep_velocities: bool = False, autocast: Callable[[], Any] = contextlib.nullcontext,
                 compiled: Any = None, ema_decay: float = 0.0):
        self.pipe, self.model, self.reference = pipe, model, reference
        self.guidance_scale = guidance_scale
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.text_encoders = [m for m in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3) if m is not None]
        no_t5 = pipe.text_encoder_3 is None
        self.max_sequence_length = max_sequence_length or (MAX_SEQUENCE_LENGTH if no_t5 else SD3_MAX_SEQUENCE_LENGTH)
        self.sample_steps, self.noise_level, self.sde_steps_fraction = sample_steps, noise_level, sde_steps_fraction
        if latent_shape is None:  # the transformer's own sample size
            latent_shape = (model.config.in_channels, model.config.sample_size, model.config.sample_size)
        self.latent_shape = tuple(latent_shape)
        self.rollout_batch_size, self.decode_batch_size = rollout_batch_size, decode_batch_size
        self.prompt_cache_size = prompt_cache_size
        self.offload_text_encoders = offload_text_encoders and self.device.type != "cpu"
        self.keep_velocities = keep_velocities
        self.autocast = autocast
        self.compiled = compiled
        self.ema_decay = ema_decay
        # diffusers' EMAModel at a constant decay d from the first update (min_decay = decay = d; its warm-up
        # (1 + n) / (10 + n) and its "no averaging before update_after_step" both disabled by update_after_step=-1)
        self.ema = (EMAModel(self.trainable(), decay=ema_decay, min_decay=ema_decay, update_after_step=-1)
                    if ema_decay > 0 else None)
        self._embed_cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.encoded_prompts = 0  # prompts run through the text encoders so far

    # -- prompts -----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt embeddings ``[N, L, D]`` and pooled embeddings ``[N, P]`` on the device.

        Each distinct prompt is encoded once and cached on the CPU; the cache holds at most ``prompt_cache_size``
        prompts (least recently used evicted). With ``offload_text_encoders`` the encoders come to the device only
        for the prompts missing from the cache."""
        cache = self._embed_cache
        missing = [p for p in dict.fromkeys(prompts) if p not in cache]
        if missing:
            with self._text_encoders_on_device():
                pe, pp = encode_prompts(self.pipe, missing, max_sequence_length=self.max_sequence_length,
                                        device=self.device)
            self.encoded_prompts += len(missing)
            for i, p in enumerate(missing):
                cache[p] = (pe[i].cpu(), pp[i].cpu())
        rows = []
        for p in prompts:
            cache.move_to_end(p)  # most recently used last
            rows.append(cache[p])
        embeds = torch.stack([r[0] for r in rows]).to(self.device)
        pooled = torch.stack([r[1] for r in rows]).to(self.device)
        while len(cache) > self.prompt_cache_size:
            cache.popitem(last=False)
        return embeds, pooled

    @contextlib.contextmanager
    def _text_encoders_on_device(self):
        """The text encoders on the device for the duration (they live on the CPU with ``offload_text_encoders``)."""
        if not self.offload_text_encoders:
            yield
            return
        for module in self.text_encoders:
            module.to(self.device)
        try:
            yield
        finally:
            for module in self.text_encoders:
                module.to("cpu")

    # -- the field ---------------------------------------------------------------------------------
    def velocity(self, model, x, sigma, embeds, pooled):
        """``v_theta(x, s, c)``; the transformer takes ``timestep = 1000 s``."""
        return model(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=embeds,
                     pooled_projections=pooled, return_dict=False)[0]

    def cfg_velocity(self, model, x, sigma, embeds, pooled, neg_embeds, neg_pooled, detach_uncond: bool = False):
        """Classifier-free guidance in one batched call: ``v_u + g (v_c - v_u)``; ``detach_uncond`` stops the
        gradient through the unconditional branch (the value is unchanged)."""
        v = self.velocity(model, torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([neg_embeds, embeds]),
                          torch.cat([neg_pooled, pooled]))
        v_u, v_c = v.chunk(2)
        if detach_uncond:
            v_u = v_u.detach()
        return classifier_free_guidance(v_u, v_c, self.guidance_scale)

    @contextlib.contextmanager
    def reference_model(self):
        """The frozen reference: the same transformer with LoRA disabled, or the full fine-tune's copy."""
        if self.reference is not None:
            yield self.reference
            return
        self.model.disable_adapters()
        try:
            yield self.model
        finally:
            self.model.enable_adapters()

    # -- the sampling EMA (DiffusionNFT) -------------------------------------------------------------
    def trainable(self) -> list[torch.nn.Parameter]:
        return [q for q in self.model.parameters() if q.requires_grad]

    def update_ema(self) -> None:
        """``ema <- d ema + (1 - d) theta`` after an update (no-op without an EMA)."""
        if self.ema is not None:
            self.ema.step(self.trainable())

    @contextlib.contextmanager
    def sampling_policy(self):
        """The policy that draws the rollouts: the trained one, or (``ema_decay > 0``) its EMA, swapped into the
        trainable parameters for the duration."""
        if self.ema is None:
            yield
            return
        params = self.trainable()
        self.ema.store(params)  # the trained values, kept aside
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)

    # -- sampling ----------------------------------------------------------------------------------
    def sde_steps(self, steps: int | None = None) -> int:
        """The stochastic (trainable) steps of a rollout of ``steps`` (default ``sample_steps``) steps."""
        return sde_window(self.sde_steps_fraction, steps or self.sample_steps)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1], exactly as the stock pipeline's ``output_type="pt"``, ``decode_batch_size``
        images per VAE call (a 1024 px decode holds GiBs of activations per image)."""
        vae = self.pipe.vae
        images = []
        for chunk in latents.split(self.decode_batch_size):
            x = chunk / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
            images.append((vae.decode(x.to(vae.dtype), return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1))
        return torch.cat(images)

    @torch.no_grad()
    def rollout(self, prompts: list[str], generator: torch.Generator | None, sampler: str, model=None,
                steps: int | None = None, noise: torch.Tensor | None = None) -> Rollout:
        """Sample one image per entry of ``prompts`` with the frozen current policy (or ``model``), from
        ``noise`` (drawn from ``generator`` when None; the SDE noise always comes from ``generator``).

        The transformer runs on ``rollout_batch_size`` images at a time; every random draw is made up front in the
        order of one batched call, so the result does not depend on the micro-batch size."""
        model = model if model is not None else self.model
        was_training = model.training
        model.eval()
        if self.compiled is not None and model is self.model:  # the same weights, compiled forward
            model = self.compiled
        embeds, pooled = self.encode(prompts)
        neg_embeds, neg_pooled = self.encode([""] * len(prompts))
        if noise is None:
            noise = torch.randn((len(prompts), *self.latent_shape), generator=generator)
        n_steps = steps or self.sample_steps
        window = self.sde_steps(n_steps)
        step_noise = draw_step_noise(noise.shape, window, generator) if sampler == "sde" else None
        sigmas = flow_sigmas(self.pipe.scheduler, n_steps, self.device)
        parts = []
        for rows in torch.arange(len(prompts)).split(self.rollout_batch_size):
            i = slice(int(rows[0]), int(rows[-1]) + 1)
            with self.autocast():
                parts.append(sample_latents(
                    lambda x, s, i=i: self.cfg_velocity(model, x, s, embeds[i], pooled[i], neg_embeds[i], neg_pooled[i]),
                    noise[i].to(self.device), sigmas, sampler=sampler, noise_level=self.noise_level, sde_steps=window,
                    step_noise=step_noise[i].to(self.device) if step_noise is not None else None,
                    return_trajectory=sampler == "sde", return_log_probs=sampler == "sde",
                    return_velocities=sampler == "sde" and self.keep_velocities,
                    log_prob_reduction="mean",  # per-dimension mean, the scale Flow-GRPO's clip range is set for
                ))
        getattr(model, "_orig_mod", model).train(was_training)

        def cat(name):
            values = [getattr(part, name) for part in parts]
            return torch.cat(values) if values[0] is not None else None

        return Rollout(prompts=list(prompts), latents=cat("latents").float(), sigmas=sigmas, embeds=embeds,
                       pooled=pooled, trajectory=cat("trajectory"), log_probs=cat("log_probs"),
                       velocities=cat("velocities"))
