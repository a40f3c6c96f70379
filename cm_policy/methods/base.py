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

    def set_progress(self, step: int, total_steps: int) -> None:  # noqa: B027
        """Called by the trainer before each step; methods with a curriculum (iCT) use it."""

    def config(self) -> dict:
        """The hyper-parameters that rebuild this method (saved with checkpoints)."""
        return {}
