"""Shared fixtures: the real PushT dataset (where human data matters) and a small planner-made
PushT buffer (for everything that just needs some PushT demonstrations)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")

# The folder beside the repository that holds the shared datasets; CM_POLICY_SHARED overrides it.
SHARED = Path(
    os.environ.get("CM_POLICY_SHARED") or Path(__file__).resolve().parents[1].parent / "shared"
)
REAL_PUSHT = SHARED / "data/pusht/pusht_cchi_v7_replay.zarr"
REAL_PUSHT_ZIP = "https://diffusion-policy.cs.columbia.edu/data/training/pusht.zip"
# The planner-made buffer: 2 successful episodes (~110 steps each) with 96x96 images, about 5 s.
PLANNER_EPISODES = 2


def in_ci() -> bool:
    """Whether the tests run in CI (CI=true, as CI services set it)."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes", "on"}


@pytest.fixture(scope="session")
def real_pusht() -> Path:
    """Diffusion Policy's human PushT dataset: a failure in CI when it is missing (tests that
    need it would otherwise pass vacuously there), a visible skip elsewhere."""
    if not (REAL_PUSHT / "meta" / "episode_ends").exists():
        message = (
            f"the real PushT dataset is not at {REAL_PUSHT}: unzip Diffusion Policy's "
            f"{REAL_PUSHT_ZIP} into {SHARED / 'data'}, or set CM_POLICY_SHARED to the folder "
            "that holds data/pusht/"
        )
        if in_ci():
            pytest.fail(f"CI=true and {message}", pytrace=False)
        pytest.skip(message)
    return REAL_PUSHT


@pytest.fixture(scope="session")
def planner_pusht(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PushT buffer of the package's own planned demonstrations (with images): the schema of
    the real dataset, for tests where human data is not essential (training, resume, eval)."""
    from cm_policy.data.pusht_demos import generate_pusht_dataset

    out = tmp_path_factory.mktemp("data") / "planner_pusht.zarr"
    started = time.perf_counter()
    stats = generate_pusht_dataset(out, n_episodes=PLANNER_EPISODES, seed=0, workers=1)
    print(f"planner_pusht: {stats['n_episodes']} episodes in {time.perf_counter() - started:.1f} s")
    return out
