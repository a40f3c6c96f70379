"""Atomic file writes: the one way the package replaces a file that something reads later.

A file is written beside its destination under a hidden temporary name (``.NAME.tmp-PID``) and
renamed over it, so a stop mid-write leaves the old file (or none), never half of the new one. A
write that fails removes its temporary file; a process killed outright (``kill -9``) cannot, so
each write first removes the temporary files that earlier writers of the same name left, when
those writers are no longer running.

>>> write_json_atomic(run / "metrics.json", {"mean_score": 0.95})
>>> write_figure_atomic(run / "summary.png", fig, dpi=110)

Only the standard library is imported here (matplotlib is used through the figure it is given),
so the checkpoint code, the data writers and the serving side can all rely on it.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
from pathlib import Path
from typing import Any

_TEMPORARY = re.compile(r"\.tmp-(\d+)$")


def temporary_name(path: Path) -> Path:
    """Where a write to ``path`` by this process goes before its rename: ``.NAME.tmp-PID``."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def stale_temporaries(path: Path) -> list[Path]:
    """The temporary files of ``path`` that writers no longer running left behind."""
    prefix = f".{path.name}.tmp-"
    found = []
    for other in sorted(path.parent.glob(glob.escape(prefix) + "*")):
        match = _TEMPORARY.search(other.name)
        if match and other.is_file():
            pid = int(match[1])
            if pid != os.getpid() and not process_alive(pid):
                found.append(other)
    return found


def write_bytes_atomic(path: str | Path, data: bytes, *, sync: bool = False) -> None:
    """Replace ``path`` with ``data`` in one rename. ``sync`` flushes the data to disk before
    the rename (for files whose loss on a power cut matters, such as a manifest)."""
    path = Path(path)
    for stale in stale_temporaries(path):
        stale.unlink(missing_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            if sync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str, *, sync: bool = False) -> None:
    """Replace ``path`` with ``text`` (UTF-8) in one rename."""
    write_bytes_atomic(path, text.encode("utf-8"), sync=sync)


def write_json_atomic(path: str | Path, value: Any, *, indent: int = 1, sync: bool = False) -> None:
    """Replace ``path`` with ``value`` as JSON in one rename; the folder is made if missing.
    The value is serialised before anything is written, so a value JSON cannot hold leaves the
    old file untouched."""
    text = json.dumps(value, indent=indent)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text, sync=sync)


def write_figure_atomic(path: str | Path, figure: Any, **savefig: Any) -> None:
    """Replace ``path`` with a matplotlib ``figure`` (its format from the suffix) in one rename."""
    path = Path(path)
    buffer = io.BytesIO()
    figure.savefig(buffer, format=path.suffix.lstrip(".") or "png", **savefig)
    write_bytes_atomic(path, buffer.getvalue())
