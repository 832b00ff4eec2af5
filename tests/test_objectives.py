"""Tests for flowalign.objectives against hand-computed values."""

import math

import numpy as np
import pytest
import torch

from flowalign.objectives import (
    WEIGHTINGS,
    RunningMeanStd,
    acflow_actor_loss,
    advantages,
    critic_loss,
    effective_sample_size,
    exp_weights,
    explained_variance,
    gaussian_kl_to_reference,
    group_mean_std,
    grpo_advantages,
    grpo_policy_loss,
    linear_weights,
    noised_states,
    orw_cfm_w2_loss,
    orw_weights,
    ot_pair,
    per_sample_mse,
    rank_weights,
    sample_sigmas,
    shape_rewards,
    uniform_weights,
    w2_distance,
    w2_regulariser,
    weighted_flow_matching_loss,
)

# ----------------------------------------------------------------------------------------------- shaping


def test_group_mean_std_hand_example():
    mean, std, counts = group_mean_std(torch.tensor([1.0, 3.0, 10.0]), [0, 0, 1])
    torch.testing.assert_close(mean, torch.tensor([2.0, 2.0, 10.0]))
    torch.testing.assert_close(std, torch.tensor([1.0, 1.0, 0.0]))
    torch.testing.assert_close(counts, torch.tensor([2.0, 2.0, 1.0]))


def test_shape_rewards_two_groups():
    # group "a": [1, 3] (mean 2, std 1); group "b": [0, 4, 8] (mean 4, std sqrt(32/3))
    rewards = torch.tensor([1.0, 0.0, 3.0, 4.0, 8.0])
    groups = ["a", "b", "a", "b", "b"]
    shaped = shape_rewards(rewards, groups, clip=None, eps=0.0)
    sb = math.sqrt(32.0 / 3.0)
    torch.testing.assert_close(shaped, torch.tensor([-1.0, -4.0 / sb, 1.0, 0.0, 4.0 / sb]))
    # integer tensor labels give the same result as string labels
    torch.testing.assert_close(shape_rewards(rewards, torch.tensor([7, 2, 7, 2, 2]), clip=None, eps=0.0), shaped)
    # each group is zero-mean after shaping
    assert abs(float(shaped[[0, 2]].sum())) < 1e-6 and abs(float(shaped[[1, 3, 4]].sum())) < 1e-6


def test_shape_rewards_clip():
    # group of 5: [0, 0, 0, 0, 10] -> mean 2, std 4 -> z = [-0.5]*4 + [2.0]; clip at 1.5
    rewards = torch.tensor([0.0, 0.0, 0.0, 0.0, 10.0])
    shaped = shape_rewards(rewards, [0] * 5, clip=1.5, eps=0.0)
    torch.testing.assert_close(shaped, torch.tensor([-0.5, -0.5, -0.5, -0.5, 1.5]))
    # eps keeps an all-equal group finite (zero signal, no NaN)
    assert torch.equal(shape_rewards(torch.ones(3), [0, 0, 0]), torch.zeros(3))


def test_shape_rewards_group_of_one_needs_running_stats():
    with pytest.raises(ValueError, match="RunningMeanStd"):
        shape_rewards(torch.tensor([1.0, 2.0, 3.0]), [0, 0, 1])
    running = RunningMeanStd()
    shaped = shape_rewards(torch.tensor([1.0, 2.0, 3.0]), None, clip=None, eps=0.0, running=running)
    torch.testing.assert_close(shaped, torch.tensor([-1.0, 0.0, 1.0]) / math.sqrt(2.0 / 3.0))
    # without updating, the stats stay put
    shape_rewards(torch.tensor([100.0]), None, running=running, update_running=False)
    assert running.count == 3


def test_running_mean_std_matches_full_batch_and_round_trips():
    torch.manual_seed(0)
    data = torch.randn(100) * 3 + 5
    rms = RunningMeanStd()
    for chunk in data.split([10, 1, 39, 50]):
        rms.update(chunk)
    assert rms.count == 100
    assert rms.mean == pytest.approx(data.double().mean().item(), rel=1e-9)
    assert rms.var == pytest.approx(data.double().var(unbiased=False).item(), rel=1e-9)
    # moments from two "ranks" merged at once == sequential updates
    other = RunningMeanStd()
    a, b = data[:30].double(), data[30:].double()
    all_mean = (a.sum() + b.sum()) / 100
    all_var = ((torch.cat([a, b]) - all_mean) ** 2).mean()
    other.update_from_moments(all_mean.item(), all_var.item(), 100)
    assert other.mean == pytest.approx(rms.mean) and other.var == pytest.approx(rms.var)
    restored = RunningMeanStd()
    restored.load_state_dict(rms.state_dict())
    assert restored.state_dict() == rms.state_dict()
    with pytest.raises(KeyError, match="count"):
        restored.load_state_dict({"mean": 0.0, "var": 1.0})


def test_advantages_and_clip_fraction():
    values = torch.tensor([0.5, 0.5, 0.0, -1.0], requires_grad=True)
    adv, frac = advantages(torch.tensor([2.0, -1.0, 0.3, 0.0]), values, clip=1.0)
    torch.testing.assert_close(adv, torch.tensor([1.0, -1.0, 0.3, 1.0]))
    # raw A = [1.5, -1.5, 0.3, 1.0]: two exceed the clip (1.0 itself is not > 1.0)
    assert float(frac) == pytest.approx(0.5)
    assert not adv.requires_grad  # the critic is not trained through the actor
    adv, frac = advantages(torch.tensor([2.0]), torch.tensor([0.0]), clip=None)
    assert float(adv) == 2.0 and float(frac) == 0.0


# ----------------------------------------------------------------------------------------------- weights


def test_exp_weights_hand_values_sum_and_stability():
    torch.testing.assert_close(exp_weights(torch.tensor([0.0, math.log(3.0)]), 1.0), torch.tensor([0.5, 1.5]))
    # beta A = log [1, 2, 4, 9] (beta = 0.5): exp -> [1, 2, 4, 9], mean 4 -> weights [0.25, 0.5, 1, 2.25]
    adv = 2.0 * torch.log(torch.tensor([1.0, 2.0, 4.0, 9.0]))
    w = exp_weights(adv, 0.5)
    torch.testing.assert_close(w, torch.tensor([0.25, 0.5, 1.0, 2.25]))
    assert float(w.sum()) == pytest.approx(4.0, rel=1e-6)
    # huge beta * A: no overflow, all mass on the best sample
    w_big = exp_weights(torch.tensor([0.0, 1000.0, 999.0]), 10.0)
    assert torch.isfinite(w_big).all()
    torch.testing.assert_close(w_big, torch.tensor([0.0, 3.0, 3.0 * math.exp(-10.0)]), rtol=1e-4, atol=1e-6)
    assert float(effective_sample_size(w_big)) == pytest.approx(1.0, abs=1e-3)


def test_other_weightings():
    torch.testing.assert_close(linear_weights(torch.tensor([-2.0, 0.0, 1.0]), 1.0), torch.tensor([0.0, 1.0, 2.0]))
    # all clamped to zero -> uniform (never NaN)
    torch.testing.assert_close(linear_weights(torch.tensor([-5.0, -3.0]), 1.0), torch.ones(2))
    # rank weights ignore the scale of A: centred ranks [1, -1, 0] -> exp weights of those
    r = rank_weights(torch.tensor([50.0, -1.0, 0.0]), 1.0)
    torch.testing.assert_close(r, exp_weights(torch.tensor([1.0, -1.0, 0.0]), 1.0))
    torch.testing.assert_close(rank_weights(torch.tensor([5.0, -1.0, 0.0]), 1.0), r)
    torch.testing.assert_close(uniform_weights(torch.tensor([3.0, -1.0]), 2.0), torch.ones(2))
    adv = torch.tensor([-1.0, -0.2, 0.4, 1.1, 2.0])
    for name, fn in WEIGHTINGS.items():
        w = fn(adv, 0.8)
        assert float(w.mean()) == pytest.approx(1.0, rel=1e-6), name
        assert (w >= 0).all(), name
        if name != "uniform":  # higher advantage, no smaller weight
            assert (w[1:] >= w[:-1]).all(), name


def test_effective_sample_size():
    assert float(effective_sample_size(torch.ones(8))) == pytest.approx(8.0)
    assert float(effective_sample_size(torch.tensor([2.0, 0.0]))) == pytest.approx(1.0)
    # (1 + 3)^2 / (1 + 9) = 1.6
    assert float(effective_sample_size(torch.tensor([1.0, 3.0]))) == pytest.approx(1.6)
    # ESS falls as beta sharpens the weights
    adv = torch.linspace(-1, 1, 16)
    ess = [float(effective_sample_size(exp_weights(adv, b))) for b in (0.0, 0.5, 2.0, 8.0)]
    assert ess[0] == pytest.approx(16.0) and all(x > y for x, y in zip(ess, ess[1:]))


# ----------------------------------------------------------------------------------------------- losses


def test_flow_matching_and_w2_hand_values():
    v = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    u = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    torch.testing.assert_close(per_sample_mse(v, u), torch.tensor([0.5, 2.0]))
    # weights [1.5, 0.5]: (1.5 * 0.5 + 0.5 * 2.0) / 2 = 0.875
    assert float(weighted_flow_matching_loss(v, u, torch.tensor([1.5, 0.5]))) == pytest.approx(0.875)
    assert float(w2_regulariser(v, u)) == pytest.approx(1.25)


def test_w2_term_zero_when_equal_and_gradient_only_to_prediction():
    v_pred = torch.randn(3, 2, 4, 4, requires_grad=True)
    assert float(w2_regulariser(v_pred, v_pred.detach().clone()).detach()) == 0.0
    v_ref = torch.randn(3, 2, 4, 4, requires_grad=True)
    w2_regulariser(v_pred, v_ref).backward()
    assert v_ref.grad is None
    # d/dv mean_i mean_d (v - r)^2 = 2 (v - r) / (B * D)
    torch.testing.assert_close(v_pred.grad, 2 * (v_pred - v_ref).detach() / (3 * 32))


def test_acflow_actor_loss_hand_value_and_metrics():
    v = torch.tensor([[1.0, 1.0], [0.0, 2.0]], requires_grad=True)
    u = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    v_ref = torch.zeros(2, 2)
    adv = torch.tensor([0.0, math.log(3.0)])
    loss, metrics = acflow_actor_loss(v, u, adv, beta=1.0, weighting="exp", v_ref=v_ref, w2_weight=0.5)
    # weights [0.5, 1.5]; fm = (0.5 * 0.5 + 1.5 * 2.0) / 2 = 1.625; w2 = (1 + 2) / 2 = 1.5
    assert float(loss.detach()) == pytest.approx(1.625 + 0.5 * 1.5)
    assert float(metrics["fm_loss"]) == pytest.approx(1.625) and float(metrics["w2"]) == pytest.approx(1.5)
    assert float(metrics["ess"]) == pytest.approx(4.0 / 2.5)
    assert set(metrics) == {"fm_loss", "w2", "ess"}
    loss.backward()  # d/dv: w_i (v_i - u_i) / 2 (per-dimension mean over 2 dims, batch mean over 2) + 0.5 v_i / 2
    torch.testing.assert_close(v.grad, torch.tensor([[0.5, 0.25], [0.0, 2.0]]))
    # fm_scale scales both terms: fm x 4, w2 x 4 (the W2 term in the units of the regression)
    _, scaled = acflow_actor_loss(v, u, adv, beta=1.0, v_ref=v_ref, w2_weight=0.5, fm_scale=torch.tensor(2.0))
    assert float(scaled["fm_loss"]) == pytest.approx(4 * 1.625) and float(scaled["w2"]) == pytest.approx(4 * 1.5)
    with pytest.raises(ValueError, match="v_ref"):
        acflow_actor_loss(v, u, adv, w2_weight=1.0)
    with pytest.raises(ValueError, match="softmax"):
        acflow_actor_loss(v, u, adv, weighting="softmax")


def test_orw_special_case_equals_acflow_with_zero_critic():
    g = torch.Generator().manual_seed(0)
    v_pred = torch.randn(6, 3, 4, 4, generator=g, requires_grad=True)
    target = torch.randn(6, 3, 4, 4, generator=g)
    v_ref = torch.randn(6, 3, 4, 4, generator=g)
    rewards = torch.rand(6, generator=g)
    beta, alpha = 0.5, 1.0
    torch.testing.assert_close(orw_weights(torch.tensor([0.0, math.log(3.0)]), 1.0), torch.tensor([0.5, 1.5]))
    # AC-Flow with V = 0, no shaping (raw rewards), no advantage clipping, exp weighting
    adv, frac = advantages(rewards, torch.zeros(6), clip=None)
    acflow, _ = acflow_actor_loss(v_pred, target, adv, beta=beta, weighting="exp", v_ref=v_ref, w2_weight=alpha)
    orw = orw_cfm_w2_loss(v_pred, target, v_ref, rewards, beta=beta, alpha=alpha)
    torch.testing.assert_close(acflow, orw, rtol=1e-6, atol=0)
    g_acflow = torch.autograd.grad(acflow, v_pred)[0]
    g_orw = torch.autograd.grad(orw, v_pred)[0]
    torch.testing.assert_close(g_acflow, g_orw, rtol=1e-5, atol=1e-9)
    # a non-zero critic changes the loss (the special case is not trivial)
    adv_v, _ = advantages(rewards, torch.linspace(-1, 1, 6), clip=None)
    other, _ = acflow_actor_loss(v_pred, target, adv_v, beta=beta, v_ref=v_ref, w2_weight=alpha)
    assert abs(float(other.detach()) - float(orw.detach())) > 1e-4


def test_critic_loss_and_explained_variance():
    assert float(critic_loss(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0]))) == pytest.approx(0.5)
    t = torch.tensor([1.0, -1.0, 2.0, 0.0])
    assert float(explained_variance(t, t)) == pytest.approx(1.0)
    assert float(explained_variance(torch.zeros(4), t - t.mean())) == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(float(explained_variance(torch.zeros(3), torch.ones(3))))
    values = torch.zeros(2, requires_grad=True)
    targets = torch.ones(2, requires_grad=True)
    critic_loss(values, targets).backward()
    assert targets.grad is None and values.grad is not None


# ----------------------------------------------------------------------------------------------- Flow-GRPO


def test_grpo_advantages():
    adv = grpo_advantages(torch.tensor([1.0, 3.0, 0.0, 0.0, 6.0]), [0, 0, 1, 1, 1])
    # group 1: mean 2, std sqrt(8)
    s = math.sqrt(8.0)
    torch.testing.assert_close(
        adv, torch.tensor([-1 / 1.0001, 1 / 1.0001, -2 / (s + 1e-4), -2 / (s + 1e-4), 4 / (s + 1e-4)])
    )
    with pytest.raises(ValueError, match="G >= 2"):
        grpo_advantages(torch.tensor([1.0, 2.0]), [0, 1])


def test_grpo_policy_loss_hand_example():
    adv = torch.tensor([1.0, -1.0, 2.0, -2.0])
    old = torch.zeros(4)
    # ratios: [1.5, 1.5, 0.9, 1.05], clip 0.2
    new = torch.log(torch.tensor([1.5, 1.5, 0.9, 1.05])).requires_grad_(True)
    loss, clip_fraction, approx_kl = grpo_policy_loss(new, old, adv, clip_range=0.2)
    # per-sample max(-A r, -A clip(r)):
    #  A= 1, r=1.5:  max(-1.5, -1.2) = -1.2   (clipped: no gradient)
    #  A=-1, r=1.5:  max( 1.5,  1.2) =  1.5
    #  A= 2, r=0.9:  max(-1.8, -1.8) = -1.8
    #  A=-2, r=1.05: max( 2.1,  2.1) =  2.1
    assert float(loss.detach()) == pytest.approx((-1.2 + 1.5 - 1.8 + 2.1) / 4)
    assert float(clip_fraction) == pytest.approx(0.5)
    logs = np.log([1.5, 1.5, 0.9, 1.05])
    assert float(approx_kl) == pytest.approx(0.5 * np.mean(logs**2), rel=1e-5)
    loss.backward()
    # d/dlogp of -A r = -A r / 4; the clipped sample gets no gradient
    torch.testing.assert_close(new.grad, torch.tensor([0.0, 1.5, -1.8, 2.1]) / 4)
    # on-policy (ratio 1): loss = -mean(A), no clipping, zero KL
    loss0, frac0, kl0 = grpo_policy_loss(old, old, adv, clip_range=0.2)
    assert float(loss0) == pytest.approx(0.0) and float(frac0) == 0.0 and float(kl0) == 0.0


def test_gaussian_kl_to_reference():
    kl = gaussian_kl_to_reference(torch.ones(1, 4), torch.zeros(1, 4), 2.0)
    torch.testing.assert_close(kl, torch.tensor([0.5]))
    kl_mean = gaussian_kl_to_reference(torch.ones(1, 4), torch.zeros(1, 4), 2.0, reduction="mean")
    torch.testing.assert_close(kl_mean, torch.tensor([0.125]))
    # matches torch.distributions for a per-sample std [B, 1, 1, 1]
    mean, ref = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)
    std = torch.tensor([0.3, 0.7]).view(2, 1, 1, 1)
    reference = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, std.expand_as(mean)), torch.distributions.Normal(ref, std.expand_as(ref))
    ).sum(dim=(1, 2, 3))
    torch.testing.assert_close(gaussian_kl_to_reference(mean, ref, std), reference)


# ----------------------------------------------------------------------------------------------- noising / OT


def test_noised_states():
    x0 = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    eps = torch.tensor([[0.0, 4.0], [3.0, -1.0]])
    x_s, target = noised_states(x0, torch.tensor([0.25, 1.0]), eps)
    torch.testing.assert_close(x_s, torch.tensor([[1.5, 1.0], [3.0, -1.0]]))
    torch.testing.assert_close(target, torch.tensor([[-2.0, 4.0], [2.0, -2.0]]))  # eps - x0, by hand
    # the target is the derivative d x_s / d s
    x_s2, _ = noised_states(x0, torch.tensor([0.35, 1.0]), eps)
    torch.testing.assert_close((x_s2 - x_s)[0] / 0.1, target[0])
    with pytest.raises(ValueError, match="sigmas"):
        noised_states(x0, torch.tensor([0.5]), eps)


def test_sample_sigmas():
    s = sample_sigmas(20000, torch.Generator().manual_seed(0))
    assert s.shape == (20000,) and ((s > 0) & (s < 1)).all()
    logits = torch.logit(s.double())
    assert float(logits.mean()) == pytest.approx(0.0, abs=0.03) and float(logits.std()) == pytest.approx(1.0, abs=0.03)
    u = sample_sigmas(20000, torch.Generator().manual_seed(0), scheme="uniform")
    assert float(u.mean()) == pytest.approx(0.5, abs=0.01)
    # shift 3 moves mass towards noise: the median of the shifted logit-normal is 3 * 0.5 / 2 = 0.75
    shifted = sample_sigmas(20000, torch.Generator().manual_seed(0), shift=3.0)
    assert float(shifted.median()) == pytest.approx(0.75, abs=0.02)
    torch.testing.assert_close(
        sample_sigmas(5, torch.Generator().manual_seed(4)), sample_sigmas(5, torch.Generator().manual_seed(4))
    )
    with pytest.raises(ValueError, match="logit_normal"):
        sample_sigmas(3, scheme="cosine")


def test_ot_pair_is_a_permutation_lowering_the_cost():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(16, 3, 4, 4, generator=g) + 2.0
    noise = torch.randn(16, 3, 4, 4, generator=g)
    paired, perm = ot_pair(x0, noise, return_permutation=True)
    assert sorted(perm.tolist()) == list(range(16))
    assert torch.equal(paired, noise[perm])

    def cost(n):
        return float(((x0 - n) ** 2).sum())

    assert cost(paired) < cost(noise)
    # it is the optimum: no random permutation beats it
    for _ in range(50):
        assert cost(paired) <= cost(noise[torch.randperm(16, generator=g)]) + 1e-4
    # hand example: swapped pairs are swapped back
    a = torch.tensor([[0.0], [10.0]])
    torch.testing.assert_close(ot_pair(a, torch.tensor([[10.5], [0.5]])), torch.tensor([[0.5], [10.5]]))


def test_w2_distance():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=g)
    assert w2_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    assert w2_distance(x, x[torch.randperm(40, generator=g)]) == pytest.approx(0.0, abs=1e-6)
    shift = torch.tensor([3.0, 0.0, -4.0, 0.0, 0.0])
    assert w2_distance(x, x + shift) == pytest.approx(5.0, rel=1e-6)
    # {0, 0} vs {0, 2} on a line: W2^2 = (0 + 4) / 2
    assert w2_distance(np.zeros((2, 1)), np.array([[0.0], [2.0]])) == pytest.approx(math.sqrt(2.0))
    # images are flattened; different set sizes are fine
    assert w2_distance(torch.zeros(3, 2, 2), torch.ones(5, 2, 2)) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="dimension"):
        w2_distance(torch.zeros(3, 2), torch.zeros(3, 4))


def test_centred_weights_keep_the_expected_gradient_and_drop_the_noise():
    """v_old given (u = v_old + noise): E_noise[grad] is the plain weighted one, and the variance is smaller."""
    g = torch.Generator().manual_seed(0)
    v_old = torch.randn(4, 8, generator=g)
    v0 = v_old + 0.3 * torch.randn(4, 8, generator=g)  # the current policy, moved away from the rollout's
    adv = torch.tensor([1.0, -0.5, 0.2, -0.7])

    def grad(noise, centred):
        v = v0.clone().requires_grad_(True)
        loss, _ = acflow_actor_loss(v, v_old + noise, adv, beta=1.0, v_old=v_old if centred else None)
        (g_,) = torch.autograd.grad(loss, v)
        return g_

    draws = [torch.randn(4, 8, generator=g) for _ in range(4000)]
    plain = torch.stack([grad(n, False) for n in draws])
    centred = torch.stack([grad(n, True) for n in draws])
    torch.testing.assert_close(centred.mean(0), plain.mean(0), atol=0.01, rtol=0.05)
    assert centred.var(0).sum() < 0.6 * plain.var(0).sum()
    # w = 1 (beta = 0): the loss is the proximal term alone, zero at v = v_old
    loss, _ = acflow_actor_loss(v_old.clone(), v_old + draws[0], adv, beta=0.0, v_old=v_old)
    assert loss.item() == pytest.approx(0.0, abs=1e-7)


def test_scaled_w2_is_twice_the_step_kl_to_the_reference():
    """On a trajectory step, ||s (v - v_ref)||^2 with s = |c_v| / std equals 2 KL(p_theta || p_ref) per dimension."""
    from flowalign.sampling import sde_step, sde_step_velocity

    g = torch.Generator().manual_seed(0)
    x, v, v_ref = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    x_next, _, mean, std = sde_step(x, v, 0.95, 0.9, noise_level=0.7, generator=g)
    _, _, ref_mean, _ = sde_step(x, v_ref, 0.95, 0.9, noise_level=0.7, noise=torch.zeros_like(x))
    u, scale = sde_step_velocity(x, x_next, 0.95, 0.9, noise_level=0.7)
    _, m = acflow_actor_loss(v, u, torch.zeros(3), v_ref=v_ref, w2_weight=1.0, fm_scale=scale)
    kl = gaussian_kl_to_reference(mean, ref_mean, std, reduction="mean").mean()
    assert float(m["w2"]) == pytest.approx(2 * float(kl), rel=1e-4)


# --- DiffusionNFT and AWM ---------------------------------------------------------------------------
def test_nft_with_r_one_is_flow_matching_on_the_positive_policy():
    from flowalign.objectives import nft_loss, nft_optimality

    g = torch.Generator().manual_seed(0)
    v, v_old, u = (torch.randn(3, 2, 4, 4, generator=g) for _ in range(3))
    v.requires_grad_(True)
    b = 0.5
    loss = nft_loss(v, v_old, u, torch.ones(3), beta=b)
    v_plus = (1 - b) * v_old + b * v
    expected = ((v_plus - u) ** 2).mean(dim=(1, 2, 3)).mean() / b
    torch.testing.assert_close(loss, expected)
    # by hand, one sample of 2 dimensions, b = 0.5: v_old = [0, 2], v = [2, 0]
    # v+ = 0.5 v_old + 0.5 v = [1, 1], v- = 1.5 v_old - 0.5 v = [-1, 3]; the per-sample MSE averages the 2 dims
    # u = [1, 3]: r = 1 -> |v+ - u|^2 / 2 = (0 + 4) / 2 = 2, / b -> 4
    # u = [1, 1]: |v+ - u|^2 / 2 = 0, |v- - u|^2 / 2 = (4 + 4) / 2 = 4
    #   r = 1 -> 0;  r = 0 -> 4 / b = 8;  r = 1/4 -> (0.25 * 0 + 0.75 * 4) / b = 6
    one = {"v_pred": torch.tensor([[2.0, 0.0]]), "v_old": torch.tensor([[0.0, 2.0]]), "beta": 0.5}
    assert float(nft_loss(target=torch.tensor([[1.0, 3.0]]), r=torch.tensor([1.0]), **one)) == pytest.approx(4.0)
    assert float(nft_loss(target=torch.tensor([[1.0, 1.0]]), r=torch.tensor([1.0]), **one)) == pytest.approx(0.0)
    assert float(nft_loss(target=torch.tensor([[1.0, 1.0]]), r=torch.tensor([0.0]), **one)) == pytest.approx(8.0)
    assert float(nft_loss(target=torch.tensor([[1.0, 1.0]]), r=torch.tensor([0.25]), **one)) == pytest.approx(6.0)
    (grad,) = torch.autograd.grad(loss, v)
    # d/dv of mean_i mean_d (v+ - u)^2 / b = 2 (v+ - u) / (B D)   (the b of v+ cancels the 1 / b)
    torch.testing.assert_close(grad, 2 * (v_plus - u).detach() / (3 * 32))
    assert nft_optimality(torch.tensor([-9.0, 0.0, 1.0, 9.0]), 2.0).tolist() == [0.0, 0.5, 0.75, 1.0]


def test_nft_minimiser_moves_toward_good_and_away_from_bad_samples():
    """Pointwise the NFT loss is minimised at v = v_old + (2 r - 1)(u - v_old) / b: the gradient vanishes there."""
    from flowalign.objectives import nft_loss

    g = torch.Generator().manual_seed(1)
    v_old, u = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    r, b = torch.tensor([1.0, 0.75, 0.5, 0.0]), 0.7
    v_star = (v_old + (2 * r[:, None] - 1) * (u - v_old) / b).requires_grad_(True)
    (grad,) = torch.autograd.grad(nft_loss(v_star, v_old, u, r, beta=b), v_star)
    assert grad.abs().max() < 1e-6
    assert torch.equal(v_star[2].detach(), v_old[2])  # r = 1/2: no information, the sampling policy stays


def test_awm_equal_advantages_give_no_update_and_its_gradient_is_advantage_weighted_matching():
    from flowalign.objectives import awm_loss

    g = torch.Generator().manual_seed(2)
    v, u = torch.randn(4, 2, 3, generator=g).requires_grad_(True), torch.randn(4, 2, 3, generator=g)
    loss, frac = awm_loss(v, u, torch.zeros(4), old_log_prob=-((v - u) ** 2).mean((1, 2)).detach(), clip_range=0.01)
    (grad,) = torch.autograd.grad(loss, v)
    assert torch.count_nonzero(grad) == 0 and float(frac) == 0.0
    adv = torch.tensor([1.0, -1.0, 0.5, 0.0])
    loss, _ = awm_loss(v, u, adv, old_log_prob=-((v - u) ** 2).mean((1, 2)).detach(), clip_range=0.01)
    (grad,) = torch.autograd.grad(loss, v)
    # at ratio 1: d/dv mean_i -A_i exp(-||v_i - u_i||^2 + c) = mean_i A_i 2 (v_i - u_i) / D
    expected = (adv[:, None, None] * 2 * (v - u) / 6 / 4).detach()
    torch.testing.assert_close(grad, expected)
    # once the ratio leaves the clip range, the clipped side stops the gradient of that sample
    far = -((v - u) ** 2).mean((1, 2)).detach() - 1.0  # log p - log p_old = 1: ratio e > 1.01
    loss, frac = awm_loss(v, u, adv, old_log_prob=far, clip_range=0.01)
    (grad,) = torch.autograd.grad(loss, v)
    assert float(frac) == 1.0 and grad[0].abs().max() == 0 and grad[1].abs().max() > 0  # A > 0 clipped, A < 0 not
