"""What the server runs: a policy behind one small interface, in torch or in ONNX Runtime.

A :class:`Backend` has the server's metadata of the policy, the observation spec, and
``predict_action(window, steps=, generator=, sampler=)`` returning raw actions or raising
:class:`cm_policy.observations.ActionRefused` (reasons per batch row); ``generator(seed)`` makes
the noise source of a seeded request. Two backends:

- :class:`TorchBackend`: a :class:`cm_policy.policy.Policy` from a checkpoint; a seed draws from
  ``torch.Generator().manual_seed(seed)``;
- :class:`OnnxBackend`: an exported model (``cm-policy export``) in ONNX Runtime, without torch;
  a seed draws the same float32 noise with numpy (:class:`~cm_policy.serve.noise.TorchGenerator`),
  so a seeded request gets the torch backend's initial noise, and actions equal to the torch
  backend's up to the float rounding of the two runtimes (about 1e-6 of the action range).

This module imports neither torch nor onnxruntime; each backend imports its own runtime.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

LOW_DIM_DTYPE, IMAGE_DTYPE = "float32", "uint8"
BACKENDS = ("auto", "torch", "onnx")


class Backend(ABC):
    """A policy as the server sees it. Subclasses set ``name``, ``n_obs_steps``, ``obs_spec``
    ({key: (shape, dtype)} of one observation), ``samplers``, ``fixed_steps`` (None, or the only
    number of steps the backend runs) and ``metadata`` (the protocol's policy fields)."""

    name = ""
    source = ""  # the checkpoint folder or model file served
    n_obs_steps: int
    obs_spec: dict[str, tuple[tuple[int, ...], str]]
    samplers: tuple[str, ...]
    fixed_steps: int | None = None
    metadata: dict[str, Any]

    @abstractmethod
    def predict_action(
        self,
        window: Mapping[str, np.ndarray],
        steps: int | None = None,
        generator: Any = None,
        sampler: str | None = None,
    ) -> np.ndarray:
        """Raw actions (B, n_action_steps, action_dim); raises ActionRefused for bad rows."""

    @abstractmethod
    def generator(self, seed: int) -> Any:
        """The noise source of a request seeded with ``seed``."""

    @abstractmethod
    def set_threads(self, threads: int) -> None:
        """Use ``threads`` CPU threads for inference."""

    @abstractmethod
    def set_obs_limit(self, limit: float | None) -> None:
        """Refuse observations beyond ``limit`` half-ranges of the training data."""

    @abstractmethod
    def describe(self) -> str:
        """A few words for the server's start-up line."""


def policy_metadata(policy: Any, control_hz: float) -> dict[str, Any]:
    """The protocol's policy fields of a torch Policy or an OnnxPolicy."""
    return {
        "task": policy.spec["task"].get("name"),
        "action_dim": policy.action_dim,
        "horizon": policy.horizon,
        "n_obs_steps": policy.n_obs_steps,
        "n_action_steps": policy.n_action_steps,
        "control_hz": control_hz,
        "method": policy.method.name,
        "default_steps": policy.method.default_steps,
        "samplers": list(policy.method.samplers),
        "default_sampler": policy.method.default_sampler,
    }


class TorchBackend(Backend):
    """A torch :class:`~cm_policy.policy.Policy` (eval mode, on its device)."""

    name = "torch"

    def __init__(self, policy: Any):
        from cm_policy.tasks import load_task

        self.policy = policy.eval()
        task = policy.spec["task"]
        self.n_obs_steps = policy.n_obs_steps
        self.obs_spec = {k: ((int(d),), LOW_DIM_DTYPE) for k, d in policy.low_dim.items()}
        self.obs_spec.update({k: (s, IMAGE_DTYPE) for k, s in policy.image_shapes.items()})
        self.samplers = tuple(policy.method.samplers)
        self.metadata = policy_metadata(policy, load_task(task).control_hz)

    def predict_action(self, window, steps=None, generator=None, sampler=None) -> np.ndarray:
        return self.policy.predict_action(window, steps=steps, generator=generator, sampler=sampler)

    def generator(self, seed: int) -> Any:
        import torch

        return torch.Generator().manual_seed(seed)

    def set_threads(self, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)

    def set_obs_limit(self, limit: float | None) -> None:
        self.policy.set_obs_limit(limit)

    def describe(self) -> str:
        device = next(self.policy.parameters()).device
        return f"torch, {self.policy.method.name}, {self.policy.method.headline}, {device}"


class OnnxBackend(Backend):
    """An exported model run by ONNX Runtime (:class:`~cm_policy.serve.onnx_policy.OnnxPolicy`):
    its sampler and number of steps are the exported ones."""

    name = "onnx"

    def __init__(self, path: str | Path, *, threads: int = 1, device: str = "cpu"):
        from cm_policy.serve.onnx_policy import OnnxPolicy

        self.policy = OnnxPolicy(path, threads=threads, device=device)
        self.threads, self.device = threads, device
        self.n_obs_steps = self.policy.n_obs_steps
        self.obs_spec = dict(self.policy.observations)
        self.samplers = tuple(self.policy.method.samplers)
        self.fixed_steps = self.policy.method.default_steps
        self.metadata = policy_metadata(self.policy, self.policy.control_hz)

    def predict_action(self, window, steps=None, generator=None, sampler=None) -> np.ndarray:
        return self.policy.predict_action(window, steps=steps, generator=generator, sampler=sampler)

    def generator(self, seed: int) -> Any:
        from cm_policy.serve.noise import TorchGenerator

        return TorchGenerator(seed)

    def set_threads(self, threads: int) -> None:
        if threads != self.threads:  # ONNX Runtime fixes its threads when the session starts
            from cm_policy.serve.onnx_policy import OnnxPolicy

            limit = self.policy.obs_limit
            self.policy = OnnxPolicy(self.policy.path, threads=threads, device=self.device)
            self.policy.set_obs_limit(limit)
            self.threads = threads

    def set_obs_limit(self, limit: float | None) -> None:
        self.policy.set_obs_limit(limit)

    def describe(self) -> str:
        providers = ", ".join(self.policy.session.get_providers())
        return f"onnx, {self.policy.method.name}, {self.policy.method.headline}, {providers}"


def resolve_backend(backend: str, checkpoint: Any, model: Any) -> tuple[str, str]:
    """(backend, path) of the serve settings ``backend`` (auto | torch | onnx), ``checkpoint``
    (a checkpoint, run or checkpoints folder; or an exported .onnx file) and ``model`` (an
    exported .onnx file)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if checkpoint and model:
        raise ValueError("give checkpoint=PATH (torch) or model=FILE.onnx (onnx), not both")
    if not checkpoint and not model:
        raise ValueError(
            "needs checkpoint=PATH (a run, checkpoints or checkpoint folder) or "
            "model=FILE.onnx (an exported policy: cm-policy export)"
        )
    path = str(model or checkpoint)
    is_onnx = bool(model) or path.endswith(".onnx")
    if backend == "auto":
        backend = "onnx" if is_onnx else "torch"
    if backend == "onnx" and not is_onnx:
        raise ValueError(
            f"backend=onnx serves an exported model file, got checkpoint={path}: export it first "
            f"(cm-policy export checkpoint={path} out=policy.onnx), then serve model=policy.onnx"
        )
    if backend == "torch" and is_onnx:
        raise ValueError(f"backend=torch serves a checkpoint folder, got the ONNX model {path}")
    return backend, path


def load_backend(
    backend: str = "auto",
    *,
    checkpoint: Any = None,
    model: Any = None,
    weights: str = "ema",
    device: str = "auto",
    threads: int = 1,
) -> Backend:
    """The backend of serve settings (see :func:`resolve_backend`); the onnx one imports no
    torch."""
    kind, path = resolve_backend(backend, checkpoint, model)
    if kind == "onnx":
        served: Backend = OnnxBackend(path, threads=threads, device=device)
        served.source = path
        return served
    from cm_policy.checkpoint import load_policy, resolve_checkpoint

    folder = resolve_checkpoint(path, weights)
    served = TorchBackend(load_policy(folder, weights=weights, device=device))
    served.source = str(folder)
    return served
