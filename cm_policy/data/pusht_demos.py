"""Offline PushT demonstrations: run the planner and store its successful episodes.

The buffer has the schema of Diffusion Policy's PushT dataset (``state``, ``keypoint``, ``img``,
``action``, ``n_contacts``; ``img`` as uint8 instead of float32 0..255, 4x smaller) and is written
under a temporary name, then renamed, so an interrupted run leaves no half dataset behind.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from cm_policy.data.outputs import prepare_output
from cm_policy.data.replay_buffer import ReplayBuffer, atomic_directory
from cm_policy.envs.pusht_planner import generate

# Attempts are made in rounds until enough episodes succeeded; this bounds a run whose planner
# fails far more often than measured (eval/results/pusht_planner.md).
MAX_ATTEMPTS_PER_EPISODE = 3


def generate_pusht_dataset(
    out: str | Path,
    n_episodes: int = 100,
    seed: int = 0,
    workers: int = 2,
    images: bool = True,
    overwrite: bool = False,
    goals: tuple[tuple[float, float, float], ...] | None = None,
) -> dict:
    """Write ``n_episodes`` successful planned episodes to the zarr buffer ``out``.

    Episodes start from the reference initial states of seeds ``seed, seed + 1, ...`` (keep them
    far from the test seeds 100000..). Returns and stores (``<out>/generation.json``) the attempt
    statistics: success rate, episode lengths and episodes per minute. ``goals``: each attempt
    plans for one of these block poses, drawn per seed; the buffer then records it per step as
    ``goal`` (its index; not an observation), and the statistics count attempts and successes
    per goal. ``overwrite`` replaces only a buffer this package wrote
    (:func:`~cm_policy.data.outputs.prepare_output`).
    """
    out = Path(out)
    if n_episodes < 1:
        raise ValueError(f"n_episodes must be >= 1, got {n_episodes}")
    prepare_output(out, overwrite)
    with atomic_directory(out) as tmp:
        buffer = ReplayBuffer.create(tmp)
        started = time.perf_counter()
        attempts, lengths, next_seed = 0, [], seed
        per_goal = [[0, 0] for _ in goals or [None]]  # attempts, successes
        while len(lengths) < n_episodes:
            if attempts >= MAX_ATTEMPTS_PER_EPISODE * n_episodes:
                raise RuntimeError(
                    f"the planner reached success in only {len(lengths)} of {attempts} attempts "
                    f"(expected {n_episodes} successes within "
                    f"{MAX_ATTEMPTS_PER_EPISODE * n_episodes})"
                )
            batch = n_episodes - len(lengths)
            for episode in generate(
                batch, seed=next_seed, workers=workers, render=images, goals=goals
            ):
                attempts += 1
                per_goal[episode.goal][0] += 1
                per_goal[episode.goal][1] += episode.success
                if episode.success:
                    data = {
                        "state": episode.state,
                        "keypoint": episode.keypoint,
                        "action": episode.action,
                        "n_contacts": episode.n_contacts,
                    }
                    if images:
                        data["img"] = episode.img.round().clip(0, 255).astype("uint8")
                    if goals is not None:
                        data["goal"] = np.full((episode.n_steps, 1), episode.goal, np.int64)
                    buffer.add_episode(data)
                    lengths.append(episode.n_steps)
            next_seed += batch
        wall = time.perf_counter() - started
        stats = {
            "n_episodes": len(lengths),
            "attempts": attempts,
            "attempt_success_rate": len(lengths) / attempts,
            "seeds": [seed, next_seed - 1],
            "mean_length": sum(lengths) / len(lengths),
            "max_length": max(lengths),
            "wall_s": wall,
            "episodes_per_minute": len(lengths) / wall * 60,
            "workers": workers,
        }
        if goals is not None:
            stats["goals"] = [list(g) for g in goals]
            stats["attempts_per_goal"] = [a for a, _ in per_goal]
            stats["episodes_per_goal"] = [n for _, n in per_goal]
        (tmp / "generation.json").write_text(json.dumps(stats, indent=2))
        buffer.close()  # its manifest, before the folder is renamed into place
    print(
        f"wrote {len(lengths)} episodes ({sum(lengths)} steps) to {out}: "
        f"{stats['attempt_success_rate']:.0%} of {attempts} attempts succeeded, "
        f"{stats['episodes_per_minute']:.1f} episodes/min"
    )
    return stats
