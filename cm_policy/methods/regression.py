"""Regression: the control every one-step claim needs (Pan et al., arXiv 2512.01809).

The same network and conditioning, trained with mean squared error to the demonstrated chunk
from a fixed input: zero noise and the one-step times (t = 1, s = 0). Sampling is one network
evaluation of that input, so the policy is deterministic: it predicts the conditional mean of
the demonstrations, and where they split between two ways of acting it averages them.
"""

from __future__ import annotations

import torch
from torch import nn

from cm_policy.methods.base import Generators, Method


class Regression(Method):
    name = "regression"
    loss_keys = ("loss_mse",)
    samplers = ("direct",)  # one evaluation of the fixed input; no noise enters
    eval_samplers = ("1",)
    uses_noise = False

    def __init__(self, *, default_steps: int, sampler: str | None = None):
        super().__init__(default_steps=default_steps, sampler=sampler)
        if self.default_steps != 1:
            raise ValueError(f"regression samples in one step, got default_steps={default_steps}")

    def predict(self, model: nn.Module, cond: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        x = torch.zeros(shape, device=cond.device, dtype=cond.dtype)
        ones = torch.ones(shape[0], device=cond.device, dtype=cond.dtype)
        return model(x, ones, torch.zeros_like(ones), cond)

    def loss(
        self, model: nn.Module, actions: torch.Tensor, cond: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = (self.predict(model, cond, tuple(actions.shape)) - actions).pow(2).mean()
        return loss, {"loss_mse": loss.detach()}

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
        if self.resolve_steps(steps) != 1:
            raise ValueError(f"regression samples in one step, got steps={steps}")
        return self.predict(model, cond, shape).clamp(-1.0, 1.0)
