"""PushT (Diffusion Policy's task): push the T-shaped block onto its goal pose, at 10 Hz.

Observation types: ``state`` (agent x, y, block x, y, angle), ``state_sincos`` (the angle as sin
and cos), ``keypoints`` (9 block keypoints + agent position) and ``image`` (96x96 RGB + agent
position). Demonstrations: the package's planner (``cm-policy data generate pusht``) or Diffusion
Policy's human dataset (a zarr replay buffer with ``state``, ``keypoint``, ``img``, ``action``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import numpy as np

from cm_policy.envs.pusht import CONTROL_HZ, SUCCESS_THRESHOLD, PushTEnv, state_sincos_obs
from cm_policy.tasks import Task, as_uint8

# Recorded fields each observation type is built from (besides ``action``).
RECORDED = {"image": ["state", "img"], "keypoints": ["state", "keypoint"]}


class PushT(Task):
    name = "pusht"
    control_hz = CONTROL_HZ
    max_steps = 300  # Diffusion Policy's PushT evaluation horizon
    # pymunk steps at ~8,000/s, so the policy's forward is the cost: share it across many envs
    # in one process (eval/results/bench_env.md).
    eval_layout = "sync"
    eval_envs = 50
    success_rule = f"coverage > {SUCCESS_THRESHOLD} at some step"
    # The goal poses the planner's demonstrations go to, one per episode (None: the reference's).
    demo_goals: tuple[tuple[float, float, float], ...] | None = None

    def make_env(self) -> gym.Env:
        return PushTEnv(obs_type=self.cfg["obs_type"])

    def dataset_keys(self) -> list[str]:
        return ["action", *RECORDED.get(self.cfg["obs_type"], ["state"])]

    def dataset_obs(self, data: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        obs_type = self.cfg["obs_type"]
        state = np.asarray(data["state"], dtype=np.float64)
        if obs_type == "state":
            return {"state": state.astype(np.float32)}
        if obs_type == "state_sincos":
            return {"state_sincos": state_sincos_obs(state)}
        if obs_type == "keypoints":
            kp = np.asarray(data["keypoint"], dtype=np.float32).reshape(len(state), -1)
            return {"keypoints": np.concatenate([kp, state[:, :2].astype(np.float32)], axis=1)}
        if obs_type == "image":
            return {"image": as_uint8(data["img"]), "agent_pos": state[:, :2].astype(np.float32)}
        raise ValueError(f"unknown PushT obs_type {obs_type!r}")

    @classmethod
    def generate(cls, opts: Mapping[str, Any]) -> dict:
        """``cm-policy data generate pusht``: options in config/generate/pusht.yaml."""
        from cm_policy.data.pusht_demos import generate_pusht_dataset

        return generate_pusht_dataset(
            opts["out"],
            n_episodes=opts["n"],
            seed=opts["seed"],
            workers=opts["workers"],
            images=opts["images"],
            goals=cls.demo_goals,
            overwrite=opts["overwrite"],
        )
