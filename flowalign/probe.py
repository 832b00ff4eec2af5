"""``flowalign probe-reward``: is a reward learnable at a given batch? The split-half policy-gradient cosine.

Sample a batch of N SDE rollouts of the current model (the embedded tiny base by default, ``--pretrained``
or ``--lora`` otherwise), G images per prompt, with group z-scored advantages
(:func:`flowalign.objectives.grpo_advantages`). Split every prompt group into two halves (the first G/2
images and the rest) and compute each half's REINFORCE gradient over the trainable (LoRA) parameters::

    g_h = sum_{i in h} A_i * grad_theta sum_k log p_theta(x_{k+1} | x_k)      (the SDE steps k of image i)

``cos(g_1, g_2)`` measures how much of a half-batch gradient is signal: with ``n`` images per half and a
per-image signal-to-noise ratio ``rho`` (signal variance over noise variance of one image's gradient),
``E[g_h] = n mu`` and the noise has variance ``n s^2``, so ``cos ~ rho n / (1 + rho n)``. Inverting,
``rho = cos / ((1 - cos) n)``, and a cosine ``c*`` (default 0.5) needs ``n* = c* / ((1 - c*) rho)`` images per
half, a batch of ``2 c* / ((1 - c*) rho)``. A reward whose batch is far beyond the training budget cannot be
learned there whatever the method (design notes: ~0.06 at 64 images for the shapes verifier).

The rollouts, rewards and guided velocities are the trainer's own (an :class:`flowalign.trainer.ACFlowTrainer`
with ``algorithm="grpo"``: ``rollout``, ``score``, ``cfg_velocity``); the log-probabilities are recomputed with
gradients by :func:`flowalign.sampling.sde_step` on the stored trajectories.

``--critic latent|lookahead`` asks whether AC-Flow's critic buys signal. The trainer is then an ``acflow`` one with
that critic; the critic is fitted by the method's own code (``ACFlow.fit_lookahead`` on its replay buffer, or the
latent critic's per-minibatch ``critic_step``) on ``--critic-fit-batches`` fresh base-model batches, then frozen.
On the probe's held-out batches it reports the critic's explained variance per window step,
``EV_k = 1 - Var(r~ - V_k) / Var(r~)`` with ``r~`` the shaped reward, and the split-half cosine of the per-step
gradient::

    g_h = sum_{i in h} sum_k A_{i,k} grad_theta log p_theta(x_{k+1} | x_k)
    A_{i,k} = step_advantages(V, r~, lam)      mc: lam = 1, A_k = r~ - V_k;   td: lam = 0, A_k = V_{k+1} - V_k (V_K = r~)

beside today's per-image advantage (``A_{i,k} = A_i`` for every k), each with its implied batch.

Example::

    flowalign probe-reward --reward shapes --batch 64 --repeats 3
    flowalign probe-reward --reward jpeg_compressibility --batch 64 --config samples/configs/acflow_shapes.yaml
    flowalign probe-reward --reward jpeg_compressibility --config samples/configs/frontier_jpeg.yaml --critic lookahead

    from flowalign.config import ACFlowConfig
    from flowalign.probe import probe_reward
    result = probe_reward(ACFlowConfig(reward="shapes", algorithm="grpo"), batch=64, repeats=3)
    result["cosine_mean"], result["implied_batch"]
    critic = probe_reward(ACFlowConfig(reward="shapes"), batch=64, critic="lookahead", critic_fit_batches=4)
    critic["critic_ev_k"], critic["advantages"]["td"]["implied_batch"]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from flowalign import objectives as O
from flowalign.checkpoints import resolve_checkpoint, strict_json, write_json
from flowalign.config import ACFlowConfig, parse_override
from flowalign.eval import mean_se
from flowalign.methods.acflow import LAMBDA, lookahead_predictions, lookahead_rewards
from flowalign.methods.base import Metrics, Rewards
from flowalign.methods.flow_matching import draw_state_batches
from flowalign.sampling import sde_step
from flowalign.seeding import generator
from flowalign.trainer import ACFlowTrainer

__all__ = ["add_arguments", "fit_critic", "half_gradients", "implied_batch", "probe_reward", "run",
           "split_half_cosine", "step_half_gradients"]

CRITICS = ("none", "latent", "lookahead")
ESTIMATORS = ("mc", "td")  # the per-step advantages probed with a critic (lam = LAMBDA[estimator])
FIT_BATCH_OFFSET = 1000  # critic fit batch j draws the prompts and noise of probe batch 1000 + j (held-out: 0 .. repeats-1)


# ----------------------------------------------------------------------------------------------------------
# Arithmetic (pure; tested on constructed gradients)
# ----------------------------------------------------------------------------------------------------------
def split_half_cosine(g1: torch.Tensor, g2: torch.Tensor) -> float:
    """``<g1, g2> / (|g1| |g2|)`` in float64; NaN when either gradient is zero (no signal to compare).

    Example: ``split_half_cosine(torch.tensor([1., 0.]), torch.tensor([0., 2.]))`` -> ``0.0``.
    """
    a, b = g1.detach().double().flatten(), g2.detach().double().flatten()
    if a.shape != b.shape:
        raise ValueError(f"split_half_cosine needs gradients of the same size, got {a.numel()} and {b.numel()}.")
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return float("nan")
    return float((a @ b) / (na * nb))


def implied_batch(cosine: float, half_size: int, target: float = 0.5) -> tuple[float, float]:
    """``(rho, batch)``: the per-image signal-to-noise ratio and the batch whose split-half cosine is ``target``.

    ``cos = rho n / (1 + rho n)`` with ``n = half_size`` images per half gives ``rho = cos / ((1 - cos) n)``; the
    target ``c*`` needs ``n* = c* / ((1 - c*) rho)`` per half, a batch of ``2 n*``. A cosine <= 0 has no
    measurable signal: ``rho = 0`` (negative values are clipped) and the batch is ``inf``; NaN stays NaN.

    Example: ``implied_batch(0.2, 32)`` -> ``rho = 0.2 / (0.8 * 32) = 0.0078125``, batch ``2 * 0.5 / (0.5 * rho) = 256``.
    """
    if half_size < 1:
        raise ValueError(f"half_size must be >= 1 image, got {half_size}.")
    if not 0.0 < target < 1.0:
        raise ValueError(f"the target cosine must be in (0, 1), got {target}.")
    if math.isnan(cosine):
        return float("nan"), float("nan")
    if cosine >= 1.0:
        return float("inf"), 0.0
    rho = max(cosine, 0.0) / ((1.0 - cosine) * half_size)  # rho = cos / ((1 - cos) n)
    batch = 2.0 * target / ((1.0 - target) * rho) if rho > 0 else float("inf")  # 2 c* / ((1 - c*) rho)
    return rho, batch


# ----------------------------------------------------------------------------------------------------------
# Gradients on the trainer's rollouts
# ----------------------------------------------------------------------------------------------------------
def half_gradients(trainer, roll: dict, advantages: torch.Tensor, halves: list[torch.Tensor],
                   minibatch: int = 32) -> list[torch.Tensor]:
    """For each index set ``h``: ``grad_theta sum_{i in h} A_i sum_k log p_theta(x_{k+1} | x_k)``, flattened.

    ``k`` runs over the rollout's SDE steps (``trainer.sde_steps``; the Euler steps after them have no density),
    ``log p`` is the exact Gaussian log-density (``sde_step(..., prev_sample=x_{k+1})``, summed over dimensions)
    of the stored transition under the guided field ``trainer.policy.cfg_velocity``; theta = the trainable parameters.
    ``advantages`` [B] (one per image) or [B, K] (one per SDE step, :func:`step_half_gradients`).

    Example: ``g1, g2 = half_gradients(trainer, roll, adv, [first_half, second_half])``.
    """
    return step_half_gradients(trainer, roll, [advantages], halves, minibatch=minibatch)[0]


def step_half_gradients(trainer, roll: dict, tables: list[torch.Tensor], halves: list[torch.Tensor],
                        minibatch: int = 32) -> list[list[torch.Tensor]]:
    """For each advantage table ``A`` and each index set ``h``:
    ``grad_theta sum_{i in h} sum_k A_{i,k} log p_theta(x_{k+1} | x_k)``, flattened; ``out[table][half]``.

    A table is [B, K] (per SDE step k, e.g. :func:`flowalign.objectives.step_advantages`) or [B] (per image:
    ``A_{i,k} = A_i`` for every k, today's REINFORCE gradient). One forward per (half, step, chunk) serves every
    table (the objective is linear in A; one backward each).

    Example: ``[[g1, g2], [s1, s2]] = step_half_gradients(trainer, roll, [adv, step_adv], [first, second])``.
    """
    cfg = trainer.config
    model = trainer.transformer
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("The model has no trainable parameters (use_lora=False and a frozen transformer?).")
    traj, sigmas = roll.trajectory, roll.sigmas
    embeds, pooled = roll.embeds, roll.pooled
    B, K = traj.shape[0], trainer.sde_steps
    columns = []
    for a in tables:  # every table as [B, K]: a per-image advantage is the same at every step
        if a.shape not in ((B,), (B, K)):
            raise ValueError(f"An advantage table must be [B={B}] (per image) or [B={B}, K={K}] (per SDE step), "
                             f"got shape {tuple(a.shape)}.")
        columns.append(a.detach().float().reshape(B, -1).expand(B, K))
    neg_embeds, neg_pooled = trainer.policy.encode([""] * B)
    was_training = model.training
    model.eval()  # the rollout's own field (no dropout), as trainer.policy.rollout samples it
    grads: list[list[torch.Tensor]] = [[] for _ in tables]
    try:
        for idx in halves:
            totals = [[torch.zeros_like(p, dtype=torch.float32) for p in params] for _ in tables]
            for k in range(K):
                for chunk in idx.split(minibatch):
                    x, x_next = traj[chunk, k], traj[chunk, k + 1]
                    with trainer.accelerator.autocast():
                        v = trainer.policy.cfg_velocity(model, x, sigmas[k].expand(chunk.numel()), embeds[chunk],
                                                        pooled[chunk], neg_embeds[chunk], neg_pooled[chunk])
                    _, log_prob, _, _ = sde_step(x, v, sigmas[k], sigmas[k + 1], noise_level=cfg.noise_level,
                                                 prev_sample=x_next, log_prob_reduction="sum")
                    for t, (total, a) in enumerate(zip(totals, columns)):
                        objective = (a[chunk, k] * log_prob).sum()  # sum_i A_{i,k} log p(x_{k+1} | x_k)
                        for acc, g in zip(total, torch.autograd.grad(objective, params, allow_unused=True,
                                                                     retain_graph=t < len(tables) - 1)):
                            if g is not None:
                                acc += g.float()
            for out, total in zip(grads, totals):
                out.append(torch.cat([t.flatten() for t in total]))
    finally:
        model.train(was_training)
    return grads


# ----------------------------------------------------------------------------------------------------------
# The critic (--critic): fitted by the method's own code, then scored on held-out batches
# ----------------------------------------------------------------------------------------------------------
def _batch(trainer, index: int, g: int) -> tuple[Any, torch.Tensor, Rewards, list[str]]:
    """Probe batch ``index``: its SDE rollout of the prompts of iteration ``index`` (G each), noise
    ``generator(seed, index)``, the raw rewards [B] and the :class:`Rewards` of one process."""
    cfg = trainer.config
    prompts = [p for p in trainer.iteration_prompts(index) for _ in range(g)]
    roll = trainer.policy.rollout(prompts, generator(cfg.seed, index), "sde")
    rewards = trainer.score(trainer.policy.decode(roll.latents), prompts)
    group = torch.arange(len(prompts) // g, device=rewards.device).repeat_interleave(g)
    return roll, rewards, Rewards(local=rewards, all=rewards, groups=group, mine=slice(0, rewards.shape[0])), prompts


def _shaped_lookahead(trainer, roll, rewards: Rewards) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z, x0)``: z_k [B, K] the look-ahead rewards r(decode(x0_k)) shaped as the targets are (per group), and
    the predictions x0_k [B, K, ...] (``lookahead_predictions``: ``critic_lookahead_steps`` Euler steps)."""
    x0 = lookahead_predictions(trainer, roll)
    raw = lookahead_rewards(trainer, roll, x0)
    return torch.stack([trainer.method.shape_like_targets(trainer, raw[:, k], rewards)
                        for k in range(raw.shape[1])], dim=1), x0


def fit_critic(trainer, batches: int, images_per_prompt: int, progress: bool = False) -> list[float]:
    """Fit ``trainer``'s critic (an ``acflow`` trainer) on ``batches`` fresh rollouts of its current policy, as a
    training iteration does, with the method's own code: ``critic="lookahead"``: ``ACFlow.fit_lookahead``
    (``critic_steps`` Adam steps on the replay buffer of the last ``critic_buffer_iterations`` batches);
    ``"latent"``: ``ACFlow.critic_step`` on every state minibatch of the iteration (``draw_state_batches``).
    Fit batch j is probe batch ``FIT_BATCH_OFFSET + j``. Returns the mean critic loss of each batch.

    Example: ``losses = fit_critic(ACFlowTrainer(ACFlowConfig(critic="lookahead")), batches=4, images_per_prompt=8)``.
    """
    cfg, method = trainer.config, trainer.method
    if trainer.critic is None or cfg.critic not in ("latent", "lookahead"):
        raise ValueError(f"fit_critic needs an acflow trainer with critic 'latent' or 'lookahead', got algorithm="
                         f"{cfg.algorithm!r}, critic={cfg.critic!r}.")
    losses = []
    for j in tqdm(range(batches), desc="probe-reward: critic fit", disable=not progress):
        trainer.iteration = j  # the method's generators (state draws, buffer minibatches) key on the iteration
        roll, rewards, rw, _ = _batch(trainer, FIT_BATCH_OFFSET + j, images_per_prompt)
        if not torch.isfinite(rewards).all():
            raise ValueError(f"The reward {cfg.reward!r} returned non-finite values on critic fit batch {j}.")
        targets = method.targets(trainer, rw)  # r~: the shaped rewards the critic regresses on
        metrics = Metrics()
        if cfg.critic == "lookahead":
            method.fit_lookahead(trainer, roll, *_shaped_lookahead(trainer, roll, rw), targets, metrics)
        else:
            for b in draw_state_batches(trainer, roll):
                method.critic_step(trainer, b, targets, metrics)  # one Adam step of L_V per minibatch
        losses.append(metrics.means()["critic_loss"])
    return losses


def _load_lora(trainer, path: str) -> None:
    """Load a LoRA (a training checkpoint folder, its ``latest`` pointer or a run's output_dir) into the
    trainer's adapter, as ``ACFlowTrainer.load_checkpoint`` does for its weights."""
    if not trainer.config.use_lora:
        raise ValueError("--lora needs use_lora=True (the probe's trainable parameters are the LoRA's).")
    trainer.load_lora(resolve_checkpoint(path))


def _summary(cosines: list[float], half_size: int, target: float) -> dict:
    """Mean ± SE of the finite cosines, rho and the implied batch (and the batches implied by cos ± SE)."""
    finite = [c for c in cosines if math.isfinite(c)]
    cos_mean, cos_se = mean_se(finite) if finite else (float("nan"), float("nan"))
    rho, needed = implied_batch(cos_mean, half_size, target)
    # the cosine's sampling error carries over: the batch implied by cos + SE and by cos - SE (inf if <= 0)
    needed_range = [implied_batch(cos_mean + cos_se, half_size, target)[1] if math.isfinite(cos_se) else float("nan"),
                    implied_batch(cos_mean - cos_se, half_size, target)[1] if math.isfinite(cos_se) else float("nan")]
    return {"cosines": cosines, "cosine_mean": cos_mean, "cosine_se": cos_se, "rho": rho,
            "implied_batch": needed, "implied_batch_range": needed_range}


def _mean_se_columns(rows: list[list[float]]) -> tuple[list[float], list[float]]:
    """Per column k: mean ± SE over the rows (repeats) of its finite values."""
    out = [mean_se(f) if (f := [r[k] for r in rows if math.isfinite(r[k])]) else (float("nan"), float("nan"))
           for k in range(len(rows[0]))] if rows else []
    return [m for m, _ in out], [e for _, e in out]


def probe_reward(config, batch: int = 64, repeats: int = 3, images_per_prompt: int | None = None,
                 target: float = 0.5, reward: Any = None, lora: str | None = None, progress: bool = False,
                 critic: str = "none", critic_fit_batches: int = 4) -> dict:
    """The split-half gradient cosine of ``config``'s reward on ``repeats`` fresh batches of ``batch`` rollouts.

    ``images_per_prompt`` (G, even; default ``config.images_per_prompt``) images of each of ``batch / G``
    prompts (the trainer's training prompts, drawn as an iteration draws them, a new draw every repeat).
    ``reward`` overrides ``config.reward`` (any callable ``f(images, prompts) -> [B]``).

    Returns a dict: ``cosines`` (one per repeat), ``cosine_mean``, ``cosine_se`` (SE over repeats), ``rho``
    and ``implied_batch`` (from the mean cosine, for ``target_cosine``), ``reward_mean``,
    ``implied_batch_range`` (the batches implied by ``cosine_mean + cosine_se`` and ``- cosine_se``; ``inf``
    where that cosine is <= 0), ``reward_std_within_groups``, ``half_size``, the settings, ``seconds`` and a ``message`` when there is no
    gradient (a reward constant within every group: cosine NaN).

    ``critic`` ``"latent"`` or ``"lookahead"``: an ``acflow`` trainer whose critic :func:`fit_critic` fits on
    ``critic_fit_batches`` fresh batches first (the held-out batches and today's cosines are unchanged). Adds
    ``critic_fit_loss`` (per fit batch), ``critic_ev_k`` / ``critic_ev_k_se`` (per window step k, mean ± SE over
    repeats of ``1 - Var(r~ - V_k) / Var(r~)``), with ``lookahead`` also ``lookahead_ev_k`` / ``lookahead_ev_k_se``
    (V = z_k alone), and ``advantages``: for ``image`` (today's, the same numbers as the top level), ``mc`` and
    ``td`` (``A_{i,k} = step_advantages(V, r~, lam)``) the ``cosines``, ``cosine_mean``, ``cosine_se``, ``rho``,
    ``implied_batch`` and ``implied_batch_range`` of the per-step gradient.
    """
    g = images_per_prompt or config.images_per_prompt
    if g < 2 or g % 2:
        raise ValueError(f"images_per_prompt must be even and >= 2 (each prompt group is split in two halves), got {g}.")
    if batch < g or batch % g:
        raise ValueError(f"batch={batch} must be a multiple of images_per_prompt={g} (whole prompt groups).")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}.")
    if critic not in CRITICS:
        raise ValueError(f"critic must be one of {CRITICS}, got {critic!r}.")
    if critic != "none" and critic_fit_batches < 1:
        raise ValueError(f"critic_fit_batches must be >= 1 with a critic, got {critic_fit_batches}.")
    if critic != "none" and repeats > FIT_BATCH_OFFSET:
        raise ValueError(f"repeats={repeats} > {FIT_BATCH_OFFSET}: the held-out batches would reach the critic's "
                         f"fit batches ({FIT_BATCH_OFFSET} onwards); probe fewer repeats.")
    if critic == "none":
        cfg = replace(config, algorithm="grpo", images_per_prompt=g, prompts_per_iteration=batch // g,
                      initial_noises=None, progress=False)
    else:  # AC-Flow's critic on the rollout's SDE window states (the probe always samples the SDE)
        cfg = replace(config, algorithm="acflow", critic=critic, sampler="sde", fm_states="trajectory",
                      images_per_prompt=g, prompts_per_iteration=batch // g, initial_noises=None, progress=False)
    start = time.perf_counter()
    trainer = ACFlowTrainer(cfg, reward=reward)
    if lora:
        _load_lora(trainer, lora)
    fit_losses = fit_critic(trainer, critic_fit_batches, g, progress) if critic != "none" else None
    tables: dict[str, list[float]] = {name: [] for name in ("image", *ESTIMATORS)}
    critic_ev, lookahead_ev = [], []
    prompts_n = batch // g
    group = torch.arange(prompts_n).repeat_interleave(g)
    first = (torch.arange(batch) % g) < g // 2  # the first G/2 images of every group, then the rest
    halves = [torch.nonzero(first).flatten(), torch.nonzero(~first).flatten()]
    cosines, reward_means, within_std = [], [], []
    message = None
    for r in tqdm(range(repeats), desc="probe-reward", disable=not progress):
        roll, rewards, rw, _ = _batch(trainer, r, g)  # prompts of iteration r, noise generator(seed, r)
        rewards = rewards.cpu()
        if not torch.isfinite(rewards).all():
            raise ValueError(f"The reward {cfg.reward!r} returned non-finite values on repeat {r}: "
                             f"{rewards[~torch.isfinite(rewards)][:5].tolist()}; fix the reward before probing it.")
        grouped = rewards.view(prompts_n, g)
        reward_means.append(float(rewards.mean()))
        within_std.append(float(grouped.std(dim=1, unbiased=False).mean()))
        if bool((grouped.amax(dim=1) == grouped.amin(dim=1)).all()):
            # no image differs from its group: every advantage is 0 (not the rounding noise of r - mean)
            cosines.append(float("nan"))
            for column in tables.values():
                column.append(float("nan"))
            message = (f"The reward is constant within every prompt group ({r + 1} of {repeats} repeats so far): "
                       "all advantages and both half gradients are zero, so the cosine is undefined (NaN) and "
                       "no policy-gradient method can learn from it at this batch.")
            continue
        adv = O.grpo_advantages(rewards, group).to(trainer.device)
        halves_here = [h.to(trainer.device) for h in halves]
        if critic == "none":
            g1, g2 = half_gradients(trainer, roll, adv, halves_here, minibatch=cfg.minibatch_size)
            cosines.append(split_half_cosine(g1, g2))
            continue
        targets = trainer.method.targets(trainer, rw)  # r~ [B]
        z, x0 = _shaped_lookahead(trainer, roll, rw) if critic == "lookahead" else (None, None)
        values = trainer.method.window_values(trainer, roll, z, x0)  # V(x_k) [B, K], the critic fitted on other batches
        critic_ev.append([float(O.explained_variance(values[:, k], targets)) for k in range(values.shape[1])])
        if z is not None:
            lookahead_ev.append([float(O.explained_variance(z[:, k], targets)) for k in range(z.shape[1])])
        steps = [O.step_advantages(values, targets, lam=LAMBDA[e]) for e in ESTIMATORS]  # A_{i,k} [B, K]
        pairs = step_half_gradients(trainer, roll, [adv, *steps], halves_here, minibatch=cfg.minibatch_size)
        for name, (g1, g2) in zip(tables, pairs):
            tables[name].append(split_half_cosine(g1, g2))
        cosines.append(tables["image"][-1])
    summary = _summary(cosines, batch // 2, target)
    cos_mean = summary["cosine_mean"]
    if message is None and cos_mean <= 0:
        message = (f"The mean split-half cosine is {cos_mean:.4f} <= 0: no measurable gradient signal at a batch of "
                   f"{batch} (implied batch infinite); probe a larger --batch or more --repeats.")
    result = {
        "reward": cfg.reward if reward is None else getattr(reward, "__name__", repr(reward)),
        "batch": batch, "images_per_prompt": g, "prompts": prompts_n, "half_size": batch // 2, "repeats": repeats,
        "sde_steps": trainer.sde_steps, "sample_steps": cfg.sample_steps, "noise_level": cfg.noise_level,
        "pretrained": cfg.pretrained, "lora": lora,
        "cosines": cosines, "cosine_mean": cos_mean, "cosine_se": summary["cosine_se"], "rho": summary["rho"],
        "target_cosine": target, "implied_batch": summary["implied_batch"],
        "implied_batch_range": summary["implied_batch_range"],
        "reward_mean": sum(reward_means) / len(reward_means),
        "reward_std_within_groups": sum(within_std) / len(within_std),
        "seconds": time.perf_counter() - start, "message": message,
    }
    if critic != "none":
        ev, ev_se = _mean_se_columns(critic_ev)
        result.update(critic=critic, critic_fit_batches=critic_fit_batches, critic_fit_loss=fit_losses,
                      critic_ev_k=ev, critic_ev_k_se=ev_se,
                      advantages={name: _summary(c, batch // 2, target) for name, c in tables.items()})
        if critic == "lookahead":
            result["lookahead_ev_k"], result["lookahead_ev_k_se"] = _mean_se_columns(lookahead_ev)
        result["seconds"] = time.perf_counter() - start
    return result


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reward", required=True, help="The reward to probe (a flowalign.rewards name or spec).")
    parser.add_argument("--batch", type=int, default=64, help="Rollouts per batch, N (default 64).")
    parser.add_argument("--images-per-prompt", type=int, default=None,
                        help="G images per prompt, even (default: the config's images_per_prompt).")
    parser.add_argument("--repeats", type=int, default=3, help="Independent batches (default 3): mean ± SE.")
    parser.add_argument("--target-cosine", type=float, default=0.5,
                        help="Cosine a usable signal needs; the implied batch is computed for it (default 0.5).")
    parser.add_argument("--config", default=None,
                        help="YAML of ACFlowConfig keys (sampling steps, SDE window, CFG); default: the defaults.")
    parser.add_argument("--pretrained", default=None, help="SD3 pipeline folder (default: the embedded tiny base).")
    parser.add_argument("--lora", default=None, help="A flowalign training checkpoint (or run folder) to probe.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the prompts, noises and the LoRA init.")
    parser.add_argument("--critic", choices=CRITICS, default="none",
                        help="Also fit AC-Flow's critic (latent | lookahead) and report its explained variance per "
                             "window step and the per-step (mc, td) advantages' cosines (default none).")
    parser.add_argument("--critic-fit-batches", type=int, default=4,
                        help="Fresh base-model batches the critic is fitted on before the probe (default 4).")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="Extra ACFlowConfig override (repeatable), e.g. --set sample_steps=8.")
    parser.add_argument("--out", default=None, help="Also write the result as JSON to this file.")
    parser.add_argument("--json", action="store_true", help="Print the result as JSON.")


def run(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    for item in args.sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"flowalign probe-reward: --set expects KEY=VALUE, got {item!r}.")
        try:
            overrides[key.strip()] = parse_override(key.strip(), value)
        except ValueError as err:
            raise SystemExit(f"flowalign probe-reward: --set {item}: {err}") from None
    overrides.update(reward=args.reward, seed=args.seed, algorithm="grpo")
    if args.pretrained:
        overrides["pretrained"] = args.pretrained
    try:
        config = (ACFlowConfig.from_yaml(args.config, overrides) if args.config
                  else ACFlowConfig.from_dict(overrides))
        result = probe_reward(config, batch=args.batch, repeats=args.repeats, images_per_prompt=args.images_per_prompt,
                              target=args.target_cosine, lora=args.lora, progress=not args.json,
                              critic=args.critic, critic_fit_batches=args.critic_fit_batches)
    except ValueError as err:
        raise SystemExit(f"flowalign probe-reward: {err}") from None
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, result)
    if args.json:
        print(json.dumps(strict_json(result), indent=1))
    else:
        print(format_result(result))
    return 0


def format_result(result: dict) -> str:
    """One paragraph: cosine ± SE, rho and the implied batch."""
    lines = [(f"reward {result['reward']}: split-half gradient cosine {result['cosine_mean']:.4f} ± "
              f"{result['cosine_se']:.4f} (SE over {result['repeats']} batches of {result['batch']}; "
              f"{result['half_size']} images per half; per batch {', '.join(f'{c:.4f}' for c in result['cosines'])})"),
             (f"per-image signal-to-noise rho = {result['rho']:.4g}; a cosine of {result['target_cosine']:g} needs a "
              f"batch of ~{result['implied_batch']:.0f} images (cosine ± 1 SE: "
              f"{' to '.join(f'{b:.0f}' for b in result['implied_batch_range'])})"),
             (f"reward mean {result['reward_mean']:.4f}, within-group std {result['reward_std_within_groups']:.4f}; "
              f"{result['seconds']:.0f} s")]
    if result.get("critic"):
        fmt = ", ".join
        lines.append(f"critic {result['critic']} fitted on {result['critic_fit_batches']} batches (loss per batch "
                     f"{fmt(f'{x:.4f}' for x in result['critic_fit_loss'])}); held-out EV per window step k: "
                     f"{fmt(f'{m:.3f} ± {e:.3f}' for m, e in zip(result['critic_ev_k'], result['critic_ev_k_se']))}")
        if "lookahead_ev_k" in result:
            lines.append("look-ahead reward alone (V = z_k), EV per k: " + fmt(
                f"{m:.3f} ± {e:.3f}" for m, e in zip(result["lookahead_ev_k"], result["lookahead_ev_k_se"])))
        for name, label in (("image", "per-image A (no baseline)"), ("mc", "per-step mc A_k = r~ - V_k"),
                            ("td", "per-step td A_k = V_(k+1) - V_k")):
            a = result["advantages"][name]
            lines.append(f"{label}: cosine {a['cosine_mean']:.4f} ± {a['cosine_se']:.4f}, implied batch "
                         f"~{a['implied_batch']:.0f} ({' to '.join(f'{b:.0f}' for b in a['implied_batch_range'])})")
    if result.get("message"):
        lines.append(result["message"])
    return "\n".join(lines)
