"""The light critic V(x_s, s, c) of AC-Flow: the expected shaped reward of the final image given a noisy state.

AC-Flow (arXiv 2510.18072) describes its critic only as "computationally efficient" (MLP layers with LayerNorm
and small CNNs); the architecture below is our design:

    latents x_s [B, C, H, W] --conv3x3--> (GroupNorm, SiLU, conv3x3 stride 2) x (len(channels) - 1)
                             --GroupNorm, SiLU, global average pool--> h_img [B, channels[-1]]
    sigma s [B]              --sinusoidal(s * 1000), Linear-SiLU-Linear (diffusers TimestepEmbedding)--> h_t [B, hidden]
    pooled prompt c [B, P]   --Linear--> h_c [B, hidden]
    concat(h_img, h_t, h_c)  --(Linear, LayerNorm, SiLU) x mlp_layers, Linear--> V [B]

The output layer starts at zero, so an untrained critic predicts V = 0 (the ORW-CFM-W2 special case) and the
advantage starts as the shaped reward. It is a diffusers ``ModelMixin``: ``save_pretrained`` /
``from_pretrained`` (safetensors + config.json) work out of the box.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

__all__ = ["Critic"]


class Critic(ModelMixin, ConfigMixin):
    """V(x_s, s, c): a small CNN on latents + timestep embedding + pooled prompt projection + LayerNorm MLP.

    Inputs: ``latents`` [B, C, H, W]; ``sigma`` [B] (or a scalar) noise level in [0, 1] (not the x1000 diffusers
    timestep: the module scales it itself); ``pooled_prompt_embeds`` [B, P]. Output: ``values`` [B].

    Hyper-parameters (registered in ``critic.config``; defaults sized for SD3 / SD3.5, ~1M parameters vs 2B):
    ``in_channels`` latent channels (SD3: 16; the tiny world: 3); ``pooled_dim`` width of the pooled prompt
    embedding (SD3: 768 + 1280 = 2048; tiny world: 128); ``channels`` conv widths, each after the first halving
    the resolution; ``time_embed_dim`` sinusoidal features of ``sigma * 1000``; ``hidden_dim`` width of the
    projections and the MLP head; ``norm_num_groups`` GroupNorm groups (must divide every channel count);
    ``mlp_layers`` (Linear, LayerNorm, SiLU) blocks before the scalar output.

    Example::

        critic = Critic(in_channels=3, pooled_dim=128)
        v = critic(latents, sigma, pooled)           # [B]
        critic.num_parameters()                       # from diffusers ModelMixin
        critic.save_pretrained("out/critic"); Critic.from_pretrained("out/critic")
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 16,
        pooled_dim: int = 2048,
        channels: tuple[int, ...] = (32, 64, 128),
        time_embed_dim: int = 128,
        hidden_dim: int = 256,
        norm_num_groups: int = 8,
        mlp_layers: int = 2,
    ):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) < 1:
            raise ValueError("Critic needs at least one conv width in channels, e.g. channels=(32, 64, 128).")
        bad = [c for c in channels if c % norm_num_groups]
        if bad:
            raise ValueError(
                f"norm_num_groups={norm_num_groups} must divide every conv width; {bad} in channels={channels} "
                "do not. Pick widths that are multiples of norm_num_groups."
            )
        if time_embed_dim % 2:
            raise ValueError(f"time_embed_dim must be even (sin and cos halves), got {time_embed_dim}.")
        if mlp_layers < 1:
            raise ValueError(f"mlp_layers must be >= 1, got {mlp_layers}.")

        # Image branch: conv_in, then stride-2 downsampling convs, then norm + pool.
        self.conv_in = nn.Conv2d(in_channels, channels[0], kernel_size=3, padding=1)
        self.down = nn.ModuleList(
            nn.Sequential(
                nn.GroupNorm(norm_num_groups, c_in),
                nn.SiLU(),
                nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1),
            )
            for c_in, c_out in zip(channels[:-1], channels[1:])
        )
        self.norm_out = nn.GroupNorm(norm_num_groups, channels[-1])
        # Timestep branch: sinusoidal features of sigma * 1000 (the diffusers timestep), as in SD3.
        self.time_proj = Timesteps(time_embed_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(time_embed_dim, hidden_dim)
        # Prompt branch: a projection of the pooled prompt embedding.
        self.prompt_proj = nn.Linear(pooled_dim, hidden_dim)
        # Head: (Linear, LayerNorm, SiLU) x mlp_layers, then a zero-initialised scalar output (V = 0 at start).
        layers: list[nn.Module] = []
        width = channels[-1] + 2 * hidden_dim
        for _ in range(mlp_layers):
            layers += [nn.Linear(width, hidden_dim), nn.LayerNorm(hidden_dim), nn.SiLU()]
            width = hidden_dim
        self.mlp = nn.Sequential(*layers)
        self.out = nn.Linear(hidden_dim, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(
        self, latents: torch.Tensor, sigma: torch.Tensor | float, pooled_prompt_embeds: torch.Tensor
    ) -> torch.Tensor:
        """``V(x_s, s, c)`` for a batch: latents [B, C, H, W], sigma [B] or scalar in [0, 1], pooled [B, P] -> [B]."""
        if latents.ndim != 4 or latents.shape[1] != self.config.in_channels:
            raise ValueError(
                f"Critic expects latents [B, {self.config.in_channels}, H, W], got shape {tuple(latents.shape)}."
            )
        if pooled_prompt_embeds.shape != (latents.shape[0], self.config.pooled_dim):
            raise ValueError(
                f"Critic expects pooled_prompt_embeds [B={latents.shape[0]}, {self.config.pooled_dim}], got shape "
                f"{tuple(pooled_prompt_embeds.shape)}."
            )
        dtype = self.conv_in.weight.dtype
        batch = latents.shape[0]
        sigma = torch.as_tensor(sigma, device=latents.device, dtype=torch.float32)
        sigma = sigma.expand(batch) if sigma.ndim == 0 else sigma.reshape(batch)

        h = self.conv_in(latents.to(dtype))
        for block in self.down:
            h = block(h)
        h_img = nn.functional.silu(self.norm_out(h)).mean(dim=(2, 3))  # global average pool -> [B, channels[-1]]
        h_t = self.time_embedding(self.time_proj(sigma * 1000.0).to(dtype))  # diffusers timestep = sigma * 1000
        h_c = self.prompt_proj(pooled_prompt_embeds.to(dtype))
        return self.out(self.mlp(torch.cat([h_img, h_t, h_c], dim=1))).squeeze(1)
