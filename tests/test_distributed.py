"""Data-parallel training under torchrun: 2 CPU processes with gloo against one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from tiny_config import TINY

from cm_policy.cli import run_command as main
from cm_policy.training.distributed import Replica, local_slices

SCHEDULE = ["training.steps=4", "training.checkpoint_every=2"]


def torchrun_train(*overrides: str) -> None:
    """``cm-policy train`` in 2 processes, as a user would start it."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node=2", "-m", "cm_policy.cli", "train", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SDL_VIDEODRIVER": "dummy"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_two_processes_match_one_and_resume(planner_pusht: Path, tmp_path: Path):
    """2 processes x 1 micro-batch of 8 compute what 1 process x 2 micro-batches of 8 computes,
    also across a stop and resume, and with rank 0 evaluating in between."""
    common = [*TINY, f"task.dataset_path={planner_pusht}", *SCHEDULE]
    single = tmp_path / "single"
    main(["train", *common, f"output_dir={single}", "training.micro_batches=2"])
    ddp = tmp_path / "ddp"
    torchrun_train(*common, f"output_dir={ddp}", "training.stop_after=2")
    torchrun_train(*common, f"output_dir={ddp}", f"resume={ddp}", "training.eval_every=4")

    for name in ("model", "ema", "optimizer"):
        a = load_file(single / "checkpoints" / "step_0000004" / f"{name}.safetensors")
        b = load_file(ddp / "checkpoints" / "step_0000004" / f"{name}.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-6), f"{name}:{key}"
    # Rank 0 alone logs: one line per step, means over the global batch like the single run's.
    logs = [
        [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
        for run in (single, ddp)
    ]
    assert [r["step"] for r in logs[1]] == [1, 2, 3, 4]
    for a, b in zip(*logs, strict=True):
        for key in ("loss", "loss_fm", "loss_sd", "grad_norm", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
    assert len(list((ddp / "tensorboard").glob("events.out.tfevents.*"))) == 2  # 1 per launch
    # Rank 0 evaluated the test seeds once: its metrics summarise its episodes.
    evaluation = ddp / "eval" / "step_0000004"
    metrics = json.loads((evaluation / "metrics.json").read_text())
    episodes = json.loads((evaluation / "episodes.json").read_text())
    assert [e["seed"] for e in episodes] == [100000, 100001] and metrics["n_episodes"] == 2
    assert metrics["mean_score"] == pytest.approx(sum(e["max_reward"] for e in episodes) / 2)
    assert metrics["success_rate"] == pytest.approx(sum(e["success"] for e in episodes) / 2)


def test_global_batch_slicing():
    n, slices = local_slices(16, None, world=2, rank=1)
    assert n == 2 and slices == [(1, slice(8, 16))]
    n, slices = local_slices(16, 4, world=2, rank=0)
    assert n == 4 and slices == [(0, slice(0, 4)), (1, slice(4, 8))]
    with pytest.raises(ValueError, match=r"batch_size=10 .* divisible by the number"):
        local_slices(10, None, world=4, rank=0)
    with pytest.raises(ValueError, match="micro_batches=3 must be a positive multiple"):
        local_slices(12, 3, world=2, rank=0)


def test_micro_batches_must_divide_the_batch(planner_pusht: Path, tmp_path: Path):
    with pytest.raises(ValueError, match=r"batch_size=16 .* divisible"):
        main(
            [
                "train",
                *TINY,
                f"task.dataset_path={planner_pusht}",
                f"output_dir={tmp_path}",
                "training.micro_batches=3",
            ]
        )


def _sync_check_worker(rank: int, store_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    try:
        replica = Replica(rank, 2, torch.device("cpu"))
        assert replica.sum(torch.tensor([1.0, rank])).tolist() == [2.0, 1.0]
        replica.check_in_sync([torch.ones(3)])
        with pytest.raises(RuntimeError, match="1 of 2 training processes differ"):
            replica.check_in_sync([torch.full((3,), float(rank))])
    finally:
        dist.destroy_process_group()


def test_diverged_replicas_are_caught_on_every_rank(tmp_path: Path):
    """Raised on rank 0 too, though only rank 1 diverged, so that no process waits forever."""
    mp.spawn(_sync_check_worker, args=(str(tmp_path / "store"),), nprocs=2)
