"""Flow-matching samplers shared by RLG and AC-Flow: the Euler ODE step and the Flow-GRPO SDE step.

Conventions (diffusers flow matching, SD3 / SD3.5 / FLUX):

- The noise level ``sigma`` (written ``s`` in the comments) runs from 1 (pure noise) to 0 (data):
  ``x_s = (1 - s) * x0 + s * eps``.
- The transformer predicts the velocity ``v = eps - x0 = d x_s / d s``.
- **Timestep convention**: every function here takes the noise level ``sigma`` in [0, 1]. A diffusers
  flow transformer (``SD3Transformer2DModel``, ``FluxTransformer2DModel``) takes ``timestep = sigma * 1000``
  (``scheduler.config.num_train_timesteps * sigma``), so a ``velocity_fn`` wrapping one does::

      def velocity_fn(x, sigma):                       # sigma: [B] in [0, 1]
          return transformer(x, timestep=sigma * 1000, ...).sample

The functions are pure torch and avoid Python branching on tensor values or host syncs, so a step can be
wrapped in ``torch.compile``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift
from diffusers.utils.torch_utils import randn_tensor

__all__ = [
    "SamplerOutput",
    "draw_step_noise",
    "dynamic_shift",
    "euler_step",
    "flow_sigmas",
    "sample_latents",
    "sde_step",
    "sde_step_velocity",
    "sde_window",
]

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def sde_window(fraction: float, steps: int) -> int:
    """How many of ``steps`` sampling steps inject SDE noise (the first ones): ``fraction`` of them, at least 1."""
    return max(1, round(fraction * steps))


def _broadcast_sigma(sigma: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Return ``sigma`` as a float32 tensor that broadcasts against ``x`` ([B] -> [B, 1, 1, 1]).

    Example: ``_broadcast_sigma(torch.tensor([0.5, 0.2]), x).shape == (2, 1, 1, 1)`` for a 4-d ``x``.
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    if sigma.ndim == 0:
        return sigma
    if sigma.ndim != 1 or sigma.shape[0] != x.shape[0]:
        raise ValueError(
            f"sigma must be a scalar or a [B] tensor with B = {x.shape[0]} (the batch of x), got shape "
            f"{tuple(sigma.shape)}."
        )
    return sigma.view(-1, *([1] * (x.ndim - 1)))


def euler_step(
    x: torch.Tensor, v: torch.Tensor, sigma: float | torch.Tensor, sigma_next: float | torch.Tensor
) -> torch.Tensor:
    """One Euler step of the flow ODE, exactly ``FlowMatchEulerDiscreteScheduler.step``.

    ``x_next = x + (s_next - s) * v``; computed in float32 and cast back to ``v.dtype`` like diffusers.
    ``sigma`` / ``sigma_next`` are scalars or [B] tensors.

    Example: ``euler_step(x, v, 1.0, 0.75)`` equals ``x - 0.25 * v``.
    """
    s = _broadcast_sigma(sigma, x)
    s_next = _broadcast_sigma(sigma_next, x)
    dt = s_next - s  # < 0: we integrate from noise (s = 1) towards data (s = 0)
    return (x.float() + dt * v.float()).to(v.dtype)


def _sde_coefficients(
    x: torch.Tensor, sigma: float | torch.Tensor, sigma_next: float | torch.Tensor, noise_level: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(c_x, c_v, std)`` of one SDE step: ``mean = c_x x + c_v v``, ``x_next = mean + std z`` (float32)."""
    s = _broadcast_sigma(sigma, x)
    s_next = _broadcast_sigma(sigma_next, x)
    dt = s_next - s
    # sigma_t^2 = a^2 * s / (1 - s_c); at s = 1 Flow-GRPO uses the next grid point in the denominator.
    s_clamped = torch.where(s >= 1.0, s_next, s)
    one_minus = 1.0 - s_clamped
    a2 = noise_level**2
    sigma_t = noise_level * torch.sqrt(s / one_minus)
    # sigma_t^2 / (2 s) = a^2 / (2 (1 - s_c));  sigma_t^2 (1 - s) / (2 s) = a^2 (1 - s) / (2 (1 - s_c))
    c_x = 1.0 + a2 / (2.0 * one_minus) * dt
    c_v = (1.0 + a2 * (1.0 - s) / (2.0 * one_minus)) * dt
    return c_x, c_v, sigma_t * torch.sqrt(-dt)


def sde_step_velocity(
    x: torch.Tensor,
    x_next: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    noise_level: float = 0.7,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The velocity whose SDE-step mean lands exactly on the realised ``x_next``, and its noise scale.

    Inverts :func:`sde_step`'s mean ``mean = c_x x + c_v v``: ``u = (x_next - c_x x) / c_v``. On a stored
    SDE trajectory ``u = v + (std / c_v) z``: the sampling velocity plus the injected noise in velocity
    units. Also returns ``scale = |c_v| / std`` (float32, broadcastable), which turns a velocity error into
    units of the step's noise: ``scale^2 ||v - u||^2 / 2`` is ``-log p(x_next | x)`` per dimension up to a
    constant, so regressing onto ``u`` with that factor and reward weights is reward-weighted maximum
    likelihood of the transitions (AC-Flow's ``fm_states="trajectory"``). Needs ``sigma_next < sigma``
    and ``noise_level > 0`` for a finite scale (``a = 0``: the Euler step, scale ``inf``).

    Example: ``x1, _, mean, _ = sde_step(x, v, 0.8, 0.7, noise=zeros_like(x))`` then
    ``sde_step_velocity(x, mean, 0.8, 0.7)[0]`` equals ``v``.
    """
    c_x, c_v, std = _sde_coefficients(x, sigma, sigma_next, noise_level)
    if bool((c_v == 0).any()):
        raise ValueError("sde_step_velocity needs sigma_next < sigma (a step of non-zero length).")
    return (x_next.float() - c_x * x.float()) / c_v, c_v.abs() / std


def sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    noise_level: float = 0.7,
    generator: torch.Generator | list[torch.Generator] | None = None,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
    log_prob_reduction: Literal["sum", "mean"] = "sum",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of the Flow-GRPO SDE (arXiv 2505.05470) with the log-probability of the transition.

    The SDE has the same marginals as the flow ODE; with ``a = noise_level`` and ``dt = s_next - s < 0``::

        sigma_t = a * sqrt(s / (1 - s))          # at s = 1 (first step) 1 - s is replaced by 1 - s_next
        mean    = x * (1 + sigma_t^2 / (2 s) dt) + v * (1 + sigma_t^2 (1 - s) / (2 s)) dt
        x_next  = mean + sigma_t * sqrt(-dt) * z,   z ~ N(0, I)
        log p(x_next | x) = sum_d log N(x_next_d; mean_d, std^2),   std = sigma_t * sqrt(-dt)

    ``a = 0`` is exactly the Euler step. The coefficients are written without dividing by ``s``
    (``sigma_t^2 / (2 s) = a^2 / (2 (1 - s_c))`` with ``s_c`` the clamped ``s``), so ``s = 0`` gives no NaN.

    Args:
        x: current latents x_s, [B, ...].
        v: velocity prediction at (x, s) (CFG already applied), same shape.
        sigma, sigma_next: noise levels of this and the next grid point, scalars or [B] tensors.
        noise_level: ``a`` above; Flow-GRPO uses 0.7.
        generator: torch generator(s) for the Gaussian draw (ignored when ``noise`` or ``prev_sample`` is given).
        noise: optional pre-drawn ``z`` (same shape as ``x``).
        prev_sample: if given, no sample is drawn: the log-probability of this ``x_next`` is computed instead
            (what the Flow-GRPO ratio needs when re-evaluating stored trajectories under the current policy).
        log_prob_reduction: ``"sum"`` (the true log-density, default) or ``"mean"`` over the non-batch
            dimensions (what the Flow-GRPO reference code does; it divides every log-ratio by the dimension).

    Returns:
        ``(x_next, log_prob, mean, std)``: ``x_next`` in ``x.dtype``; ``log_prob`` [B] float32 (0 where
        ``std = 0``, a deterministic step); ``mean`` float32 like ``x``; ``std`` float32 broadcastable to ``x``
        (the standard deviation of ``x_next``, ``sigma_t * sqrt(-dt)``).

    Example: ``x1, logp, mean, std = sde_step(x, v, 1.0, 0.9, noise_level=0.7, generator=g)``.
    """
    if log_prob_reduction not in ("sum", "mean"):
        raise ValueError(f"log_prob_reduction must be 'sum' or 'mean', got {log_prob_reduction!r}.")
    # bf16 can overflow in the mean below: compute in float32 (as Flow-GRPO does).
    c_x, c_v, std = _sde_coefficients(x, sigma, sigma_next, noise_level)
    mean = c_x * x.float() + c_v * v.float()

    if prev_sample is None:
        if noise is None:
            noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        x_next = (mean + std * noise.float()).to(x.dtype)
    else:
        if prev_sample.shape != x.shape:
            raise ValueError(f"prev_sample must have the shape of x {tuple(x.shape)}, got {tuple(prev_sample.shape)}.")
        x_next = prev_sample
    # Gaussian log-density of the (dtype-cast) sample, so recomputing it from prev_sample gives the same number.
    # std = 0 (a = 0 or s = 0) has no density: the log-prob is defined as 0 there (ratio exp(0) = 1).
    positive = std > 0
    safe_std = torch.where(positive, std, torch.ones_like(std))
    diff = x_next.detach().float() - mean
    log_density = -(diff**2) / (2.0 * safe_std**2) - torch.log(safe_std) - _LOG_SQRT_2PI
    log_density = torch.where(positive, log_density, torch.zeros_like(log_density))
    dims = tuple(range(1, x.ndim))
    log_prob = log_density.sum(dim=dims) if log_prob_reduction == "sum" else log_density.mean(dim=dims)
    return x_next, log_prob, mean, std


def dynamic_shift(scheduler: FlowMatchEulerDiscreteScheduler, image_seq_len: int) -> float:
    """The shift ``mu`` of a dynamically shifted scheduler for ``image_seq_len`` latent patches, as the stock SD3
    pipeline computes it (linear in the sequence length between the scheduler's base and max shifts)."""
    return calculate_shift(
        image_seq_len,
        scheduler.config.get("base_image_seq_len", 256),
        scheduler.config.get("max_image_seq_len", 4096),
        scheduler.config.get("base_shift", 0.5),
        scheduler.config.get("max_shift", 1.16),
    )


def flow_sigmas(
    scheduler: FlowMatchEulerDiscreteScheduler,
    num_inference_steps: int,
    device: torch.device | str | None = None,
    mu: float | None = None,
    image_seq_len: int | None = None,
) -> torch.Tensor:
    """The sigma grid (length ``N + 1``, from ~1 down to exactly 0) the stock SD3 pipeline samples with.

    Calls ``set_timesteps`` on a *copy* of ``scheduler`` (the caller's scheduler is not touched), so the
    scheduler's ``shift`` (3.0 for SD3), dynamic shifting, Karras/exponential/beta options all apply exactly as
    in ``StableDiffusion3Pipeline``. With ``use_dynamic_shifting`` pass ``mu`` or ``image_seq_len``
    (``(H_latent / patch) * (W_latent / patch)``) as the pipeline does.

    Example: ``flow_sigmas(FlowMatchEulerDiscreteScheduler(shift=3.0), 4)`` ->
    ``tensor([1.0000, 0.8577, 0.6022, 0.0089, 0.0000])`` (diffusers spaces the grid linearly in timestep
    between sigma_max and the shifted sigma_min, then shifts it); the transformer timesteps are
    ``sigmas[:-1] * 1000``.
    """
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}.")
    scheduler = copy.deepcopy(scheduler)  # keeps the shift (also one set with set_shift) and every option
    kwargs = {}
    if scheduler.config.get("use_dynamic_shifting", False):
        if mu is None:
            if image_seq_len is None:
                raise ValueError(
                    "This scheduler uses dynamic shifting: pass mu=... or image_seq_len=... "
                    "((latent_height // patch_size) * (latent_width // patch_size)) to flow_sigmas."
                )
            mu = dynamic_shift(scheduler, image_seq_len)
        kwargs["mu"] = mu
    elif mu is not None:
        kwargs["mu"] = mu
    scheduler.set_timesteps(num_inference_steps, device=device, **kwargs)
    return scheduler.sigmas.to(device)


@dataclass
class SamplerOutput:
    """Result of :func:`sample_latents`.

    Attributes:
        latents: final latents x_0, [B, ...].
        trajectory: ``[B, N + 1, ...]`` states x at every grid point (index 0 = start), or ``None``.
        log_probs: ``[B, N]`` log p(x_{k+1} | x_k) of every SDE step, or ``None``.
        sigmas: the grid used, [N + 1].
        velocities: ``[B, N, ...]`` the velocity used at every step (``return_velocities``), or ``None``.
    """

    latents: torch.Tensor
    trajectory: torch.Tensor | None
    log_probs: torch.Tensor | None
    sigmas: torch.Tensor
    velocities: torch.Tensor | None = None


def sample_latents(
    velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    latents: torch.Tensor,
    sigmas: torch.Tensor,
    sampler: Literal["euler", "sde"] = "euler",
    noise_level: float = 0.7,
    generator: torch.Generator | list[torch.Generator] | None = None,
    return_trajectory: bool = False,
    return_log_probs: bool = False,
    log_prob_reduction: Literal["sum", "mean"] = "sum",
    return_velocities: bool = False,
    sde_steps: int | None = None,
    step_noise: torch.Tensor | None = None,
) -> SamplerOutput:
    """Integrate from ``latents`` (at ``sigmas[0]``) to ``sigmas[-1]`` with Euler or the Flow-GRPO SDE.

    ``velocity_fn(x, sigma_batch) -> v`` gets ``sigma_batch`` [B] in [0, 1] (multiply by 1000 for a diffusers
    transformer) and must return the final velocity (CFG / RLG mixing already applied by the caller).

    ``sde_steps``: with ``sampler="sde"``, only the first ``sde_steps`` steps (the high-noise ones that lay out
    the image) inject noise; the rest are Euler steps (a = 0: std 0, log-prob 0). A fixed SDE window at the
    start (MixGRPO, arXiv 2507.21802, slides one along the trajectory). None = every step.

    ``step_noise``: the SDE's Gaussian draws ``z`` given up front, ``[B, K, ...]`` for the first ``K`` steps (the
    noisy ones; :func:`draw_step_noise` draws them in the order ``generator`` would), instead of ``generator``:
    a batch sampled in micro-batches, each with its rows of ``step_noise``, equals the batch sampled at once.

    Example::

        sigmas = flow_sigmas(pipe.scheduler, 20, device)
        out = sample_latents(lambda x, s: transformer(x, timestep=s * 1000, ...).sample, noise, sigmas)
        image_latents = out.latents
    """
    if sampler not in ("euler", "sde"):
        raise ValueError(f"sampler must be 'euler' or 'sde', got {sampler!r}.")
    if return_log_probs and sampler != "sde":
        raise ValueError("return_log_probs=True needs sampler='sde': the Euler ODE step has no transition density.")
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise ValueError(f"sigmas must be a 1-d grid with at least 2 points, got shape {tuple(sigmas.shape)}.")
    if sde_steps is not None and sde_steps < 0:
        raise ValueError(f"sde_steps must be >= 0 or None (every step), got {sde_steps}.")
    batch = latents.shape[0]
    x = latents
    trajectory = [x] if return_trajectory else None
    log_probs = [] if return_log_probs else None
    velocities = [] if return_velocities else None
    for k in range(sigmas.shape[0] - 1):
        sigma, sigma_next = sigmas[k], sigmas[k + 1]
        v = velocity_fn(x, sigma.expand(batch))
        if velocities is not None:
            velocities.append(v.float())
        if sampler == "euler":
            x = euler_step(x, v, sigma, sigma_next)
        else:
            # a = 0 after the SDE window: the step is Euler's (std 0, log-prob 0)
            a = noise_level if sde_steps is None or k < sde_steps else 0.0
            z = None
            if step_noise is not None:  # pre-drawn; past its steps a = 0 must hold (std 0: z is irrelevant)
                if k >= step_noise.shape[1] and a > 0:
                    raise ValueError(f"step_noise covers {step_noise.shape[1]} steps, but step {k} is noisy.")
                z = step_noise[:, k] if k < step_noise.shape[1] else torch.zeros_like(x, dtype=torch.float32)
            x, log_prob, _, _ = sde_step(
                x, v, sigma, sigma_next, noise_level=a, generator=generator, noise=z,
                log_prob_reduction=log_prob_reduction,
            )
            if log_probs is not None:
                log_probs.append(log_prob)
        if trajectory is not None:
            trajectory.append(x)
    return SamplerOutput(
        latents=x,
        trajectory=torch.stack(trajectory, dim=1) if trajectory is not None else None,
        log_probs=torch.stack(log_probs, dim=1) if log_probs is not None else None,
        sigmas=sigmas,
        velocities=torch.stack(velocities, dim=1) if velocities is not None else None,
    )


def draw_step_noise(shape: Sequence[int], steps: int, generator: torch.Generator | None) -> torch.Tensor:
    """The SDE sampler's Gaussian draws for ``steps`` steps of a batch of ``shape``, ``[B, steps, ...]`` float32 on
    the CPU, in the order :func:`sample_latents` draws them from a CPU ``generator`` (step by step, the whole batch
    each step), so ``sample_latents(..., step_noise=draw_step_noise(x.shape, K, g))`` equals
    ``sample_latents(..., generator=g)`` on its first ``K`` (noisy) steps, in any micro-batching.

    Example: ``z = draw_step_noise(noise.shape, 4, torch.Generator().manual_seed(0))``.
    """
    draws = [torch.randn(tuple(shape), generator=generator, dtype=torch.float32) for _ in range(steps)]
    return torch.stack(draws, dim=1) if draws else torch.zeros((shape[0], 0, *shape[1:]))
