"""A task made of a dataset alone: train on any replay buffer whose keys a config names.

For data recorded elsewhere (a converted LeRobot dataset, a robot's own logs): the config lists
the low-dim observation keys with their sizes, the image keys and the action size, and the
buffer stores each under that key. There is no simulator, so ``cm-policy train`` works and
``cm-policy eval`` does not; the trained policy is deployed with ``cm-policy serve``, which
reports the config's ``control_hz`` to its clients.
"""

from __future__ import annotations

from collections.abc import Mapping

import gymnasium as gym
import numpy as np

from cm_policy.tasks import Task, as_uint8


class DatasetTask(Task):
    name = "dataset"
    simulated = False
    max_steps = 300
    success_rule = "none: a dataset task has no simulator to evaluate in"

    @property  # type: ignore[override]
    def control_hz(self) -> float:
        """The config's ``control_hz`` (a LeRobot dataset's fps), else 10."""
        return float(self.cfg.get("control_hz") or 10)

    def make_env(self) -> gym.Env:
        raise ValueError(
            f"task {self.cfg.get('name', self.name)!r} is a dataset without a simulator "
            "(env: dataset): train on it, and deploy the policy with cm-policy serve"
        )

    def dataset_keys(self) -> list[str]:
        return ["action", *self.cfg["low_dim"], *self.cfg.get("image_keys", [])]

    def dataset_obs(self, data: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        obs = {k: np.asarray(data[k], dtype=np.float32) for k in self.cfg["low_dim"]}
        obs.update({k: as_uint8(data[k]) for k in self.cfg.get("image_keys", [])})
        return obs
