"""ACFlowTrainer: config, the five methods, warm-up, robustness, checkpoints, resume, multi-process."""

import textwrap
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from flowalign import objectives as O
from flowalign.checkpoints import latest_checkpoint, resolve_checkpoint
from flowalign.config import ACFlowConfig, parse_override
from flowalign.eval import diversity
from flowalign.prompts import load_prompts

# The tiny config, trainer, pipeline, reward and LoRA copy are conftest.py's fixtures: tiny_config, make_trainer,
# tiny_pipeline, redness, lora_state.


def critic_state(trainer):
    return {k: v.detach().clone() for k, v in trainer.accelerator.unwrap_model(trainer.critic).state_dict().items()}


def changed(a, b):
    return any(not torch.equal(a[k], b[k]) for k in a)


# --- config ------------------------------------------------------------------------------------
def test_config_yaml_and_unknown_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("algorithm: orw\niterations: 7\nbeta: 0.5\n")
    cfg = ACFlowConfig.from_yaml(path, {"iterations": 9})
    assert (cfg.algorithm, cfg.iterations, cfg.beta) == ("orw", 9, 0.5)
    path.write_text("algoritm: orw\n")
    with pytest.raises(ValueError, match=r"'algoritm' \(did you mean 'algorithm'\?\)"):
        ACFlowConfig.from_yaml(path)
    with pytest.raises(ValueError, match="algorithm='ppo'"):
        ACFlowConfig(algorithm="ppo")
    assert parse_override("learning_rate", "1e-4") == 1e-4 and parse_override("use_lora", "false") is False
    with pytest.raises(ValueError, match="lerning_rate"):
        parse_override("lerning_rate", "1")


def test_shipped_configs_load():
    configs = Path(__file__).parents[1] / "samples" / "configs"
    cfg = ACFlowConfig.from_yaml(configs / "acflow_shapes.yaml")
    assert cfg.algorithm == "acflow" and cfg.reward == "shapes" and cfg.fm_states == "trajectory"
    real = ACFlowConfig.from_yaml(configs / "acflow_sd35m.yaml")
    assert real.pretrained == "stabilityai/stable-diffusion-3.5-medium" and real.sampler == "sde"
    for path in sorted(configs.glob("*.yaml")):  # every shipped config is valid
        ACFlowConfig.from_yaml(path)


@pytest.mark.parametrize("name, overrides", [
    # the frontier's shared setup plus what the bench set for that method's runs (acflow at its shipped kl_coef)
    ("acflow_jpeg.yaml", {"algorithm": "acflow", "kl_coef": 0.25, "inner_epochs": 1, "minibatch_size": 64}),
    ("nft_jpeg.yaml", {"algorithm": "nft", "kl_coef": 0.15}),
    ("awm_jpeg.yaml", {"algorithm": "awm", "kl_coef": 0.15}),
])
def test_method_configs_are_the_frontiers_runs(name, overrides):
    """The shipped per-method configs resolve to the frontier's shared setup plus that method's run settings, so
    the figures docs/benchmarks.md gives for them are the figures of these files."""
    configs = Path(__file__).parents[1] / "samples" / "configs"
    shipped = asdict(ACFlowConfig.from_yaml(configs / name))
    frontier = asdict(ACFlowConfig.from_yaml(configs / "frontier_jpeg.yaml", overrides))
    other_methods = tuple(f"{m}_" for m in ("grpo", "nft", "awm") if m != overrides["algorithm"])
    differ = {k: (shipped[k], frontier[k]) for k in shipped
              if k != "output_dir" and not k.startswith(other_methods) and shipped[k] != frontier[k]}
    assert differ == {}


def test_diversity_metric():
    a = torch.zeros(2, 3, 4, 4)
    b = torch.cat([torch.zeros(1, 3, 4, 4), torch.ones(1, 3, 4, 4)])
    assert diversity(a, [0, 0]) == 0.0
    assert diversity(b, [0, 0]) == pytest.approx(1.0)  # RMS distance of all-zeros vs all-ones


def test_shapes_prompts_are_drawn_family_balanced(tmp_path, make_trainer):
    from flowalign import shapes

    source = load_prompts("shapes")
    train, weights = source.train, source.sampling_weights()
    assert train == shapes.all_prompts("train") and source.heldout_prompts(6, seed=3) == shapes.heldout_prompts(6, 3)
    per_family = {}
    for prompt, w in zip(train, weights.tolist()):
        per_family[shapes.family_of(prompt)] = per_family.get(shapes.family_of(prompt), 0.0) + w
    assert per_family == pytest.approx({f: 1 / 6 for f in shapes.FAMILIES})  # not 54/97 for color_attr
    (tmp_path / "p.txt").write_text("# a comment\na\n\nb\n")
    assert load_prompts(str(tmp_path / "p.txt")).sampling_weights().tolist() == [0.5, 0.5]
    assert load_prompts(str(tmp_path / "p.txt")).heldout_prompts(5) == ["a", "b"]
    with pytest.raises(FileNotFoundError, match="no-such.txt"):
        load_prompts("no-such.txt")
    # the trainer draws with these weights: over many iterations every family comes up about equally
    trainer = make_trainer(tmp_path / "run", prompts="shapes", prompts_per_iteration=8)
    drawn = [shapes.family_of(p) for it in range(75) for p in trainer.iteration_prompts(it)]
    counts = {f: drawn.count(f) for f in shapes.FAMILIES}  # 600 draws, 100 expected per family
    assert all(70 <= c <= 130 for c in counts.values()), counts


# --- algorithms --------------------------------------------------------------------------------
def test_acflow_warmup_trains_critic_only_then_actor(tmp_path, make_trainer, lora_state):
    """warmup_actor="frozen": the warm-up iteration trains the critic only (the default "shaped" is tested below)."""
    trainer = make_trainer(tmp_path, critic_warmup_iterations=1, warmup_actor="frozen")
    lora0, critic0 = lora_state(trainer), critic_state(trainer)
    m = trainer.step()  # warm-up iteration
    assert not changed(lora0, lora_state(trainer)), "the actor moved during critic warm-up"
    assert changed(critic0, critic_state(trainer))
    assert {"critic_loss", "explained_variance", "advantage_clip_fraction"} <= set(m)
    assert "actor_loss" not in m
    m = trainer.step()
    assert changed(lora0, lora_state(trainer))
    assert {"actor_loss", "w2", "ess", "grad_norm"} <= set(m)
    # exp weights of advantages that differ: fewer effective samples than states (uniform weights would give 4)
    assert 1.0 <= m["ess"] < trainer.config.minibatch_size - 1e-3


def test_warmup_actor_learns_from_shaped_rewards(tmp_path, monkeypatch, make_trainer, lora_state):
    """warmup_actor="shaped" (default): while the critic warms up the actor moves, with advantages clip(r~) (V = 0);
    after warm-up the critic's values enter: A = clip(r~ - V)."""
    seen = []
    loss = O.acflow_actor_loss

    def record(v, target, adv, **kw):
        seen.append(adv.clone())
        return loss(v, target, adv, **kw)

    monkeypatch.setattr(O, "acflow_actor_loss", record)
    trainer = make_trainer(tmp_path, critic_warmup_iterations=1, images_per_prompt=4, minibatch_size=8)
    shaped = O.shape_rewards
    targets = {}
    monkeypatch.setattr(O, "shape_rewards", lambda r, g, **kw: targets.setdefault(len(targets), shaped(r, g, **kw)))
    lora0 = lora_state(trainer)
    trainer.step()
    assert changed(lora0, lora_state(trainer)), "the actor should learn from shaped rewards during warm-up"
    # every advantage of the warm-up iteration is a clipped shaped reward of its sample: A = clip(r~ - 0)
    allowed = set(targets[0].clamp(-2.0, 2.0).tolist())
    assert seen and all(set(a.tolist()) <= allowed for a in seen)
    seen.clear()
    trainer.step()
    allowed = set(targets[1].clamp(-2.0, 2.0).tolist())
    assert not any(set(a.tolist()) <= allowed for a in seen)  # the critic's values enter now: A = clip(r~ - V)


def test_advantages_do_not_change_when_the_critic_trains_within_the_iteration(tmp_path, monkeypatch, make_trainer):
    """PPO-style: the critic scores every state of the iteration before it trains on them, so the advantages the
    actor sees are the same whether the critic learns fast or not at all within the iteration."""
    seen = {}
    loss = O.acflow_actor_loss

    def run(name, critic_lr):
        seen[name] = []

        def record(v, target, adv, **kw):
            seen[name].append(adv.clone())
            return loss(v, target, adv, **kw)

        monkeypatch.setattr(O, "acflow_actor_loss", record)
        trainer = make_trainer(tmp_path / name, critic_warmup_iterations=0, critic_lr=critic_lr, inner_epochs=2,
                               noise_draws=2, minibatch_size=2)
        critic0 = critic_state(trainer)
        trainer.step()
        return changed(critic0, critic_state(trainer))

    assert run("learning", 0.5) and not run("still", 0.0)  # the critic moved in one run, not in the other
    assert len(seen["learning"]) == len(seen["still"]) == 8  # 4 images x 2 epochs x 2 draws / 2
    for a, b in zip(seen["learning"], seen["still"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _velocity_change(trainer) -> float:
    """Mean squared difference between the policy's and the reference's velocity on a fixed probe batch."""
    x = torch.randn(4, *trainer.latent_shape, generator=torch.Generator().manual_seed(7))
    s = torch.tensor([0.9, 0.7, 0.5, 0.3])
    e, p = trainer.policy.encode(["a photo of a circle"] * 4)
    with torch.no_grad():
        v = trainer.policy.velocity(trainer.unwrapped, x, s, e, p)
        with trainer.policy.reference_model() as ref:
            v_ref = trainer.policy.velocity(ref, x, s, e, p)
    return ((v - v_ref) ** 2).mean().item()


@pytest.mark.parametrize("algorithm", ["acflow", "orw", "grpo", "nft", "awm"])
def test_larger_kl_coef_gives_a_smaller_update(tmp_path, algorithm, make_trainer):
    """The one regulariser axis: on the same batch (same seeds), a larger kl_coef moves the policy less."""
    sizes = []
    for kl in (0.0, 1.0, 100.0):
        trainer = make_trainer(tmp_path / f"kl{kl}", algorithm=algorithm, kl_coef=kl, critic_warmup_iterations=0,
                               images_per_prompt=4, minibatch_size=2, inner_epochs=2, learning_rate=1e-2,
                               grpo_learning_rate=1e-2, grpo_clip_range=1e-2, grpo_train_fraction=1.0)
        cfg = trainer.config  # the mapping onto each method's knob (docs/algorithms.md)
        alpha = {"nft": kl / cfg.advantage_clip, "awm": kl}.get(algorithm, kl * cfg.beta)
        assert cfg.grpo_kl_weight == kl and cfg.w2_weight == alpha
        for _ in range(2):
            trainer.step()
        sizes.append(_velocity_change(trainer))
    assert sizes[0] > sizes[1] > sizes[2] > 0, sizes


def test_kl_coef_must_be_a_non_negative_number():
    with pytest.raises(ValueError, match="kl_coef=-1"):
        ACFlowConfig(kl_coef=-1)
    assert ACFlowConfig(algorithm="orw", fm_states="trajectory").fm_states == "noised"  # orw as published


def test_trajectory_states_loss_is_the_transition_likelihood_in_noise_units(tmp_path, make_trainer, lora_state):
    """fm_states="trajectory": the first actor step sees the rollout policy itself, so the scaled residual
    |c_v| / std (v - u) is the injected SDE noise -z and the weighted loss is mean w z^2 ~ 1 per dimension."""
    with pytest.raises(ValueError, match="sampler='euler' with fm_states='trajectory'"):
        ACFlowConfig(sampler="euler")  # the default states are the trajectory's
    with pytest.raises(ValueError, match="guided_loss=False with fm_states='trajectory'"):
        ACFlowConfig(guided_loss=False)
    trajectory = {"algorithm": "acflow", "critic_warmup_iterations": 0, "w2_weight": 0.0, "fm_states": "trajectory",
                  "sampler": "sde", "prompts_per_iteration": 4, "images_per_prompt": 4, "minibatch_size": 16,
                  "sample_steps": 4}
    trainer = make_trainer(tmp_path, beta=0.0, centered_weights=False, **trajectory)
    lora0 = lora_state(trainer)
    m = trainer.step()
    assert m["fm_loss"] == pytest.approx(1.0, abs=0.05)  # 16 x 4x16x16 draws of z^2 (a wrong target or scale is far off)
    assert changed(lora0, lora_state(trainer))
    # centred weights: with no reward information (beta = 0, w = 1) the noise alone moves nothing
    centred = make_trainer(tmp_path / "centred", beta=0.0, **trajectory)
    lora0 = lora_state(centred)
    m = centred.step()
    assert m["fm_loss"] == pytest.approx(0.0, abs=1e-6) and not changed(lora0, lora_state(centred))
    centred = make_trainer(tmp_path / "centred1", beta=1.0, **trajectory)
    centred.step()
    assert changed(lora0, lora_state(centred))  # with rewards it learns
    noised = make_trainer(tmp_path / "noised", algorithm="orw", beta=0.0, w2_weight=0.0, prompts_per_iteration=4,
                          images_per_prompt=4, minibatch_size=16, sample_steps=4, fm_states="noised").step()
    assert abs(noised["fm_loss"] - 1.0) > 0.2  # the noised-state regression has another scale: eps - x0


def test_sde_window_rollouts_and_trajectory_states(tmp_path, make_trainer):
    """sde_steps_fraction=0.5: rollouts inject noise on the first half of the steps only, and the trajectory-state
    loss draws its states there (a deterministic step has no step noise: its scaled residual would be inf)."""
    with pytest.raises(ValueError, match="sde_steps_fraction=0.0 must be in"):
        ACFlowConfig(sde_steps_fraction=0.0)
    trainer = make_trainer(tmp_path, algorithm="acflow", critic_warmup_iterations=0, beta=0.0, w2_weight=0.0,
                           centered_weights=False, sde_steps_fraction=0.5, prompts_per_iteration=4, images_per_prompt=4, minibatch_size=16,
                           sample_steps=4)
    assert trainer.sde_steps == 2
    roll = trainer.policy.rollout(["a red circle"] * 3, torch.Generator().manual_seed(0), "sde")
    assert (roll.log_probs[:, :2] != 0).all() and (roll.log_probs[:, 2:] == 0).all()
    m = trainer.step()
    assert m["fm_loss"] == pytest.approx(1.0, abs=0.05)


def test_initial_noises_branch_and_group(tmp_path, monkeypatch, make_trainer):
    """initial_noises=2, G=4: each prompt's images branch in pairs from 2 starting noises, shaped per pair."""
    with pytest.raises(ValueError, match="initial_noises=2 needs"):
        ACFlowConfig(initial_noises=2, sampler="euler", fm_states="noised")
    with pytest.raises(ValueError, match="divisible by initial_noises=3"):
        make_trainer(tmp_path / "bad", images_per_prompt=4, initial_noises=3)
    trainer = make_trainer(tmp_path, images_per_prompt=4, initial_noises=2, critic_warmup_iterations=5)
    seen = {}
    rollout, shape = trainer.policy.rollout, O.shape_rewards

    def spy_rollout(prompts, generator, sampler, **kw):
        seen["noise"] = kw["noise"]
        out = rollout(prompts, generator, sampler, **kw)
        seen["final"] = out.latents
        return out

    def spy_shape(rewards, groups, **kw):
        seen["groups"] = groups.tolist()
        return shape(rewards, groups, **kw)

    monkeypatch.setattr(trainer.policy, "rollout", spy_rollout)
    monkeypatch.setattr(O, "shape_rewards", spy_shape)
    trainer.step()
    x1, final = seen["noise"], seen["final"]
    assert x1.shape[0] == 8 and seen["groups"] == [0, 0, 1, 1, 2, 2, 3, 3]
    for a in range(0, 8, 2):  # a pair shares x_1 and the SDE noise tells its branches apart
        assert torch.equal(x1[a], x1[a + 1]) and not torch.allclose(final[a], final[a + 1])
    assert not torch.equal(x1[0], x1[2]) and not torch.equal(x1[0], x1[4])


@pytest.mark.parametrize("algorithm", ["acflow", "orw", "grpo", "nft", "awm"])
def test_training_raises_the_reward(tmp_path, algorithm, make_trainer, redness):
    """The point of it all: 15 iterations on the redness reward make fresh samples redder (fixed seeds, Euler)."""
    (tmp_path / "p.txt").write_text("a photo of a circle\n")  # one prompt: its group is the whole batch
    trainer = make_trainer(tmp_path, algorithm=algorithm, prompts=str(tmp_path / "p.txt"), prompts_per_iteration=2,
                           images_per_prompt=8, sample_steps=4, minibatch_size=16, critic_warmup_iterations=0,
                           learning_rate=1e-2, grpo_learning_rate=1e-2, grpo_clip_range=1e-2, kl_coef=0.0)

    def fresh_redness():
        roll = trainer.policy.rollout(["a photo of a circle"] * 64, torch.Generator().manual_seed(123), "euler")
        return redness(trainer.policy.decode(roll.latents), None).mean().item()

    before = fresh_redness()
    rollout_rewards = [trainer.step()["reward_mean"] for _ in range(15)]
    assert fresh_redness() > before + 0.01  # measured (seed 0): +0.017 acflow, +0.119 orw, +0.048 grpo
    assert sum(rollout_rewards[-3:]) > sum(rollout_rewards[:3]) + 0.03


def test_critic_is_a_small_fraction_of_the_transformer(tmp_path, make_trainer):
    info = make_trainer(tmp_path).parameter_counts()
    assert info["critic"] > 0 and info["trainable"] < info["transformer"]  # LoRA: a few trainable weights
    assert info["critic_fraction_of_transformer"] == info["critic"] / info["transformer"]
    # The 1-layer test transformer is small; the default critic is < 1M parameters (SD3.5-M: 2.5B).
    assert info["critic"] < 1_000_000


def test_orw_has_no_critic_and_updates(tmp_path, make_trainer, lora_state):
    trainer = make_trainer(tmp_path, algorithm="orw", beta=0.5)
    assert trainer.critic is None
    lora0 = lora_state(trainer)
    m = trainer.step()
    assert changed(lora0, lora_state(trainer)) and "critic_loss" not in m


def test_grpo_updates_with_zero_initial_kl(tmp_path, make_trainer, lora_state):
    trainer = make_trainer(tmp_path, algorithm="grpo", grpo_train_fraction=0.34)
    lora0 = lora_state(trainer)
    m = trainer.step()
    assert changed(lora0, lora_state(trainer))
    assert m["kl"] == pytest.approx(0.0, abs=1e-12)  # LoRA B starts at 0: policy == reference
    # one minibatch, updated once: its ratios are computed before the update, where the policy drew the rollouts
    assert m["clip_fraction"] == 0.0 and m["approx_kl"] == pytest.approx(0.0, abs=1e-10)


def test_reference_is_the_adapter_free_transformer(tmp_path, make_trainer, tiny_pipeline):
    trainer = make_trainer(tmp_path, algorithm="orw")
    trainer.step()
    pipe = tiny_pipeline(seed=0, num_layers=1)
    x, s = torch.randn(2, 3, 32, 32), torch.tensor([0.3, 0.8])
    e, p = trainer.policy.encode(["a photo of a circle"] * 2)
    with torch.no_grad(), trainer.policy.reference_model() as ref:
        v_ref = trainer.policy.velocity(ref, x, s, e, p)
        v_base = trainer.policy.velocity(pipe.transformer, x, s, e, p)
    torch.testing.assert_close(v_ref, v_base)
    with torch.no_grad():
        assert not torch.allclose(trainer.policy.velocity(trainer.unwrapped, x, s, e, p), v_base)


def test_training_noise_levels_follow_the_sampler_shift(tmp_path, make_trainer):
    trainer = make_trainer(tmp_path)
    assert trainer.sigma_shift == trainer.pipe.scheduler.config.shift == 3.0  # default: the scheduler's shift
    assert make_trainer(tmp_path / "b", sigma_shift=1.0).sigma_shift == 1.0
    from flowalign.objectives import sample_sigmas

    s = sample_sigmas(20_000, torch.Generator().manual_seed(0), shift=trainer.sigma_shift)
    # logit-normal(0, 1) has median 0.5; shift 3 moves it to 3 * 0.5 / (1 + 2 * 0.5) = 0.75
    assert abs(s.median().item() - 0.75) < 0.01


@pytest.mark.parametrize("guided", [True, False])
def test_flow_matching_loss_fits_the_guided_velocity(tmp_path, monkeypatch, guided, make_trainer):
    """With CFG g, the actor and its W2 reference are the guided field v_u + g (v_c - v_u) (or v_c if not guided)."""
    from flowalign import objectives as O

    (tmp_path / "p.txt").write_text("a photo of a red circle\n")
    seen = {}
    noised, loss = O.noised_states, O.acflow_actor_loss

    def record_states(x0, s, eps):  # the first minibatch's noised states
        out = noised(x0, s, eps)
        seen.setdefault("xs", (out[0], s))
        return out

    def record_loss(v, target, adv, **kw):  # ... and its reference velocity
        seen.setdefault("v_ref", kw["v_ref"])
        return loss(v, target, adv, **kw)

    monkeypatch.setattr(O, "noised_states", record_states)
    monkeypatch.setattr(O, "acflow_actor_loss", record_loss)
    trainer = make_trainer(tmp_path, algorithm="orw", prompts=str(tmp_path / "p.txt"), guidance_scale=3.0,
                           guided_loss=guided, w2_weight=0.5, prompts_per_iteration=1, fm_states="noised", sampler="euler")
    trainer.step()
    x_s, s = seen["xs"]
    n = x_s.shape[0]
    e, p = trainer.policy.encode(["a photo of a red circle"] * n)
    ne, np_ = trainer.policy.encode([""] * n)
    with torch.no_grad(), trainer.policy.reference_model() as ref:
        v_c = trainer.policy.velocity(ref, x_s, s, e, p)
        v_g = trainer.policy.cfg_velocity(ref, x_s, s, e, p, ne, np_)
    torch.testing.assert_close(seen["v_ref"], v_g if guided else v_c, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(v_g, v_c, atol=1e-3)  # the two differ, so the test tells them apart


# --- robustness --------------------------------------------------------------------------------
def test_nan_reward_skips_the_update(tmp_path, make_trainer, lora_state):
    trainer = make_trainer(tmp_path, algorithm="orw", reward=lambda im, p: torch.full((im.shape[0],), float("nan")))
    lora0 = lora_state(trainer)
    with pytest.warns(UserWarning, match="non-finite rewards"):
        m = trainer.step()
    assert m["skipped_updates"] == 1 and not changed(lora0, lora_state(trainer))


def test_reward_that_raises_saves_a_checkpoint(tmp_path, make_trainer):
    def broken(images, prompts):
        raise OSError("reward server down")

    trainer = make_trainer(tmp_path, algorithm="orw", reward=broken)
    with pytest.raises(RuntimeError, match="reward server down.*checkpoint was saved"):
        trainer.step()
    assert latest_checkpoint(tmp_path) is not None


# --- checkpoints and resume ----------------------------------------------------------------------
def test_checkpoint_is_a_diffusers_lora_file(tmp_path, make_trainer, tiny_pipeline):
    trainer = make_trainer(tmp_path, algorithm="orw")
    trainer.step()
    folder = trainer.save_checkpoint()
    assert (folder / "pytorch_lora_weights.safetensors").exists()
    pipe = tiny_pipeline(seed=0, num_layers=1)
    pipe.load_lora_weights(folder)  # stock diffusers reads it directly
    x, s = torch.randn(1, 3, 32, 32), torch.tensor([0.5])
    e, p = trainer.policy.encode(["a photo of a circle"])
    with torch.no_grad():
        torch.testing.assert_close(trainer.policy.velocity(pipe.transformer, x, s, e, p),
                                   trainer.policy.velocity(trainer.unwrapped, x, s, e, p))


def test_resolve_checkpoint_accepts_the_run_the_pointer_or_the_folder(tmp_path, make_trainer, tiny_pipeline):
    trainer = make_trainer(tmp_path / "run", algorithm="orw")
    trainer.step()
    folder = trainer.save_checkpoint()
    assert resolve_checkpoint(tmp_path / "run") == str(folder)  # the run's output_dir
    assert resolve_checkpoint(tmp_path / "run" / "checkpoints" / "latest") == str(folder)  # the pointer file
    assert resolve_checkpoint(folder) == str(folder)
    assert resolve_checkpoint("org/some-lora") == "org/some-lora"  # a hub id passes through
    pipe = tiny_pipeline(seed=0, num_layers=1)
    pipe.load_lora_weights(resolve_checkpoint(tmp_path / "run" / "checkpoints" / "latest"))
    (tmp_path / "run" / "checkpoints" / "latest").write_text("iter-999999")
    with pytest.raises(FileNotFoundError, match="iter-999999"):
        resolve_checkpoint(tmp_path / "run")


@pytest.mark.parametrize("algorithm", ["acflow", "orw", "grpo", "nft", "awm"])
def test_resume_matches_uninterrupted_run(tmp_path, algorithm, make_trainer, lora_state):
    """nft with an EMA sampling policy: the EMA is part of the state (a resume without it samples differently)."""
    kw = {"iterations": 3, "critic_warmup_iterations": 1, "algorithm": algorithm, "nft_ema_decay": 0.5,
          "learning_rate": 1e-2}
    full = make_trainer(tmp_path / "full", **kw)
    full.train()
    first = make_trainer(tmp_path / "resumed", **{**kw, "iterations": 2})
    first.train()
    second = make_trainer(tmp_path / "resumed", **kw, resume=True)
    steps = []
    step = second.step
    second.step = lambda: steps.append(second.iteration) or step()
    second.train()
    assert second.iteration == 3 and steps == [2]  # it resumed at iteration 2 (a fresh start would run 0, 1, 2)
    # Same seed, data and order. Not bit-exact: multi-threaded CPU conv backward sums in a varying order
    # (seen: 2 of 73,728 critic weights off by 2.6e-6). A broken resume (optimiser state, RNG, counters)
    # moves weights by ~1e-4 or more, far outside this tolerance.
    a, b = lora_state(full), lora_state(second)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)
    if full.critic is not None:
        for k, v in critic_state(full).items():
            torch.testing.assert_close(v, critic_state(second)[k], rtol=1e-3, atol=1e-5)
    if algorithm == "nft":
        for e, f in zip(full.policy.ema.shadow_params, second.policy.ema.shadow_params):
            torch.testing.assert_close(e, f, rtol=1e-3, atol=1e-5)
    assert full.counters == second.counters


def test_resume_refuses_a_checkpoint_of_other_settings_and_names_them(tmp_path, make_trainer):
    make_trainer(tmp_path, algorithm="orw", iterations=1, learning_rate=1e-2).train()
    with pytest.raises(ValueError, match=r"other settings \(beta: 1.0 -> 0.5; learning_rate: 0.01 -> 0.02\)"):
        make_trainer(tmp_path, algorithm="orw", iterations=2, learning_rate=2e-2, beta=0.5, resume=True).train()
    more = make_trainer(tmp_path, algorithm="orw", iterations=2, learning_rate=1e-2, resume=True)  # longer: allowed
    more.train()
    assert more.iteration == 2
    forced = make_trainer(tmp_path, algorithm="orw", iterations=3, learning_rate=2e-2, resume=True,
                          allow_config_change=True)
    forced.train()
    assert forced.iteration == 3


def test_orw_trains_on_batch_z_scored_rewards_with_exp_weights(tmp_path, monkeypatch, make_trainer):
    """The trainer's own ORW path: the advantages the loss gets are the z-scores of the batch's rewards (population
    std), and the weighting is exp(beta A), whatever ``weighting`` says."""
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0])
    trainer = make_trainer(tmp_path, algorithm="orw", reward=lambda images, prompts: rewards[: len(prompts)],
                           beta=0.5, weighting="linear", minibatch_size=4)
    seen = []
    loss = O.acflow_actor_loss
    monkeypatch.setattr(O, "acflow_actor_loss", lambda v, target, adv, **kw: seen.append((adv, kw)) or loss(
        v, target, adv, **kw))
    trainer.step()
    z = (rewards - 3.0) / (3.5 ** 0.5 + 1e-6)  # mean 3, population variance (4 + 1 + 0 + 9) / 4
    (adv, kw), = seen
    torch.testing.assert_close(adv.sort().values, z.sort().values)
    assert kw["weighting"] == "exp" and kw["beta"] == 0.5


def test_a_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, make_trainer):
    trainer = make_trainer(tmp_path, algorithm="orw")
    trainer.step()
    good = trainer.save_checkpoint()
    trainer.step()

    def crash(folder, *gathered):
        (folder / "partial.bin").write_bytes(b"x")
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(trainer, "_write_checkpoint", crash)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint()
    assert latest_checkpoint(tmp_path) == good
    fresh = make_trainer(tmp_path, algorithm="orw")
    fresh.load_checkpoint(latest_checkpoint(tmp_path))
    assert fresh.iteration == 1


# --- several processes ---------------------------------------------------------------------------
SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from flowalign.tiny import build_tiny_sd3_pipeline
    from flowalign.trainer import ACFlowConfig, ACFlowTrainer
    from peft.utils import get_peft_model_state_dict

    out, config = sys.argv[1], sys.argv[2]  # the test's tiny_config, written as YAML
    cfg = ACFlowConfig.from_yaml(config, {"output_dir": out})
    reward = lambda images, prompts: images[:, 0].mean((1, 2))
    trainer = ACFlowTrainer(cfg, reward=reward, pipeline=build_tiny_sd3_pipeline(seed=0, num_layers=1))
    trainer.train()
    rank = trainer.accelerator.process_index
    state = {"lora": get_peft_model_state_dict(trainer.unwrapped),
             "critic": trainer.accelerator.unwrap_model(trainer.critic).state_dict(),
             "world": trainer.accelerator.num_processes, "local_g": trainer.local_g}
    torch.save(state, f"{out}/rank{rank}.pt")
    """
)


@pytest.mark.slow
def test_two_processes_end_with_identical_weights(tmp_path, tiny_config, accelerate_launch):
    script, config = tmp_path / "dist.py", tmp_path / "tiny.yaml"
    script.write_text(SCRIPT)
    tiny_config(tmp_path, iterations=2, critic_warmup_iterations=1, sample_steps=2, minibatch_size=2).to_yaml(config)
    accelerate_launch(script, tmp_path, config, processes=2, port=29533)  # 2 CPU processes (gloo)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert r0["world"] == r1["world"] == 2 and r0["local_g"] == 1  # G=2 images per prompt, one on each rank
    for part in ("lora", "critic"):
        for k in r0[part]:
            assert torch.equal(r0[part][k], r1[part][k]), f"{part}:{k} differs between ranks"
    assert any(v.abs().sum() > 0 for k, v in r0["lora"].items() if "lora_B" in k)  # the actor did move
    assert (tmp_path / "checkpoints" / "latest").exists()  # written once, by rank 0


def test_detach_uncond_trains_only_the_conditional_branch(tmp_path, make_trainer):
    """detach_uncond: the guided value is unchanged, and its gradient is the conditional branch's, g * grad v_c."""
    trainer = make_trainer(tmp_path, guidance_scale=3.0)
    model, g = trainer.unwrapped, trainer.guidance_scale
    x = torch.randn(2, *trainer.latent_shape, generator=torch.Generator().manual_seed(0))
    s = torch.tensor([0.8, 0.4])
    e, p = trainer.policy.encode(["a photo of a circle"] * 2)
    ne, np_ = trainer.policy.encode([""] * 2)
    params = [q for q in model.parameters() if q.requires_grad]

    def grads(loss):
        return torch.autograd.grad(loss, params, allow_unused=True)

    full = trainer.policy.cfg_velocity(model, x, s, e, p, ne, np_)
    detached = trainer.policy.cfg_velocity(model, x, s, e, p, ne, np_, detach_uncond=True)
    torch.testing.assert_close(full, detached)
    w = torch.randn_like(full)
    # LoRA B starts at zero, so only B has a gradient; compare the conditional branch alone, scaled by g
    got = grads((detached * w).sum())
    cond = grads((g * trainer.policy.velocity(model, x, s, e, p) * w).sum())
    both = grads((full * w).sum())
    for a, b, c in zip(got, cond, both):
        if a is None:
            assert b is None
            continue
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert any(a is not None and not torch.allclose(a, c) for a, c in zip(got, both))  # the branch did carry gradient
