"""Training end to end: the loop, resume, and the CLI (tiny budgets on CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file
from tiny_config import TINY

from cm_policy.cli import compose, main
from cm_policy.data import DatasetError
from cm_policy.training.trainer import train


def tiny_cfg(dataset: Path, out: Path, *extra: str):
    return compose("config", [*TINY, f"task.dataset_path={dataset}", f"output_dir={out}", *extra])


def test_resume_continues_bit_for_bit(tiny_pusht: Path, tmp_path: Path):
    schedule = ["training.steps=6", "training.checkpoint_every=3"]
    straight = train(tiny_cfg(tiny_pusht, tmp_path / "a", *schedule))
    # The same 6-step schedule interrupted after 3 steps, then resumed from its checkpoint.
    half = train(tiny_cfg(tiny_pusht, tmp_path / "b", *schedule, "training.stop_after=3"))
    assert (half / "checkpoints" / "latest").read_text().strip() == "step_0000003"
    resumed = train(tiny_cfg(tiny_pusht, tmp_path / "b", *schedule, f"resume={half}"))
    for name in ("model", "ema", "optimizer"):
        a = load_file(straight / "checkpoints" / "step_0000006" / f"{name}.safetensors")
        b = load_file(resumed / "checkpoints" / "step_0000006" / f"{name}.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            assert (a[key] == b[key]).all(), f"{name}:{key} differs after resume"
    log = [json.loads(x) for x in (resumed / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    walls = [r["wall_s"] for r in log]
    assert walls == sorted(walls), "a resumed run's clock must continue, not restart"


def test_cli_train_then_eval(tiny_pusht: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    run = tmp_path / "run"
    main(
        [
            "train",
            *TINY,
            f"task.dataset_path={tiny_pusht}",
            f"output_dir={run}",
            "training.steps=4",
            "training.eval_every=4",
        ]
    )
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(r["loss_fm"] > 0 and r["grad_norm"] > 0 for r in log)
    assert (run / "learning_curves.png").stat().st_size > 0
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    out = tmp_path / "eval"
    main(
        [
            "eval",
            f"checkpoint={run}",
            "steps=1",
            "n_episodes=2",
            "n_envs=1",
            "n_videos=1",
            "max_steps=16",
            f"out={out}",
        ]
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_episodes"] == 2 and metrics["steps"] == 1
    assert 0.0 <= metrics["mean_score"] <= 1.0
    assert len(list((out / "videos").glob("*.mp4"))) == 1
    assert "mean_score" in capsys.readouterr().out


def test_image_task_trains_and_evaluates(tiny_pusht: Path, tmp_path: Path):
    cfg = tiny_cfg(
        tiny_pusht,
        tmp_path / "img",
        "task=pusht_image",
        "training.steps=2",
        "training.batch_size=4",
        "model.resnet_widths=[8,16,16,16]",
        "training.eval_every=2",
    )
    run = train(cfg)
    metrics = json.loads((run / "eval" / "step_0000002" / "metrics.json").read_text())
    assert metrics["n_episodes"] == 2


def test_missing_dataset_is_a_clear_error(tmp_path: Path):
    with pytest.raises(DatasetError, match="path does not exist"):
        train(tiny_cfg(tmp_path / "nope.zarr", tmp_path / "x", "training.steps=1"))


def test_run_job_end_to_end_on_generated_demos(tmp_path: Path, capsys: pytest.CaptureFixture):
    """The quick-start job at a toy budget: plan demos -> train -> evaluate -> report."""
    dataset = tmp_path / "demos.zarr"
    run = tmp_path / "run"
    main(
        [
            "run",
            *TINY,
            f"task.dataset_path={dataset}",
            f"output_dir={run}",
            "demos.n_episodes=2",
            "demos.workers=1",
            "training.steps=3",
            "training.checkpoint_every=3",
            "training.val_ratio=0",
        ]
    )
    stats = json.loads((dataset / "generation.json").read_text())
    assert stats["n_episodes"] == 2 and stats["attempt_success_rate"] > 0
    report = (run / "report.md").read_text()
    assert "mean_score" in report and "learning_curves.png" in report
    metrics = json.loads((run / "eval_final" / "metrics.json").read_text())
    assert metrics["n_episodes"] == 2
    assert len(list((run / "eval_final" / "videos").glob("*.mp4"))) == 1
    main(["data", "info", str(dataset)])
    info = capsys.readouterr().out
    assert "episodes:  2" in info and "data/keypoint" in info


def test_float_images_convert_to_uint8_by_chunks_and_reject_nan():
    import numpy as np

    from cm_policy.tasks import _as_uint8

    rng = np.random.default_rng(0)
    pixels = rng.uniform(-20, 280, (70, 4, 4, 3)).astype(np.float32)
    got = _as_uint8(pixels, chunk=16)
    assert got.dtype == np.uint8
    assert (got == np.clip(np.rint(pixels), 0, 255).astype(np.uint8)).all()
    pixels[37, 1, 2, 0] = np.nan
    with pytest.raises(DatasetError, match=r"NaN or inf pixels .*step 37"):
        _as_uint8(pixels, chunk=16)
