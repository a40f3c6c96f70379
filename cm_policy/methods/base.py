"""The interface every training method implements."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn


class Method(ABC):
    """A way to train the network on normalised action chunks and to sample from it.

    The network is called as ``model(x, t, s, cond)``; methods that need one time only pass it
    twice. ``default_steps`` is the number of network evaluations used when none is asked for.
    """

    name: str = ""
    default_steps: int = 1

    @abstractmethod
    def loss(
        self, model: nn.Module, actions: torch.Tensor, cond: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scalar loss to minimise and detached per-batch scalars to log."""

    @abstractmethod
    def sample(
        self,
        model: nn.Module,
        cond: torch.Tensor,
        shape: tuple[int, ...],
        steps: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Normalised action chunks of ``shape`` (B, horizon, action_dim), clipped to [-1, 1]."""

    def resolve_steps(self, steps: int | None) -> int:
        """``steps``, or the method's default when none is asked for; at least 1."""
        steps = steps or self.default_steps
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        return steps

    def set_progress(self, step: int, total_steps: int) -> None:  # noqa: B027
        """Called by the trainer before each step; methods with a curriculum (iCT) use it."""

    def config(self) -> dict:
        """The hyper-parameters that rebuild this method (saved with checkpoints)."""
        return {}


def ordered_beta_times(
    batch: int, a: float, b: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two Beta(a, b) draws per sample, ordered: (larger, smaller)."""
    alpha = torch.full((2, batch), a, device=device)
    u = torch.distributions.Beta(alpha, torch.full_like(alpha, b)).sample()
    return u.max(dim=0).values, u.min(dim=0).values


def adaptive_weighted(per_sample: torch.Tensor, c: float, p: float) -> torch.Tensor:
    """Mean of ``l / stopgrad(l + c)^p`` over the batch (p = 0: the plain mean)."""
    return (per_sample / (per_sample.detach() + c).pow(p)).mean()


def noise(
    shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """Standard normal noise on ``like``'s device and dtype, drawn from ``generator``.

    A generator on another device than the network (a CPU generator, as the server and the
    runner seed requests, driving a CUDA policy) draws where it lives and the noise is moved, so a
    seed gives the same noise whatever device the policy runs on.
    """
    where = generator.device if generator is not None else like.device
    x = torch.randn(shape, generator=generator, device=where, dtype=like.dtype)
    return x.to(like.device)


def euler_sample(
    model: nn.Module,
    cond: torch.Tensor,
    shape: tuple[int, ...],
    steps: int,
    generator: torch.Generator | None,
    jump: bool,
) -> torch.Tensor:
    """From noise at t = 1 to t = 0 on ``steps`` equal intervals, ``x <- x - (t - s) F``.

    ``jump``: F is a flow map's average velocity from t to s, ``F(x, t, s)``; otherwise it is an
    instantaneous velocity, ``F(x, t, t)`` (Euler steps of a flow).
    """
    x = noise(shape, cond, generator)
    grid = torch.linspace(1.0, 0.0, steps + 1, device=cond.device)
    for k in range(steps):
        t = grid[k].expand(shape[0])
        s = grid[k + 1].expand(shape[0]) if jump else t
        x = x - (grid[k] - grid[k + 1]) * model(x, t, s, cond)
    return x.clamp(-1.0, 1.0)
