"""Tests for flowalign.eval: diversity, W2 features, the SDE path KL, paired and per-seed standard errors."""

import math

import numpy as np
import pytest
import torch

from flowalign.eval import diversity, eval_features, mean_se, paired_difference, sde_path_kl, w2_distance
from flowalign.sampling import sample_latents

SHAPE = (2, 3, 4, 4)  # B = 2 images of D = 3 * 4 * 4 = 48 latent dimensions
D = 48


def const_field(c):
    return lambda x, s: torch.full_like(x, c)


def nonlinear_field(scale):
    def field(x, s):
        sb = s.view(-1, 1, 1, 1)
        return scale * torch.tanh(x) * (1.0 + sb) - 0.3 * sb * x + 0.1
    return field


# ---------------------------------------------------------------------------- diversity, eval_features, W2
def test_diversity_hand_value_and_singletons_ignored():
    zeros, ones = torch.zeros(3, 4, 4), torch.ones(3, 4, 4)
    twos = torch.full((3, 4, 4), 2.0)
    images = torch.stack([zeros, ones, zeros, twos, ones])
    # group 0: one pair at RMS distance 1; group 1: one pair at RMS distance 2; group 2: a single image (skipped)
    assert diversity(images, [0, 0, 1, 1, 2]) == pytest.approx(1.5)
    assert math.isnan(diversity(images[:2], [0, 1]))  # no group of two: NaN, not 0


def test_eval_features_pool_to_8x8():
    images = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).view(2, 3, 16, 16)
    feats = eval_features(images)
    assert feats.shape == (2, 3 * 64)
    # the first feature is the mean of the top-left 2x2 block of channel 0: (0 + 1 + 16 + 17) / 4
    assert feats[0, 0].item() == pytest.approx(8.5)


def test_w2_distance_hand_values():
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    assert w2_distance(x, x + torch.tensor([3.0, 0.0, 4.0])) == pytest.approx(5.0, rel=1e-6)  # a shift: its length
    # the optimal matching, not the distance of the means: {0, 0} vs {0, 2} is sqrt((0 + 4) / 2), the means are 1 apart
    assert w2_distance(torch.zeros(2, 1), torch.tensor([[0.0], [2.0]])) == pytest.approx(math.sqrt(2.0), rel=1e-6)
    # and not the distance of paired rows in their given order: {0, 10} vs {10, 0} is 0
    assert w2_distance(torch.tensor([[0.0], [10.0]]), torch.tensor([[10.0], [0.0]])) == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------------------- sde_path_kl
def _noise(seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def test_path_kl_one_step_from_noise_hand_computed():
    # s = 1 -> 0.8, a = 0.7. At s = 1 the clamp uses 1 - s_next: sigma_t^2 = a^2 * 1 / 0.2; the v coefficient is
    # (1 + sigma_t^2 (1 - s) / (2 s)) dt = dt = -0.2; std^2 = sigma_t^2 * 0.2 = a^2.
    a, c1, c2 = 0.7, 1.5, -0.5
    c_v, std2 = -0.2, a**2
    expected = (c_v * (c1 - c2)) ** 2 * D / (2 * std2)  # = 0.16 * 48 / 0.98
    kl = sde_path_kl(const_field(c1), const_field(c2), _noise(), torch.tensor([1.0, 0.8]), a,
                     generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(kl, torch.full((2,), expected), rtol=1e-5, atol=0)


def test_path_kl_one_interior_step_hand_computed():
    # s = 0.6 -> 0.4, a = 0.7: sigma_t^2 = 0.49 * 0.6 / 0.4 = 0.735, dt = -0.2,
    # c_v = (1 + 0.735 * 0.4 / (2 * 0.6)) * (-0.2) = 1.245 * (-0.2) = -0.249, std^2 = 0.735 * 0.2 = 0.147
    a, c1, c2 = 0.7, 0.3, 1.3
    sigma_t2 = a**2 * 0.6 / 0.4
    c_v = (1 + sigma_t2 * (1 - 0.6) / (2 * 0.6)) * (0.4 - 0.6)
    std2 = sigma_t2 * 0.2
    assert c_v == pytest.approx(-0.249) and std2 == pytest.approx(0.147)
    expected = (c_v * (c1 - c2)) ** 2 * D / (2 * std2)  # 0.062001 * 48 / 0.294 = 10.1226...
    kl = sde_path_kl(const_field(c1), const_field(c2), _noise(), torch.tensor([0.6, 0.4]), a,
                     generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(kl, torch.full((2,), expected), rtol=1e-5, atol=0)
    assert expected == pytest.approx(10.12261, rel=1e-5)


def test_path_kl_zero_for_identical_fields():
    sigmas = torch.tensor([1.0, 0.9, 0.6, 0.3, 0.0])
    kl = sde_path_kl(nonlinear_field(1.0), nonlinear_field(1.0), _noise(), sigmas, 0.7,
                     generator=torch.Generator().manual_seed(2))
    assert torch.equal(kl, torch.zeros(2))


def test_path_kl_is_the_sum_of_its_steps_on_its_own_trajectory():
    sigmas = torch.tensor([1.0, 0.9, 0.6, 0.3, 0.1])
    ft, ref, noise = nonlinear_field(1.4), nonlinear_field(1.0), _noise(3)
    total = sde_path_kl(ft, ref, noise, sigmas, 0.7, generator=torch.Generator().manual_seed(4))
    # the policy's own trajectory with the same generator; each step's KL depends only on the state it starts from
    traj = sample_latents(ft, noise, sigmas, sampler="sde", noise_level=0.7,
                          generator=torch.Generator().manual_seed(4), return_trajectory=True).trajectory
    steps = [sde_path_kl(ft, ref, traj[:, k], sigmas[k : k + 2], 0.7, generator=torch.Generator().manual_seed(99))
             for k in range(4)]
    assert all(bool((s > 0).all()) for s in steps)
    torch.testing.assert_close(total, sum(steps), rtol=1e-5, atol=1e-6)
    # ... and the states matter: the KL of step 2 from the noise instead of x_2 is a different number
    other = sde_path_kl(ft, ref, noise, sigmas[2:4], 0.7)
    assert not torch.allclose(other, steps[2], rtol=1e-3)


def test_path_kl_euler_steps_add_nothing():
    sigmas = torch.tensor([1.0, 0.9, 0.6, 0.3, 0.1])
    ft, ref, noise = nonlinear_field(1.4), nonlinear_field(1.0), _noise(5)
    windowed = sde_path_kl(ft, ref, noise, sigmas, 0.7, generator=torch.Generator().manual_seed(6), sde_steps=2)
    first_two = sde_path_kl(ft, ref, noise, sigmas[:3], 0.7, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(windowed, first_two, rtol=0, atol=0)
    full = sde_path_kl(ft, ref, noise, sigmas, 0.7, generator=torch.Generator().manual_seed(6))
    assert bool((full > windowed).all())
    assert torch.equal(sde_path_kl(ft, ref, noise, sigmas, 0.7, sde_steps=0), torch.zeros(2))


def test_path_kl_reference_called_only_on_sde_steps_and_needs_noise():
    calls = []

    def ref(x, s):
        calls.append(float(s[0]))
        return torch.zeros_like(x)

    sigmas = torch.tensor([1.0, 0.9, 0.6, 0.3, 0.1])
    sde_path_kl(const_field(1.0), ref, _noise(), sigmas, 0.7, sde_steps=2)
    assert calls == pytest.approx([1.0, 0.9])
    with pytest.raises(ValueError, match="noise_level > 0"):
        sde_path_kl(const_field(1.0), ref, _noise(), sigmas, 0.0)


# ---------------------------------------------------------------------------- paired_difference, mean_se
def test_paired_difference_hand_values():
    mean, se = paired_difference([3.0, 5.0, 4.0], [1.0, 2.0, 3.0])  # d = [2, 3, 1]: mean 2, s_d = 1
    assert mean == pytest.approx(2.0) and se == pytest.approx(1.0 / math.sqrt(3.0))
    mean, se = paired_difference(torch.tensor([1.0, 1.0]), np.array([0.5, 0.5]))  # constant shift: se 0
    assert (mean, se) == (pytest.approx(0.5), 0.0)


def test_paired_difference_errors():
    with pytest.raises(ValueError, match="3 and 2"):
        paired_difference([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="at least 2 pairs"):
        paired_difference([1.0], [0.0])
    with pytest.raises(ValueError, match=r"index \[1\]"):
        paired_difference([1.0, float("nan")], [0.0, 0.0])


def test_mean_se_hand_values():
    mean, se = mean_se([1.0, 2.0, 3.0, 6.0])  # mean 3, sample var (4 + 1 + 0 + 9) / 3 = 14 / 3
    assert mean == pytest.approx(3.0) and se == pytest.approx(math.sqrt(14 / 3) / 2)
    mean, se = mean_se([4.0])
    assert mean == 4.0 and math.isnan(se)
    with pytest.raises(ValueError, match="no values"):
        mean_se([])
