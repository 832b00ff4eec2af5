"""What every fine-tuning method shares: the typed rollout, rewards and state batches, and the method interface.

A method (one file each in ``flowalign/methods/``) turns one iteration's rollout and rewards into parameter
updates; the trainer (``flowalign.trainer``) owns everything else (sampling, rewards, evaluation, checkpoints).
A new method is a new file with a :class:`Method` subclass plus one line in ``flowalign.methods.METHODS``.

Example::

    from flowalign.methods import get_method

    method = get_method("grpo")
    method.sampler                  # "sde": Flow-GRPO needs the SDE's log-probabilities
    metrics = method.update(trainer, rollout, rewards)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Method", "Metrics", "Rewards", "Rollout", "StateBatch"]


@dataclass
class Rollout:
    """One rank's rollout of an iteration (``ACFlowTrainer.rollout``): B images, K sampling steps.

    ``trajectory`` [B, K + 1, C, H, W] (states x_0 = noise ... x_K), ``log_probs`` [B, K] (per-dimension mean of
    each SDE transition's log-density) and ``velocities`` [B, K] (the guided field that drew each step) exist for
    SDE rollouts only (``velocities`` when a method trains on trajectory states)."""

    prompts: list[str]
    latents: torch.Tensor
    sigmas: torch.Tensor
    embeds: torch.Tensor
    pooled: torch.Tensor
    trajectory: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None
    velocities: torch.Tensor | None = None


@dataclass
class Rewards:
    """An iteration's rewards: this rank's (``local``), every rank's in rank order (``all``, with their shaping /
    advantage ``groups``) and where this rank's sit in ``all`` (``mine``)."""

    local: torch.Tensor
    all: torch.Tensor
    groups: torch.Tensor
    mine: slice


@dataclass
class StateBatch:
    """A minibatch of states where a flow-matching method evaluates its loss: images ``idx`` of the rollout at
    noise levels ``sigma``, states ``x_s`` and regression ``target`` u; the rest is filled in by the method."""

    idx: torch.Tensor
    x_s: torch.Tensor
    sigma: torch.Tensor
    target: torch.Tensor
    pooled: torch.Tensor | None = None        # the images' pooled prompt embeddings (the critic's prompt input)
    fm_scale: torch.Tensor | None = None      # trajectory states: |c_v| / std, the residual in step-noise units
    v_old: torch.Tensor | None = None         # the sampling policy's field at the states (nft, awm; acflow's proximal)
    adv: torch.Tensor | None = None           # the advantage of each state
    values: torch.Tensor | None = None        # the critic's V at the states (acflow)
    old_log_prob: torch.Tensor | None = None  # awm: -||v_old - u||^2
    step: torch.Tensor | None = None          # trajectory states: the window step k of each state


class Metrics:
    """Running means of an update's scalar metrics: ``add(key, value)``, then ``means()``."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, key: str, value: torch.Tensor | float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + float(value)
        self.counts[key] = self.counts.get(key, 0) + 1

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums}


class Method:
    """A fine-tuning method: its rollout needs, its ``kl_coef`` mapping and its update.

    Class attributes: ``name`` (the config's ``algorithm``), ``settings`` (its typed config sections, dataclasses
    that ``ACFlowConfig`` inherits), ``sampler`` (the rollout sampler the method requires, None = the
    config's), ``fm_states`` (the states it regresses on, None = the config's), ``uses_critic`` (the trainer builds
    AC-Flow's critic)."""

    name: str = ""
    settings: tuple[type, ...] = ()
    sampler: str | None = None
    fm_states: str | None = None
    uses_critic: bool = False

    def resolve(self, cfg: Any) -> None:
        """Fill in the settings the method decides (called once by ``ACFlowConfig.__post_init__``): its knobs for
        ``kl_coef`` when set, and the states it regresses on."""
        if cfg.kl_coef is not None:
            for key, value in self.kl_knobs(cfg, cfg.kl_coef).items():
                setattr(cfg, key, value)
        cfg.fm_states = self.fm_states or cfg.fm_states  # forward-process methods: freshly noised states

    def validate(self, cfg: Any) -> None:
        """Refuse settings that contradict each other for this method (``ValueError`` naming the keys and the fix);
        called after :meth:`resolve`. The single fields' own choices and ranges are checked by the config."""

    def kl_knobs(self, cfg: Any, kl_coef: float) -> dict[str, float]:
        """The method's knobs for ``kl_coef`` nats per image (docs/algorithms.md, "One regulariser axis"): by
        default the W2 weight of the exp-weighted regressions (alpha = kl_coef * beta, the KL coefficient
        alpha / beta) and Flow-GRPO's per-step KL weight (kl_coef)."""
        return {"w2_weight": kl_coef * cfg.beta, "grpo_kl_weight": kl_coef}

    def learning_rate(self, cfg: Any) -> float:
        return cfg.learning_rate

    def uses_ema(self, cfg: Any) -> bool:
        """Whether the rollouts come from an EMA of the trained parameters (DiffusionNFT's option)."""
        return False

    def update(self, trainer: Any, roll: Rollout, rewards: Rewards) -> dict[str, float]:
        raise NotImplementedError
