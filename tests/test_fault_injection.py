"""Training and campaigns survive ``kill -9``: a run killed at random moments (one of them in the
middle of writing a checkpoint, one between a checkpoint's rename and ``latest``) and resumed each
time ends with the weights of a run never interrupted, bit for bit, and leaves no partial file; a
campaign killed (its whole process group) while it evaluates, then run again, ends with the cache
of a campaign never interrupted."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file
from tiny_config import TINY, TINY_CAMPAIGN

from cm_policy.checkpoint import list_checkpoints
from cm_policy.cli import compose
from cm_policy.training.trainer import train

STEPS, EVERY = 40, 5
SCHEDULE = [
    "task=pusht_keypoints",
    f"training.steps={STEPS}",
    f"training.checkpoint_every={EVERY}",
    "training.keep_checkpoints=2",
]
STATE_FILES = ("model", "ema", "optimizer", "rng")

# ``cm-policy train`` with an optional pause (a test-only patch, nothing in the package): with
# FAULT_PAUSE=files it stops inside the write of checkpoint FAULT_STEP (after its first weights
# file), with FAULT_PAUSE=latest after that checkpoint's rename and before ``latest`` moves; it
# creates FAULT_MARKER when it stops there, so that the test kills it at that very moment.
DRIVER = """
import os, sys, time
from pathlib import Path
import cm_policy.checkpoint as ck

pause, marker = os.environ.get("FAULT_PAUSE"), Path(os.environ.get("FAULT_MARKER", "-"))
where = f"step_{int(os.environ.get('FAULT_STEP', 0)):07d}"

def stop_here():
    marker.touch()
    time.sleep(600)

if pause == "files":
    real_save = ck.save_file
    def save_file(tensors, path, *args, **kwargs):
        real_save(tensors, path, *args, **kwargs)
        if f".{where}.tmp-" in str(path):
            stop_here()
    ck.save_file = save_file
elif pause == "latest":
    real_write = ck.write_text_atomic
    def write_text_atomic(path, text):
        if Path(path).name == "latest" and text.strip() == where:
            stop_here()
        real_write(path, text)
    ck.write_text_atomic = write_text_atomic

from cm_policy.cli import main
main(sys.argv[1:])
"""


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, what: str, limit=240.0):
    """Poll ``condition`` every few milliseconds while ``proc`` runs."""
    deadline = time.monotonic() + limit
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the process ended ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {limit} s")
        time.sleep(0.003)


def logged_steps(run: Path) -> list[int]:
    log = run / "train_log.jsonl"
    lines = log.read_text().splitlines() if log.exists() else []
    return [json.loads(line)["step"] for line in lines if line.endswith("}")]


def latest_step(run: Path) -> int:
    latest = run / "checkpoints" / "latest"
    return int(latest.read_text().split("_")[1]) if latest.exists() else 0


def assert_checkpoints_intact(run: Path) -> None:
    """Every checkpoint folder verifies against its manifest and ``latest`` names one of them."""
    if not (run / "checkpoints").is_dir():
        return
    entries = list_checkpoints(run)
    assert all(e.status == "ok" for e in entries), [(e.step, e.status) for e in entries]
    if latest_step(run):
        assert [e.step for e in entries if e.latest] == [latest_step(run)], entries


def test_training_killed_at_random_moments_resumes_to_the_same_weights(
    planner_pusht: Path, tmp_path: Path
):
    started = time.monotonic()
    overrides = [*TINY, *SCHEDULE, f"task.dataset_path={planner_pusht}"]
    straight = train(compose("config", [*overrides, f"output_dir={tmp_path / 'straight'}"]))
    run = tmp_path / "killed"
    rng = random.Random(40)
    # Kills at random steps and the two moments a checkpoint is most fragile.
    plan = ["step", "files", "step", "latest", "step"]
    kills = []
    for how in [*plan, None]:
        resume = [f"resume={run}"] if latest_step(run) else []
        env = {**os.environ, "OMP_NUM_THREADS": "1", "CM_POLICY_DEBUG": "1"}
        marker = tmp_path / f"marker{len(kills)}"
        # The next checkpoint this launch writes (or the one after): where a pause stops it.
        at = min(STEPS, (latest_step(run) // EVERY + 1 + rng.randint(0, 1)) * EVERY)
        if how in ("files", "latest"):
            env.update(FAULT_PAUSE=how, FAULT_STEP=str(at), FAULT_MARKER=str(marker))
        output = tmp_path / f"launch{len(kills)}.log"
        with open(output, "w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-c", DRIVER, "train", *overrides, f"output_dir={run}", *resume],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            if how is None:
                proc.wait(timeout=300)
                assert proc.returncode == 0, output.read_text()[-3000:]
                break
            if how == "step":
                # A random moment inside a random step beyond what was logged before.
                after = max([0, *logged_steps(run)])
                at = rng.randint(after + 1, min(after + 9, STEPS - 1))
                wait_for(lambda at=at: at in logged_steps(run), proc, f"step {at} logged")
                time.sleep(rng.uniform(0.0, 0.05))
            else:
                wait_for(marker.exists, proc, f"the pause at step {at} ({how})")
            proc.kill()  # SIGKILL
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        kills.append((how, at, latest_step(run)))
        assert_checkpoints_intact(run)
        root = run / "checkpoints"
        if how == "files":  # killed inside the write: the folder stays temporary
            assert list(root.glob(f".step_{at:07d}.tmp-{proc.pid}/model.safetensors"))
            assert not (root / f"step_{at:07d}").exists() and latest_step(run) < at
        if how == "latest":  # renamed into place, latest not moved yet: still the one before
            assert (root / f"step_{at:07d}").is_dir() and latest_step(run) == at - EVERY
    print(f"kills (how, step, latest after): {kills}")

    # The resumed run ends where the straight one does, bit for bit, and leaves nothing partial.
    root = run / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000035", "step_0000040"]
    assert [(e.step, e.status, e.latest) for e in list_checkpoints(run)] == [
        (35, "ok", False),
        (40, "ok", True),
    ]
    assert not [p for p in run.rglob("*") if ".tmp" in p.name or ".old-" in p.name]
    for name in STATE_FILES:
        a = load_file(straight / "checkpoints" / "step_0000040" / f"{name}.safetensors")
        b = load_file(root / "step_0000040" / f"{name}.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}:{key} differs after the kills"
    state = [
        json.loads((r / "step_0000040" / "trainer_state.json").read_text())
        for r in (
            straight / "checkpoints",
            root,
        )
    ]
    assert state[0] == state[1]
    assert logged_steps(run) == list(range(1, STEPS + 1))
    print(f"wall time {time.monotonic() - started:.0f} s")


# --- a campaign killed while it evaluates -------------------------------------------------------
def campaign_plan(tmp_path: Path, dataset: Path, name: str) -> tuple[Path, Path, Path]:
    """A one-run campaign (regression, marks at steps 4 and 8, 4 test episodes in 2 waves of 2
    envs) with its step cost given, so that no cost is measured; its plan, results and root."""
    results, root = tmp_path / name / "results", tmp_path / name / "runs"
    results.mkdir(parents=True)
    (results / "step_costs.json").write_text(json.dumps({"reg": 0.05}))
    plan = {
        "name": "fault",
        "task": "pusht_keypoints",
        "dataset": str(dataset),
        "results": str(results),
        "common": list(TINY_CAMPAIGN),
        "marks_steps": [4, 8],
        "grain": 4,
        "episodes_per_seed": 4,
        "n_envs": 2,
        "runs": [{"name": "reg", "method": "regression", "seeds": [0]}],
    }
    path = tmp_path / name / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path, results, root


def start_campaign(plan: Path, root: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "cm_policy.cli", "campaign", str(plan), "--root", str(root)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CM_POLICY_DEBUG": "1"}
    with open(plan.with_suffix(".log"), "a") as out:
        # Its own process group: the pool's workers and their training runs die with it.
        return subprocess.Popen(
            [*command, "--jobs", "1"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def finish(proc: subprocess.Popen, plan: Path) -> None:
    proc.wait(timeout=600)
    assert proc.returncode == 0, plan.with_suffix(".log").read_text()[-3000:]


def without(record: dict, *keys: str) -> dict:
    return {k: v for k, v in record.items() if k not in keys}


def test_campaign_killed_while_evaluating_ends_with_the_cache_of_an_uninterrupted_one(
    planner_pusht: Path, tmp_path: Path
):
    started = time.monotonic()
    plan, results, root = campaign_plan(tmp_path, planner_pusht, "straight")
    finish(start_campaign(plan, root), plan)
    straight = json.loads((results / "cache" / "reg_s0.json").read_text())

    plan, results, root = campaign_plan(tmp_path, planner_pusht, "killed")
    cache = results / "cache" / "reg_s0.json"
    rng = random.Random(8)
    # Killed between the two waves of mark 4's evaluation, then at a random moment of mark 8's.
    for step, started_file in ((4, "episodes.partial.jsonl"), (8, "")):
        out = root / "reg_s0" / "eval" / f"step{step}_1"
        proc = start_campaign(plan, root)
        try:
            wait_for((out / started_file).exists, proc, f"mark {step}'s evaluation")
            time.sleep(rng.uniform(0.0, 0.1) if not started_file else 0.0)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        assert not (out / "metrics.json").exists(), "killed after the evaluation, not during it"
        # The cache holds the marks finished before the kill, whole; nothing half written.
        done = json.loads(cache.read_text())["marks"] if cache.exists() else {}
        assert sorted(done) == [str(s) for s in (4, 8) if s < step]
        assert [p.name for p in results.rglob("*") if ".tmp" in p.name] == []
        assert_checkpoints_intact(root / "reg_s0")
    finish(start_campaign(plan, root), plan)
    killed = json.loads(cache.read_text())

    # The same marks, evaluations, training statistics and last-mark diagnostics; what differs
    # is only time: wall clocks, latency and how many episodes a resumed evaluation found done.
    assert killed["marks"].keys() == straight["marks"].keys() == {"4", "8"}
    for mark, expected in straight["marks"].items():
        got = killed["marks"][mark]
        assert got["minutes"] == expected["minutes"]
        assert without(got["train"], "wall_s") == without(expected["train"], "wall_s")
        assert got["entries"].keys() == expected["entries"].keys() == {"1"}
        for label, entry in expected["entries"].items():
            clock = ("wall_s", "resumed_episodes")
            assert without(got["entries"][label], *clock) == without(entry, *clock)
    # Mark 4's evaluation went on from the wave finished before the kill.
    assert killed["marks"]["4"]["entries"]["1"]["resumed_episodes"] == 2
    final = [without(c["final"], "latency_ms", "train") for c in (killed, straight)]
    assert final[0] == final[1]
    assert without(killed["final"]["train"], "wall_s") == without(
        straight["final"]["train"], "wall_s"
    )
    for step in (4, 8):
        for name in STATE_FILES:
            file = Path("reg_s0", "checkpoints", f"step_{step:07d}", f"{name}.safetensors")
            a = load_file(tmp_path / "straight" / "runs" / file)
            b = load_file(root / file)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file
    leftovers = [
        p
        for p in [*results.rglob("*"), *root.rglob("*")]
        if ".tmp" in p.name or p.name == "episodes.partial.jsonl"
    ]
    assert leftovers == []
    print(f"wall time {time.monotonic() - started:.0f} s")
