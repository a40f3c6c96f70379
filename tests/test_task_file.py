"""A buffer's own task config (cm_policy/data/task_file.py) and ``task=PATH`` in compose
(cm_policy/configs.py): derived from the arrays, written by the robomimic converter, shown by
``cm-policy data info``, and trained on by ``cm-policy train task=BUFFER/task.yaml``.
(The LeRobot converter's task file: tests/test_lerobot.py, on datasets LeRobot wrote.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from omegaconf import OmegaConf
from tiny_config import TINY

from cm_policy.cli import main, run_command
from cm_policy.configs import compose
from cm_policy.data import DatasetError, ReplayBuffer
from cm_policy.data.task_file import (
    DEFAULT_CONTROL_HZ,
    TASK_FILE,
    derive_task,
    describe_task,
    task_yaml,
    write_task_file,
)

STEPS = (6, 4)  # two episodes


def _buffer(path: Path, arrays: dict[str, tuple[tuple[int, ...], str]]) -> Path:
    """A buffer at ``path`` with arrays {key: (per-step shape, dtype)} of random values."""
    buffer = ReplayBuffer.create(path)
    rng = np.random.default_rng(0)
    for n in STEPS:
        episode = {}
        for key, (shape, dtype) in arrays.items():
            values = rng.uniform(0, 100, size=(n, *shape))
            episode[key] = values > 50 if dtype == "bool" else values.astype(dtype)
        buffer.add_episode(episode)
    return path


# Every kind of array a buffer may hold, in the buffer's (sorted) key order.
EVERY_KIND = {
    "action": ((2,), "float32"),
    "done": ((1,), "bool"),
    "front": ((96, 128, 3), "uint8"),
    "grid": ((3, 2), "float32"),
    "int_frames": ((8, 8, 3), "int16"),
    "joint_counts": ((2,), "int64"),
    "on": ((1,), "float32"),  # a key YAML 1.1 would read as true, unquoted
    "reward": ((), "float64"),
    "state": ((6,), "float32"),
    "velocity": ((4,), "float64"),
    "wrist": ((48, 64, 3), "float32"),
}
EXPECTED = {
    "name": "my_robot",
    "env": "dataset",
    "dataset_path": ".",
    "control_hz": DEFAULT_CONTROL_HZ,
    "action_dim": 2,
    "low_dim": {"joint_counts": 2, "on": 1, "state": 6, "velocity": 4},
    "image_keys": ["front", "wrist"],
    "image_shape": {"front": [96, 128, 3], "wrist": [48, 64, 3]},
}


def test_every_kind_of_array_and_the_yaml_reads_back(tmp_path: Path):
    path = _buffer(tmp_path / "my_robot.zarr", EVERY_KIND)
    task = derive_task(path)
    assert task.config == EXPECTED
    assert list(task.config["low_dim"]) == list(EXPECTED["low_dim"])  # the buffer's order
    assert set(task.left_out) == {"done", "grid", "int_frames", "reward"}
    text = task_yaml(task, made_by="a test", location=path)
    assert yaml.safe_load(text) == EXPECTED
    assert OmegaConf.to_container(OmegaConf.create(text)) == EXPECTED
    comments = [line.strip() for line in text.splitlines() if line.lstrip().startswith("#")]
    for key, why in [
        ("done", "dtype bool"),
        ("grid", "(3, 2) per step"),
        ("int_frames", "dtype int16 for (8, 8, 3) frames"),
        ("reward", "shape (N,)"),
    ]:
        assert any(c.startswith(f"# {key} is left out: {why}") for c in comments), (key, text)
    assert f"#   cm-policy train task={path / TASK_FILE} [key=value ...]" in text
    assert f"control_hz: {DEFAULT_CONTROL_HZ}           # not recorded with the data" in text
    # The name, the rate and no cameras: an empty image_keys and no image_shape.
    low = _buffer(tmp_path / "low.zarr", {"action": ((3,), "float32"), "s": ((1,), "int32")})
    task = derive_task(low, name="yes", control_hz=12.5, control_hz_source="the robot's")
    assert task.config == {
        "name": "yes",
        "env": "dataset",
        "dataset_path": ".",
        "control_hz": 12.5,
        "action_dim": 3,
        "low_dim": {"s": 1},
        "image_keys": [],
    }
    text = task_yaml(task, made_by="a test", location=low)
    assert yaml.safe_load(text) == task.config
    assert "control_hz: 12.5         # the robot's" in text


def test_a_buffer_without_an_action_has_no_task(tmp_path: Path):
    path = _buffer(tmp_path / "b.zarr", {"state": ((2,), "float32")})
    with pytest.raises(DatasetError, match=r"no 'action' array, so no task config"):
        derive_task(path)
    assert describe_task(path).startswith("task config: none (")
    images = _buffer(tmp_path / "c.zarr", {"action": ((4, 4, 3), "uint8")})
    with pytest.raises(DatasetError, match=r"action has shape \(10, 4, 4, 3\)"):
        derive_task(images)


def test_data_info_shows_the_buffer_s_file_and_whether_it_matches(tmp_path: Path, capsys):
    path = _buffer(tmp_path / "my_robot.zarr", EVERY_KIND)
    main(["data", "info", str(path)])
    out = capsys.readouterr().out
    lead = f"task config (derived; no {TASK_FILE} here: save it as {path / TASK_FILE} for "
    assert lead in out and out.index("arrays:") < out.index(lead)
    derived = out[out.index(lead) :].split("\n", 1)[1]
    assert yaml.safe_load(derived) == EXPECTED
    written = write_task_file(path, made_by="a test")
    assert written == path / TASK_FILE and yaml.safe_load(written.read_text()) == EXPECTED
    main(["data", "info", str(path)])
    out = capsys.readouterr().out
    assert "the buffer's own file, which cm-policy train task=" in out
    assert "it matches the buffer's arrays):" in out
    assert out.rstrip().endswith(written.read_text().rstrip())
    # Deleting features is what the user does: it still matches. Other sizes do not.
    edited = written.read_text().replace("  state: 6\n", "").replace("[front, wrist]", "[wrist]")
    written.write_text(edited.replace("  front: [96, 128, 3]\n", ""))
    assert "it matches the buffer's arrays" in describe_task(path)
    written.write_text(
        edited.replace("velocity: 4", "velocity: 5").replace("action_dim: 2", "action_dim: 3")
    )
    described = describe_task(path)
    assert "it differs from the buffer's arrays: low_dim velocity: declared size 5" in described
    assert "low_dim velocity: declared size 5, the data has size 4" in described
    assert "action: declared action_dim 3, the data has size 2" in described
    # A left-out array named as a feature says why it is none; a missing one says so.
    written.write_text(
        edited.replace("  velocity: 4\n", "  velocity: 4\n  done: 1\n  speed: 2\n").replace(
            "[wrist]", "[wrist, grid]"
        )
    )
    described = describe_task(path)
    assert "low_dim done: declared size 1, the data's done is no feature: dtype bool" in described
    assert "low_dim speed: declared size 2, the data has no such array" in described
    assert "camera grid: the data's grid is no feature: (3, 2) per step" in described
    assert "low_dim velocity" not in described.splitlines()[0]
    written.write_text("- a list\n")
    assert "it differs from the buffer's arrays: not a YAML mapping" in describe_task(path)


# --- task=PATH --------------------------------------------------------------------------------
def test_compose_a_task_file_given_by_its_path(tmp_path: Path, monkeypatch):
    buffer = _buffer(tmp_path / "buf.zarr", EVERY_KIND)
    file = write_task_file(buffer, made_by="a test")
    cfg = compose("config", [f"task={file}", "task.low_dim={state:6,velocity:4}"])
    assert cfg.task.dataset_path == str(buffer.resolve())
    assert (cfg.task.name, cfg.task.env, cfg.task.action_dim) == ("buf", "dataset", 2)
    assert dict(cfg.task.low_dim) == {"state": 6, "velocity": 4}
    assert list(cfg.task.image_keys) == ["front", "wrist"]
    assert cfg.output_dir.startswith("outputs/buf_")
    # Relative to the current directory; other overrides (+key, lists) apply on top.
    monkeypatch.chdir(tmp_path)
    cfg = compose(
        "config", [f"task=buf.zarr/{TASK_FILE}", "task.image_keys=[wrist]", "+task.crop=40"]
    )
    assert cfg.task.dataset_path == str(buffer.resolve())
    assert (list(cfg.task.image_keys), cfg.task.crop) == (["wrist"], 40)
    # A file of one's own: a relative dataset_path is relative to the file's folder, an
    # interpolation is left to resolve as in config/task/*.yaml, the name is the folder's.
    mine = tmp_path / "configs" / "robot"
    mine.mkdir(parents=True)
    (mine / "arm.yml").write_text("env: dataset\ndataset_path: ../../buf.zarr\naction_dim: 2\n")
    cfg = compose("config", ["task=configs/robot/arm.yml", "+task.low_dim={state:6}"])
    assert (cfg.task.name, cfg.task.dataset_path) == ("robot", str(buffer.resolve()))
    monkeypatch.delenv("MY_DATA", raising=False)
    (mine / "env.yaml").write_text("dataset_path: ${oc.env:MY_DATA,data/x.zarr}\n")
    cfg = compose("config", [f"task={mine / 'env.yaml'}"])
    assert cfg.task.dataset_path == "data/x.zarr" and cfg.task.name == "robot"
    # By name, as before.
    assert compose("config", ["task=pusht_keypoints"]).task.name == "pusht_keypoints"


def test_a_missing_or_malformed_task_file_is_one_line(tmp_path: Path, capsys):
    missing = tmp_path.resolve() / "nowhere.zarr" / TASK_FILE
    with pytest.raises(FileNotFoundError, match=re.escape(f"task={missing}: no such task file")):
        compose("config", [f"task={missing}"])
    listed = tmp_path / "list.yaml"
    listed.write_text("- name\n- env\n")
    with pytest.raises(ValueError, match=r"list.yaml: expected a YAML mapping .* found a list"):
        compose("config", [f"task={listed}"])
    broken = tmp_path / "broken.yaml"
    broken.write_text("low_dim: {a: [\n")
    with pytest.raises(ValueError, match=r"broken.yaml: not readable as YAML"):
        compose("config", [f"task={broken}"])
    with pytest.raises(SystemExit) as exited:
        main(["train", f"task={missing}"])
    assert exited.value.code == 2
    [line, _] = capsys.readouterr().err.splitlines()
    assert line == (
        f"error: task={missing}: no such task file (expected a YAML task config, e.g. the "
        "task.yaml that cm-policy data convert writes into its buffer)"
    )


def test_train_from_a_buffer_s_task_file(tmp_path: Path):
    """``cm-policy train task=BUFFER/task.yaml``, end to end on a low-dim buffer."""
    buffer = ReplayBuffer.create(tmp_path / "robot.zarr")
    rng = np.random.default_rng(0)
    for n in (30, 40):
        state = rng.normal(size=(n, 3)).astype(np.float32)
        action = rng.normal(size=(n, 2)).astype(np.float32)
        buffer.add_episode({"action": action, "state": state, "done": np.zeros((n, 1), bool)})
    file = write_task_file(buffer.path, made_by="a test", control_hz=30)
    run = tmp_path / "run"
    run_command(["train", f"task={file}", *TINY, "training.steps=2", f"output_dir={run}"])
    from cm_policy.checkpoint import load_policy

    policy = load_policy(run)
    obs = {"state": rng.normal(size=(1, 2, 3)).astype(np.float32)}
    assert policy.predict_action(obs).shape == (1, 8, 2)
    trained = OmegaConf.load(run / "config.yaml").task
    assert (trained.name, trained.control_hz, dict(trained.low_dim)) == ("robot", 30, {"state": 3})


# --- the robomimic converter --------------------------------------------------------------------
ROBOMIMIC_META = {"env_name": "Lift", "type": 1, "env_kwargs": {"robots": ["Panda"]}}
ROBOMIMIC_LOW_DIM = {"object": 10, "robot0_eef_pos": 3, "robot0_eef_quat": 4}
ROBOMIMIC_LOW_DIM["robot0_gripper_qpos"] = 2
CAMERA = (12, 16, 3)  # robomimic's are 84x84; any size converts


def _robomimic_hdf5(path: Path) -> Path:
    from cm_policy.data.robomimic_hdf5 import RobomimicWriter
    from cm_policy.envs.robosuite_env import IMAGE_KEYS

    rng = np.random.default_rng(0)
    with RobomimicWriter(path, ROBOMIMIC_META) as writer:
        for n in STEPS:
            obs = {k: rng.normal(size=(n, d)) for k, d in ROBOMIMIC_LOW_DIM.items()}
            obs |= {k: rng.integers(0, 256, (n, *CAMERA), dtype=np.uint8) for k in IMAGE_KEYS}
            writer.add_demo(rng.normal(size=(n, 32)), rng.uniform(-1, 1, (n, 7)), obs)
    return path


def test_the_robomimic_converter_writes_the_task_file(tmp_path: Path, capsys, monkeypatch):
    import cm_policy.data.robomimic_hdf5 as robomimic_hdf5
    from cm_policy.envs.robosuite_env import IMAGE_KEYS
    from cm_policy.tasks.robomimic import Robomimic

    source = _robomimic_hdf5(tmp_path / "lift.hdf5")
    out = tmp_path / "lift.zarr"
    main(["data", "convert", "robomimic", str(source), str(out), "image=true"])
    stats = json.loads(capsys.readouterr().out)
    assert stats["task_file"] == str(out / TASK_FILE)
    text = (out / TASK_FILE).read_text()
    assert Robomimic.control_hz == 20
    assert yaml.safe_load(text) == {
        "name": "lift",
        "env": "dataset",
        "dataset_path": ".",
        "control_hz": Robomimic.control_hz,
        "action_dim": 7,
        "low_dim": ROBOMIMIC_LOW_DIM,
        "image_keys": sorted(IMAGE_KEYS),
        "image_shape": {k: list(CAMERA) for k in sorted(IMAGE_KEYS)},
    }
    assert "control_hz: 20           # robomimic's control rate" in text
    assert f"#   cm-policy train task={out / TASK_FILE} [key=value ...]" in text
    # The file is written before the buffer is moved into place: a failure there leaves
    # neither a buffer nor a task file.

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(robomimic_hdf5, "write_task_file", fail)
    other = tmp_path / "other.zarr"
    with pytest.raises(OSError, match="disk full"):
        robomimic_hdf5.convert_to_zarr(source, other, progress=False)
    assert not other.exists() and list(tmp_path.glob(".other.zarr*")) == []
