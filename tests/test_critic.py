"""Tests for flowalign.critic in the tiny world (latents 3x32x32, pooled prompt embedding 128)."""

import pytest
import torch

from flowalign.critic import Critic

TINY = dict(in_channels=3, pooled_dim=128)


def _inputs(batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 32, 32, generator=g), torch.rand(batch, generator=g), torch.randn(batch, 128, generator=g)


def _perturb(critic: Critic, seed: int = 1) -> Critic:
    """Give the zero-initialised output layer random weights so outputs depend on the inputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        critic.out.weight.copy_(torch.randn(critic.out.weight.shape, generator=g) * 0.1)
        critic.out.bias.fill_(0.3)
    return critic


def test_output_shape_and_zero_init():
    torch.manual_seed(0)
    critic = Critic(**TINY)
    latents, sigma, pooled = _inputs()
    values = critic(latents, sigma, pooled)
    assert values.shape == (4,)
    assert torch.equal(values, torch.zeros(4))  # zero-initialised head: V = 0 before training
    _perturb(critic)
    values = critic(latents, sigma, pooled)
    assert values.shape == (4,) and torch.isfinite(values).all()
    # every input matters
    assert not torch.allclose(values, critic(latents + 1.0, sigma, pooled))
    assert not torch.allclose(values, critic(latents, 1.0 - sigma, pooled))
    assert not torch.allclose(values, critic(latents, sigma, pooled + 1.0))
    # a scalar sigma broadcasts over the batch
    torch.testing.assert_close(critic(latents, 0.5, pooled), critic(latents, torch.full((4,), 0.5), pooled))


def test_parameter_count_matches_architecture():
    critic = Critic(**TINY)
    cfg = critic.config  # the registered hyper-parameters, defaults included
    c0, c1, c2 = cfg.channels
    t, h, p, cin = cfg.time_embed_dim, cfg.hidden_dim, cfg.pooled_dim, cfg.in_channels
    expected = (
        (cin * 9 * c0 + c0)  # conv_in
        + (2 * c0 + c0 * 9 * c1 + c1)  # GroupNorm + stride-2 conv
        + (2 * c1 + c1 * 9 * c2 + c2)
        + 2 * c2  # norm_out
        + (t * h + h) + (h * h + h)  # TimestepEmbedding: Linear-SiLU-Linear
        + (p * h + h)  # prompt projection
        + ((c2 + 2 * h) * h + h + 2 * h)  # MLP block 1: Linear + LayerNorm
        + (h * h + h + 2 * h)  # MLP block 2
        + (h + 1)  # scalar output
    )
    assert critic.num_parameters() == expected == sum(p.numel() for p in critic.parameters())
    assert expected == 456_705
    # the SD3-sized default stays ~1M parameters (SD3-medium's transformer has ~2B)
    assert Critic().num_parameters() < 1_000_000


def test_critic_fits_a_toy_regression():
    torch.manual_seed(0)
    critic = Critic(in_channels=3, pooled_dim=128, channels=(16, 32), hidden_dim=64)
    n = 32
    g = torch.Generator().manual_seed(1)
    offset = torch.randn(n, generator=g)
    # 16x16 keeps the test fast; the critic pools globally, so any resolution works
    latents = torch.randn(n, 3, 16, 16, generator=g) * 0.5 + offset.view(-1, 1, 1, 1)
    sigma = torch.rand(n, generator=g)
    pooled = torch.randn(n, 128, generator=g)
    # target depends on the image content, the noise level and the prompt
    target = torch.tanh(offset) + (2 * sigma - 1) * 0.5 + 0.5 * torch.tanh(pooled[:, 0])
    optimizer = torch.optim.Adam(critic.parameters(), lr=3e-3)
    losses = []
    for _ in range(200):
        loss = ((critic(latents, sigma, pooled) - target) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    print(f'critic toy regression: loss {losses[0]:.4f} -> {losses[-1]:.2e}')
    assert losses[-1] < losses[0] / 20, (losses[0], losses[-1])


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    critic = _perturb(Critic(**TINY)).eval()
    critic.save_pretrained(tmp_path / "critic")
    assert (tmp_path / "critic" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "critic" / "config.json").is_file()
    loaded = Critic.from_pretrained(tmp_path / "critic").eval()
    architecture = [k for k in critic.config if not k.startswith("_")]
    assert {k: loaded.config[k] for k in TINY} == TINY
    assert {k: tuple(loaded.config[k]) if k == "channels" else loaded.config[k] for k in architecture} == {
        k: tuple(critic.config[k]) if k == "channels" else critic.config[k] for k in architecture}
    for (name, a), (_, b) in zip(critic.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    latents, sigma, pooled = _inputs()
    assert torch.equal(critic(latents, sigma, pooled), loaded(latents, sigma, pooled))


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="norm_num_groups=8"):
        Critic(in_channels=3, pooled_dim=128, channels=(12, 24))
    critic = Critic(**TINY)
    latents, sigma, pooled = _inputs()
    with pytest.raises(ValueError, match=r"latents \[B, 3, H, W\]"):
        critic(latents[:, :2], sigma, pooled)
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        critic(latents, sigma, pooled[:, :64])
