"""Shared fixtures: a small PushT replay buffer cut from the real dataset."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")

REAL_PUSHT = (
    Path(__file__).resolve().parents[1].parent / "shared/data/pusht/pusht_cchi_v7_replay.zarr"
)


@pytest.fixture(scope="session")
def real_pusht() -> Path:
    if not REAL_PUSHT.exists():
        pytest.skip(f"the real PushT dataset is not at {REAL_PUSHT}")
    return REAL_PUSHT


@pytest.fixture(scope="session")
def tiny_pusht(tmp_path_factory: pytest.TempPathFactory, real_pusht: Path) -> Path:
    """The first 6 episodes of the real dataset (with images) as a new zarr 3 buffer."""
    from cm_policy.data import ReplayBuffer

    source = ReplayBuffer.open(real_pusht)
    out = tmp_path_factory.mktemp("data") / "tiny_pusht.zarr"
    buffer = ReplayBuffer.create(out)
    for i in range(6):
        episode = source.get_episode(i)
        episode["img"] = np.rint(episode["img"]).astype(np.uint8)
        buffer.add_episode(episode)
    return out
