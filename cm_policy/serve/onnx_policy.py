"""An exported policy (``cm-policy export``) run by ONNX Runtime, without torch.

:class:`OnnxPolicy` stands in for :class:`cm_policy.policy.Policy` at inference:
``predict_action(obs, steps=, generator=, sampler=, noise=)`` takes the same raw observation
windows and returns the same raw actions, refuses non-finite actions (and, with
:meth:`set_obs_limit`, far observations) with :class:`ActionRefused` saying why per batch row,
and carries ``spec``, ``method`` (name, samplers, default steps), ``n_obs_steps``,
``n_action_steps``, ``horizon`` and ``action_dim``, so that the closed-loop runner
(:func:`cm_policy.evaluation.runner.evaluate_policy`) and the action server take either.

Only numpy and onnxruntime are imported. The initial noise comes from ``generator``: a
:class:`~cm_policy.serve.noise.TorchGenerator` (torch's seeded noise, drawn with numpy), a
``numpy.random.Generator``, a ``torch.Generator`` (drawn with torch, which its owner has
imported), or a list of those, one per batch row, as the runner passes them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cm_policy.observations import ActionRefused, check_obs, check_obs_limit, refusal_reasons
from cm_policy.serve.noise import TorchGenerator

METADATA_KEY = "cm_policy"  # the model's metadata_props entry (cm_policy.export.METADATA_KEY)
NOISE, ACTION = "noise", "action"
NOISE_MODES = "random | zero | mean:K"


def parse_noise(noise: str) -> tuple[int, bool]:
    """(number of draws averaged, whether the initial noise is random) of a ``noise`` mode."""
    if noise == "random":
        return 1, True
    if noise == "zero":
        return 1, False
    kind, _, k = str(noise).partition(":")
    if kind == "mean" and k.isdigit() and int(k) >= 1:
        return int(k), True
    raise ValueError(f"noise must be {NOISE_MODES}, got {noise!r}")


class ExportedMethod:
    """What an export fixed of its method: name, the one sampler kind and number of steps."""

    def __init__(self, name: str, sampler: str, steps: int, label: str):
        self.name = name
        self.samplers = (sampler,)
        self.default_sampler = sampler
        self.default_steps = steps
        self.headline = label

    def resolve_sampler(self, sampler: str | None) -> str:
        if sampler not in (None, self.default_sampler):
            raise ValueError(
                f"this ONNX model was exported with sampler {self.default_sampler!r}, got "
                f"sampler={sampler!r}; export another with cm-policy export sampler=..."
            )
        return self.default_sampler

    def resolve_steps(self, steps: int | None) -> int:
        if steps not in (None, self.default_steps):
            raise ValueError(
                f"this ONNX model was exported with steps={self.default_steps} (unrolled in the "
                f"graph), got steps={steps}; export another with cm-policy export steps=N"
            )
        return self.default_steps

    def label(self, sampler: str | None, steps: int | None) -> str:
        self.resolve_sampler(sampler)
        self.resolve_steps(steps)
        return self.headline


_CPU = ["CPUExecutionProvider"]


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model {path} does not exist (cm-policy export writes one)")
    return path


def _metadata(modelmeta: Any, path: str | Path) -> dict[str, Any]:
    raw = modelmeta.custom_metadata_map.get(METADATA_KEY)
    if raw is None:
        raise ValueError(
            f"{path} is not a cm-policy export: its metadata has no {METADATA_KEY!r} entry "
            "(write one with cm-policy export checkpoint=PATH out=FILE.onnx)"
        )
    return json.loads(raw)


def providers_for(device: str) -> list[str]:
    """ONNX Runtime execution providers for ``device`` (auto | cpu | cuda[:index])."""
    import onnxruntime as ort

    if device in ("auto", "cpu"):
        if device == "auto" and "CUDAExecutionProvider" in ort.get_available_providers():
            return ["CUDAExecutionProvider", *_CPU]
        return _CPU
    if str(device).startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ValueError(
                f"device={device} but this onnxruntime ({ort.__version__}) has no CUDA provider "
                f"(it has {ort.get_available_providers()}); use device=cpu or install "
                "onnxruntime-gpu"
            )
        return ["CUDAExecutionProvider", *_CPU]
    raise ValueError(f"device must be auto, cpu or cuda[:index], got {device!r}")


class OnnxPolicy:
    """An exported policy run by ONNX Runtime; ``predict_action`` as :class:`Policy`'s.

    ``threads``: ONNX Runtime's intra-op threads (1 by default, like the server's torch);
    ``device``: auto | cpu | cuda (the CUDA provider of onnxruntime-gpu).
    """

    def __init__(self, path: str | Path, *, threads: int = 1, device: str = "cpu"):
        import onnxruntime as ort

        self.path = _existing(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(self.path), options, providers=providers_for(device)
        )
        meta = _metadata(self.session.get_modelmeta(), self.path)
        self.metadata = meta
        self.spec: dict[str, Any] = meta["spec"]
        self.horizon = int(meta["horizon"])
        self.n_obs_steps = int(meta["n_obs_steps"])
        self.n_action_steps = int(meta["n_action_steps"])
        self.action_dim = int(meta["action_dim"])
        self.control_hz = float(meta["control_hz"])
        self.observations: dict[str, tuple[tuple[int, ...], str]] = {
            k: (tuple(v["shape"]), v["dtype"]) for k, v in meta["observations"].items()
        }
        self.low_dim = [k for k, (_, dtype) in self.observations.items() if dtype == "float32"]
        self.method = ExportedMethod(
            meta["method"], meta["sampler"], int(meta["steps"]), meta["sampler_label"]
        )
        self.normalizer = {
            k: (np.asarray(v["scale"], np.float32), np.asarray(v["offset"], np.float32))
            for k, v in meta["normalizer"].items()
        }
        inputs = {i.name for i in self.session.get_inputs()}
        self.feeds_noise = NOISE in inputs  # exporters may drop an input a method never reads
        missing = set(self.observations) - inputs
        if missing:
            raise ValueError(f"{self.path}: the graph lacks inputs {sorted(missing)}")
        self.rng = np.random.default_rng()
        self.obs_limit: float | None = None

    def eval(self) -> OnnxPolicy:  # the runner's evaluate_policy calls it on a torch policy
        return self

    def set_n_action_steps(self, n: int) -> None:
        raise ValueError(
            f"this ONNX model returns n_action_steps={self.n_action_steps} actions per chunk; "
            "export the checkpoint again after choosing another"
        )

    def set_obs_limit(self, limit: float | None) -> None:
        """As :meth:`Policy.set_obs_limit`: refuse observations more than ``limit`` half-ranges
        of the training data from its middle (None: no limit)."""
        self.obs_limit = check_obs_limit(limit)

    def check_obs(self, obs: Mapping[str, Any]) -> None:
        """Raise a ValueError naming what was expected when ``obs`` does not fit this policy."""
        expected = {k: shape for k, (shape, _) in self.observations.items()}
        check_obs(obs, expected, self.n_obs_steps)

    def draw_noise(self, batch: int, generator: Any = None) -> np.ndarray:
        """Initial noise (batch, horizon, action_dim) float32 from ``generator`` (see the
        module's docstring; None: this policy's own numpy generator)."""
        shape = (batch, self.horizon, self.action_dim)
        if isinstance(generator, list | tuple):
            if len(generator) != batch:
                raise ValueError(f"{len(generator)} generators for a batch of {batch}")
            rows = [self.draw_noise(1, g) for g in generator]
            return np.concatenate(rows) if rows else np.empty(shape, np.float32)
        if generator is None:
            return self.rng.standard_normal(shape, dtype=np.float32)
        if isinstance(generator, TorchGenerator):
            return generator.randn(shape)
        if isinstance(generator, np.random.Generator):
            return generator.standard_normal(shape, dtype=np.float32)
        if type(generator).__module__.startswith("torch"):
            import torch  # the caller passed a torch generator: torch is there

            return torch.randn(shape, generator=generator, device=generator.device).cpu().numpy()
        raise TypeError(f"unsupported noise generator {type(generator).__name__}")

    def predict_action(
        self,
        obs: Mapping[str, Any],
        steps: int | None = None,
        generator: Any = None,
        sampler: str | None = None,
        noise: str = "random",
        z: np.ndarray | None = None,
    ) -> np.ndarray:
        """Raw actions (B, n_action_steps, action_dim) for raw observations (B, >=n_obs_steps,
        ...), as :meth:`Policy.predict_action`. ``steps`` and ``sampler`` must be None or the
        exported ones. ``z``: the initial noise (B, horizon, action_dim) itself (then
        ``generator`` and ``noise`` are not used). ``noise="mean:K"`` averages the actions of K
        draws (Policy averages the normalised chunks: the same up to rounding)."""
        self.method.resolve_steps(steps)
        self.method.resolve_sampler(sampler)
        self.check_obs(obs)
        draws, random = parse_noise(noise)
        window = {}
        for key, (_, dtype) in self.observations.items():
            array = np.asarray(obs[key])[:, -self.n_obs_steps :]
            if dtype == "uint8" and array.dtype != np.uint8:
                raise ValueError(f"obs[{key!r}] must be uint8 images, got {array.dtype}")
            window[key] = np.ascontiguousarray(array, dtype=dtype)
        batch = len(next(iter(window.values())))
        if z is not None:
            z = np.asarray(z, np.float32)
            if z.shape != (batch, self.horizon, self.action_dim):
                raise ValueError(
                    f"z must have shape {(batch, self.horizon, self.action_dim)}, got {z.shape}"
                )
            draws = 1
        runs = []
        for _ in range(draws):
            if z is not None:
                initial = z
            elif random:
                initial = self.draw_noise(batch, generator)
            else:
                initial = np.zeros((batch, self.horizon, self.action_dim), np.float32)
            feeds = dict(window)
            if self.feeds_noise:
                feeds[NOISE] = initial
            runs.append(self.session.run([ACTION], feeds)[0])
        actions = runs[0] if draws == 1 else np.mean(runs, axis=0, dtype=np.float32)
        reasons = self.refusals(window, actions)
        if any(reasons):
            raise ActionRefused(reasons, actions)
        return actions

    def refusals(self, window: Mapping[str, np.ndarray], actions: np.ndarray) -> list[str | None]:
        """Per batch row, why its actions must not be sent (None: they may), as
        :meth:`Policy.refusals` decides."""
        peaks = {}
        for key in self.low_dim:
            scale, offset = self.normalizer[key]
            peaks[key] = np.abs(window[key] * scale + offset).reshape(len(actions), -1).max(axis=1)
        return refusal_reasons(peaks, self.obs_limit, actions)
