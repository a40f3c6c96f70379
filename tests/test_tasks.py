"""The task registry: discovery, what tasks declare, and the dataset-only task."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from tiny_config import TINY

import cm_policy.tasks
from cm_policy.cli import run_command
from cm_policy.configs import compose, config_dir
from cm_policy.evaluation.runner import LAYOUTS
from cm_policy.tasks import load_task, task_types

TASKS_DIR = Path(cm_policy.tasks.__file__).parent
TASK_YAMLS = sorted((config_dir() / "task").glob("*.yaml"))


def test_every_task_module_registers_a_task():
    """Each module file of cm_policy/tasks/ (listed from the folder, not by the registry's own
    discovery) defines at least one registered task type, and every registered type lives
    there."""
    modules = {f"cm_policy.tasks.{p.stem}" for p in TASKS_DIR.glob("*.py") if p.stem != "__init__"}
    registered = {cls.__module__ for cls in task_types().values()}
    assert modules - registered == set(), "task modules that register no Task"
    assert registered <= modules
    for name, cls in task_types().items():
        assert cls.name == name


@pytest.mark.parametrize("path", TASK_YAMLS, ids=lambda p: p.stem)
def test_every_task_config_names_a_registered_task_and_loads(path: Path):
    """``config/task/<name>.yaml``, composed as the CLI composes it, names (``env``) a registered
    task type, and that task loads from it and declares what training and evaluation ask."""
    cfg = OmegaConf.to_container(compose("config", [f"task={path.stem}"]).task, resolve=True)
    assert isinstance(cfg, dict)
    assert cfg.get("env") in task_types(), f"{path.name}: env {cfg.get('env')!r}"
    task = load_task(cfg)
    assert type(task) is task_types()[cfg["env"]]
    assert task.horizon >= 1 and task.control_hz > 0 and task.eval_layout in LAYOUTS
    assert task.success_rule
    keys = task.dataset_keys()
    assert "action" in keys and len(keys) == len(set(keys)), keys


def test_every_task_type_has_a_config():
    envs = {OmegaConf.load(path).get("env") for path in TASK_YAMLS}
    assert set(task_types()) - envs == set(), "task types that no config/task/*.yaml uses"


def test_unknown_or_missing_env_is_refused():
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
    sources = sorted(p.stem for p in (config_dir() / "convert").glob("*.yaml"))
    with pytest.raises(ValueError, match=r"no data convert for 'nosuch': SOURCE in \[") as refused:
        run_command(["data", "convert", "nosuch", "a", str(tmp_path / "b.zarr")])
    assert str(sources) in str(refused.value)


def test_every_generator_and_converter_has_its_options_config_and_back():
    """``config/generate/<task>.yaml`` for each task with a generator, ``config/convert/<name>
    .yaml`` for each data format and each task with a converter, and no config without one."""
    from cm_policy.data.formats import data_formats
    from cm_policy.tasks import Task

    def has(cls: type, method: str) -> bool:
        return getattr(cls, method).__func__ is not getattr(Task, method).__func__

    generate = {p.stem for p in (config_dir() / "generate").glob("*.yaml")}
    convert = {p.stem for p in (config_dir() / "convert").glob("*.yaml")}
    assert generate == {name for name, cls in task_types().items() if has(cls, "generate")}
    converters = {name for name, cls in task_types().items() if has(cls, "convert")}
    assert convert == converters | set(data_formats())


def test_a_mapping_on_the_command_line_replaces_the_task_s_mapping():
    """``task.low_dim={...}`` (the form the docs show) replaces the YAML's mapping: no stale key
    of PushT's survives, new keys are taken; Hydra alone merges (and refuses new keys)."""
    from cm_policy.configs import compose

    cfg = compose("config", ["task=lerobot_pusht", "task.low_dim={joint_pos:6,gripper:1}"])
    assert dict(cfg.task.low_dim) == {"joint_pos": 6, "gripper": 1}
    cfg = compose("config", ["task=lerobot_pusht", "task.low_dim={observation_state:2}"])
    assert dict(cfg.task.low_dim) == {"observation_state": 2}
    # The explicit Hydra form still works, and a mapping for a new field is added as before.
    cfg = compose("config", ["task=lerobot_pusht", "~task.low_dim", "+task.low_dim={a:3}"])
    assert dict(cfg.task.low_dim) == {"a": 3}
    cfg = compose("config", ["task=lerobot_pusht", "+task.extra={b:1}"])
    assert dict(cfg.task.extra) == {"b": 1}
