"""Training end to end: the loop, resume, and the CLI (tiny budgets on CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_config import TINY

from cm_policy.cli import compose
from cm_policy.cli import run_command as main
from cm_policy.data import DatasetError, ReplayBuffer
from cm_policy.training.plots import eval_history
from cm_policy.training.trainer import train

TEST_SEEDS = [100000, 100001]  # eval.start_seed and the 2 episodes of TINY


def tiny_cfg(dataset: Path, out: Path, *extra: str):
    return compose("config", [*TINY, f"task.dataset_path={dataset}", f"output_dir={out}", *extra])


def read_episodes(folder: Path) -> list[dict]:
    return json.loads((folder / "episodes.json").read_text())


def outcomes(folder: Path) -> list[list]:
    """Per episode of an evaluation folder: seed, max reward, success, steps (not the video)."""
    keys = ("seed", "max_reward", "success", "n_steps")
    return [[e[k] for k in keys] for e in read_episodes(folder)]


def assert_metrics_summarise_episodes(folder: Path, seeds: list[int]) -> dict:
    """metrics.json of an evaluation folder is the summary of its episodes.json, which ran one
    episode on each of ``seeds``; returns the metrics."""
    metrics = json.loads((folder / "metrics.json").read_text())
    episodes = read_episodes(folder)
    assert [e["seed"] for e in episodes] == seeds
    assert metrics["n_episodes"] == len(seeds) and metrics["seeds"] == [seeds[0], seeds[-1]]
    assert metrics["mean_score"] == pytest.approx(np.mean([e["max_reward"] for e in episodes]))
    assert metrics["success_rate"] == pytest.approx(np.mean([e["success"] for e in episodes]))
    return metrics


def test_resume_continues_bit_for_bit(planner_pusht: Path, tmp_path: Path):
    schedule = ["training.steps=6", "training.checkpoint_every=3"]
    # Checkpointing every step (it draws no random numbers), pruned to the last two and the pinned.
    pruned = ["training.checkpoint_every=1", "training.keep_steps=[1,3]"]
    straight = train(tiny_cfg(planner_pusht, tmp_path / "a", *schedule, *pruned))
    kept = sorted(p.name for p in (straight / "checkpoints").glob("step_*"))
    assert kept == [f"step_{s:07d}" for s in (1, 3, 5, 6)]
    # The same 6-step schedule interrupted after 3 steps, then resumed from its checkpoint.
    half = train(tiny_cfg(planner_pusht, tmp_path / "b", *schedule, "training.stop_after=3"))
    assert (half / "checkpoints" / "latest").read_text().strip() == "step_0000003"
    resumed = train(tiny_cfg(planner_pusht, tmp_path / "b", *schedule, f"resume={half}"))
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


def test_anytime_schedule_extends_a_finished_run_as_if_it_had_never_stopped(
    planner_pusht: Path, tmp_path: Path
):
    """Warm-up then constant (training.lr_schedule=constant): a run trained to its plan's last
    step (3), then continued toward a step appended later (6), ends with the weights of one run
    trained to 6 in one go. Under the cosine schedule the first 3 steps already differ."""
    anytime = ["training.lr_schedule=constant", "training.checkpoint_every=3"]
    straight = train(tiny_cfg(planner_pusht, tmp_path / "a", *anytime, "training.steps=6"))
    first = train(tiny_cfg(planner_pusht, tmp_path / "b", *anytime, "training.steps=3"))
    extended = train(
        tiny_cfg(planner_pusht, tmp_path / "b", *anytime, "training.steps=6", f"resume={first}")
    )
    for name in ("model", "ema", "optimizer"):
        a = load_file(straight / "checkpoints" / "step_0000006" / f"{name}.safetensors")
        b = load_file(extended / "checkpoints" / "step_0000006" / f"{name}.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            assert (a[key] == b[key]).all(), f"{name}:{key} differs after extending"
    lrs = [json.loads(x)["lr"] for x in (extended / "train_log.jsonl").read_text().splitlines()]
    # The log shows the rate of the next step: after the 2 warm-up steps, the constant 3e-4.
    assert lrs == [pytest.approx(3e-4)] * 6
    # The same extension under the cosine schedule (its rates bent toward step 3, then toward 6)
    # does not reproduce the straight run: what the anytime schedule is for.
    cosine = ["training.checkpoint_every=3"]
    c6 = train(tiny_cfg(planner_pusht, tmp_path / "c", *cosine, "training.steps=6"))
    c3 = train(tiny_cfg(planner_pusht, tmp_path / "d", *cosine, "training.steps=3"))
    c3 = train(tiny_cfg(planner_pusht, tmp_path / "d", *cosine, "training.steps=6", f"resume={c3}"))
    a = load_file(c6 / "checkpoints" / "step_0000006" / "model.safetensors")
    b = load_file(c3 / "checkpoints" / "step_0000006" / "model.safetensors")
    assert any((a[k] != b[k]).any() for k in a), "cosine rates must depend on training.steps"


def test_cli_train_then_eval(planner_pusht: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    run = tmp_path / "run"
    main(
        [
            "train",
            *TINY,
            f"task.dataset_path={planner_pusht}",
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
    periodic = assert_metrics_summarise_episodes(run / "eval" / "step_0000004", TEST_SEEDS)
    assert eval_history(run, log[-1]["step"]) == {
        "": [(4, periodic["mean_score"], periodic["success_rate"])]
    }

    def evaluate(out: Path, n_videos: int) -> dict:
        torch.manual_seed(0)  # the sampling noise: the same for both evaluations
        args = ["eval", f"checkpoint={run}", "steps=1", "n_episodes=2", "n_envs=1"]
        main([*args, f"n_videos={n_videos}", "max_steps=16", f"output_dir={out}"])
        return assert_metrics_summarise_episodes(out, TEST_SEEDS)

    out = tmp_path / "eval"
    metrics = evaluate(out, n_videos=1)
    assert metrics["steps"] == 1
    assert all(e["n_steps"] == 16 or e["success"] for e in read_episodes(out))
    assert len(list((out / "videos").glob("*.mp4"))) == 1
    assert "mean_score" in capsys.readouterr().out
    # The same checkpoint, seeds and noise give the same episodes: the seeds set the episodes.
    again = evaluate(tmp_path / "again", n_videos=0)
    assert outcomes(tmp_path / "again") == outcomes(out)
    assert again["mean_score"] == metrics["mean_score"]


def test_image_task_trains_and_evaluates(planner_pusht: Path, tmp_path: Path):
    cfg = tiny_cfg(
        planner_pusht,
        tmp_path / "img",
        "task=pusht_image",
        "training.steps=2",
        "training.batch_size=4",
        "model.resnet_widths=[8,16,16,16]",
        "training.eval_every=2",
    )
    run = train(cfg)
    assert_metrics_summarise_episodes(run / "eval" / "step_0000002", TEST_SEEDS)
    # The image reaches the actions: with the same agent position and noise, two different
    # scenes give different actions, and the same scene the same ones.
    from cm_policy.checkpoint import load_policy

    policy = load_policy(run, weights="ema")
    assert policy.image_keys == ["image"]
    frames = ReplayBuffer.open(planner_pusht).get_episode(0, keys=["img"])["img"]
    agent_pos = np.full((1, 2, 2), 256.0, np.float32)

    def act(frame: int) -> np.ndarray:
        image = np.repeat(frames[None, frame : frame + 1], 2, axis=1)  # (1, 2, 96, 96, 3)
        obs = {"image": image, "agent_pos": agent_pos}
        return policy.predict_action(obs, generator=torch.Generator().manual_seed(0))

    np.testing.assert_array_equal(act(0), act(0))
    assert np.abs(act(0) - act(len(frames) - 1)).max() > 1e-3
    with pytest.raises(ValueError, match=r"missing keys \['image'\]"):
        policy.predict_action({"agent_pos": agent_pos})


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
            "demos.n=2",
            "demos.workers=1",
            "training.steps=3",
            "training.checkpoint_every=3",
            "training.val_ratio=0",
        ]
    )
    # The planned demos are in the buffer the statistics describe (keypoint task: no images).
    stats = json.loads((dataset / "generation.json").read_text())
    buffer = ReplayBuffer.open(dataset)
    assert sorted(buffer.keys) == ["action", "keypoint", "n_contacts", "state"]
    assert buffer.n_episodes == stats["n_episodes"] == 2
    assert stats["mean_length"] == pytest.approx(buffer.episode_lengths.mean())
    assert stats["max_length"] == buffer.episode_lengths.max()
    metrics = assert_metrics_summarise_episodes(run / "eval_final", TEST_SEEDS)
    report = (run / "report.md").read_text()
    assert f"| mean_score | {metrics['mean_score']:.3f} |" in report
    assert "learning_curves.png" in report
    assert len(list((run / "eval_final" / "videos").glob("*.mp4"))) == 1
    main(["data", "info", str(dataset)])
    info = capsys.readouterr().out
    assert "episodes:  2" in info and "data/keypoint" in info


def test_float_images_convert_to_uint8_by_chunks_and_reject_nan():
    import numpy as np

    from cm_policy.tasks import as_uint8

    rng = np.random.default_rng(0)
    pixels = rng.uniform(-20, 280, (70, 4, 4, 3)).astype(np.float32)
    got = as_uint8(pixels, chunk=16)
    assert got.dtype == np.uint8
    assert (got == np.clip(np.rint(pixels), 0, 255).astype(np.uint8)).all()
    pixels[37, 1, 2, 0] = np.nan
    with pytest.raises(DatasetError, match=r"NaN or inf pixels .*step 37"):
        as_uint8(pixels, chunk=16)


def test_eval_history_reads_periodic_final_and_campaign_evaluations(tmp_path: Path):
    """The learning-curve panel's data: the trainer's evaluations and the final one under one
    label, a campaign's marks (``step<N>_<sampler>``) under their sampler, other folders not."""

    def metrics(folder: Path, score: float) -> None:
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps({"mean_score": score, "success_rate": 0.5}))

    metrics(tmp_path / "eval" / "step_0000200", 0.2)
    metrics(tmp_path / "eval" / "step_0000100", 0.1)
    metrics(tmp_path / "eval" / "step32900_1", 0.8)
    metrics(tmp_path / "eval" / "step8200_1", 0.7)
    metrics(tmp_path / "eval" / "step8200_2", 0.75)
    metrics(tmp_path / "eval" / "final_isd1_random", 0.9)
    metrics(tmp_path / "eval_final", 0.3)
    assert eval_history(tmp_path, 300) == {
        "": [(100, 0.1, 0.5), (200, 0.2, 0.5), (300, 0.3, 0.5)],
        "1": [(8200, 0.7, 0.5), (32900, 0.8, 0.5)],
        "2": [(8200, 0.75, 0.5)],
    }
