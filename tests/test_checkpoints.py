"""Verified checkpoints: every file's SHA-256 in a manifest written last, checked by whatever
loads a checkpoint; a damaged one is refused with the file, what was expected and what was found,
and the run's checkpoints that verify; ``cm-policy checkpoints RUN`` lists them all."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_config import TINY

from cm_policy.checkpoint import (
    MANIFEST,
    DamagedCheckpointError,
    list_checkpoints,
    load_policy,
    load_training_state,
    resolve_checkpoint,
    save_checkpoint,
    save_policy,
)
from cm_policy.cli import UsageError, check_command, compose
from cm_policy.cli import main as cli_main
from cm_policy.cli import run_command as main
from cm_policy.data import LinearNormalizer
from cm_policy.policy import Policy
from cm_policy.training.trainer import policy_spec, train

WEIGHTS = ("model.safetensors", "ema.safetensors", "optimizer.safetensors", "rng.safetensors")
STATE = ("policy.json", "config.yaml", "trainer_state.json", *WEIGHTS)


def tiny_policy() -> Policy:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    norm = LinearNormalizer()
    norm.fit(
        {
            "action": rng.normal(size=(64, 2)).astype(np.float32),
            "keypoints": rng.normal(size=(64, 20)).astype(np.float32),
        }
    )
    return Policy(policy_spec(compose("config", TINY)), norm).eval()


def save_steps(run: Path, steps: list[int]) -> list[Path]:
    """Checkpoints of a tiny policy at ``steps`` (all kept), each with optimiser moments."""
    policy = tiny_policy()
    optimizer = torch.optim.AdamW(policy.parameters())
    folders = []
    for step in steps:
        for p in policy.parameters():
            p.grad = torch.full_like(p, 1e-3 * step)
        optimizer.step()
        folders.append(
            save_checkpoint(
                run,
                step,
                config_yaml="seed: 0\n",
                policy=policy,
                ema_policy=copy.deepcopy(policy),
                optimizer=optimizer,
                trainer_state={"history": []},
                keep_last=0,
            )
        )
    return folders


def flip_a_byte(path: Path, offset: int = -100) -> None:
    """Damage a file without changing its size (what a bad disk or a bad copy does)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_manifest_records_every_file_with_its_sha256_size_step_and_time(tmp_path: Path):
    before = datetime.now(UTC).replace(microsecond=0)
    (folder,) = save_steps(tmp_path / "run", [5])
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["version"] == 1 and manifest["step"] == 5
    written = datetime.strptime(manifest["written"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert before <= written <= datetime.now(UTC) + timedelta(seconds=1)
    # Every file of the folder but the manifest itself, each with its real hash and size.
    assert set(manifest["files"]) == set(STATE)
    assert {p.name for p in folder.iterdir()} == {*STATE, MANIFEST}
    for name, record in manifest["files"].items():
        assert record == {"sha256": sha256(folder / name), "bytes": (folder / name).stat().st_size}
    # Nothing else is left in the checkpoints folder: no temporary folder or file.
    assert sorted(p.name for p in folder.parent.iterdir()) == ["latest", "step_0000005"]
    # save_policy (a policy saved outside training) writes one too.
    other = save_policy(tiny_policy(), tmp_path / "other", step=3)
    assert json.loads((other / MANIFEST).read_text())["step"] == 3
    assert [e.status for e in list_checkpoints(tmp_path / "other")] == ["ok"]


def test_damaged_weights_are_refused_naming_the_file_and_the_checkpoints_that_verify(
    tmp_path: Path,
):
    run = tmp_path / "run"
    first, second, last = save_steps(run, [5, 10, 15])
    assert load_policy(run).spec == tiny_policy().spec  # intact: loads
    recorded = json.loads((last / MANIFEST).read_text())["files"]["ema.safetensors"]
    flip_a_byte(last / "ema.safetensors")
    found = sha256(last / "ema.safetensors")
    with pytest.raises(DamagedCheckpointError) as info:
        load_policy(run)
    message = str(info.value)
    assert message.startswith(f"{last / 'ema.safetensors'} is damaged: its SHA-256 is {found}")
    assert f"the manifest records {recorded['sha256']} (both {recorded['bytes']} bytes)" in message
    assert "other checkpoints of the run that verify: step_0000005, step_0000010" in message
    assert f"cm-policy checkpoints {run} lists them" in message
    # The raw weights of the same checkpoint were not damaged: they load.
    assert load_policy(run, weights="model").spec == tiny_policy().spec
    # Resuming reads every weights file: it refuses too.
    with pytest.raises(DamagedCheckpointError, match=r"ema\.safetensors is damaged"):
        load_training_state(last)
    # The other checkpoints are untouched: they load.
    assert load_training_state(second)["trainer_state"]["step"] == 10

    # A truncated file: refused when the folder is resolved, by its size, before any reading.
    weights = second / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[:-7])
    with pytest.raises(DamagedCheckpointError) as info:
        resolve_checkpoint(second)
    assert str(info.value).startswith(
        f"{weights} is damaged: it has {size - 7} bytes, the manifest records {size}"
    )
    # Only the first checkpoint verifies now.
    assert "other checkpoints of the run that verify: step_0000005 (" in str(info.value)
    # A file the manifest records that is gone.
    (first / "rng.safetensors").unlink()
    with pytest.raises(DamagedCheckpointError) as info:
        load_training_state(first)
    assert str(info.value).startswith(f"{first / 'rng.safetensors'} is missing: the manifest")
    assert "the run has no other checkpoint that verifies" in str(info.value)
    # A manifest that is not one.
    (first / MANIFEST).write_text('{"files": ')
    with pytest.raises(DamagedCheckpointError, match=r"manifest\.json is damaged: expected JSON"):
        load_policy(first)


def test_a_checkpoint_without_manifest_still_loads_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    (folder,) = save_steps(tmp_path / "run", [5])
    (folder / MANIFEST).unlink()  # as written before checkpoints had manifests
    with caplog.at_level(logging.WARNING, logger="cm_policy.checkpoint"):
        load_policy(folder)
        load_training_state(resolve_checkpoint(folder))
    warnings = [r.getMessage() for r in caplog.records if r.name == "cm_policy.checkpoint"]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert f"{folder} has no manifest.json" in warnings[0] and "without verification" in warnings[0]
    assert [e.status for e in list_checkpoints(tmp_path / "run")] == ["no manifest (older)"]


def test_a_step_written_again_and_a_stopped_save_leave_no_partial_files(tmp_path: Path):
    run = tmp_path / "run"
    root = run / "checkpoints"
    save_steps(run, [5, 10])
    # What a killed save leaves: a temporary checkpoint, one set aside for removal, a latest
    # being replaced; all of processes that are gone. One of a running process stays.
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    dead = int(gone.stdout)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [f".step_0000015.tmp-{dead}", f".step_0000005.old-{dead}"]
        for name in stale:
            (root / name).mkdir()
            (root / name / "ema.safetensors").write_bytes(b"partial")
        (root / f".latest.tmp-{dead}").write_text("step_00")
        (root / f".step_0000020.tmp-{alive.pid}").mkdir()
        listing = main(["checkpoints", str(run)])
        assert "left by a stopped save (the next save removes them): " in listing
        assert f".latest.tmp-{dead}" in listing and f".step_0000020.tmp-{alive.pid}" not in listing
        # Step 10 written again (a run restarted in its own folder): replaced whole.
        save_steps(run, [10])
        names = sorted(p.name for p in root.iterdir())
        assert names == [f".step_0000020.tmp-{alive.pid}", "latest", "step_0000005", "step_0000010"]
    finally:
        alive.kill()
        alive.wait()
    assert [e.status for e in list_checkpoints(run)] == ["ok", "ok"]
    assert (root / "latest").read_text() == "step_0000010\n"


def test_checkpoints_command_lists_step_time_size_status_and_latest(
    tmp_path: Path, capsys: pytest.CaptureFixture
):
    run = tmp_path / "run"
    older, damaged, latest = save_steps(run, [5, 10, 15])
    (older / MANIFEST).unlink()
    flip_a_byte(damaged / "model.safetensors")
    text = main(["checkpoints", str(run)])
    assert capsys.readouterr().out.strip() == text.strip()
    lines = text.splitlines()
    assert lines[0] == f"checkpoints of {run} ({run / 'checkpoints'}):"
    assert re.fullmatch(r"\s+step\s+written \(UTC\)\s+size\s+status", lines[1])
    time = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"
    size = r"\d+\.\d MB"
    assert re.fullmatch(rf"\s+5\s+{time}\s+{size}\s+no manifest \(older\)", lines[2]), lines[2]
    assert re.fullmatch(
        rf"\s+10\s+{time}\s+{size}\s+damaged: model\.safetensors \(its SHA-256 differs from the "
        r"manifest's\)",
        lines[3],
    ), lines[3]
    assert re.fullmatch(rf"\s+15\s+{time}\s+{size}\s+ok  <- latest", lines[4]), lines[4]
    assert lines[5:] == ["latest: step_0000015"]
    total = sum(f.stat().st_size for f in latest.iterdir())
    assert f"{total / 1e6:.1f} MB" in lines[4]
    written = json.loads((latest / MANIFEST).read_text())["written"]
    assert written in lines[4]
    # The checkpoints folder itself is accepted too.
    assert main(["checkpoints", str(run / "checkpoints")]) == text
    # latest naming a checkpoint that is damaged is shown as such.
    (latest / "policy.json").unlink()
    entries = list_checkpoints(run)
    assert [(e.step, e.status, e.latest) for e in entries][2] == (
        15,
        "damaged: policy.json (missing)",
        True,
    )


def test_checkpoints_command_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delenv("CM_POLICY_DEBUG", raising=False)
    for args, part in (
        ([str(tmp_path / "nosuch")], f"no run folder at {tmp_path / 'nosuch'}"),
        ([str(tmp_path)], f"{tmp_path} holds no checkpoints"),
        ([], "usage: cm-policy checkpoints RUN"),
    ):
        with pytest.raises(SystemExit) as info:
            cli_main(["checkpoints", *args])
        stderr = capsys.readouterr().err
        assert info.value.code == 2 and "Traceback" not in stderr, stderr
        assert stderr.startswith("error: ") and part in stderr.splitlines()[0]
    with pytest.raises(UsageError, match="usage: cm-policy checkpoints RUN"):
        check_command(["checkpoints", "a", "b"])
    check_command(["checkpoints", "RUN"])


def test_resume_from_a_damaged_latest_is_refused_naming_the_file_and_the_others(
    planner_pusht: Path, tmp_path: Path
):
    def cfg(*extra: str):
        return compose(
            "config",
            [
                *TINY,
                f"task.dataset_path={planner_pusht}",
                f"output_dir={tmp_path / 'run'}",
                "training.steps=6",
                "training.checkpoint_every=2",
                "training.keep_checkpoints=3",
                *extra,
            ],
        )

    run = train(cfg())
    straight = load_training_state(run / "checkpoints" / "step_0000006")
    flip_a_byte(run / "checkpoints" / "step_0000004" / "model.safetensors")
    (run / "checkpoints" / "latest").write_text("step_0000004\n")  # as if stopped after step 4
    with pytest.raises(DamagedCheckpointError) as info:
        train(cfg(f"resume={run}"))
    message = str(info.value)
    assert message.startswith(f"resume={run}: not resuming from damaged weights: ")
    assert f"{run / 'checkpoints' / 'step_0000004' / 'model.safetensors'} is damaged" in message
    assert "checkpoints of the run that verify: step_0000002, step_0000006" in message
    # Resuming from a checkpoint that verifies (the one the message names) reproduces the run.
    train(cfg(f"resume={run / 'checkpoints' / 'step_0000002'}"))
    again = load_training_state(run / "checkpoints" / "step_0000006")
    for key in ("model", "ema"):
        for name, tensor in straight[key].items():
            assert torch.equal(tensor, again[key][name]), f"{key}:{name}"
    assert [e.status for e in list_checkpoints(run)] == ["ok", "ok", "ok"]


def test_a_log_line_cut_short_is_left_out_on_resume(tmp_path: Path):
    """A machine that stops while a log line is appended leaves it cut short: resume reads the
    entries before it; a damaged line before the last is an error naming file and line."""
    from cm_policy.training.trainer import read_log

    log = tmp_path / "train_log.jsonl"
    log.write_text('{"step": 1, "wall_s": 0.5}\n{"step": 2, "wall_s": 1.0}\n{"step": 3, "wa')
    assert read_log(log) == [{"step": 1, "wall_s": 0.5}, {"step": 2, "wall_s": 1.0}]
    log.write_text('{"step": 1}\n{"ste\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"train_log.jsonl, line 2: not a JSON log entry"):
        read_log(log)
