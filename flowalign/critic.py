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

__all__ = ["Critic", "LookaheadCritic"]


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


class LookaheadCritic(ModelMixin, ConfigMixin):
    """V of a window state from the policy's own one-step prediction of its image (``critic="lookahead"``)::

        x0_k = x_k - s_k v_k                      the policy's one-step prediction (v_k: the velocity that drew step k)
        z_k  = shaped reward of decode(x0_k)       the look-ahead reward, normalised like the targets (per group)
        h    = SiLU(TimestepEmbedding(sinusoidal(s_k * 1000)))
        V    = a(h) z_k + b(h) + p(c) [+ g(CNN(x0_k), h, c)]   a, b, p: Linear; g: an optional image branch

    The look-ahead reward carries most of what the state knows about the final reward (docs/algorithms.md, "The
    critic"); the head learns how far to trust it at each noise level (a correlation, the same for every prompt:
    a prompt-dependent slope fitted on a few images per prompt is mostly noise); the prompt shifts V additively. The output layers start at
    zero (V = 0 at start, the ORW-CFM-W2 case). ``channels=()`` (the default) drops the image branch.

    Example::

        critic = LookaheadCritic(in_channels=3, pooled_dim=128)
        v = critic(z, sigma, pooled)                       # [B]
        v = LookaheadCritic(in_channels=3, pooled_dim=128, channels=(16, 32))(z, sigma, pooled, x0=x0_latents)
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 16,
        pooled_dim: int = 2048,
        channels: tuple[int, ...] = (),
        time_embed_dim: int = 64,
        hidden_dim: int = 64,
        norm_num_groups: int = 8,
    ):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        bad = [c for c in channels if c % norm_num_groups]
        if bad:
            raise ValueError(f"norm_num_groups={norm_num_groups} must divide every conv width; {bad} in "
                             f"channels={channels} do not. Pick widths that are multiples of norm_num_groups.")
        if time_embed_dim % 2:
            raise ValueError(f"time_embed_dim must be even (sin and cos halves), got {time_embed_dim}.")
        self.time_proj = Timesteps(time_embed_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(time_embed_dim, hidden_dim)
        self.head = nn.Linear(hidden_dim, 2)  # (a, b) of the noise level
        self.prompt_proj = nn.Linear(pooled_dim, 1)  # p(c)
        for layer in (self.head, self.prompt_proj):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.image = None
        if channels:  # g(CNN(x0_k), h): the same conv stack as Critic's, on the predicted image's latent
            convs: list[nn.Module] = [nn.Conv2d(in_channels, channels[0], kernel_size=3, padding=1)]
            for c_in, c_out in zip(channels[:-1], channels[1:]):
                convs += [nn.GroupNorm(norm_num_groups, c_in), nn.SiLU(),
                          nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1)]
            convs += [nn.GroupNorm(norm_num_groups, channels[-1]), nn.SiLU()]
            self.image = nn.Sequential(*convs)
            self.image_proj = nn.Linear(pooled_dim, hidden_dim)
            self.image_out = nn.Linear(channels[-1] + 2 * hidden_dim, 1)
            nn.init.zeros_(self.image_out.weight)
            nn.init.zeros_(self.image_out.bias)

    def forward(self, lookahead: torch.Tensor, sigma: torch.Tensor | float, pooled_prompt_embeds: torch.Tensor,
                x0: torch.Tensor | None = None) -> torch.Tensor:
        """``V`` for a batch: ``lookahead`` [B] (z_k), ``sigma`` [B] or scalar, pooled [B, P], ``x0`` [B, C, H, W]
        (the predicted latent; needed only with an image branch) -> [B]."""
        batch = lookahead.shape[0]
        if pooled_prompt_embeds.shape != (batch, self.config.pooled_dim):
            raise ValueError(f"LookaheadCritic expects pooled_prompt_embeds [B={batch}, {self.config.pooled_dim}], "
                             f"got shape {tuple(pooled_prompt_embeds.shape)}.")
        dtype = self.head.weight.dtype
        sigma = torch.as_tensor(sigma, device=lookahead.device, dtype=torch.float32)
        sigma = sigma.expand(batch) if sigma.ndim == 0 else sigma.reshape(batch)
        h = nn.functional.silu(self.time_embedding(self.time_proj(sigma * 1000.0).to(dtype)))
        a, b = self.head(h).unbind(1)
        value = a * lookahead.to(dtype) + b + self.prompt_proj(pooled_prompt_embeds.to(dtype)).squeeze(1)
        if self.image is not None:
            if x0 is None:
                raise ValueError("LookaheadCritic with an image branch (channels set) needs x0, the predicted latent.")
            h_img = self.image(x0.to(dtype)).mean(dim=(2, 3))  # global average pool
            h_c = self.image_proj(pooled_prompt_embeds.to(dtype))
            value = value + self.image_out(torch.cat([h_img, h, h_c], dim=1)).squeeze(1)
        return value
