"""Diffusion Policy's DDPM (Chi et al., arXiv 2303.04137) with ``diffusers`` schedulers.

Training: 100 timesteps, squaredcos_cap_v2 betas, epsilon prediction, clipped x0 estimates.
Sampling: the full DDPM chain (``sampler="ddpm"``) or deterministic DDIM (``sampler="ddim"``,
eta 0) with any number of steps. Fewer steps than training timesteps use "trailing" spacing, so
that the first step starts from the noisiest timestep (DDIM-1 evaluates t = 99, not t = 0).

The network sees the timestep as a raw value in [0, 1) (``k / num_train_timesteps``), in both its
t and s inputs, like every other method of the package.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn

from cm_policy.methods.base import Generators, Method, noise


class DDPM(Method):
    name = "ddpm"
    loss_keys = ("loss_eps",)
    samplers = ("ddpm", "ddim")
    eval_samplers = ("ddpm:100", "ddim:10", "ddim:1")

    def __init__(
        self,
        *,
        num_train_timesteps: int,
        beta_schedule: str,
        clip_sample: bool,
        default_steps: int,
        sampler: str | None = None,
    ):
        super().__init__(default_steps=default_steps, sampler=sampler)
        self.num_train_timesteps = num_train_timesteps
        common = {
            "num_train_timesteps": num_train_timesteps,
            "beta_schedule": beta_schedule,
            "clip_sample": clip_sample,
            "prediction_type": "epsilon",
            "timestep_spacing": "trailing",
        }
        self.train_scheduler = DDPMScheduler(**common)
        self._schedulers = {
            "ddpm": DDPMScheduler(**common),
            "ddim": DDIMScheduler(**common, set_alpha_to_one=True),
        }

    def time_input(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timesteps.float() / self.num_train_timesteps

    def loss(
        self, model: nn.Module, actions: torch.Tensor, cond: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        noise = torch.randn_like(actions)
        k = torch.randint(0, self.num_train_timesteps, (actions.shape[0],), device=actions.device)
        noisy = self.train_scheduler.add_noise(actions, noise, k)
        t = self.time_input(k)
        pred = model(noisy, t, t, cond)
        loss = (pred - noise).pow(2).mean()
        return loss, {"loss_eps": loss.detach()}

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
        steps = steps or self.default_steps
        if not 1 <= steps <= self.num_train_timesteps:
            raise ValueError(f"steps must be in [1, {self.num_train_timesteps}], got {steps}")
        scheduler = self._schedulers[self.resolve_sampler(sampler)]
        scheduler.set_timesteps(steps)  # on the CPU: the step's table lookups stay there
        x = noise(shape, cond, generator) if z is None else z
        for k in scheduler.timesteps:
            t = self.time_input(k.expand(shape[0]).to(cond.device))
            eps = model(x, t, t, cond)
            x = scheduler.step(eps, k, x, generator=generator).prev_sample
        return x.clamp(-1.0, 1.0)
