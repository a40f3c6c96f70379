"""The command line: errors a user makes get a short message and exit status 2, not a
traceback; --debug (or CM_POLICY_DEBUG=1) shows the traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "cm_policy.cli"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "CM_POLICY_DEBUG": "0", **(env or {})},
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["data", "info", "/nonexistent/missing.zarr"], "no dataset at /nonexistent/missing.zarr"),
        (["eval", "checkpoint=/nonexistent/run"], "checkpoint folder /nonexistent/run does not"),
        (["train", "task=nosuch"], "Could not find 'task/nosuch'"),
        (["eval", "checkpoint=/tmp", "nosuchkey=1"], "Could not override 'eval.nosuchkey'"),
        (["data", "generate", "nosuch"], "unknown task env 'nosuch'"),
    ],
)
def test_user_errors_are_one_message_not_a_traceback(args: list[str], message: str):
    done = run(*args)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.startswith("error: ")
    assert message in done.stderr
    assert len(done.stderr.splitlines()) <= 20  # Hydra's unknown choice lists the available ones


def test_unknown_choice_lists_the_available_ones():
    stderr = run("train", "task=nosuch").stderr
    assert "Available options in 'task'" in stderr and "pusht_keypoints" in stderr


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(how: str, tmp_path: Path):
    missing = str(tmp_path / "missing.zarr")
    if how == "flag":
        done = run("--debug", "data", "info", missing)
    else:
        done = run("data", "info", missing, env={"CM_POLICY_DEBUG": "1"})
    assert done.returncode == 1 and "Traceback" in done.stderr and missing in done.stderr
