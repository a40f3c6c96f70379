"""robomimic's tasks (Lift, Can, Square) in robosuite + MuJoCo, Panda arm, at 20 Hz.

A config names the robosuite task (``robomimic_task``), the observation type (``lowdim`` or
``image``), the observation keys, and absolute or delta actions. Demonstrations: the scripted
experts (``cm-policy data generate robomimic task=...``) or robomimic HDF5 files converted with
``cm-policy data convert robomimic``; converted buffers store each observation under the env's key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import numpy as np

from cm_policy.envs.robosuite_env import CONTROL_HZ, MAX_STEPS, RobosuiteEnv
from cm_policy.tasks import Task


class Robomimic(Task):
    name = "robomimic"
    control_hz = CONTROL_HZ
    max_steps = MAX_STEPS
    success_rule = "the task's own success check (its sparse reward, so mean_score = success)"

    def make_env(self) -> gym.Env:
        return RobosuiteEnv(
            task=self.cfg["robomimic_task"],
            obs_type=self.cfg["obs_type"],
            abs_action=bool(self.cfg.get("abs_action", False)),
            max_steps=self.horizon,
        )

    def dataset_keys(self) -> list[str]:
        return ["action", *self.cfg["low_dim"], *self.cfg.get("image_keys", [])]

    def dataset_obs(self, data: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        obs = {k: np.asarray(data[k], dtype=np.float32) for k in self.cfg["low_dim"]}
        obs.update({k: np.asarray(data[k]) for k in self.cfg.get("image_keys", [])})
        return obs

    @classmethod
    def generate(cls, opts: Mapping[str, Any]) -> dict:
        """``cm-policy data generate robomimic``: options in config/generate/robomimic.yaml."""
        if not opts["task"]:
            raise ValueError("cm-policy data generate robomimic needs task=lift|can|square")
        from cm_policy.data.robomimic_demos import generate_robomimic_dataset

        return generate_robomimic_dataset(
            opts["task"],
            opts["out"],
            n_episodes=opts["n"],
            seed=opts["seed"],
            images=opts["images"],
            overwrite=opts["overwrite"],
            recovery=opts["recovery"],
            recovery_kind=opts["recovery_kind"],
        )

    @classmethod
    def convert(cls, sources: list[str], out: str, opts: Mapping[str, Any]) -> dict:
        """``cm-policy data convert robomimic``: options in config/convert/robomimic.yaml."""
        from cm_policy.data.robomimic_hdf5 import convert_to_zarr

        kwargs = {k: v for k, v in opts.items() if v is not None}
        return convert_to_zarr(sources, out, **kwargs)
