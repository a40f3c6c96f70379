"""Tasks: everything the package knows about an environment, declared in one module each.

A task module (``cm_policy/tasks/<name>.py``) defines a :class:`Task` subclass whose ``name`` is
the ``env`` of its configs (``config/task/*.yaml``). It declares the env factory, how recorded
dataset fields become the env's observations, the control rate, the evaluation horizon, the
success rule, and the demonstration generators and converters behind ``cm-policy data`` (whose
options and their defaults are the config groups ``config/generate/<name>.yaml`` and
``config/convert/<name>.yaml``).
Nothing outside a task module switches on a task's name: the rest of the package asks
:func:`load_task` for the task of a config and calls it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np

from cm_policy.data import DatasetError


class Task:
    """One environment family and its data, configured by a task config (a plain mapping)."""

    name: ClassVar[str] = ""
    control_hz: ClassVar[float]  # actions per second the env expects
    max_steps: ClassVar[int]  # the evaluation horizon, unless the config sets ``max_steps``
    # How evaluations step the env: "sync" (all envs in the evaluating process, one batched
    # forward per chunk: for cheap physics) or "async" (a worker process per env: for slow envs),
    # and how many envs by default.
    eval_layout: ClassVar[str] = "async"
    eval_envs: ClassVar[int] = 2
    success_rule: ClassVar[str]  # how the env decides ``is_success``, in words, for reports
    # The info keys an evaluation keeps from each episode's last step, for episode_outcome.
    outcome_keys: ClassVar[tuple[str, ...]] = ()
    # Whether the task has an env to evaluate in (False: data only, trained but not evaluated).
    simulated: ClassVar[bool] = True

    def __init__(self, cfg: Mapping[str, Any]):
        self.cfg = dict(cfg)

    @property
    def horizon(self) -> int:
        """Env steps per evaluation episode."""
        return int(self.cfg.get("max_steps") or self.max_steps)

    def make_env(self) -> gym.Env:
        raise NotImplementedError

    def env_factory(self) -> Callable[[], gym.Env]:
        """A picklable constructor for vector envs in spawned processes."""
        return partial(_make_env, type(self).name, self.cfg)

    def dataset_keys(self) -> list[str]:
        """The recorded dataset fields training needs (loaded into RAM)."""
        raise NotImplementedError

    def dataset_obs(self, data: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Observation arrays (N, ...) from recorded fields, keyed as the env's observations."""
        raise NotImplementedError

    def episode_outcome(self, info: Mapping[str, Any]) -> dict[str, Any]:
        """How an episode ended, from its last ``outcome_keys`` info values (JSON-able)."""
        return {}

    def summarize_outcomes(self, results: Sequence[Any]) -> dict[str, Any]:
        """The task's own metrics over evaluated episodes (their ``outcome``)."""
        return {}

    @classmethod
    def generate(cls, opts: Mapping[str, Any]) -> Any:
        """Write demonstrations (``cm-policy data generate <name> k=v ...``); ``opts``: the
        options of ``config/generate/<name>.yaml`` (their defaults) with the command's overrides."""
        raise ValueError(f"task {cls.name!r} has no demonstration generator")

    @classmethod
    def convert(cls, sources: list[str], out: str, opts: Mapping[str, Any]) -> Any:
        """Convert recorded datasets into a replay buffer (``cm-policy data convert <name> IN
        ... OUT k=v ...``); ``opts``: the options of ``config/convert/<name>.yaml`` (their
        defaults) with the command's overrides."""
        raise ValueError(f"task {cls.name!r} has no dataset converter")


def task_types() -> dict[str, type[Task]]:
    """Every task module's :class:`Task`, by name."""
    global _TASKS
    if _TASKS is None:
        from cm_policy.registry import discover

        _TASKS = discover(sys.modules[__name__], Task)
    return _TASKS


_TASKS: dict[str, type[Task]] | None = None


def task_type(name: str) -> type[Task]:
    tasks = task_types()
    if name not in tasks:
        raise ValueError(f"unknown task env {name!r}; expected one of {sorted(tasks)}")
    return tasks[name]


def load_task(cfg: Mapping[str, Any]) -> Task:
    """The task of a task config (its ``env`` names the task module)."""
    if "env" not in cfg:
        raise ValueError(f"a task config needs an 'env' key naming its task; got keys {list(cfg)}")
    return task_type(str(cfg["env"]))(cfg)


def _make_env(name: str, cfg: Mapping[str, Any]) -> gym.Env:
    return task_type(name)(cfg).make_env()


def as_uint8(images: Any, chunk: int = 512) -> np.ndarray:
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
