"""Errors a user meets, and promises the code keeps: a damaged dataset chunk is a DatasetError
naming it, a missing onnx extra says how to install it, the run report states the real episode
step limit, training evaluates at its end by default (and never with eval_every null), and the
robosuite tests fail rather than skip when robosuite is missing."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import zarr
from tiny_config import TINY
from zarr.codecs import BloscCodec
from zarr.storage import LocalStore

from cm_policy.cli import compose, main, user_error
from cm_policy.data import DatasetError, ReplayBuffer, describe
from cm_policy.training.plots import eval_history
from cm_policy.training.report import write_report
from cm_policy.training.trainer import Trainer, has_simulator, train

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "cm_policy.cli"]
# TINY without its training.eval_every=null: the config's default evaluation schedule.
TINY_DEFAULT_EVAL = [a for a in TINY if not a.startswith("training.eval_every=")]


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CM_POLICY_DEBUG": "0", "SDL_VIDEODRIVER": "dummy"}
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=300, env=env, check=False
    )


def assert_one_line_user_error(stderr: str, *parts: str) -> str:
    """stderr of a command that failed on a user error: ``error: MESSAGE`` on one line (then
    the --debug hint), no traceback, and MESSAGE holds every one of ``parts``."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and len(lines) == 2, stderr
    for part in parts:
        assert part in lines[0], f"{part!r} not in {lines[0]!r}"
    return lines[0]


# --- 1. a damaged zarr chunk ------------------------------------------------------------------
DAMAGE_PARTS = ("is damaged", "download it again", "convert / generate it again")


@pytest.fixture
def damaged(tmp_path: Path) -> Path:
    """A 3-episode buffer (4 steps each) whose data/action has a chunk of 4 steps per episode;
    the third chunk's file (episode 2) is overwritten with bytes that are not blosc data."""
    path = tmp_path / "damaged.zarr"
    root = zarr.open_group(LocalStore(path), mode="w", zarr_format=3)
    action = root.create_group("data").create_array(
        "action", shape=(12, 2), chunks=(4, 2), dtype=np.float32, compressors=BloscCodec()
    )
    action[:] = np.arange(24, dtype=np.float32).reshape(12, 2)
    ends = root.create_group("meta").create_array("episode_ends", shape=(3,), dtype=np.int64)
    ends[:] = [4, 8, 12]
    chunk = path / "data" / "action" / "c" / "2" / "0"
    assert chunk.is_file()
    chunk.write_bytes(b"not a blosc chunk" * 4)
    return path


def test_damaged_chunk_is_a_dataset_error_naming_array_chunk_and_file(damaged: Path):
    chunk_file = str(damaged / "data" / "action" / "c" / "2" / "0")
    parts = (str(damaged), "data/action", "chunk (2, 0)", chunk_file, *DAMAGE_PARTS)
    for read in (
        lambda: ReplayBuffer.load(damaged),
        lambda: describe(damaged),
        lambda: ReplayBuffer.open(damaged).get_episode(2),
    ):
        with pytest.raises(DatasetError) as info:
            read()
        message = str(info.value)
        assert "\n" not in message
        for part in parts:
            assert part in message, f"{part!r} not in {message!r}"
    # Only the damaged chunk is refused: the episodes stored in the other chunks still read.
    first = ReplayBuffer.open(damaged).get_episode(0)["action"]
    np.testing.assert_array_equal(first, np.arange(8, dtype=np.float32).reshape(4, 2))


def test_cli_data_info_on_a_damaged_dataset_is_one_line_exit_2(damaged: Path):
    done = cli("data", "info", str(damaged))
    assert done.returncode == 2, done.stderr
    chunk_file = str(damaged / "data" / "action" / "c" / "2" / "0")
    assert_one_line_user_error(
        done.stderr, "data/action", "chunk (2, 0)", chunk_file, *DAMAGE_PARTS
    )


def test_train_on_a_damaged_image_chunk_is_one_line_exit_2(
    planner_pusht: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    """Image arrays are read lazily, by the task's conversion to uint8: a damaged chunk there is
    named too."""
    dataset = tmp_path / "pusht.zarr"
    shutil.copytree(planner_pusht, dataset)
    chunk = sorted(p for p in (dataset / "data" / "img" / "c").rglob("*") if p.is_file())[-1]
    chunk.write_bytes(b"\x00garbage" * 16)
    args = ["train", *TINY, "task=pusht_image", f"task.dataset_path={dataset}"]
    with pytest.raises(SystemExit) as info:
        main([*args, f"output_dir={tmp_path / 'run'}", "training.steps=1"])
    assert info.value.code == 2
    stderr = capsys.readouterr().err
    assert_one_line_user_error(stderr, "data/img", str(chunk), *DAMAGE_PARTS)


# --- 2. export without the onnx extra -----------------------------------------------------------
INSTALL = "pip install 'cm-policy[onnx]'"


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    """A keypoint policy of the tiny network, untrained, saved as a checkpoint."""
    import torch

    from cm_policy.checkpoint import save_policy
    from cm_policy.data import LinearNormalizer
    from cm_policy.policy import Policy
    from cm_policy.training.trainer import policy_spec

    torch.manual_seed(0)
    spec = policy_spec(compose("config", TINY))
    rng = np.random.default_rng(0)
    norm = LinearNormalizer()
    norm.fit(
        {
            "action": rng.normal(size=(64, 2)).astype(np.float32),
            "keypoints": rng.normal(size=(64, 20)).astype(np.float32),
        }
    )
    return save_policy(Policy(spec, norm).eval(), tmp_path / "run")


@pytest.mark.parametrize("missing", ["onnx", "onnxscript", "onnxruntime"])
def test_export_without_the_onnx_extra_says_how_to_install_it(
    missing: str,
    tiny_checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
):
    monkeypatch.delenv("CM_POLICY_DEBUG", raising=False)
    monkeypatch.setitem(sys.modules, missing, None)  # import fails as if not installed
    out = tmp_path / "policy.onnx"
    with pytest.raises(SystemExit) as info:
        main(["export", f"checkpoint={tiny_checkpoint}", f"out={out}"])
    assert info.value.code == 2
    stderr = capsys.readouterr().err
    assert_one_line_user_error(stderr, "'onnx' extra", f"not installed: {missing}", INSTALL)
    assert "pip install -e '.[onnx]'" in stderr
    assert not out.exists()


def test_a_missing_extra_module_anywhere_names_the_install_command():
    """The same for an onnx module that fails to import elsewhere (serving an exported model
    imports onnxruntime); a missing module of no extra stays a traceback (a broken install)."""
    error = ModuleNotFoundError("No module named 'onnxruntime'", name="onnxruntime")
    message = user_error(error)
    assert message is not None and message.startswith("No module named 'onnxruntime'")
    assert INSTALL in message
    assert user_error(ModuleNotFoundError("No module named 'scipy'", name="scipy")) is None


# --- 3. the run report's step limit -------------------------------------------------------------
def report_of(tmp_path: Path, *overrides: str) -> str:
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_log.jsonl").write_text(json.dumps({"step": 1, "wall_s": 60.0}) + "\n")
    metrics = {
        "mean_score": 0.5,
        "mean_score_ci95": [0.4, 0.6],
        "success_rate": 0.25,
        "success_rate_ci95": [0.1, 0.4],
        "steps": 1,
        "seeds": [100000, 100049],
        "n_episodes": 50,
    }
    cfg = compose("quickstart", list(overrides))
    return write_report(run, cfg, metrics).read_text()


def test_run_report_states_the_task_horizon_when_max_steps_is_null(tmp_path: Path):
    report = report_of(tmp_path)  # eval.max_steps: null; PushT's horizon is 300 steps
    assert "(50 episodes, max 300 steps)" in report
    assert "None" not in report


def test_run_report_states_the_configured_max_steps(tmp_path: Path):
    assert "(50 episodes, max 16 steps)" in report_of(tmp_path, "eval.max_steps=16")


# --- 4. evaluation at the end of training -------------------------------------------------------
def eval_folders(run: Path) -> list[str]:
    folder = run / "eval"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def tiny_train_cfg(dataset: Path, out: Path, *extra: str):
    overrides = [*TINY_DEFAULT_EVAL, f"task.dataset_path={dataset}", f"output_dir={out}", *extra]
    return compose("config", overrides)


def test_default_eval_every_evaluates_once_at_the_end(planner_pusht: Path, tmp_path: Path):
    cfg = tiny_train_cfg(planner_pusht, tmp_path / "run", "training.steps=2")
    assert cfg.training.eval_every == 0  # the config's default
    run = train(cfg)
    assert eval_folders(run) == ["step_0000002"]
    metrics = json.loads((run / "eval" / "step_0000002" / "metrics.json").read_text())
    assert metrics["n_episodes"] == 2
    history = eval_history(run, 2)
    assert history == {"": [(2, metrics["mean_score"], metrics["success_rate"])]}


def test_eval_every_null_never_evaluates(planner_pusht: Path, tmp_path: Path):
    cfg = tiny_train_cfg(
        planner_pusht, tmp_path / "run", "training.steps=2", "training.eval_every=null"
    )
    run = train(cfg)
    assert eval_folders(run) == []
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000002"


def test_stop_after_does_not_evaluate_at_the_stop(planner_pusht: Path, tmp_path: Path):
    """A run stopped early by training.stop_after evaluates at its real end only, after the
    resume."""
    steps = ["training.steps=4", "training.checkpoint_every=4"]
    run = train(tiny_train_cfg(planner_pusht, tmp_path / "run", *steps, "training.stop_after=2"))
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000002"
    assert eval_folders(run) == []
    run = train(tiny_train_cfg(planner_pusht, tmp_path / "run", *steps, f"resume={run}"))
    assert eval_folders(run) == ["step_0000004"]


@pytest.mark.parametrize(
    ("every", "final_eval", "evaluated"),
    [
        (None, True, []),
        (0, True, [6]),
        (0, False, []),
        (2, True, [2, 4, 6]),
        (4, True, [4, 6]),
        (2, False, [2, 4]),  # cm-policy run: its own final evaluation replaces the trainer's
    ],
)
def test_evaluation_schedule(every: int | None, final_eval: bool, evaluated: list[int]):
    trainer = SimpleNamespace(eval_every=every, final_eval=final_eval, tc=SimpleNamespace(steps=6))
    assert [d for d in range(1, 7) if Trainer.evaluates_at(trainer, d)] == evaluated


@pytest.mark.parametrize("bad", ["-1", "true", "1.5"])
def test_bad_eval_every_is_refused_before_training(bad: str, tmp_path: Path):
    cfg = tiny_train_cfg(tmp_path / "unused.zarr", tmp_path / "run", f"training.eval_every={bad}")
    with pytest.raises(ValueError, match=r"training\.eval_every must be null"):
        train(cfg)


@pytest.mark.parametrize(("every", "periodic"), [(None, []), (1, ["step_0000001"])])
def test_run_job_evaluates_the_final_policy_once(
    every: int | None, periodic: list[str], planner_pusht: Path, tmp_path: Path
):
    """cm-policy run evaluates the final policy itself (eval_final): with the default eval_every
    (None here: not overridden) or a periodic one, the trainer keeps its evaluations before the
    last step and never evaluates the final policy a second time."""
    run = tmp_path / "run"
    main(
        [
            "run",
            *TINY_DEFAULT_EVAL,
            *([] if every is None else [f"training.eval_every={every}"]),
            f"task.dataset_path={planner_pusht}",
            f"output_dir={run}",
            "training.steps=2",
            "training.checkpoint_every=2",
            "eval.n_videos=0",
        ]
    )
    assert (run / "eval_final" / "metrics.json").exists()
    assert eval_folders(run) == periodic
    assert "(2 episodes, max 16 steps)" in (run / "report.md").read_text()


def dataset_task(dataset: Path) -> list[str]:
    """The planner buffer as a dataset task (env: dataset, no simulator) on its 5-d state."""
    return [
        "task.name=robot",
        "task.env=dataset",
        f"task.dataset_path={dataset}",
        "~task.obs_type",
        "~task.low_dim",
        "+task.low_dim={state: 5}",
        "+task.control_hz=10",
    ]


def test_a_task_without_simulator_trains_without_its_default_evaluation(
    planner_pusht: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    task = dataset_task(planner_pusht)
    cfg = compose(
        "config", [*TINY_DEFAULT_EVAL, *task, "training.steps=1", f"output_dir={tmp_path / 'a'}"]
    )
    assert not has_simulator(cfg.task) and has_simulator(compose("config", []).task)
    run = train(cfg)
    assert eval_folders(run) == []
    assert "no closed-loop evaluation: task 'robot' is a dataset" in capsys.readouterr().out
    # Periodic evaluations asked for explicitly are refused before any training step.
    overrides = [*TINY_DEFAULT_EVAL, *task, "training.eval_every=1", f"output_dir={tmp_path / 'b'}"]
    with pytest.raises(ValueError, match=r"dataset without a simulator: set training\.eval_every"):
        train(compose("config", overrides))
    assert not (tmp_path / "b" / "train_log.jsonl").exists()


# --- 5. robosuite tests without robosuite -------------------------------------------------------
def test_robosuite_tests_fail_without_robosuite_unless_opted_out(monkeypatch: pytest.MonkeyPatch):
    robomimic_tests = importlib.import_module("test_robomimic")
    env = robomimic_tests.SKIP_ROBOSUITE_ENV
    assert env == "CM_POLICY_SKIP_ROBOSUITE"
    monkeypatch.setattr(robomimic_tests, "HAS_ROBOSUITE", False)
    for value in (None, "", "0"):
        if value is None:
            monkeypatch.delenv(env, raising=False)
        else:
            monkeypatch.setenv(env, value)
        with pytest.raises(
            pytest.fail.Exception, match=r"pip install --no-deps robosuite==1\.5\.2"
        ):
            robomimic_tests.require_robosuite()
    monkeypatch.setenv(env, "1")
    with pytest.raises(pytest.skip.Exception, match=f"{env}=1"):
        robomimic_tests.require_robosuite()
    monkeypatch.setattr(robomimic_tests, "HAS_ROBOSUITE", True)
    robomimic_tests.require_robosuite()  # installed: runs, opted out or not


def test_ci_does_not_opt_out_of_the_robosuite_tests():
    for script in (REPO / ".ci").iterdir():
        assert "CM_POLICY_SKIP_ROBOSUITE" not in script.read_text(), script
    assert "robosuite==1.5.2" in (REPO / ".ci" / "run").read_text()


def test_a_crop_larger_than_the_camera_is_refused_before_training(planner_pusht: Path, tmp_path):
    """pusht_image's frames are 96x96: model.crop=100 is one line naming the camera and both
    sizes when the policy is built, not a traceback from inside the first training step."""
    cfg = compose(
        "config",
        [
            *TINY,
            "task=pusht_image",
            f"task.dataset_path={planner_pusht}",
            "model.crop=100",
            "training.steps=1",
            "training.eval_every=null",
            f"output_dir={tmp_path / 'run'}",
        ],
    )
    with pytest.raises(
        ValueError,
        match=r"camera 'image': its frames are 96x96, smaller than the "
        r"crop model.crop=100 \(100x100\): set model.crop to at most 96",
    ):
        train(cfg)


# --- 6. a damaged checkpoint ----------------------------------------------------------------------
def test_a_damaged_checkpoint_is_one_line_naming_the_file_and_the_others(
    planner_pusht: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch
):
    """Resuming from (or evaluating) a checkpoint whose weights differ from its manifest is one
    line: the damaged file, its SHA-256 and the manifest's, and the checkpoints that verify."""
    monkeypatch.delenv("CM_POLICY_DEBUG", raising=False)
    args = [
        *TINY,
        f"task.dataset_path={planner_pusht}",
        f"output_dir={tmp_path / 'run'}",
        "training.steps=4",
        "training.checkpoint_every=2",
    ]
    run = train(compose("config", args))
    damaged = run / "checkpoints" / "step_0000004" / "ema.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    recorded = json.loads((damaged.parent / "manifest.json").read_text())["files"]
    capsys.readouterr()  # the training's progress bar
    for command in (["train", *args, f"resume={run}"], ["eval", f"checkpoint={run}"]):
        with pytest.raises(SystemExit) as info:
            main(command)
        assert info.value.code == 2
        line = assert_one_line_user_error(
            capsys.readouterr().err,
            f"{damaged} is damaged: its SHA-256 is ",
            f"the manifest records {recorded['ema.safetensors']['sha256']}",
            "other checkpoints of the run that verify: step_0000002",
            f"cm-policy checkpoints {run}",
        )
        assert line.startswith(f"error: resume={run}: not resuming from damaged weights: ") == (
            command[0] == "train"
        )
