"""Improved consistency training from scratch (iCT, Song & Dhariwal, arXiv 2310.14189).

The consistency function is ``f(x, sigma) = c_skip x + c_out F(c_in x, tau, tau, o)`` with EDM's
boundary scalings (so ``f(x, sigma_min) = x``) and the network's time input
``tau = log(sigma / sigma_min) / log(sigma_max / sigma_min)`` in [0, 1]. One step:

- the discretisation N(k) doubles from 10 to 1280 intervals over training (iCT's curriculum,
  driven by the trainer through ``set_progress``);
- an adjacent pair of the N Karras noise levels is drawn from iCT's log-normal(-1.1, 2) weighting;
- ``loss = mean( 1/(sigma_hi - sigma_lo) * pseudo_huber(f(a + sigma_hi z, sigma_hi)
  - stopgrad f(a + sigma_lo z, sigma_lo)) )`` with the same z, pseudo-Huber constant
  0.00054 sqrt(d), and no EMA teacher (the target uses the online weights).

Sampling: one step ``f(sigma_max z, sigma_max)``; N steps re-noise to the next of N Karras levels.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cm_policy.methods.base import Generators, Method, noise


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """n noise levels from sigma_min up to sigma_max (float64)."""
    ramp = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (lo + ramp * (hi - lo)) ** rho


class ICT(Method):
    name = "ict"
    loss_keys = ("loss_ct",)
    samplers = ("consistency",)  # one jump to the data, re-noised to each next level
    eval_samplers = ("1", "2", "4")

    def __init__(
        self,
        *,
        sigma_min: float,
        sigma_max: float,
        sigma_data: float,
        rho: float,
        p_mean: float,
        p_std: float,
        s0: int,
        s1: int,
        huber_scale: float,
        default_steps: int,
        sampler: str | None = None,
    ):
        super().__init__(default_steps=default_steps, sampler=sampler)
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data
        self.rho, self.p_mean, self.p_std = rho, p_mean, p_std
        self.s0, self.s1 = s0, s1
        self.huber_scale = huber_scale
        self.step, self.total_steps = 0, 0

    def set_progress(self, step: int, total_steps: int) -> None:
        self.step, self.total_steps = step, total_steps

    def n_intervals(self) -> int:
        """iCT's doubling curriculum: N(k) = min(s0 * 2^floor(k / K'), s1) + 1 levels."""
        if self.total_steps <= 0:
            return self.s0 + 1
        stage = self.total_steps // (int(math.log2(self.s1 // self.s0)) + 1)
        return min(self.s0 * 2 ** (self.step // max(1, stage)), self.s1) + 1

    def consistency(
        self, model: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor
    ) -> torch.Tensor:
        sd = self.sigma_data
        sig = sigma.view(-1, 1, 1)
        c_skip = sd**2 / ((sig - self.sigma_min) ** 2 + sd**2)
        c_out = (sig - self.sigma_min) * sd / (sig**2 + sd**2).sqrt()
        c_in = 1 / (sig**2 + sd**2).sqrt()
        tau = torch.log(sigma / self.sigma_min) / math.log(self.sigma_max / self.sigma_min)
        return c_skip * x + c_out * model(c_in * x, tau, tau, cond)

    def loss(
        self, model: nn.Module, actions: torch.Tensor, cond: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        sigmas = karras_sigmas(self.n_intervals(), self.sigma_min, self.sigma_max, self.rho)
        cdf = torch.erf((sigmas.log() - self.p_mean) / (math.sqrt(2) * self.p_std))
        probs = (cdf[1:] - cdf[:-1]).clamp_min(0)
        i = torch.multinomial(probs.float(), actions.shape[0], replacement=True)
        device, dtype = actions.device, actions.dtype
        lo = sigmas[i].to(device=device, dtype=dtype)
        hi = sigmas[i + 1].to(device=device, dtype=dtype)
        z = torch.randn_like(actions)
        pred = self.consistency(model, actions + hi.view(-1, 1, 1) * z, hi, cond)
        with torch.no_grad():
            target = self.consistency(model, actions + lo.view(-1, 1, 1) * z, lo, cond)
        c = self.huber_scale * math.sqrt(actions[0].numel())
        sq = (pred - target).pow(2).flatten(1).sum(dim=1)
        huber = (sq + c**2).sqrt() - c
        loss = (huber / (hi - lo)).mean()
        return loss, {"loss_ct": huber.detach().mean(), "n_intervals": torch.tensor(len(probs))}

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
        steps = self.resolve_steps(steps)
        levels = karras_sigmas(steps + 1, self.sigma_min, self.sigma_max, self.rho).flip(0)[:-1]
        x = torch.zeros(shape, device=cond.device, dtype=cond.dtype)
        for k, sigma in enumerate(levels.tolist()):
            draw = z if k == 0 and z is not None else noise(shape, cond, generator)
            x = x + math.sqrt(sigma**2 - self.sigma_min**2) * draw
            x = self.consistency(model, x, torch.full((shape[0],), sigma, device=cond.device), cond)
        return x.clamp(-1.0, 1.0)
