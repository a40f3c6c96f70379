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

# How D = dF/dx v_hat + dF/dt (at fixed s) is computed; forward-equivalents per step in brackets
# (a backward counts two forwards, a JVP about two; eval/results/isd_derivative.md measures them):
# - finite_difference: central, (F(x + eps v, t + eps) - F(x - eps v, t - eps)) / (2 eps),
#   two no-grad forwards, error O(eps^2) [8];
# - finite_difference_one_sided: (F(x + eps v, t + eps) - F(x, t)) / eps, the centre F(x, t, s) the
#   detached jump of the gradient pass, one no-grad forward, error O(eps) [7];
# - jvp: a no-grad forward-mode JVP beside the jump pass, exact [8];
# - jvp_primal: one JVP whose primal output is the jump itself, with gradient (its tangent, D,
#   without), so the separate jump forward is not needed; exact, same gradient as jvp [7].
DERIVATIVES = ("finite_difference", "finite_difference_one_sided", "jvp", "jvp_primal")


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
            raise ValueError(
                f"method.derivative must be one of {', '.join(DERIVATIVES)}, got {derivative!r}"
            )
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
        centre: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """dF/dx * velocity + dF/dt at fixed s, without gradient.

        ``centre``: F(x, t, s, cond) when the caller has it (the jump pass); the one-sided
        difference uses it (detached) instead of evaluating it again. ``jvp_primal`` gives the
        same tangent as ``jvp`` here; in the loss it comes from :meth:`jump_and_derivative`.
        """
        with torch.no_grad():
            if self.derivative in ("jvp", "jvp_primal"):
                _, tangent = torch.func.jvp(
                    lambda x_, t_: model(x_, t_, s, cond), (x, t), (velocity, torch.ones_like(t))
                )
                return tangent
            eps = self.fd_eps
            shift = eps * velocity
            if self.derivative == "finite_difference_one_sided":
                if centre is None:
                    ahead, centre = self._pair(model, x + shift, t + eps, x, t, s, cond)
                else:
                    ahead = model(x + shift, t + eps, s, cond)
                return (ahead - centre.detach()) / eps
            plus, minus = self._pair(model, x + shift, t + eps, x - shift, t - eps, s, cond)
            return (plus - minus) / (2 * eps)

    def _pair(
        self,
        model: nn.Module,
        x1: torch.Tensor,
        t1: torch.Tensor,
        x2: torch.Tensor,
        t2: torch.Tensor,
        s: torch.Tensor,
        cond: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """F(x1, t1, s) and F(x2, t2, s): one concatenated call, or two with batch_passes off."""
        if not self.batch_passes:
            return model(x1, t1, s, cond), model(x2, t2, s, cond)
        first, second = model(
            torch.cat([x1, x2]), torch.cat([t1, t2]), torch.cat([s, s]), torch.cat([cond, cond])
        ).chunk(2)
        return first, second

    def jump_and_derivative(
        self,
        model: nn.Module,
        x: torch.Tensor,
        t: torch.Tensor,
        s: torch.Tensor,
        cond: torch.Tensor,
        velocity: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The jump F(x, t, s, cond) WITH gradient and D = dF/dx velocity + dF/dt WITHOUT, from
        one forward-mode pass (``jvp_primal``).

        ``torch.func.jvp`` composed with autograd (gradient mode on): the primal output is
        computed by the same operations as a plain forward on the captured weights, so it
        backpropagates to them exactly as the plain jump does; the tangent is detached (the
        target is under stop-gradient) and only x and t carry tangents, so D is the derivative at
        fixed s and fixed weights (``torch.autograd.forward_ad`` dual tensors give the same).

        Under bf16 autocast it falls back to ``jvp``'s two passes (same loss, no saving): in
        gradient mode PyTorch 2.13's forward-mode AD of group_norm under CPU autocast leaves an
        fp32 tangent beside a bf16 primal, and the next convolution fails (not tried on CUDA).
        """
        if torch.is_autocast_enabled(x.device.type):
            return model(x, t, s, cond), self.time_derivative(model, x, t, s, cond, velocity)
        primal, tangent = torch.func.jvp(
            lambda x_, t_: model(x_, t_, s, cond), (x, t), (velocity, torch.ones_like(t))
        )
        return primal, tangent.detach()

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
        # The diagonal F(x_t, t, t) and the jump F(x_t, t, s), both with gradient (jvp_primal: the
        # jump comes with the derivative, from one forward-mode pass after the diagonal).
        if self.derivative == "jvp_primal":
            f_diag = model(x_t, t, t, cond)
        elif self.batch_passes:
            out = model(
                torch.cat([x_t, xs]), torch.cat([t, ts]), torch.cat([t, ss]), torch.cat([cond, cs])
            )
            f_diag, f_jump = out[:batch], out[batch:]
        else:
            f_diag, f_jump = model(x_t, t, t, cond), model(xs, ts, ss, cs)
        v_hat = f_diag[:k].detach()  # the teacher velocity is the model's own diagonal, no grad
        if self.derivative == "jvp_primal":
            f_jump, d = self.jump_and_derivative(model, xs, ts, ss, cs, v_hat)
        else:
            d = self.time_derivative(model, xs, ts, ss, cs, v_hat, centre=f_jump)
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
        if amp and self.derivative == "finite_difference_one_sided":
            # Worse than the central difference: the bf16 rounding of the two evaluations is
            # divided by fd_eps (not 2 fd_eps) and the O(fd_eps) truncation adds to it. Measured
            # on PushT (eval/results/isd_derivative.md), target error p99 under bf16 autocast:
            # one-sided 1.2, central 0.6, jvp 0.02 (float32: 6e-3, 9e-5, 1e-6).
            return [
                "training.amp=true with method.derivative=finite_difference_one_sided: a one-sided "
                f"difference over fd_eps={self.fd_eps} is below bf16 resolution (worse than the "
                "central one: its target is off by more than the target itself); use "
                "method.derivative=jvp"
            ]
        if amp and self.derivative == "jvp_primal":
            return [
                "training.amp=true with method.derivative=jvp_primal: under bf16 autocast the jump "
                "is not taken from the JVP (forward-mode AD with gradient fails there on CPU); it "
                "runs as method.derivative=jvp, the same loss at jvp's cost"
            ]
        return []
