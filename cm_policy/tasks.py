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
        img = np.asarray(data["img"])
        if img.dtype != np.uint8:
            img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
        return {"image": img, "agent_pos": state[:, :2].astype(np.float32)}
    raise ValueError(f"unknown PushT obs_type {obs_type!r}")


def dataset_keys(task: Mapping[str, Any]) -> list[str]:
    """The recorded dataset fields a task needs (loaded into RAM for training)."""
    if task["env"] == "pusht":
        needed = {"image": ["state", "img"], "keypoints": ["state", "keypoint"]}
        return ["action", *needed.get(task["obs_type"], ["state"])]
    raise ValueError(f"unknown env {task['env']!r}; expected 'pusht'")


def dataset_obs(task: Mapping[str, Any], data: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Observation arrays (N, ...) built from recorded fields, keyed as the env's observations."""
    if task["env"] == "pusht":
        return _pusht_obs(task["obs_type"], data)
    raise ValueError(f"unknown env {task['env']!r}; expected 'pusht'")


def make_env(task: Mapping[str, Any]) -> gym.Env:
    if task["env"] == "pusht":
        return PushTEnv(obs_type=task["obs_type"])
    raise ValueError(f"unknown env {task['env']!r}; expected 'pusht'")


def env_factory(task: Mapping[str, Any]) -> Callable[[], gym.Env]:
    """A picklable constructor for vector envs in spawned processes."""
    return partial(make_env, dict(task))
