"""Conditional 1D temporal U-Net over action chunks, conditioned through FiLM.

The network is ``F(x, t, s, cond)``: the average velocity of the flow from time ``t`` down to
time ``s`` (see ../shared/docs/METHOD.md). ``t`` and ``s`` are embedded separately from their raw
values in [0, 1]; the ``s`` branch ends in a zero-initialised layer so that the network starts as a
function of ``t`` alone (a plain velocity field) and learns the jump size from there.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import nn


class SinusoidalEmbedding(nn.Module):
    """Sinusoidal features of a scalar per sample, frequencies geometric in [1/max_period, 1]."""

    def __init__(self, dim: int, max_period: float = 10000.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"embedding dim must be even, got {dim}")
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        args = x.reshape(-1, 1).float() * self.freqs
        return torch.cat([args.sin(), args.cos()], dim=-1)


TIME_COMBINE = ("concat", "sum")


def time_mlp(dim: int, max_period: float, zero_init: bool, hidden_mult: int = 4) -> nn.Sequential:
    mlp = nn.Sequential(
        SinusoidalEmbedding(dim, max_period),
        nn.Linear(dim, dim * hidden_mult),
        nn.Mish(),
        nn.Linear(dim * hidden_mult, dim),
    )
    if zero_init:
        nn.init.zeros_(mlp[-1].weight)
        nn.init.zeros_(mlp[-1].bias)
    return mlp


class Conv1dBlock(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, n_groups: int):
        super().__init__(
            nn.Conv1d(in_ch, out_ch, kernel_size, padding=kernel_size // 2),
            nn.GroupNorm(n_groups, out_ch),
            nn.Mish(),
        )


class ConditionalResidualBlock1D(nn.Module):
    """Two conv blocks; FiLM (per-channel scale and bias from the condition) after the first."""

    def __init__(self, in_ch: int, out_ch: int, cond_dim: int, kernel_size: int, n_groups: int):
        super().__init__()
        self.block1 = Conv1dBlock(in_ch, out_ch, kernel_size, n_groups)
        self.block2 = Conv1dBlock(out_ch, out_ch, kernel_size, n_groups)
        self.film = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, out_ch * 2))
        self.residual = nn.Conv1d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.block1(x)
        scale, bias = self.film(cond).unsqueeze(-1).chunk(2, dim=1)
        h = self.block2(scale * h + bias)
        return h + self.residual(x)


class ConditionalUnet1D(nn.Module):
    """U-Net over (B, horizon, action_dim) chunks; ``forward(x, t, s, cond)``.

    ``cond`` is the observation feature (B, cond_dim) from an observation encoder. The FiLM
    condition is the t and s embeddings, concatenated (``time_combine="concat"``) or summed
    (``"sum"``, a smaller FiLM input), followed by ``cond``. ``time_hidden_mult`` sets the width
    of each time MLP's hidden layer as a multiple of ``time_embed_dim``.
    """

    def __init__(
        self,
        action_dim: int,
        cond_dim: int,
        down_dims: Sequence[int] = (64, 128, 256),
        kernel_size: int = 5,
        n_groups: int = 8,
        time_embed_dim: int = 128,
        time_max_period: float = 10000.0,
        time_combine: str = "concat",
        time_hidden_mult: int = 4,
    ):
        super().__init__()
        if time_combine not in TIME_COMBINE:
            raise ValueError(f"time_combine must be one of {TIME_COMBINE}, got {time_combine!r}")
        self.time_combine = time_combine
        self.t_embed = time_mlp(time_embed_dim, time_max_period, False, time_hidden_mult)
        self.s_embed = time_mlp(time_embed_dim, time_max_period, True, time_hidden_mult)
        n_time = 2 if time_combine == "concat" else 1
        film_dim = n_time * time_embed_dim + cond_dim
        dims = [action_dim, *down_dims]
        levels = list(itertools.pairwise(dims))

        def block(i: int, o: int) -> ConditionalResidualBlock1D:
            return ConditionalResidualBlock1D(i, o, film_dim, kernel_size, n_groups)

        self.down = nn.ModuleList()
        for k, (i, o) in enumerate(levels):
            last = k == len(levels) - 1
            sample = nn.Identity() if last else nn.Conv1d(o, o, 3, stride=2, padding=1)
            self.down.append(nn.ModuleList([block(i, o), block(o, o), sample]))
        mid = down_dims[-1]
        self.mid = nn.ModuleList([block(mid, mid), block(mid, mid)])
        self.up = nn.ModuleList()
        for i, o in reversed(levels[1:]):
            upsample = nn.ConvTranspose1d(i, i, 4, stride=2, padding=1)
            self.up.append(nn.ModuleList([block(o * 2, i), block(i, i), upsample]))
        self.final = nn.Sequential(
            Conv1dBlock(down_dims[0], down_dims[0], kernel_size, n_groups),
            nn.Conv1d(down_dims[0], action_dim, 1),
        )

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, cond: torch.Tensor
    ) -> torch.Tensor:
        batch = x.shape[0]
        t_emb, s_emb = self.t_embed(t.expand(batch)), self.s_embed(s.expand(batch))
        times = [t_emb, s_emb] if self.time_combine == "concat" else [t_emb + s_emb]
        film = torch.cat([*times, cond], dim=-1)
        h = x.transpose(1, 2)
        skips = []
        for res1, res2, downsample in self.down:
            h = res2(res1(h, film), film)
            skips.append(h)
            h = downsample(h)
        for res in self.mid:
            h = res(h, film)
        for res1, res2, upsample in self.up:
            h = torch.cat([h, skips.pop()], dim=1)
            h = upsample(res2(res1(h, film), film))
        return self.final(h).transpose(1, 2)
