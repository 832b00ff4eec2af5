"""AC-Flow's critics and per-step advantages (issue #23): the look-ahead critic, TD / GAE / MC advantages, the replay
buffer, the noised-state refusal, and the two new distance axes of the held-out evaluation."""

import contextlib

import pytest
import torch

from flowalign import objectives as O
from flowalign.config import ACFlowConfig
from flowalign.methods import acflow
from flowalign.tiny import build_tiny_sd3_pipeline
from flowalign.trainer import ACFlowTrainer

# sample_steps 12 x sde_steps_fraction 0.25 = a 3-step SDE window
TINY = dict(prompts_per_iteration=2, images_per_prompt=3, sample_steps=12, sde_steps_fraction=0.25,
            minibatch_size=6, inner_epochs=1, noise_draws=1, eval_prompts=0, progress=False, lora_rank=4,
            lora_alpha=4.0, sampler="sde", fm_states="trajectory", critic_warmup_iterations=0, advantage_clip=100.0)


def redness(images, prompts):
    return images[:, 0].mean((1, 2)) - 0.5 * images[:, 1:].mean((1, 2, 3))


def make_trainer(tmp_path, **overrides):
    cfg = ACFlowConfig(output_dir=str(tmp_path), **{**TINY, **overrides})
    return ACFlowTrainer(cfg, reward=redness, pipeline=build_tiny_sd3_pipeline(seed=0, num_layers=1))


def capture_advantages(monkeypatch):
    """Record (roll, rewards, targets, batches) of every ACFlow.advantages call."""
    seen = []
    original = acflow.ACFlow.advantages

    def wrapped(self, trainer, batches, targets, metrics, roll, rewards):
        original(self, trainer, batches, targets, metrics, roll, rewards)
        seen.append(dict(roll=roll, rewards=rewards, targets=targets.clone(),
                         batches=[(b.idx.clone(), b.step.clone(), b.adv.clone()) for b in batches]))

    monkeypatch.setattr(acflow.ACFlow, "advantages", wrapped)
    return seen


def test_step_advantages_hand_computed_three_steps():
    values, final = torch.tensor([[0.2, 0.5, 0.9]]), torch.tensor([1.0])  # deltas 0.3, 0.4, 0.1
    torch.testing.assert_close(O.step_advantages(values, final, lam=0.0), torch.tensor([[0.3, 0.4, 0.1]]))
    torch.testing.assert_close(O.step_advantages(values, final, lam=1.0), torch.tensor([[0.8, 0.5, 0.1]]))
    # GAE(0.5): A2 = 0.1, A1 = 0.4 + 0.5 * 0.1, A0 = 0.3 + 0.5 * 0.45
    torch.testing.assert_close(O.step_advantages(values, final, lam=0.5), torch.tensor([[0.525, 0.45, 0.1]]))


def test_lookahead_td_advantages_equal_a_hand_computation(tmp_path, monkeypatch):
    """critic='lookahead', td: A_k = V(x_{k+1}) - V(x_k), V(x_3) = r~, with V = a z_k + b set by hand and z_k the
    group z-score of r(decode(x_k - s_k v_k)) recomputed here from the rollout."""
    seen = capture_advantages(monkeypatch)
    trainer = make_trainer(tmp_path, critic="lookahead", advantage_estimator="td")
    a, b = 0.7, 0.1
    head = trainer.accelerator.unwrap_model(trainer.critic).head
    with torch.no_grad():  # a(h) = a, b(h) = b for every state
        head.weight.zero_()
        head.bias.copy_(torch.tensor([a, b]))
    trainer.step()
    (rec,) = seen
    roll, rewards, targets = rec["roll"], rec["rewards"], rec["targets"]
    assert trainer.sde_steps == 3
    groups = rewards.groups
    values = []
    for k in range(3):  # the one-step prediction x0 = x_k - s_k v_k, decoded and scored, z-scored per prompt
        x0 = roll.trajectory[:, k] - roll.sigmas[k] * roll.velocities[:, k]
        z = O.shape_rewards(redness(trainer.policy.decode(x0), roll.prompts), groups, clip=trainer.config.shaping_clip)
        values.append(a * z + b)
    values.append(targets)  # V(x_3) = r~
    hand = torch.stack([values[k + 1] - values[k] for k in range(3)], dim=1)  # [B, 3]
    for idx, step, adv in rec["batches"]:
        torch.testing.assert_close(adv, hand[idx, step], atol=1e-5, rtol=1e-5)
    assert hand.abs().max() > 1e-3  # a non-trivial case


def test_replay_buffer_never_feeds_the_actor(tmp_path, monkeypatch):
    """The actor's advantages come from the current rollout and the critic as it was: a buffer full of junk targets
    changes the critic's fit after them, not them."""
    seen = capture_advantages(monkeypatch)
    clean = make_trainer(tmp_path / "clean", critic="lookahead", advantage_estimator="gae", gae_lambda=0.5)
    junk = make_trainer(tmp_path / "junk", critic="lookahead", advantage_estimator="gae", gae_lambda=0.5)
    clean.step()
    junk.step()
    for entry in junk.critic_buffer:  # stale states with absurd targets
        entry["target"].fill_(100.0)
    clean.step()
    junk.step()
    for (ic, sc, ac), (ij, sj, aj) in zip(seen[2]["batches"], seen[3]["batches"]):
        assert torch.equal(ic, ij) and torch.equal(sc, sj)
        torch.testing.assert_close(ac, aj)
    # ... while the critics fitted afterwards differ (the junk did reach the critic's regression)
    pc = torch.cat([p.flatten() for p in clean.critic.parameters()])
    pj = torch.cat([p.flatten() for p in junk.critic.parameters()])
    assert not torch.allclose(pc, pj)


def test_replay_buffer_keeps_the_last_iterations_and_resumes(tmp_path):
    trainer = make_trainer(tmp_path, critic="lookahead", critic_buffer_iterations=2)
    for _ in range(3):
        trainer.step()
    assert len(trainer.critic_buffer) == 2
    assert trainer.critic_buffer[0]["z"].numel() == 6 * 3  # B images x K window states
    folder = trainer.save_checkpoint()
    resumed = make_trainer(tmp_path, critic="lookahead", critic_buffer_iterations=2)
    resumed.load_checkpoint(folder)
    for e, f in zip(trainer.critic_buffer, resumed.critic_buffer):
        assert e.keys() == f.keys() and all(torch.equal(e[k].cpu(), f[k].cpu()) for k in e)


def test_mc_with_zero_critic_is_the_shaped_reward(tmp_path, monkeypatch):
    seen = capture_advantages(monkeypatch)
    trainer = make_trainer(tmp_path, critic="zero")
    assert trainer.critic is None
    trainer.step()
    (rec,) = seen
    for idx, _, adv in rec["batches"]:
        torch.testing.assert_close(adv, rec["targets"][idx])


def test_critic_on_noised_states_is_refused():
    with pytest.raises(ValueError, match="noised copy of the scored sample"):
        ACFlowConfig(critic="latent", fm_states="noised", sampler="euler")
    assert ACFlowConfig(fm_states="noised", sampler="euler").critic == "zero"  # the default there
    assert ACFlowConfig().critic == "latent"
    with pytest.raises(ValueError, match="fm_states='trajectory'"):
        ACFlowConfig(critic="zero", advantage_estimator="td", fm_states="noised", sampler="euler")


def test_coupling_distance_and_path_kl(tmp_path, monkeypatch):
    """0 for the base model (a fresh LoRA is zero); for x-independent fields c (base) and c + d (fine-tuned) the
    Euler samples from the same noise end at z - c and z - c - d, so the coupling distance is sum(d^2) exactly,
    and the path KL (every step but the last noisy) exceeds the window KL."""
    trainer = make_trainer(tmp_path, eval_prompts=2, eval_images_per_prompt=2, eval_steps=12)
    base = trainer.evaluate()
    assert max(base["per_image"]["coupling_distance"]) == 0.0
    assert max(base["per_image"]["path_kl"]) == 0.0

    shape = trainer.latent_shape
    c = torch.linspace(-1, 1, int(torch.tensor(shape).prod())).reshape(shape)
    d = 0.05 * torch.cos(torch.arange(c.numel(), dtype=torch.float32)).reshape(shape)
    in_reference = []

    @contextlib.contextmanager
    def reference_model():
        in_reference.append(True)
        try:
            yield trainer.unwrapped
        finally:
            in_reference.pop()

    def velocity(model, x, sigma, embeds, pooled):
        field = c if in_reference else c + d
        return field.to(x).expand_as(x).clone()

    monkeypatch.setattr(trainer.policy, "reference_model", reference_model)
    monkeypatch.setattr(trainer.policy, "velocity", velocity)
    trainer._ref_eval_features = None  # recompute the reference samples under the constructed field
    out = trainer.evaluate()
    hand = float(d.pow(2).sum())
    for value in out["per_image"]["coupling_distance"]:
        assert value == pytest.approx(hand, rel=1e-4)
    assert min(out["per_image"]["path_kl"]) > max(out["per_image"]["kl_to_reference"]) > 0


def test_two_step_lookahead_is_two_euler_steps_of_the_policy(tmp_path):
    """critic_lookahead_steps=2: x_k + (s_k/2 - s_k) v_k, then + (0 - s_k/2) v(x_mid, s_k/2), the guided field of
    the sampling policy; 1 step is x_k - s_k v_k."""
    trainer = make_trainer(tmp_path, critic="lookahead", critic_lookahead_steps=2)
    prompts = ["a photo of a red circle"] * 2 + ["a photo of a blue square"] * 2
    roll = trainer.policy.rollout(prompts, torch.Generator().manual_seed(3), "sde")
    x0 = acflow.lookahead_predictions(trainer, roll)
    neg = trainer.policy.encode([""] * 4)
    for k in range(trainer.sde_steps):
        s = float(roll.sigmas[k])
        mid = roll.trajectory[:, k] + (s / 2 - s) * roll.velocities[:, k]
        with torch.no_grad():
            v_mid = trainer.policy.cfg_velocity(trainer.unwrapped, mid, torch.full((4,), s / 2), roll.embeds, roll.pooled, *neg)
        torch.testing.assert_close(x0[:, k], mid + (0 - s / 2) * v_mid, atol=1e-5, rtol=1e-5)
    trainer.config.critic_lookahead_steps = 1
    one = acflow.lookahead_predictions(trainer, roll)
    torch.testing.assert_close(one, roll.trajectory[:, :3] - roll.sigmas[:3].view(1, 3, 1, 1, 1) * roll.velocities[:, :3])
    assert (one - x0).abs().max() > 1e-4  # the second step moved the prediction


def test_trackers_write_tensorboard_scalars_and_refuse_unknown(tmp_path):
    """accelerate's TensorBoard tracker gets every finite metric under train/ at its iteration; log_with: [] writes
    none; an unknown tracker is refused by name."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = make_trainer(tmp_path / "tb", critic="zero", iterations=2)
    trainer.train()
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard")).Reload()
    rewards = events.Scalars("train/reward_mean")
    assert [e.step for e in rewards] == [0, 1]
    assert [e.value for e in rewards] == pytest.approx([h["reward_mean"] for h in trainer.history], rel=1e-6)
    silent = make_trainer(tmp_path / "none", critic="zero", iterations=1, log_with=[])
    silent.train()
    assert not (tmp_path / "none" / "tensorboard").exists()
    with pytest.raises(ValueError, match="'mlflow'"):
        ACFlowConfig(log_with=["mlflow"])
