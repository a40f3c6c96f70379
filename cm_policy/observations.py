"""Observation windows, and the checks every policy backend applies to a window and its actions.

It imports numpy only, so deployment code can import it without gymnasium or torch: the runner
and the action server keep their windows with the same :func:`stack_obs` / :func:`push_obs`, and
the torch :class:`~cm_policy.policy.Policy` and the ONNX Runtime
:class:`~cm_policy.serve.onnx_policy.OnnxPolicy` refuse the same requests with the same words."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def stack_obs(obs: Mapping[str, np.ndarray], steps: int) -> dict[str, np.ndarray]:
    """A history window (B, steps, ...) filled with the first observation (B, ...)."""
    return {k: np.repeat(np.asarray(v)[:, None], steps, axis=1) for k, v in obs.items()}


def push_obs(history: dict[str, np.ndarray], obs: Mapping[str, np.ndarray]) -> None:
    """Shift the history windows by one step and append ``obs`` in place."""
    for k, window in history.items():
        window[:, :-1] = window[:, 1:]
        window[:, -1] = obs[k]


class ActionRefused(ValueError):
    """``predict_action`` computed actions that must not be sent: ``reasons[i]`` says why for
    batch row i (None where the row is fine); ``actions`` holds every row, as computed."""

    def __init__(self, reasons: list[str | None], actions: np.ndarray):
        bad = [i for i, r in enumerate(reasons) if r]
        super().__init__(f"actions refused for batch rows {bad}: {reasons[bad[0]]}")
        self.reasons, self.actions = reasons, actions


def camera_shapes(task: Mapping[str, Any]) -> dict[str, tuple[int, int, int]]:
    """Each camera's frame shape (height, width, 3) from a task spec's ``image_keys`` and
    ``image_shape``: a mapping camera -> shape, or one shape for every camera (the simulated
    tasks' configs and checkpoints written before cameras had shapes of their own)."""
    keys = [str(k) for k in task.get("image_keys") or []]
    if not keys:
        return {}
    declared = task.get("image_shape")
    name = task.get("name", "?")
    if not declared:
        raise ValueError(
            f"task {name!r} has cameras {keys} but no image_shape: expected a shape "
            "[height, width, 3] per camera, e.g. task.image_shape={"
            + ",".join(f"{k}:[96,96,3]" for k in keys)
            + "}"
        )
    if isinstance(declared, Mapping):
        missing = [k for k in keys if k not in declared]
        extra = [str(k) for k in declared if k not in keys]
        if missing or extra:
            raise ValueError(
                f"task {name!r}: image_shape must name exactly the cameras {keys}; "
                f"missing {missing}, not a camera {extra}"
            )
        shapes = {k: declared[k] for k in keys}
    else:
        shapes = {k: declared for k in keys}
    out = {}
    for key, shape in shapes.items():
        dims = tuple(shape) if isinstance(shape, list | tuple) else ()
        if len(dims) != 3 or dims[2] != 3 or not all(_positive_int(d) for d in dims):
            raise ValueError(
                f"task {name!r}: image_shape of camera {key!r} must be [height, width, 3], "
                f"got {shape!r}"
            )
        out[key] = (int(dims[0]), int(dims[1]), 3)
    return out


def _positive_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool) and value > 0


def check_obs(
    obs: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], n_obs_steps: int
) -> None:
    """Raise a ValueError naming what was expected when ``obs`` does not hold, for every key of
    ``expected``, an array (batch, >= n_obs_steps, *shape) with one batch size for all keys."""
    missing = sorted(set(expected) - set(obs))
    if missing:
        raise ValueError(f"observation is missing keys {missing}; expected {sorted(expected)}")
    batch = None
    for key, tail in expected.items():
        shape = tuple(np.shape(obs[key]))
        if len(shape) != 2 + len(tail) or shape[2:] != tail or shape[1] < n_obs_steps:
            raise ValueError(
                f"obs[{key!r}] must have shape (batch, >={n_obs_steps}, "
                f"{', '.join(map(str, tail))}), got {shape}"
            )
        if batch is not None and shape[0] != batch:
            raise ValueError(f"obs[{key!r}] has batch {shape[0]}, other keys have {batch}")
        batch = shape[0]


def check_obs_limit(limit: float | None) -> float | None:
    """An ``obs_limit`` (half-ranges of the training data from its middle), validated."""
    if limit is not None and not limit >= 1.0:
        raise ValueError(f"obs_limit must be >= 1 (the training range) or None, got {limit}")
    return None if limit is None else float(limit)


def refusal_reasons(
    peaks: Mapping[str, np.ndarray], obs_limit: float | None, actions: np.ndarray
) -> list[str | None]:
    """Per batch row, why its actions must not be sent (None: they may): an observation key
    whose largest normalised |value| (``peaks[key]``, per row; the training range is [-1, 1])
    exceeds ``obs_limit``, or actions that are not finite."""
    reasons: list[str | None] = [None] * len(actions)
    if obs_limit is not None:
        for key, peak in peaks.items():
            for row in np.flatnonzero(peak > obs_limit):
                reasons[row] = reasons[row] or (
                    f"observation {key!r} lies {peak[row]:.3g} half-ranges of the "
                    f"training data from its middle; this policy accepts up to "
                    f"{obs_limit:g} (obs_limit)"
                )
    finite = np.isfinite(actions).reshape(len(actions), -1).all(axis=1)
    for row in np.flatnonzero(~finite):
        reasons[row] = reasons[row] or (
            "the policy computed non-finite actions (NaN or inf), most likely from "
            "observation values far outside the training range"
        )
    return reasons
