"""The interface every training method implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn


class Method(ABC):
    """A way to train the network on normalised action chunks and to sample from it.

    The network is called as ``model(x, t, s, cond)``; methods that need one time only pass it
    twice. A method module declares, beside its class:

    - ``loss_keys``: the raw loss terms its ``loss`` logs (plotted and compared);
    - ``samplers``: its sampler kinds, the first being the default unless the config's ``sampler``
      names another; a sampler is chosen per call (``sample(..., sampler=...)``);
    - ``eval_samplers``: the sampler labels a comparison evaluates (``"N"``, or ``"kind:N"`` for a
      method with several kinds: N network evaluations of that kind);
    - ``uses_noise``: whether sampling starts from random noise (False for a deterministic
      method, which the noise diagnostic then skips).

    Hyper-parameters, ``default_steps`` included, come from the method's YAML
    (``config/method/<name>.yaml``) and are saved with every checkpoint; the constructor takes
    them all as keywords and has no defaults of its own.
    """

    name: ClassVar[str] = ""
    loss_keys: ClassVar[tuple[str, ...]] = ()
    samplers: ClassVar[tuple[str, ...]] = ()
    eval_samplers: ClassVar[tuple[str, ...]] = ()
    uses_noise: ClassVar[bool] = True

    def __init__(self, *, default_steps: int, sampler: str | None = None):
        self.default_steps = int(default_steps)
        self.default_sampler = self.resolve_sampler(sampler or self.samplers[0])

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
        generator: Generators = None,
        sampler: str | None = None,
        z: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Normalised action chunks of ``shape`` (B, horizon, action_dim), clipped to [-1, 1].

        ``z``: the initial noise (drawn from ``generator`` when None); the noise diagnostic
        passes zeros to see whether the policy uses it.
        """

    def resolve_steps(self, steps: int | None) -> int:
        """``steps``, or the method's default when none is asked for; at least 1."""
        steps = steps or self.default_steps
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        return steps

    def resolve_sampler(self, sampler: str | None) -> str:
        """``sampler``, or the default kind when None; a clear error for a kind not offered."""
        if sampler is None:
            return self.default_sampler
        if sampler not in self.samplers:
            raise ValueError(
                f"method {self.name} has samplers {list(self.samplers)}, got sampler={sampler!r}"
            )
        return sampler

    def label(self, sampler: str | None, steps: int | None) -> str:
        """The label of a sampler setting: ``"N"``, or ``"kind:N"`` where there are several."""
        steps = self.resolve_steps(steps)
        return f"{self.resolve_sampler(sampler)}:{steps}" if len(self.samplers) > 1 else str(steps)

    @property
    def headline(self) -> str:
        """The setting the method is known by: its default sampler and steps."""
        return self.label(None, None)

    def parse_label(self, label: str) -> tuple[str, int]:
        """(sampler kind, steps) of a label made by :meth:`label`."""
        kind, _, steps = str(label).rpartition(":")
        return self.resolve_sampler(kind or None), int(steps)

    def set_progress(self, step: int, total_steps: int) -> None:  # noqa: B027
        """Called by the trainer before each step; methods with a curriculum (iCT) use it."""

    def training_warnings(self, amp: bool) -> list[str]:
        """Settings of this method that a training setup would make unsound, in words."""
        return []


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


Generators = torch.Generator | list[torch.Generator] | None


def noise(shape: tuple[int, ...], like: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Standard normal noise on ``like``'s device and dtype, drawn from ``generator``.

    A generator on another device than the network (a CPU generator, as the server and the
    runner seed requests, driving a CUDA policy) draws where it lives and the noise is moved, so a
    seed gives the same noise whatever device the policy runs on. A list holds one generator per
    batch row, so that a row's noise does not depend on the rows batched with it.
    """
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        rows = [noise((1, *shape[1:]), like, g) for g in generator]
        return torch.cat(rows) if rows else torch.empty(shape, device=like.device)
    where = generator.device if generator is not None else like.device
    x = torch.randn(shape, generator=generator, device=where, dtype=like.dtype)
    return x.to(like.device)


def euler_sample(
    model: nn.Module,
    cond: torch.Tensor,
    shape: tuple[int, ...],
    steps: int,
    generator: Generators,
    jump: bool,
    z: torch.Tensor | None = None,
) -> torch.Tensor:
    """From noise at t = 1 to t = 0 on ``steps`` equal intervals, ``x <- x - (t - s) F``.

    ``jump``: F is a flow map's average velocity from t to s, ``F(x, t, s)``; otherwise it is an
    instantaneous velocity, ``F(x, t, t)`` (Euler steps of a flow).
    """
    x = noise(shape, cond, generator) if z is None else z
    grid = torch.linspace(1.0, 0.0, steps + 1, device=cond.device)
    for k in range(steps):
        t = grid[k].expand(shape[0])
        s = grid[k + 1].expand(shape[0]) if jump else t
        x = x - (grid[k] - grid[k + 1]) * model(x, t, s, cond)
    return x.clamp(-1.0, 1.0)
