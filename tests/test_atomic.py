"""The package's one atomic-write path (cm_policy.atomic): a file is replaced whole or not at all,
a failed write leaves neither half a file nor its temporary, and what a killed writer left is
removed by the next write of the same name."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import matplotlib
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from cm_policy import atomic
from cm_policy.atomic import (
    temporary_name,
    write_figure_atomic,
    write_json_atomic,
    write_text_atomic,
)


def dead_pid() -> int:
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    return int(gone.stdout)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "metrics.json"
    write_json_atomic(path, {"mean_score": 0.9})
    assert json.loads(path.read_text()) == {"mean_score": 0.9}
    # A value JSON cannot hold: refused before anything is written.
    with pytest.raises(TypeError):
        write_json_atomic(path, {"mean_score": object()})
    # A stop at the rename (the disk full, a signal): the temporary goes, the old file stays.
    real_replace = os.replace

    def failing_replace(src, dst):
        assert os.path.exists(src) and open(src).read() == "half"
        raise OSError("no space left on device")

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(OSError, match="no space"):
        write_text_atomic(path, "half")
    monkeypatch.setattr(atomic.os, "replace", real_replace)
    assert json.loads(path.read_text()) == {"mean_score": 0.9}
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.json"]


def test_a_figure_is_written_whole_or_not_at_all(tmp_path):
    path = tmp_path / "summary.png"
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    write_figure_atomic(path, fig, dpi=50)
    first = path.read_bytes()
    assert first.startswith(b"\x89PNG")

    class Broken:
        def savefig(self, out, **kwargs):
            out.write(b"\x89PNG half")
            raise RuntimeError("renderer failed")

    with pytest.raises(RuntimeError):
        write_figure_atomic(path, Broken())
    assert path.read_bytes() == first
    write_figure_atomic(tmp_path / "curves.svg", fig)
    assert b"<svg" in (tmp_path / "curves.svg").read_bytes()
    plt.close(fig)


def test_the_next_write_removes_what_a_killed_writer_left(tmp_path):
    path = tmp_path / "config.yaml"
    dead = dead_pid()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        left = tmp_path / f".config.yaml.tmp-{dead}"
        running = tmp_path / f".config.yaml.tmp-{alive.pid}"
        other = tmp_path / f".latest.tmp-{dead}"  # another file's: not this write's to remove
        for p in (left, running, other):
            p.write_text("partial")
        write_text_atomic(path, "a: 1\n")
        names = sorted(p.name for p in tmp_path.iterdir())
        assert names == sorted([running.name, other.name, "config.yaml"])
        assert path.read_text() == "a: 1\n"
        assert temporary_name(path).name == f".config.yaml.tmp-{os.getpid()}"
    finally:
        alive.kill()
        alive.wait()
