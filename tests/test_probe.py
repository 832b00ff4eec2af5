"""The reward learnability probe: cosine and implied-batch arithmetic, then the tiny model end to end."""

import json
import math

import pytest
import torch

from flowalign.probe import implied_batch, probe_reward, split_half_cosine


def test_split_half_cosine_hand_values():
    g = torch.tensor([1.0, -2.0, 3.0])
    assert split_half_cosine(g, g) == pytest.approx(1.0)
    assert split_half_cosine(g, 5 * g) == pytest.approx(1.0)
    assert split_half_cosine(g, -g) == pytest.approx(-1.0)
    assert split_half_cosine(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])) == 0.0
    assert split_half_cosine(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0])) == pytest.approx(1 / math.sqrt(2))
    assert math.isnan(split_half_cosine(torch.zeros(3), g))  # no gradient: undefined, not 0
    with pytest.raises(ValueError, match="3 and 2"):
        split_half_cosine(g, torch.ones(2))


def test_implied_batch_hand_values():
    rho, batch = implied_batch(0.2, 32)  # rho = 0.2 / (0.8 * 32) = 1 / 128; batch = 2 * 0.5 / (0.5 * rho) = 256
    assert rho == pytest.approx(1 / 128) and batch == pytest.approx(256.0)
    # a batch that already reaches the target cosine implies itself
    assert implied_batch(0.5, 32)[1] == pytest.approx(64.0)
    rho, batch = implied_batch(0.06, 32, target=0.8)  # rho = 0.06 / (0.94 * 32); batch = 2 * 0.8 / (0.2 * rho)
    assert batch == pytest.approx(2 * 0.8 / 0.2 * 0.94 * 32 / 0.06)
    assert implied_batch(0.0, 32) == (0.0, math.inf) and implied_batch(-0.1, 32) == (0.0, math.inf)
    assert all(math.isnan(x) for x in implied_batch(float("nan"), 32))
    with pytest.raises(ValueError, match="target"):
        implied_batch(0.2, 32, target=1.0)


def test_cosine_model_recovers_the_per_image_snr():
    # per-image gradients mu + s z in d dimensions: per-image SNR rho = |mu|^2 / (s^2 d); with n images per half
    # cos -> rho n / (1 + rho n). Here rho n = 1: cos ~ 0.5 and implied_batch recovers rho.
    d, n, rho = 40000, 16, 1 / 16
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(d, generator=gen)
    mu = mu / mu.norm() * math.sqrt(rho * d)  # |mu|^2 = rho d (s = 1)
    halves = [(mu + torch.randn(n, d, generator=gen)).sum(0) for _ in range(2)]
    cos = split_half_cosine(*halves)
    assert cos == pytest.approx(rho * n / (1 + rho * n), abs=0.03)
    assert implied_batch(cos, n)[0] == pytest.approx(rho, rel=0.15)


# ---------------------------------------------------------------------------------------------- tiny model
def _config(**kw):
    from flowalign.config import ACFlowConfig

    return ACFlowConfig(algorithm="grpo", sample_steps=4, sde_steps_fraction=0.5, eval_prompts=0,
                        output_dir="unused", **kw)


def test_probe_on_the_tiny_model_deterministic_and_constant_rewards():
    def brightness(images, prompts):
        return images.float().mean(dim=(1, 2, 3))

    result = probe_reward(_config(), batch=8, repeats=2, images_per_prompt=4, reward=brightness)
    assert len(result["cosines"]) == 2 and result["half_size"] == 4 and result["sde_steps"] == 2
    assert all(math.isfinite(c) and -1.0 <= c <= 1.0 for c in result["cosines"])
    assert result["cosines"][0] != result["cosines"][1]  # two independent batches
    assert result["reward_std_within_groups"] > 0 and "constant" not in (result["message"] or "")
    # the implied batch is finite exactly when the mean cosine is positive; the range brackets it
    assert math.isfinite(result["implied_batch"]) == (result["cosine_mean"] > 0)
    low, high = result["implied_batch_range"]
    assert low == pytest.approx(implied_batch(result["cosine_mean"] + result["cosine_se"], 4)[1])
    assert low <= result["implied_batch"] <= high

    def constant(images, prompts):
        return torch.full((images.shape[0],), 0.3)

    flat = probe_reward(_config(), batch=8, repeats=1, images_per_prompt=4, reward=constant)
    assert math.isnan(flat["cosines"][0]) and math.isnan(flat["implied_batch"])
    assert "constant within every prompt group" in flat["message"]


def test_half_gradients_are_linear_in_the_advantages():
    from flowalign.probe import half_gradients
    from flowalign.trainer import ACFlowTrainer

    trainer = ACFlowTrainer(_config(prompts_per_iteration=1, images_per_prompt=4))
    prompts = trainer.iteration_prompts(0) * 4
    roll = trainer.policy.rollout(prompts, torch.Generator().manual_seed(0), "sde")
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    one, two = [torch.tensor([0]), torch.tensor([1])], [torch.tensor([0, 1])]
    g0, g1 = half_gradients(trainer, roll, adv, one)
    (g01,) = half_gradients(trainer, roll, adv, two)
    assert g0.norm() > 0 and g1.norm() > 0
    # a half's gradient is the sum over its images (float32 batching: equal to ~1e-5 of the norm)
    assert ((g01 - (g0 + g1)).norm() / (g0 + g1).norm()).item() < 1e-4
    assert split_half_cosine(g0, g1) < 0.999  # two images' gradients are different directions
    (g0_scaled,) = half_gradients(trainer, roll, 3 * adv, one[:1])
    assert ((g0_scaled - 3 * g0).norm() / (3 * g0).norm()).item() < 1e-5


def test_cli_probe_reward_json(tmp_path, capsys):
    from flowalign.cli import SUBCOMMANDS, main

    assert SUBCOMMANDS["probe-reward"][0] == "flowalign.probe"
    out = tmp_path / "probe.json"
    assert main(["probe-reward", "--reward", "jpeg_compressibility", "--batch", "8", "--images-per-prompt", "4",
                 "--repeats", "1", "--set", "sample_steps=4", "--set", "sde_steps_fraction=0.5",
                 "--set", "eval_prompts=0", "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert printed["reward"] == "jpeg_compressibility" and printed["batch"] == 8
    assert -1.0 <= printed["cosine_mean"] <= 1.0
    with pytest.raises(SystemExit, match="even"):
        main(["probe-reward", "--reward", "shapes", "--batch", "9", "--images-per-prompt", "3"])


# ---------------------------------------------------------------------------------------------- critic (--critic)
def _step_gradient(trainer, roll, a, idx, k):
    """Hand-built: grad_theta sum_{i in idx} a_i log p(x_{k+1} | x_k) of SDE step k alone, all images at once."""
    from flowalign.sampling import sde_step

    params = [p for p in trainer.transformer.parameters() if p.requires_grad]
    neg_embeds, neg_pooled = trainer.policy.encode([""] * idx.numel())
    x, x_next = roll.trajectory[idx, k], roll.trajectory[idx, k + 1]
    trainer.transformer.eval()
    v = trainer.policy.cfg_velocity(trainer.transformer, x, roll.sigmas[k].expand(idx.numel()), roll.embeds[idx],
                             roll.pooled[idx], neg_embeds, neg_pooled)
    _, log_prob, _, _ = sde_step(x, v, roll.sigmas[k], roll.sigmas[k + 1], noise_level=trainer.config.noise_level,
                                 prev_sample=x_next, log_prob_reduction="sum")
    grads = torch.autograd.grad((a * log_prob).sum(), params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])


def _close(a, b, rel=1e-5):
    return ((a - b).norm() / b.norm()).item() < rel


def test_per_step_advantages_weight_each_sde_step_by_its_own_advantage():
    from flowalign.probe import half_gradients, step_half_gradients
    from flowalign.trainer import ACFlowTrainer

    trainer = ACFlowTrainer(_config(prompts_per_iteration=1, images_per_prompt=4))
    assert trainer.sde_steps == 2
    prompts = trainer.iteration_prompts(0) * 4
    roll = trainer.policy.rollout(prompts, torch.Generator().manual_seed(1), "sde")
    adv = torch.tensor([1.0, -1.0, 0.5, -0.25])
    idx = torch.tensor([0, 2, 3])
    step0, step1 = (_step_gradient(trainer, roll, adv[idx], idx, k) for k in range(2))
    assert step0.norm() > 0 and step1.norm() > 0 and split_half_cosine(step0, step1) < 0.999
    (today,) = half_gradients(trainer, roll, adv, [idx])
    assert _close(today, step0 + step1)  # the per-image gradient: every step weighted by A_i
    only0 = torch.stack([adv, torch.zeros(4)], dim=1)  # A_{i,1} = 0: step 1 contributes nothing
    only1 = torch.stack([torch.zeros(4), adv], dim=1)  # A_{i,0} = 0: step 0 contributes nothing
    same, first, second, mixed = step_half_gradients(
        trainer, roll, [adv[:, None].expand(4, 2), only0, only1, torch.stack([adv, -3 * adv], dim=1)], [idx])
    assert torch.equal(same[0], today)  # A_{i,k} = A_i for every k is today's gradient, exactly
    assert _close(first[0], step0) and _close(second[0], step1)
    assert _close(mixed[0], step0 - 3 * step1)  # each step by its own weight
    with pytest.raises(ValueError, match=r"\[B=4, K=2\].*\(4, 3\)"):
        step_half_gradients(trainer, roll, [torch.zeros(4, 3)], [idx])


def test_fit_critic_uses_the_methods_regression():
    from dataclasses import replace

    from flowalign.probe import fit_critic
    from flowalign.trainer import ACFlowTrainer

    base = _config(prompts_per_iteration=1, images_per_prompt=4)
    with pytest.raises(ValueError, match="acflow trainer"):
        fit_critic(ACFlowTrainer(base), 1, 4)
    trainer = ACFlowTrainer(replace(base, algorithm="acflow", critic="latent", minibatch_size=2))
    assert float(trainer.critic.out.weight.detach().abs().sum()) == 0.0  # V = 0 at start
    losses = fit_critic(trainer, 1, 4)
    # latent: one Adam step per state minibatch, inner_epochs x noise_draws x B / minibatch = 2 x 2 x 4 / 2 = 8
    assert len(losses) == 1 and math.isfinite(losses[0]) and trainer.critic_optimizer.state_dict()["state"][0]["step"] == 8
    assert float(trainer.critic.out.weight.detach().abs().sum()) > 0.0
    with pytest.raises(ValueError, match="critic must be one of"):
        probe_reward(base, batch=4, repeats=1, images_per_prompt=4, critic="zero")
    with pytest.raises(ValueError, match="critic_fit_batches must be >= 1"):
        probe_reward(base, batch=4, repeats=1, images_per_prompt=4, critic="latent", critic_fit_batches=0)


def test_probe_with_the_lookahead_critic_on_the_tiny_model():
    def brightness(images, prompts):
        return images.float().mean(dim=(1, 2, 3))

    config = _config(critic_steps=8, critic_batch_size=16)
    plain = probe_reward(config, batch=8, repeats=2, images_per_prompt=4, reward=brightness)
    result = probe_reward(config, batch=8, repeats=2, images_per_prompt=4, reward=brightness, critic="lookahead",
                          critic_fit_batches=2)
    assert "critic_ev_k" not in plain and "advantages" not in plain  # the default output is today's
    # the held-out batches are today's: the per-image cosines are the same numbers
    assert result["cosines"] == plain["cosines"] and result["advantages"]["image"]["cosines"] == plain["cosines"]
    assert result["critic"] == "lookahead" and len(result["critic_fit_loss"]) == 2
    K = result["sde_steps"]
    for key in ("critic_ev_k", "critic_ev_k_se", "lookahead_ev_k", "lookahead_ev_k_se"):
        assert len(result[key]) == K and all(math.isfinite(x) for x in result[key]), key
    assert all(ev <= 1.0 for ev in result["critic_ev_k"] + result["lookahead_ev_k"])
    assert set(result["advantages"]) == {"image", "mc", "td"}
    for name, a in result["advantages"].items():
        assert len(a["cosines"]) == 2 and all(-1.0 <= c <= 1.0 for c in a["cosines"]), name
        assert a["implied_batch"] == implied_batch(a["cosine_mean"], 4)[1]
    # a fitted critic (V != 0) changes the advantages: mc and td weight the steps differently from r~ alone
    assert result["advantages"]["mc"]["cosines"] != plain["cosines"]
    assert result["advantages"]["td"]["cosines"] != result["advantages"]["mc"]["cosines"]
