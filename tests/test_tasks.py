"""The task registry: discovery, what tasks declare, and the dataset-only task."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tiny_config import TINY

from cm_policy.cli import run_command
from cm_policy.tasks import load_task, task_types


def test_registry_finds_every_task_module():
    assert set(task_types()) == {"pusht", "pusht_twogoal", "robomimic", "dataset"}
    with pytest.raises(ValueError, match="unknown task env 'nosuch'; expected one of"):
        load_task({"env": "nosuch"})
    with pytest.raises(ValueError, match="needs an 'env' key"):
        load_task({"obs_type": "state"})


def test_tasks_declare_rate_horizon_and_layout():
    pusht = load_task({"env": "pusht", "obs_type": "keypoints"})
    assert (pusht.control_hz, pusht.horizon, pusht.eval_layout) == (10, 300, "sync")
    robomimic = load_task({"env": "robomimic", "robomimic_task": "can", "max_steps": 500})
    assert (robomimic.control_hz, robomimic.horizon, robomimic.eval_layout) == (20, 500, "async")


def test_dataset_task_trains_on_named_keys(tmp_path: Path):
    from cm_policy.data import ReplayBuffer

    data = tmp_path / "robot.zarr"
    buffer = ReplayBuffer.create(data)
    rng = np.random.default_rng(0)
    for length in (30, 40):
        buffer.add_episode(
            {
                "observation_state": rng.normal(size=(length, 3)).astype(np.float32),
                "action": rng.normal(size=(length, 2)).astype(np.float32),
            }
        )
    task = {
        "name": "robot",
        "env": "dataset",
        "dataset_path": str(data),
        "action_dim": 2,
        "low_dim": {"observation_state": 3},
        "image_keys": [],
        "control_hz": 30,
    }
    assert load_task(task).control_hz == 30.0
    with pytest.raises(ValueError, match="a dataset without a simulator"):
        load_task(task).make_env()
    run = tmp_path / "run"
    run_command(
        [
            "train",
            "task.name=robot",
            "task.env=dataset",
            f"task.dataset_path={data}",
            "~task.obs_type",
            "~task.low_dim",
            "+task.low_dim={observation_state: 3}",
            "+task.control_hz=30",
            *TINY,
            "training.steps=2",
            f"output_dir={run}",
        ]
    )
    from cm_policy.checkpoint import load_policy

    policy = load_policy(run)
    obs = {"observation_state": rng.normal(size=(1, 2, 3)).astype(np.float32)}
    assert policy.predict_action(obs).shape == (1, 8, 2)


def test_data_convert_names_the_sources(tmp_path: Path):
    with pytest.raises(ValueError, match=r"unknown task env 'nosuch'"):
        run_command(["data", "convert", "nosuch", "a", str(tmp_path / "b.zarr")])
