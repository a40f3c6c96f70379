"""Robomimic demonstrations: play the scripted experts and store their successful episodes.

The robomimic counterpart of :mod:`cm_policy.data.pusht_demos`. The experts and the episodes
they play live with the simulator (:mod:`cm_policy.envs.robomimic_experts`); this module writes
the successful ones in robomimic's HDF5 layout
(:class:`~cm_policy.data.robomimic_hdf5.RobomimicWriter`), optionally converts them to a zarr
ReplayBuffer for training, and reports the attempt success rate. Writing datasets is the data
layer's work, which is why it is not beside the experts: envs import nothing of data.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from cm_policy.atomic import write_json_atomic
from cm_policy.data.outputs import MARKER_KEY, OutputError, marker, prepare_output
from cm_policy.data.robomimic_hdf5 import RobomimicWriter, convert_to_zarr
from cm_policy.envs.robomimic_experts import expert_episodes
from cm_policy.envs.robosuite_env import TASKS, default_env_meta

# Attempts are bounded so that a broken expert fails loudly instead of running forever.
MAX_ATTEMPTS_PER_EPISODE = 4


def generate_robomimic_dataset(
    task: str,
    out: str | Path,
    n_episodes: int = 200,
    seed: int = 0,
    images: bool = False,
    overwrite: bool = False,
    convert: bool = True,
    progress: bool = True,
    recovery: float = 0.0,
    recovery_kind: str = "push",
) -> dict[str, Any]:
    """Write ``n_episodes`` successful expert demos to the robomimic HDF5 file ``out``.

    Attempts start from initial states ``seed, seed + 1, ...`` (keep them far from the test
    seeds 100000..). A fraction ``recovery`` of the attempts are recovery demonstrations of
    ``recovery_kind`` (``push`` or ``regrasp``, see :mod:`cm_policy.envs.robomimic_experts`);
    they are listed in the filter key ``mask/recovery`` (the others in ``mask/full``) and carry
    the attributes ``recovery_kind`` and ``recorded_from`` (unrecorded steps before their first
    state); every demo records its initial state's ``seed``. With ``convert`` the demos are also
    written as a zarr ReplayBuffer beside it (``out`` with the suffix ``.zarr``) for training.
    Returns the attempt statistics, also stored in ``<out>.json``. ``overwrite`` replaces only
    outputs this package wrote (:func:`~cm_policy.data.outputs.prepare_output`).
    """
    if task not in TASKS:
        raise ValueError(f"unknown robomimic task {task!r}; expected one of {sorted(TASKS)}")
    if n_episodes < 1:
        raise ValueError(f"n_episodes must be >= 1, got {n_episodes}")
    out = Path(out)
    zarr_out = out.with_suffix(".zarr")
    stats_out = out.with_suffix(".json")
    if out.suffix in (".zarr", ".json"):
        raise OutputError(
            f"out={out} ends in {out.suffix}, like the outputs written beside it "
            f"({zarr_out.name}, {stats_out.name}): name the HDF5 file out=...hdf5"
        )
    # Every output is checked before the first attempt, not after an hour of demos.
    prepare_output(out, overwrite, kind="hdf5")
    if convert:
        prepare_output(zarr_out, overwrite, sources=[out])
    prepare_output(stats_out, overwrite, kind="json")
    started = time.perf_counter()
    limit = MAX_ATTEMPTS_PER_EPISODE * n_episodes
    attempts, lengths = 0, []
    kinds: dict[str, list[str]] = {"full": [], "recovery": []}
    recovery_attempts = 0
    writer = RobomimicWriter(out, default_env_meta(task), overwrite=overwrite)
    bar = tqdm(total=n_episodes, desc=f"{task} demos", unit="demo", disable=not progress)
    episodes = expert_episodes(task, range(seed, seed + limit), images, recovery, recovery_kind)
    try:
        for episode in episodes:
            kind = "recovery" if episode.recovery else "full"
            recovery_attempts += episode.recovery
            attempts += 1
            if episode.success:
                name = writer.add_demo(
                    episode.states,
                    episode.actions,
                    episode.obs,
                    episode.next_obs,
                    episode.rewards,
                    episode.dones,
                    episode.model_xml,
                    attrs=episode.attrs(),
                )
                kinds[kind].append(name)
                lengths.append(episode.n_steps)
                bar.update(1)
            bar.set_postfix(success=f"{len(lengths)}/{attempts}")
            if len(lengths) == n_episodes:
                break
        if len(lengths) < n_episodes:
            raise RuntimeError(
                f"the {task} expert succeeded in only {len(lengths)} of {attempts} attempts "
                f"(expected {n_episodes} successes within {limit})"
            )
        if recovery:
            for kind, names in kinds.items():
                writer.add_mask(kind, names)
    except BaseException:
        writer.abort()
        raise
    finally:
        episodes.close()
        bar.close()
    writer.close()
    wall = time.perf_counter() - started
    stats = {
        "task": task,
        "n_episodes": len(lengths),
        "attempts": attempts,
        "attempt_success_rate": len(lengths) / attempts,
        "seeds": [seed, seed + attempts - 1],
        "mean_length": float(np.mean(lengths)),
        "max_length": int(max(lengths)),
        "images": images,
        "recovery": recovery,
        "recovery_kind": recovery_kind,
        "recovery_demos": len(kinds["recovery"]),
        "recovery_attempts": recovery_attempts,
        "wall_s": wall,
        "episodes_per_minute": len(lengths) / wall * 60,
        "hdf5": str(out),
    }
    if convert:
        convert_to_zarr(out, zarr_out, image=images, overwrite=overwrite, progress=progress)
        stats["zarr"] = str(zarr_out)
    write_json_atomic(stats_out, {**stats, MARKER_KEY: marker()}, indent=2)
    print(
        f"wrote {len(lengths)} {task} demos ({sum(lengths)} steps) to {out}"
        + (f" and {zarr_out}" if convert else "")
        + f": {stats['attempt_success_rate']:.0%} of {attempts} attempts succeeded, "
        f"{stats['episodes_per_minute']:.1f} demos/min"
    )
    return stats
