"""Flow matching: the diagonal term of iSD alone, sampled with N Euler steps.

Same notation as iSD (time 1 = noise, 0 = data, ``x_t = (1 - t) a + t z``): the network's diagonal
``F(x, t, t, o)`` regresses the conditional velocity ``z - a``, with t drawn as iSD draws its
larger time (the max of two Beta(0.8, 1) samples).
"""

from __future__ import annotations

import torch
from torch import nn

from cm_policy.methods.base import Generators, Method, euler_sample, ordered_beta_times


class Flow(Method):
    name = "flow"
    loss_keys = ("loss_fm",)
    samplers = ("euler",)
    eval_samplers = ("1", "4", "16")

    def __init__(
        self, *, beta_a: float, beta_b: float, default_steps: int, sampler: str | None = None
    ):
        super().__init__(default_steps=default_steps, sampler=sampler)
        self.beta_a, self.beta_b = beta_a, beta_b

    def loss(
        self, model: nn.Module, actions: torch.Tensor, cond: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        t, _ = ordered_beta_times(actions.shape[0], self.beta_a, self.beta_b, actions.device)
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
        generator: Generators = None,
        sampler: str | None = None,
        z: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self.resolve_sampler(sampler)
        return euler_sample(model, cond, shape, self.resolve_steps(steps), generator, False, z)
