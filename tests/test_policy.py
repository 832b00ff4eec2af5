"""flowalign.policy.Policy: the one object the trainer, the methods, the probe and the demo sample and evaluate
through. Built from a bare pipeline it samples what the trainer's policy samples; its velocity hook is what every
rollout calls; its EMA and reference swap in and out exactly."""

from __future__ import annotations

import torch
from peft import LoraConfig

from flowalign.policy import Policy, default_guidance_scale


def test_a_policy_of_a_bare_pipeline_samples_what_the_trainers_policy_samples(tmp_path, make_trainer, tiny_pipeline):
    trainer = make_trainer(tmp_path)  # a fresh LoRA (lora_B = 0): the policy is still the base model
    cfg = trainer.config
    pipe = tiny_pipeline(seed=0, num_layers=1)
    policy = Policy(pipe, pipe.transformer, trainer.guidance_scale, sample_steps=cfg.sample_steps,
                    noise_level=cfg.noise_level, sde_steps_fraction=cfg.sde_steps_fraction)
    assert policy.latent_shape == trainer.latent_shape and policy.sde_steps() == trainer.sde_steps
    prompts = ["a red circle", "a blue square", "a red circle"]
    for sampler in ("euler", "sde"):
        mine = policy.rollout(prompts, torch.Generator().manual_seed(4), sampler)
        theirs = trainer.policy.rollout(prompts, torch.Generator().manual_seed(4), sampler)
        torch.testing.assert_close(mine.latents, theirs.latents, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(policy.decode(mine.latents), trainer.policy.decode(theirs.latents), rtol=1e-5, atol=1e-5)
    assert (mine.log_probs is not None) and mine.trajectory.shape[1] == cfg.sample_steps + 1
    assert default_guidance_scale(None) == 2.0 and default_guidance_scale("stabilityai/sd3.5-medium") == 4.5


def test_every_rollout_goes_through_the_velocity_hook(tiny_pipeline):
    """With v = c everywhere (both CFG branches), the Euler sampler from x_1 lands on x_1 - c (the steps sum to
    -1), whatever the guidance scale and micro-batch; so the rollout calls ``policy.velocity`` and nothing else."""
    pipe = tiny_pipeline(seed=0, num_layers=1)
    policy = Policy(pipe, pipe.transformer, guidance_scale=3.0, sample_steps=5, rollout_batch_size=2)
    c = torch.linspace(-1, 1, int(torch.tensor(policy.latent_shape).prod())).reshape(policy.latent_shape)
    calls = []

    def velocity(model, x, sigma, embeds, pooled):
        calls.append(x.shape[0])
        return c.expand_as(x).clone()

    policy.velocity = velocity
    noise = torch.randn(3, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    roll = policy.rollout(["a", "b", "c"], None, "euler", noise=noise)
    torch.testing.assert_close(roll.latents, noise - c, rtol=0, atol=1e-5)
    assert calls == [4] * 5 + [2] * 5  # 2 then 1 images a call (CFG doubles the rows), 5 steps each


def test_the_ema_swaps_in_for_sampling_and_out_after(tiny_pipeline):
    pipe = tiny_pipeline(seed=0, num_layers=1)
    model = pipe.transformer
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=["attn.to_q"]))
    policy = Policy(pipe, model, 2.0, ema_decay=0.75)
    params = policy.trainable()
    start = [q.detach().clone() for q in params]
    with torch.no_grad():
        for q in params:
            q.add_(1.0)
    policy.update_ema()  # ema = 0.75 start + 0.25 (start + 1)
    for e, s in zip(policy.ema.shadow_params, start):
        torch.testing.assert_close(e, s + 0.25)
    policy.update_ema()  # a constant decay from the first update on: 0.75 (start + 0.25) + 0.25 (start + 1)
    for e, s in zip(policy.ema.shadow_params, start):
        torch.testing.assert_close(e, s + 0.4375)
    with policy.sampling_policy():
        for q, s in zip(params, start):
            torch.testing.assert_close(q.detach(), s + 0.4375)
    for q, s in zip(params, start):  # the trained values are back
        torch.testing.assert_close(q.detach(), s + 1.0)
    assert Policy(pipe, model, 2.0).ema is None  # no EMA: sampling_policy is the trained policy


def test_the_reference_is_the_model_without_its_adapters_or_the_given_copy(tiny_pipeline):
    pipe = tiny_pipeline(seed=0, num_layers=1)
    base = tiny_pipeline(seed=0, num_layers=1).transformer
    model = pipe.transformer
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=["attn.to_q"]))
    with torch.no_grad():
        for name, q in model.named_parameters():
            if "lora_B" in name:
                q.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    policy = Policy(pipe, model, 2.0)
    x = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(2))
    s = torch.full((2,), 0.6)
    e, p = policy.encode(["a red circle"] * 2)
    with torch.no_grad():
        trained = policy.velocity(model, x, s, e, p)
        with policy.reference_model() as ref:
            v_ref = policy.velocity(ref, x, s, e, p)
        v_base = policy.velocity(base, x, s, e, p)
        torch.testing.assert_close(v_ref, v_base)
        assert not torch.allclose(trained, v_base)
        torch.testing.assert_close(policy.velocity(model, x, s, e, p), trained)  # adapters back on
        with Policy(pipe, model, 2.0, reference=base).reference_model() as ref:
            assert ref is base
