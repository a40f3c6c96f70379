"""Stabilized flow-map self-distillation (iSD, arXiv 2601.22679), as specified in METHOD.md.

Time runs from 1 (noise) to 0 (data). The network ``F(x, t, s, o)`` is the average velocity from t
to s, so the flow map is ``x - (t - s) * F``. One step generates ``a = z - F(z, 1, 0, o)``.
"""

from __future__ import annotations

import torch
from torch import nn

from cm_policy.methods.base import (
    Generators,
    Method,
    adaptive_weighted,
    euler_sample,
    ordered_beta_times,
)

DERIVATIVES = ("finite_difference", "jvp")


class ISD(Method):
    name = "isd"
    loss_keys = ("loss_fm", "loss_sd")
    samplers = ("flowmap",)  # jumps of the flow map on an even time grid
    eval_samplers = ("1", "2", "4")

    def __init__(
        self,
        *,
        derivative: str,
        fd_eps: float,
        beta_a: float,
        beta_b: float,
        adaptive_c: float,
        adaptive_p: float,
        default_steps: int,
        batch_passes: bool,
        sd_fraction: float = 1.0,
        sampler: str | None = None,
    ):
        super().__init__(default_steps=default_steps, sampler=sampler)
        if derivative not in DERIVATIVES:
            raise ValueError(f"derivative must be one of {DERIVATIVES}, got {derivative!r}")
        if not 0.0 < sd_fraction <= 1.0:
            raise ValueError(f"sd_fraction must be in (0, 1], got {sd_fraction!r}")
        self.derivative = derivative
        self.sd_fraction = sd_fraction
        self.fd_eps = fd_eps
        self.beta_a, self.beta_b = beta_a, beta_b
        self.adaptive_c, self.adaptive_p = adaptive_c, adaptive_p
        # Concatenate the evaluations of a step into one batch (same math; fewer, larger
        # kernels). False runs them one by one, for the benchmark in eval/bench_policy.py.
        self.batch_passes = batch_passes

    def sample_times(self, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """t >= s, both from Beta(0.8, 1) and ordered."""
        return ordered_beta_times(batch, self.beta_a, self.beta_b, device)

    def time_derivative(
        self,
        model: nn.Module,
        x: torch.Tensor,
        t: torch.Tensor,
        s: torch.Tensor,
        cond: torch.Tensor,
        velocity: torch.Tensor,
    ) -> torch.Tensor:
        """dF/dx * velocity + dF/dt at fixed s, without gradient."""
        with torch.no_grad():
            if self.derivative == "jvp":
                _, tangent = torch.func.jvp(
                    lambda x_, t_: model(x_, t_, s, cond), (x, t), (velocity, torch.ones_like(t))
                )
                return tangent
            eps = self.fd_eps
            shift = eps * velocity
            if self.batch_passes:
                plus, minus = model(
                    torch.cat([x + shift, x - shift]),
                    torch.cat([t + eps, t - eps]),
                    torch.cat([s, s]),
                    torch.cat([cond, cond]),
                ).chunk(2)
            else:
                plus = model(x + shift, t + eps, s, cond)
                minus = model(x - shift, t - eps, s, cond)
            return (plus - minus) / (2 * eps)

    def loss(
        self, model: nn.Module, actions: torch.Tensor, cond: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        batch = actions.shape[0]
        t, s = self.sample_times(batch, actions.device)
        z = torch.randn_like(actions)
        tb = t.view(-1, 1, 1)
        x_t = (1 - tb) * actions + tb * z
        # The self-distillation term on the first k samples (all of them by default, as in
        # METHOD.md); the flow-matching term on every sample. The batch is shuffled, so the
        # first k are a random subset.
        k = max(1, round(self.sd_fraction * batch))
        xs, ts, ss, cs = x_t[:k], t[:k], s[:k], cond[:k]
        # The diagonal F(x_t, t, t) and the jump F(x_t, t, s), both with gradient.
        if self.batch_passes:
            out = model(
                torch.cat([x_t, xs]), torch.cat([t, ts]), torch.cat([t, ss]), torch.cat([cond, cs])
            )
            f_diag, f_jump = out[:batch], out[batch:]
        else:
            f_diag, f_jump = model(x_t, t, t, cond), model(xs, ts, ss, cs)
        v_hat = f_diag[:k].detach()  # the teacher velocity is the model's own diagonal, no grad
        d = self.time_derivative(model, xs, ts, ss, cs, v_hat)
        target = v_hat - (ts - ss).view(-1, 1, 1) * d
        loss_fm = (f_diag - (z - actions)).pow(2).flatten(1).mean(dim=1)
        loss_sd = (f_jump - target).pow(2).flatten(1).mean(dim=1)
        per_sample = loss_fm + torch.nn.functional.pad(loss_sd, (0, batch - k))
        loss = adaptive_weighted(per_sample, self.adaptive_c, self.adaptive_p)
        logs = {"loss_fm": loss_fm.detach().mean(), "loss_sd": loss_sd.detach().mean()}
        return loss, logs

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

    def training_warnings(self, amp: bool) -> list[str]:
        if amp and self.derivative == "finite_difference":
            # Measured on the tiny U-Net: bf16 turns a loss_sd of 0.003 into 0.05; jvp keeps it.
            return [
                "training.amp=true with method.derivative=finite_difference: a difference over "
                f"fd_eps={self.fd_eps} is below bf16 resolution; use method.derivative=jvp"
            ]
        return []
