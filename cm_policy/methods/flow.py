"""Flow matching: the diagonal term of iSD alone, sampled with N Euler steps.

Same notation as iSD (time 1 = noise, 0 = data, ``x_t = (1 - t) a + t z``): the network's diagonal
``F(x, t, t, o)`` regresses the conditional velocity ``z - a``, with t drawn as iSD draws its
larger time (the max of two Beta(0.8, 1) samples).
"""

from __future__ import annotations

import torch
from torch import nn

from cm_policy.methods.base import Method


class Flow(Method):
    name = "flow"

    def __init__(self, beta_a: float = 0.8, beta_b: float = 1.0, default_steps: int = 16):
        self.beta_a, self.beta_b = beta_a, beta_b
        self.default_steps = default_steps

    def config(self) -> dict:
        return {"beta_a": self.beta_a, "beta_b": self.beta_b, "default_steps": self.default_steps}

    def loss(
        self, model: nn.Module, actions: torch.Tensor, cond: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        a = torch.full((2, actions.shape[0]), self.beta_a, device=actions.device)
        t = torch.distributions.Beta(a, torch.full_like(a, self.beta_b)).sample().max(dim=0).values
        z = torch.randn_like(actions)
        tb = t.view(-1, 1, 1)
        x_t = (1 - tb) * actions + tb * z
        loss = (model(x_t, t, t, cond) - (z - actions)).pow(2).mean()
        return loss, {"loss_fm": loss.detach()}

    def sample(
        self,
        model: nn.Module,
        cond: torch.Tensor,
        shape: tuple[int, ...],
        steps: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        steps = steps or self.default_steps
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        x = torch.randn(shape, generator=generator, device=cond.device, dtype=cond.dtype)
        grid = torch.linspace(1.0, 0.0, steps + 1, device=cond.device)
        for k in range(steps):
            t = grid[k].expand(shape[0])
            x = x - (grid[k] - grid[k + 1]) * model(x, t, t, cond)
        return x.clamp(-1.0, 1.0)
