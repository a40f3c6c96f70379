"""The method tests must stay able to fail: every deliberate mistake of tests/mutations.py
turns at least one of them red (each mistake in a copy of the package, never in the checkout)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_every_deliberate_mistake_in_a_method_is_caught():
    out = subprocess.run(
        [sys.executable, str(REPO / "tests" / "mutations.py")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    lines = [x for x in out.stdout.splitlines() if not x.startswith(" ")]
    assert out.returncode == 0, out.stdout + out.stderr
    assert len(lines) >= 10 and all(x.startswith("caught") for x in lines), out.stdout
