"""AC-Flow: actor-critic flow matching with intermediate feedback (ideas from "AC-Flow", arXiv 2510.18072; the
concrete design is ours, docs/algorithms.md, "The critic")::

    shaping    r~ = clip((r - mean_c) / (std_c + eps), -k, k)      per prompt group, statistics over all ranks
    critic     V(x_k) of the K window states x_0 .. x_{K-1}; V(x_K) = r~ (the path after the window is deterministic)
               'latent':    CNN on x_k, L_V = mean (V - r~)^2, one step per actor minibatch
               'lookahead': a(h) z_k + b(h) with z_k the shaped reward of decode(x_k - s_k v_k), the policy's
                            one-step image prediction; critic_steps steps per iteration on a replay buffer
               'zero':      V = 0
    advantage  A_k = clip(sum_{j>=k} lambda^(j-k) (V_{j+1} - V_j), +-eps_A)   mc: lambda = 1 (A_k = r~ - V_k),
               td: lambda = 0, gae: gae_lambda; V = 0 (so A = r~) during the warm-up
    actor      L = mean_i f(A_i) ||v_theta - u_i||^2 + alpha ||v_theta - stopgrad(v_ref)||^2
    kl_coef    alpha = kl_coef * beta                               (the KL coefficient alpha / beta)

The actor's advantages always come from the current rollout, scored by the critic as it was before this
iteration; the replay buffer only feeds the critic's regression.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from flowalign import objectives as O
from flowalign.methods.base import Metrics, Rewards, Rollout, StateBatch
from flowalign.methods.flow_matching import FlowMatchingMethod, FlowMatchingSettings
from flowalign.seeding import generator


@dataclass
class ACFlowSettings:
    """AC-Flow's knobs (``ACFlowConfig`` inherits them; the YAML keys are these names): reward shaping, the
    critic, the per-step advantages and the actor's weighting."""

    shaping: bool = field(default=True, metadata={"help": (
        "z-score within each prompt's group (each (prompt, x_1) group with initial_noises); running statistics "
        "over all images only when a group has one image"
    )})
    shaping_clip: float = field(default=3.0, metadata={"help": "k: shaped rewards are clipped to [-k, k]"})
    critic_lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate of the critic"})
    critic_warmup_iterations: int = field(default=3, metadata={"help": (
        "iterations before the critic's values enter the advantages"
    )})
    warmup_actor: str = field(default="shaped", metadata={"choices": ("shaped", "frozen"), "help": (
        "during the critic warm-up the actor 'shaped': learns from the shaped rewards (advantage r~, i.e. V = 0),"
        " or 'frozen': does not move (those rollouts only train the critic)"
    )})
    critic_channels: list[int] = field(default_factory=lambda: [32, 64, 128], metadata={"help": (
        "critic='latent': CNN widths (stride 2 after the first)"
    )})
    critic_hidden_dim: int = field(default=256, metadata={"help": "width of the critic's MLP head"})
    critic: str | None = field(default=None, metadata={"choices": (None, "zero", "latent", "lookahead"), "help": (
        "acflow's value model V of a window state x_k: 'latent' = a CNN on the noisy latent x_k, one Adam step per "
        "actor minibatch (the original design); 'lookahead' = flowalign.critic.LookaheadCritic on the policy's own"
        " one-step prediction x0_k = x_k - s_k v_k: its reward (decoded and scored, one extra decode + reward per "
        "window step and image), sigma and prompt, fitted critic_steps times per iteration on a replay buffer; "
        "'zero' = V = 0 (the shaped reward is every state's advantage); None = 'latent' on trajectory states, "
        "'zero' on noised states (where a critic's input would be a noised copy of the scored sample itself). "
        "docs/algorithms.md, 'The critic'"
    )})
    advantage_estimator: str = field(default="mc", metadata={"choices": ("mc", "td", "gae"), "help": (
        "per-step advantage of the SDE transition x_k -> x_{k+1} (V(x_K) = r~ at the window's end, the path after"
        " it being deterministic): 'mc' = r~ - V(x_k); 'td' = V(x_{k+1}) - V(x_k); 'gae' = sum_j lambda^j "
        "delta_{k+j} with delta_k = V(x_{k+1}) - V(x_k) (gae_lambda 1 = mc, 0 = td)"
    )})
    critic_lookahead_channels: list[int] = field(default_factory=list, metadata={"help": (
        "critic='lookahead': CNN widths of an optional image branch on the predicted latent x0_k ([] = none: V from"
        " the look-ahead reward, sigma and the prompt)"
    )})
    critic_lookahead_steps: int = field(default=1, metadata={"minimum": 1, "help": (
        "critic='lookahead': Euler steps of the policy's guided field from x_k to its predicted image (1 = the "
        "one-step prediction x_k - s_k v_k, free; each more step costs one guided forward per window state and "
        "predicts the final image better: held-out EV at the last window step of the tiny JPEG task .23 / .39 / "
        ".44 with 1 / 2 / 4 steps, docs/algorithms.md)"
    )})
    gae_lambda: float = field(default=0.9, metadata={"help": "lambda of advantage_estimator='gae', in [0, 1]"})
    critic_steps: int = field(default=32, metadata={"minimum": 1, "help": (
        "critic='lookahead': Adam steps per iteration on minibatches of the replay buffer"
    )})
    critic_batch_size: int = field(default=128, metadata={"minimum": 1, "help": "critic='lookahead': states per critic step"})
    critic_buffer_iterations: int = field(default=4, metadata={"minimum": 1, "help": (
        "critic='lookahead': the replay buffer keeps the window states of this many most recent iterations (the "
        "critic fits them; the actor's advantages always come from the current rollout)"
    )})
    weighting: str = field(default="exp", metadata={"choices": tuple(O.WEIGHTINGS), "help": (
        "see flowalign.objectives.WEIGHTINGS (orw: always exp, as published)"
    )})


LAMBDA = {"mc": 1.0, "td": 0.0}


def lookahead_predictions(trainer: Any, roll: Rollout) -> torch.Tensor:
    """``[B, K, C, H, W]``: the policy's prediction of the final latent from each window state x_k, by
    ``critic_lookahead_steps`` = m Euler steps of its guided field from s_k to 0 (m = 1: the one-step prediction
    ``x0_k = x_k - s_k v_k``, x0 = x_s - s v under x_s = (1 - s) x0 + s eps, v = eps - x0). The first step reuses
    ``v_k``, the velocity that drew step k; each further step costs one guided forward per state."""
    cfg, K = trainer.config, trainer.sde_steps
    m, B = cfg.critic_lookahead_steps, roll.latents.shape[0]
    neg = trainer.policy.encode([""] * B) if m > 1 else None
    out = []
    for k in range(K):
        x, v = roll.trajectory[:, k], roll.velocities[:, k]
        grid = torch.linspace(float(roll.sigmas[k]), 0.0, m + 1)
        for j in range(m):
            if j:  # v(x, s_j) of the current (sampling) policy, in rollout micro-batches
                s = torch.full((B,), float(grid[j]), device=x.device)
                with torch.no_grad(), trainer.accelerator.autocast():
                    v = torch.cat([trainer.policy.cfg_velocity(trainer.unwrapped, x[i], s[i], roll.embeds[i],
                                                               roll.pooled[i], neg[0][i], neg[1][i]).float()
                                   for i in torch.arange(B).split(cfg.rollout_batch_size)])
            x = x + (grid[j + 1] - grid[j]) * v  # Euler: x <- x + (s_{j+1} - s_j) v
        out.append(x)
    return torch.stack(out, dim=1)


def lookahead_rewards(trainer: Any, roll: Rollout, x0: torch.Tensor) -> torch.Tensor:
    """``[B, K]`` the training reward of the predictions ``x0`` [B, K, ...] (:func:`lookahead_predictions`),
    decoded: one decode and one reward call per window step."""
    prompts = list(roll.prompts)
    return torch.stack([trainer.score(trainer.policy.decode(x0[:, k]), prompts) for k in range(x0.shape[1])], dim=1)


class ACFlow(FlowMatchingMethod):
    name = "acflow"
    settings = (FlowMatchingSettings, ACFlowSettings)
    uses_critic = True

    def validate(self, cfg: Any) -> None:
        super().validate(cfg)
        if cfg.critic != "zero" and cfg.fm_states == "noised":
            raise ValueError(f"ACFlowConfig.critic={cfg.critic!r} with fm_states='noised': V would be evaluated at a "
                             "noised copy of the scored sample itself, so the baseline depends on the outcome and "
                             "biases the gradient; set critic='zero' (V = 0) or fm_states='trajectory'.")
        if (cfg.critic == "lookahead" or cfg.advantage_estimator != "mc") and cfg.fm_states != "trajectory":
            raise ValueError(f"ACFlowConfig.critic={cfg.critic!r}, advantage_estimator={cfg.advantage_estimator!r} "
                             "need fm_states='trajectory' (the rollout's SDE window states and velocities).")
        if not 0.0 <= cfg.gae_lambda <= 1.0:
            raise ValueError(f"ACFlowConfig.gae_lambda={cfg.gae_lambda} must be in [0, 1] (1 = mc, 0 = td).")

    def targets(self, trainer: Any, rewards: Rewards) -> torch.Tensor:
        cfg = trainer.config
        if not cfg.shaping:
            return rewards.local
        if trainer.group_size >= 2:  # r~ = clip((r - mean_c) / (std_c + eps), -k, k), statistics over all ranks
            return O.shape_rewards(rewards.all, rewards.groups, clip=cfg.shaping_clip)[rewards.mine]
        # one image per group: running statistics (identical on every rank: fed the gathered rewards)
        return O.shape_rewards(rewards.all, None, clip=cfg.shaping_clip, running=trainer.running)[rewards.mine]

    def shape_like_targets(self, trainer: Any, local: torch.Tensor, rewards: Rewards) -> torch.Tensor:
        """Normalise per-image scores ``local`` [B] as the targets are (the same groups, no running update)."""
        cfg = trainer.config
        if not cfg.shaping:
            return local
        every = trainer.accelerator.gather(local.contiguous())
        if trainer.group_size >= 2:
            return O.shape_rewards(every, rewards.groups, clip=cfg.shaping_clip)[rewards.mine]
        return O.shape_rewards(every, None, clip=cfg.shaping_clip, running=trainer.running,
                               update_running=False)[rewards.mine]

    def warming_up(self, trainer: Any) -> bool:
        return trainer.iteration < trainer.config.critic_warmup_iterations

    def window_values(self, trainer: Any, roll: Rollout, z: torch.Tensor | None,
                      x0: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, K]`` the critic's V at every window state x_0 .. x_{K-1} (no gradient)."""
        cfg, K = trainer.config, trainer.sde_steps
        B = roll.latents.shape[0]
        if cfg.critic == "zero":
            return torch.zeros(B, K, device=trainer.device)
        out = []
        with torch.no_grad(), trainer.accelerator.autocast():
            for k in range(K):
                sigma = roll.sigmas[k].expand(B)
                if cfg.critic == "latent":
                    out.append(trainer.critic(roll.trajectory[:, k], sigma, roll.pooled).float())
                else:
                    image = x0[:, k] if trainer.critic_has_image else None
                    out.append(trainer.critic(z[:, k], sigma, roll.pooled, x0=image).float())
        return torch.stack(out, dim=1)

    def advantages(self, trainer: Any, batches: list[StateBatch], targets: torch.Tensor, metrics: Metrics,
                   roll: Rollout, rewards: Rewards) -> None:
        """A_k of each state from the critic as it was before this iteration (scored after its updates, the critic
        would have fit these very samples and the advantages shrink); V = 0 while warming up. Logs the critic's
        held-out explained variance per window step, ``critic_ev_k<k>``, before it sees these states."""
        cfg = trainer.config
        warm = self.warming_up(trainer)
        z = x0 = None
        if cfg.critic == "lookahead":
            x0 = lookahead_predictions(trainer, roll)
            raw = lookahead_rewards(trainer, roll, x0)
            z = torch.stack([self.shape_like_targets(trainer, raw[:, k], rewards)
                             for k in range(raw.shape[1])], dim=1)
            for k in range(z.shape[1]):
                metrics.add(f"lookahead_ev_k{k}", O.explained_variance(z[:, k], targets))
        values = None
        if cfg.critic != "zero":
            values = self.window_values(trainer, roll, z, x0)
            for k in range(values.shape[1]):
                metrics.add(f"critic_ev_k{k}", O.explained_variance(values[:, k], targets))
        if cfg.critic == "latent" and cfg.advantage_estimator == "mc":
            self._latent_mc_advantages(trainer, batches, targets, metrics, warm)  # the original per-batch form
        else:
            v = torch.zeros(roll.latents.shape[0], trainer.sde_steps, device=trainer.device) \
                if (warm or values is None) else values
            lam = 1.0 if warm else LAMBDA.get(cfg.advantage_estimator, cfg.gae_lambda)
            table = O.step_advantages(v, targets, lam=lam)  # [B, K]
            for b in batches:
                adv = table[b.idx, b.step]
                b.values = v[b.idx, b.step]
                b.adv = adv.clamp(-cfg.advantage_clip, cfg.advantage_clip)
                metrics.add("advantage_clip_fraction", (adv.abs() > cfg.advantage_clip).float().mean())
        if cfg.critic == "lookahead":
            self.fit_lookahead(trainer, roll, z, x0, targets, metrics)

    def _latent_mc_advantages(self, trainer, batches, targets, metrics, warm) -> None:
        """A = clip(r~ - V(x_s, s, c), +-eps_A) per minibatch (critic='latent', mc)."""
        cfg, acc = trainer.config, trainer.accelerator
        for b in batches:
            tgt = targets[b.idx]
            with torch.no_grad(), acc.autocast():
                b.values = trainer.critic(b.x_s, b.sigma, b.pooled).float()
            b.adv, clip_frac = O.advantages(tgt, torch.zeros_like(tgt) if warm else b.values, clip=cfg.advantage_clip)
            metrics.add("advantage_clip_fraction", clip_frac)
            metrics.add("explained_variance", O.explained_variance(b.values, tgt))

    def fit_lookahead(self, trainer: Any, roll: Rollout, z: torch.Tensor, x0: torch.Tensor | None,
                      targets: torch.Tensor, metrics: Metrics) -> None:
        """Add this iteration's window states to the replay buffer (the last ``critic_buffer_iterations``
        iterations), then ``critic_steps`` Adam steps of L_V = mean (V(x_k) - r~)^2 on random buffer minibatches."""
        cfg, K = trainer.config, trainer.sde_steps
        B = z.shape[0]
        buffer = trainer.critic_buffer
        entry = {"z": z.reshape(-1).detach(), "sigma": roll.sigmas[:K].repeat(B).detach(),
                 "pooled": roll.pooled.repeat_interleave(K, dim=0).detach(),
                 "target": targets.repeat_interleave(K).detach()}
        if trainer.critic_has_image:
            entry["x0"] = x0.flatten(0, 1).detach()
        buffer.append(entry)
        data = {key: torch.cat([e[key] for e in buffer]) for key in entry}
        n = data["z"].shape[0]
        gen = generator(cfg.seed, trainer.iteration, trainer.accelerator.process_index + 1, 5)
        for _ in range(cfg.critic_steps):
            i = torch.randperm(n, generator=gen)[: cfg.critic_batch_size].to(trainer.device)
            with trainer.accelerator.autocast():
                v = trainer.critic(data["z"][i], data["sigma"][i], data["pooled"][i],
                                   x0=data["x0"][i] if "x0" in data else None).float()
                lv = O.critic_loss(v, data["target"][i])
            self._critic_backward(trainer, lv)
            metrics.add("critic_loss", lv.detach())

    def _critic_backward(self, trainer: Any, lv: torch.Tensor) -> None:
        trainer.critic_optimizer.zero_grad(set_to_none=True)
        if trainer.critic_prepared:
            trainer.accelerator.backward(lv)
        else:  # replicated beside a sharded transformer: its own backward (no fp16 scaler of the transformer's)
            lv.backward()
        trainer.critic_optimizer.step()

    def critic_step(self, trainer: Any, b: StateBatch, targets: torch.Tensor, metrics: Metrics) -> bool:
        """critic='latent': L_V = mean (V(x_s, s, c) - r~)^2 on the minibatch. During a "frozen" warm-up the actor
        waits."""
        if trainer.config.critic == "latent":
            with trainer.accelerator.autocast():
                lv = O.critic_loss(trainer.critic(b.x_s, b.sigma, b.pooled).float(), targets[b.idx])
            self._critic_backward(trainer, lv)
            metrics.add("critic_loss", lv.detach())
        return not (self.warming_up(trainer) and trainer.config.warmup_actor == "frozen")

    def loss(self, trainer: Any, v: torch.Tensor, b: StateBatch, v_ref: torch.Tensor | None):
        cfg = trainer.config
        return O.acflow_actor_loss(v, b.target, b.adv, beta=cfg.beta, weighting=cfg.weighting, v_ref=v_ref,
                                   w2_weight=cfg.w2_weight, fm_scale=b.fm_scale, v_old=b.v_old)


METHOD = ACFlow()
