"""Tasks: how an environment's observations and a dataset's recorded fields line up.

A task config (``config/task/*.yaml``) names the env, its observation type, the observation keys
the policy sees with their shapes, and the dataset to train on. This module turns recorded dataset
fields into exactly the observation dict the env produces, so training and evaluation agree.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from cm_policy.data import DatasetError
from cm_policy.envs.pusht import PushTEnv, state_sincos_obs

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PUSHT_DATASET = REPO_ROOT / "data" / "pusht_generated.zarr"


def _pusht_obs(obs_type: str, data: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    state = np.asarray(data["state"], dtype=np.float64)
    if obs_type == "state":
        return {"state": state.astype(np.float32)}
    if obs_type == "state_sincos":
        return {"state_sincos": state_sincos_obs(state)}
    if obs_type == "keypoints":
        kp = np.asarray(data["keypoint"], dtype=np.float32).reshape(len(state), -1)
        return {"keypoints": np.concatenate([kp, state[:, :2].astype(np.float32)], axis=1)}
    if obs_type == "image":
        return {"image": _as_uint8(data["img"]), "agent_pos": state[:, :2].astype(np.float32)}
    raise ValueError(f"unknown PushT obs_type {obs_type!r}")


def _robomimic_obs(
    task: Mapping[str, Any], data: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    # Converted robomimic buffers store each observation under the env's own key.
    obs = {k: np.asarray(data[k], dtype=np.float32) for k in task["low_dim"]}
    obs.update({k: np.asarray(data[k]) for k in task.get("image_keys", [])})
    return obs


def _as_uint8(images: Any, chunk: int = 512) -> np.ndarray:
    """Images as uint8, converted a chunk at a time: the human PushT dataset stores float32
    pixels, and converting it whole would hold several float copies of the largest array."""
    if images.dtype == np.uint8:
        return np.asarray(images)
    out = np.empty(images.shape, dtype=np.uint8)
    for start in range(0, images.shape[0], chunk):
        part = np.asarray(images[start : start + chunk])
        if not np.isfinite(part).all():
            bad = start + int(np.flatnonzero((~np.isfinite(part)).reshape(len(part), -1).any(1))[0])
            raise DatasetError(f"image array has NaN or inf pixels (first at step {bad})")
        out[start : start + chunk] = np.clip(np.rint(part), 0, 255)
    return out


def dataset_keys(task: Mapping[str, Any]) -> list[str]:
    """The recorded dataset fields a task needs (loaded into RAM for training)."""
    if task["env"] == "pusht":
        needed = {"image": ["state", "img"], "keypoints": ["state", "keypoint"]}
        return ["action", *needed.get(task["obs_type"], ["state"])]
    if task["env"] == "robomimic":
        return ["action", *task["low_dim"], *task.get("image_keys", [])]
    raise ValueError(f"unknown env {task['env']!r}; expected 'pusht' or 'robomimic'")


def dataset_obs(task: Mapping[str, Any], data: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Observation arrays (N, ...) built from recorded fields, keyed as the env's observations."""
    if task["env"] == "pusht":
        return _pusht_obs(task["obs_type"], data)
    if task["env"] == "robomimic":
        return _robomimic_obs(task, data)
    raise ValueError(f"unknown env {task['env']!r}; expected 'pusht' or 'robomimic'")


def make_env(task: Mapping[str, Any]) -> gym.Env:
    if task["env"] == "pusht":
        return PushTEnv(obs_type=task["obs_type"])
    if task["env"] == "robomimic":
        from cm_policy.envs.robosuite_env import MAX_STEPS, RobosuiteEnv

        return RobosuiteEnv(
            task=task["robomimic_task"],
            obs_type=task["obs_type"],
            abs_action=bool(task.get("abs_action", False)),
            max_steps=int(task.get("max_steps", MAX_STEPS)),
        )
    raise ValueError(f"unknown env {task['env']!r}; expected 'pusht' or 'robomimic'")


def env_factory(task: Mapping[str, Any]) -> Callable[[], gym.Env]:
    """A picklable constructor for vector envs in spawned processes."""
    return partial(make_env, dict(task))
