"""Tests for flowalign.sampling: Euler and Flow-GRPO SDE steps, sigma grids, the sampler loop."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from flowalign.sampling import euler_step, flow_sigmas, sample_latents, sde_step, sde_step_velocity


def toy_velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A smooth, non-linear, sigma-dependent velocity field (stands in for a transformer)."""
    s = sigma.view(-1, *([1] * (x.ndim - 1)))
    return torch.tanh(x) * (1.0 + s) - 0.3 * s * x + 0.1


def _xv(batch=4, shape=(3, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *shape, generator=g), torch.randn(batch, *shape, generator=g)


def test_euler_step_formula():
    x, v = _xv()
    torch.testing.assert_close(euler_step(x, v, 1.0, 0.75), x - 0.25 * v, rtol=0, atol=0)
    sig = torch.tensor([0.9, 0.5, 0.3, 0.1])
    nxt = torch.tensor([0.8, 0.25, 0.0, 0.05])
    expected = x + (nxt - sig).view(-1, 1, 1, 1) * v
    torch.testing.assert_close(euler_step(x, v, sig, nxt), expected)


@pytest.mark.parametrize("sigma,sigma_next", [(1.0, 0.9), (0.6, 0.4), (0.2, 0.0)])
def test_sde_with_zero_noise_is_euler_bit_for_bit(sigma, sigma_next):
    x, v = _xv()
    x_next, log_prob, mean, std = sde_step(x, v, sigma, sigma_next, noise_level=0.0, generator=torch.Generator())
    assert torch.equal(x_next, euler_step(x, v, sigma, sigma_next))
    assert torch.equal(mean, euler_step(x, v, sigma, sigma_next))
    assert float(std) == 0.0
    # A deterministic step has no density: defined as 0 (never NaN).
    assert torch.equal(log_prob, torch.zeros(4))


def test_sde_mean_and_std_hand_computed():
    # s = 0.5, s_next = 0.3, a = 0.7: sigma_t = 0.7, dt = -0.2
    x = torch.full((1, 1, 1, 1), 2.0)
    v = torch.full((1, 1, 1, 1), -1.0)
    _, _, mean, std = sde_step(x, v, 0.5, 0.3, noise_level=0.7, noise=torch.zeros_like(x))
    sigma_t, s, dt = 0.7, 0.5, -0.2
    expected_mean = 2.0 * (1 + sigma_t**2 / (2 * s) * dt) + (-1.0) * (1 + sigma_t**2 * (1 - s) / (2 * s)) * dt
    assert mean.item() == pytest.approx(expected_mean, rel=1e-6)
    assert float(std) == pytest.approx(sigma_t * math.sqrt(0.2), rel=1e-6)


def test_sde_first_step_clamp_is_finite():
    # At s = 1 the denominator 1 - s is replaced by 1 - s_next (Flow-GRPO clamp): finite values.
    x, v = _xv()
    x_next, log_prob, mean, std = sde_step(x, v, 1.0, 0.8, noise_level=0.7, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(x_next).all() and torch.isfinite(log_prob).all()
    assert float(std) == pytest.approx(0.7 * math.sqrt(1.0 / 0.2) * math.sqrt(0.2), rel=1e-6)


def test_sde_log_prob_matches_torch_normal():
    x, v = _xv()
    sig = torch.tensor([0.9, 0.7, 0.5, 0.2])
    nxt = torch.tensor([0.8, 0.6, 0.3, 0.0])
    x_next, log_prob, mean, std = sde_step(x, v, sig, nxt, noise_level=0.7, generator=torch.Generator().manual_seed(1))
    reference = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(x_next).sum(dim=(1, 2, 3))
    torch.testing.assert_close(log_prob, reference, rtol=1e-5, atol=1e-3)
    _, log_prob_mean, _, _ = sde_step(x, v, sig, nxt, prev_sample=x_next, log_prob_reduction="mean")
    torch.testing.assert_close(log_prob_mean, reference / (3 * 8 * 8), rtol=1e-5, atol=1e-5)


def test_sde_empirical_moments_match_mean_and_std():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 2, 2).expand(20000, 2, 2, 2).contiguous()
    v = toy_velocity(x, torch.full((20000,), 0.6))
    x_next, _, mean, std = sde_step(x, v, 0.6, 0.45, noise_level=0.7, generator=torch.Generator().manual_seed(3))
    empirical_mean = x_next.mean(0)
    empirical_std = x_next.std(0)
    # standard error of the mean: std / sqrt(20000) ~ 0.003 * std; allow 5 standard errors
    assert (empirical_mean - mean[0]).abs().max() < 5 * float(std) / math.sqrt(20000)
    torch.testing.assert_close(empirical_std, torch.full_like(empirical_std, float(std)), rtol=0.03, atol=0)


def test_prev_sample_recomputes_the_same_log_prob():
    x, v = _xv()
    x_next, log_prob, _, _ = sde_step(x, v, 0.8, 0.6, generator=torch.Generator().manual_seed(5))
    _, log_prob_again, _, _ = sde_step(x, v, 0.8, 0.6, prev_sample=x_next)
    torch.testing.assert_close(log_prob_again, log_prob, rtol=1e-6, atol=1e-4)
    # a different velocity (policy) gives a lower density to the same sample
    _, log_prob_other, _, _ = sde_step(x, v + 0.5, 0.8, 0.6, prev_sample=x_next)
    assert (log_prob_other < log_prob).all()


def test_sde_bf16_sample_log_prob_is_consistent():
    x, v = _xv()
    x, v = x.bfloat16(), v.bfloat16()
    x_next, log_prob, _, _ = sde_step(x, v, 0.8, 0.6, generator=torch.Generator().manual_seed(5))
    assert x_next.dtype == torch.bfloat16 and log_prob.dtype == torch.float32
    _, log_prob_again, _, _ = sde_step(x, v, 0.8, 0.6, prev_sample=x_next)
    torch.testing.assert_close(log_prob_again, log_prob)


def test_sde_noise_argument_is_used():
    x, v = _xv()
    z = torch.randn_like(x)
    x_next, _, mean, std = sde_step(x, v, 0.8, 0.6, noise=z)
    torch.testing.assert_close(x_next, mean + std * z)


@pytest.mark.parametrize("sigma, sigma_next", [(1.0, 0.9), (0.8, 0.6), (0.2, 0.0)])
def test_sde_step_velocity_inverts_the_step(sigma, sigma_next):
    """The velocity recovered from a realised step is v + std z / c_v: v itself for z = 0, and its
    shift from v is exactly the injected noise (an unbiased regression target with the step's noise)."""
    x, v = _xv()
    z = torch.randn_like(x)
    x_mean, _, mean, std = sde_step(x, v, sigma, sigma_next, noise_level=0.7, noise=torch.zeros_like(x))
    torch.testing.assert_close(sde_step_velocity(x, x_mean, sigma, sigma_next, noise_level=0.7)[0], v, rtol=1e-4, atol=1e-4)
    x_next, _, _, _ = sde_step(x, v, sigma, sigma_next, noise_level=0.7, noise=z)
    u, scale = sde_step_velocity(x, x_next, sigma, sigma_next, noise_level=0.7)
    # the step with velocity u and no noise lands on x_next: the definition
    landed, _, _, _ = sde_step(x, u, sigma, sigma_next, noise_level=0.7, noise=torch.zeros_like(x))
    torch.testing.assert_close(landed, x_next, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(u, v)  # the noise moved the target
    # in units of the step noise the target error is the injected z, and scale^2 |u - v|^2 / 2 is -log p + const
    torch.testing.assert_close(scale * (u - v), -z, rtol=1e-3, atol=1e-3)  # c_v < 0: dt < 0
    _, logp, _, std = sde_step(x, v, sigma, sigma_next, noise_level=0.7, prev_sample=x_next, log_prob_reduction="mean")
    nll = (scale**2 * (u - v) ** 2 / 2).mean(dim=(1, 2, 3)) + torch.log(std).flatten() + 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(-logp, nll, rtol=1e-4, atol=1e-4)
    # a = 0: the Euler step, whose recovered velocity is (x_next - x) / dt
    x_euler = euler_step(x, v, sigma, sigma_next)
    torch.testing.assert_close(sde_step_velocity(x, x_euler, sigma, sigma_next, noise_level=0.0)[0], v, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="non-zero length"):
        sde_step_velocity(x, x, 0.5, 0.5)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_sigmas_match_scheduler(shift):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    sigmas = flow_sigmas(scheduler, 6)
    reference = FlowMatchEulerDiscreteScheduler(shift=shift)
    reference.set_timesteps(6)
    assert sigmas.shape == (7,) and sigmas[-1] == 0 and sigmas[0] == 1
    torch.testing.assert_close(sigmas, reference.sigmas, rtol=0, atol=0)
    torch.testing.assert_close(sigmas[:-1] * 1000, reference.timesteps, rtol=0, atol=0)
    assert scheduler.timesteps.shape[0] == 1000  # the caller's scheduler is untouched
    # a shift set after construction (set_shift) is respected too, exactly as the stock scheduler does
    late, late_reference = FlowMatchEulerDiscreteScheduler(shift=1.0), FlowMatchEulerDiscreteScheduler(shift=1.0)
    late.set_shift(shift)
    late_reference.set_shift(shift)
    late_reference.set_timesteps(6)
    torch.testing.assert_close(flow_sigmas(late, 6), late_reference.sigmas, rtol=0, atol=0)


def test_flow_sigmas_shift_warps_grid_towards_noise():
    plain = flow_sigmas(FlowMatchEulerDiscreteScheduler(shift=1.0), 4)
    shifted = flow_sigmas(FlowMatchEulerDiscreteScheduler(shift=3.0), 4)
    assert (shifted[1:-1] > plain[1:-1]).all()
    torch.testing.assert_close(shifted, torch.tensor([1.0, 0.8577, 0.6022, 0.0089, 0.0]), atol=1e-4, rtol=0)


def test_flow_sigmas_dynamic_shifting_needs_mu():
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    with pytest.raises(ValueError, match="image_seq_len"):
        flow_sigmas(scheduler, 4)
    reference = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    reference.set_timesteps(4, mu=0.8)
    torch.testing.assert_close(flow_sigmas(scheduler, 4, mu=0.8), reference.sigmas)


def test_sample_latents_euler_matches_stock_scheduler_loop():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    x0, _ = _xv(batch=3)
    # the stock pipeline loop
    scheduler.set_timesteps(8)
    latents = x0.clone()
    for t in scheduler.timesteps:
        timestep = t.expand(latents.shape[0])
        v = toy_velocity(latents, timestep / 1000)
        latents = scheduler.step(v, t, latents, return_dict=False)[0]
    out = sample_latents(toy_velocity, x0, flow_sigmas(FlowMatchEulerDiscreteScheduler(shift=3.0), 8))
    torch.testing.assert_close(out.latents, latents, rtol=0, atol=0)
    assert out.trajectory is None and out.log_probs is None


def test_sample_latents_sde_trajectory_and_log_probs():
    sigmas = flow_sigmas(FlowMatchEulerDiscreteScheduler(shift=3.0), 5)
    x0, _ = _xv(batch=2)
    out = sample_latents(
        toy_velocity, x0, sigmas, sampler="sde", generator=torch.Generator().manual_seed(0),
        return_trajectory=True, return_log_probs=True,
    )
    assert out.trajectory.shape == (2, 6, 3, 8, 8) and out.log_probs.shape == (2, 5)
    assert torch.equal(out.trajectory[:, 0], x0) and torch.equal(out.trajectory[:, -1], out.latents)
    assert torch.isfinite(out.log_probs).all()
    # every stored transition re-evaluates to the stored log-prob (what the Flow-GRPO ratio relies on)
    for k in range(5):
        x_k = out.trajectory[:, k]
        v = toy_velocity(x_k, sigmas[k].expand(2))
        _, lp, _, _ = sde_step(x_k, v, sigmas[k], sigmas[k + 1], prev_sample=out.trajectory[:, k + 1])
        torch.testing.assert_close(lp, out.log_probs[:, k], rtol=1e-6, atol=1e-3)
    # same generator seed -> same samples; noise_level 0 -> the Euler result
    again = sample_latents(toy_velocity, x0, sigmas, sampler="sde", generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.latents, out.latents)
    ode = sample_latents(toy_velocity, x0, sigmas, sampler="sde", noise_level=0.0)
    assert torch.equal(ode.latents, sample_latents(toy_velocity, x0, sigmas).latents)


def test_sde_window_is_sde_then_euler():
    """sde_steps=m: the first m steps are the full SDE run's (same generator), the rest Euler steps."""
    sigmas = flow_sigmas(FlowMatchEulerDiscreteScheduler(shift=3.0), 6)
    x0, _ = _xv(batch=3)
    kw = dict(sampler="sde", return_trajectory=True, return_log_probs=True)
    full = sample_latents(toy_velocity, x0, sigmas, generator=torch.Generator().manual_seed(5), **kw)
    win = sample_latents(toy_velocity, x0, sigmas, generator=torch.Generator().manual_seed(5), sde_steps=2, **kw)
    assert torch.equal(win.trajectory[:, :3], full.trajectory[:, :3])
    assert not torch.allclose(win.latents, full.latents)
    assert torch.equal(win.log_probs[:, :2], full.log_probs[:, :2]) and (win.log_probs[:, 2:] == 0).all()
    x = win.trajectory[:, 2]
    for k in range(2, 6):  # the rest: deterministic Euler from the state the window left
        x = euler_step(x, toy_velocity(x, sigmas[k].expand(3)), sigmas[k], sigmas[k + 1])
        torch.testing.assert_close(win.trajectory[:, k + 1], x)
    zero = sample_latents(toy_velocity, x0, sigmas, sampler="sde", generator=torch.Generator(), sde_steps=0)
    assert torch.equal(zero.latents, sample_latents(toy_velocity, x0, sigmas).latents)
    with pytest.raises(ValueError, match="sde_steps"):
        sample_latents(toy_velocity, x0, sigmas, sampler="sde", sde_steps=-1)


def test_sample_latents_rejects_bad_arguments():
    sigmas = torch.tensor([1.0, 0.5, 0.0])
    x0, _ = _xv(batch=1)
    with pytest.raises(ValueError, match="sampler"):
        sample_latents(toy_velocity, x0, sigmas, sampler="heun")
    with pytest.raises(ValueError, match="return_log_probs"):
        sample_latents(toy_velocity, x0, sigmas, return_log_probs=True)
    with pytest.raises(ValueError, match="sigma must be"):
        euler_step(x0, x0, torch.tensor([1.0, 0.5]), 0.0)


def test_steps_trace_as_one_graph():
    """No Python branching on tensor values / host syncs: dynamo traces the steps with fullgraph=True."""
    x, v = _xv(batch=2)
    z = torch.randn_like(x)
    sig, nxt = torch.tensor([0.8, 0.5]), torch.tensor([0.6, 0.0])
    compiled_sde = torch.compile(sde_step, backend="eager", fullgraph=True)
    for got, want in zip(compiled_sde(x, v, sig, nxt, noise=z), sde_step(x, v, sig, nxt, noise=z)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    compiled_euler = torch.compile(euler_step, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled_euler(x, v, sig, nxt), euler_step(x, v, sig, nxt), rtol=0, atol=0)


def test_sample_latents_reproduces_the_stock_sd3_pipeline_bit_for_bit():
    """velocity_fn = CFG over the transformer at timestep sigma * 1000 gives exactly the pipeline's latents."""
    from flowalign.tiny import MAX_SEQUENCE_LENGTH, build_tiny_sd3_pipeline

    pipe = build_tiny_sd3_pipeline(num_layers=1)
    prompts, guidance = ["a red circle", "two blue squares"], 3.0
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    reference = pipe(
        prompts, num_inference_steps=4, guidance_scale=guidance, latents=x.clone(), output_type="latent",
        max_sequence_length=MAX_SEQUENCE_LENGTH,
    ).images
    embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
        prompt=prompts, prompt_2=None, prompt_3=None, do_classifier_free_guidance=True,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
    )

    @torch.no_grad()
    def velocity_fn(latents, sigma):
        v = pipe.transformer(
            hidden_states=torch.cat([latents, latents]),
            timestep=torch.cat([sigma, sigma]) * 1000,  # diffusers timestep = sigma * 1000
            encoder_hidden_states=torch.cat([negative_embeds, embeds]),
            pooled_projections=torch.cat([negative_pooled, pooled]),
            return_dict=False,
        )[0]
        v_uncond, v_cond = v.chunk(2)
        return v_uncond + guidance * (v_cond - v_uncond)

    out = sample_latents(velocity_fn, x, flow_sigmas(pipe.scheduler, 4))
    torch.testing.assert_close(out.latents, reference, rtol=0, atol=0)
