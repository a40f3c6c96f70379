"""Naive flow-map training from scratch as in MeanFlow (Geng et al., arXiv 2505.13447).

The baseline whose instability iSD removes. Same network and notation as iSD: ``F(x, t, s, o)`` is
the average velocity from t down to s. The target is built from the per-sample *conditional*
velocity ``v = z - a`` instead of the model's own marginal estimate:

    T = v - (t - s) * (dF/dx v + dF/dt),   the derivative a forward-mode JVP with tangents (v, 1),

and ``loss = || F(x_t, t, s, o) - stopgrad(T) ||^2`` per sample, divided by MeanFlow's adaptive
weight ``stopgrad(l + c)^p`` (p = 1, c = 1e-3; ``adaptive_p = 0`` turns it off). Times follow
MeanFlow's defaults: t and s from a logit-normal(-0.4, 1), ordered, and s set equal to t for
all but ``ratio_neq`` (25%) of the samples, which makes those plain flow matching.
"""

from __future__ import annotations

import torch
from torch import nn

from cm_policy.methods.base import Generators, Method, adaptive_weighted, euler_sample


class MeanFlow(Method):
    name = "meanflow"
    loss_keys = ("loss_mf",)
    samplers = ("flowmap",)
    eval_samplers = ("1", "2", "4")

    def __init__(
        self,
        *,
        logit_mean: float,
        logit_std: float,
        ratio_neq: float,
        adaptive_c: float,
        adaptive_p: float,
        default_steps: int,
        sampler: str | None = None,
    ):
        super().__init__(default_steps=default_steps, sampler=sampler)
        if not 0.0 <= ratio_neq <= 1.0:
            raise ValueError(f"ratio_neq must be in [0, 1], got {ratio_neq}")
        self.logit_mean, self.logit_std = logit_mean, logit_std
        self.ratio_neq = ratio_neq
        self.adaptive_c, self.adaptive_p = adaptive_c, adaptive_p

    def sample_times(self, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        u = torch.sigmoid(torch.randn(2, batch, device=device) * self.logit_std + self.logit_mean)
        t, s = u.max(dim=0).values, u.min(dim=0).values
        equal = torch.rand(batch, device=device) >= self.ratio_neq
        return t, torch.where(equal, t, s)

    def loss(
        self, model: nn.Module, actions: torch.Tensor, cond: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        t, s = self.sample_times(actions.shape[0], actions.device)
        z = torch.randn_like(actions)
        tb = t.view(-1, 1, 1)
        x_t = (1 - tb) * actions + tb * z
        v = z - actions  # the conditional velocity: what makes this target high-variance
        f = model(x_t, t, s, cond)
        with torch.no_grad():
            _, dfdt = torch.func.jvp(
                lambda x_, t_: model(x_, t_, s, cond), (x_t, t), (v, torch.ones_like(t))
            )
            target = v - (t - s).view(-1, 1, 1) * dfdt
        per_sample = (f - target).pow(2).flatten(1).mean(dim=1)
        loss = adaptive_weighted(per_sample, self.adaptive_c, self.adaptive_p)
        return loss, {"loss_mf": per_sample.detach().mean()}

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
        return euler_sample(model, cond, shape, self.resolve_steps(steps), generator, True, z)
