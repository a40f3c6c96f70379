"""How faithfully ``cm_policy.envs.pusht`` reproduces the real PushT demonstrations.

Measures, on the recorded states and actions of ``pusht_cchi_v7_replay.zarr``:
(a) the coverage / reward our env computes for the recorded states, (b) one-step teleport errors
(set a recorded state, apply its action, compare with the next recorded state) and the agreement of
the contact flag, (c) open-loop replay of every episode, (d) the rendered image against the
dataset's image. Writes ``pusht_fidelity.md`` and ``pusht_fidelity.png`` to ``--out``.

    python eval/pusht_fidelity.py --dataset ../shared/data/pusht/pusht_cchi_v7_replay.zarr \
        --out eval/results

``--pymunk6-path DIR`` (a ``pip install --target DIR pymunk==6.11.1``) also runs (b) and (c) under
pymunk 6, the physics the dataset was recorded with, in a subprocess, and adds a comparison table.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import zarr
from tqdm import tqdm

from cm_policy.evaluation.machine import describe_machine

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATASET = REPO_ROOT.parent / "shared/data/pusht/pusht_cchi_v7_replay.zarr"
N_IMAGE_SAMPLES = 1000
IMAGE_SAMPLE_SEED = 0
N_WORST = 5
# Numbers measured with the reference gym-pusht on pymunk 6 (../shared/docs/PUSHT_FACTS.md).
FACTS = {
    "highest_recorded_coverage": 0.901,
    "median_episode_max_coverage": 0.851,
    "final_coverage_p5_p50_p95": (0.80, 0.85, 0.88),
    "episodes_over_threshold": 7,
    "teacher_mean_score": "0.90-0.94",
    "replay_final_error_mean_px": 0.011,
    "replay_final_angle_error_mean_rad": 1.4e-4,
    "replay_worst_block_error_px": 1.04,
    "replay_agent_error_max_px": 2e-5,
    "teleport_agent_px": {"p50": 2.2, "p90": 5.2, "max": 19.6},
    "teleport_block_px": {"p50": 0.00, "p90": 1.85, "max": 6.3},
    "teleport_angle_p90_rad": 0.019,
    "teleport_true_velocity_block_p90_px": 0.27,
    "contact_agreement": 0.964,
}


def load_env_module(pymunk6_path: str | None) -> ModuleType:
    """Import ``cm_policy.envs.pusht``, under pymunk 6 from ``pymunk6_path`` if given.

    pymunk 6 lacks ``Space.on_collision``; the shim maps it onto ``add_collision_handler``, the
    only pymunk 7 API the env uses that pymunk 6 spells differently.
    """
    if pymunk6_path is not None:
        sys.path.insert(0, str(Path(pymunk6_path).resolve()))
        import pymunk

        if not pymunk.version.startswith("6."):
            raise RuntimeError(f"{pymunk6_path} holds pymunk {pymunk.version}, expected 6.x")

        def on_collision(space, collision_type_a, collision_type_b, post_solve=None):
            space.add_collision_handler(collision_type_a, collision_type_b).post_solve = post_solve

        pymunk.Space.on_collision = on_collision
    return importlib.import_module("cm_policy.envs.pusht")


def load_dataset(path: Path) -> dict[str, np.ndarray]:
    if not (path / "data" / "state").exists():
        raise FileNotFoundError(f"expected a PushT replay zarr with data/state at {path}")
    root = zarr.open_group(str(path), mode="r")
    ends = root["meta/episode_ends"][:].astype(np.int64)
    return {
        "state": root["data/state"][:].astype(np.float64),
        "action": root["data/action"][:].astype(np.float64),
        "n_contacts": root["data/n_contacts"][:, 0].astype(np.float64),
        "starts": np.concatenate([[0], ends[:-1]]),
        "ends": ends,
    }


def wrap_angle(a: np.ndarray) -> np.ndarray:
    return (a + np.pi) % (2 * np.pi) - np.pi


def pose_errors(pred: np.ndarray, true: np.ndarray) -> dict[str, np.ndarray]:
    """Agent and block position errors (px) and block angle error (rad) of (N, 5) states."""
    return {
        "agent_px": np.linalg.norm(pred[:, :2] - true[:, :2], axis=1),
        "block_px": np.linalg.norm(pred[:, 2:4] - true[:, 2:4], axis=1),
        "angle_rad": np.abs(wrap_angle(pred[:, 4] - true[:, 4])),
    }


def percentiles(x: np.ndarray) -> dict[str, float]:
    p50, p90, p99 = np.percentile(x, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "max": float(np.max(x))}


def score_of(coverage: np.ndarray, threshold: float) -> np.ndarray:
    return np.clip(coverage / threshold, 0.0, 1.0)


def env_setter(env, state: np.ndarray, velocities: np.ndarray | None = None) -> None:
    env.set_state(state, velocities)


def reindexing_setter(env, state: np.ndarray, velocities: np.ndarray | None = None) -> None:
    """The env's ``set_state`` (gym-pusht's setter) followed by reindexing the moved shapes.

    This is what ``set_state`` used to do. Reindexing changes the order in which Chipmunk solves
    simultaneous contacts; the env does not do it, as the reference does not.
    """
    env.set_state(state, velocities)
    env.space.reindex_shapes_for_body(env.block)
    env.space.reindex_shapes_for_body(env.agent)


def replay(
    pusht: ModuleType, data: dict, from_seed: bool, setter: Callable = env_setter
) -> dict[str, np.ndarray]:
    """Open-loop replay of every episode; returns per-action arrays aligned with the dataset.

    ``from_seed=False`` starts from the recorded first state (``setter``, zero velocities);
    ``from_seed=True`` from ``reset(seed=episode index)``, the recording's own reset (the demos
    were recorded with seed = episode index), which also recreates the physics step of that reset.
    ``state[t]`` is the state after ``action[t]``; ``velocity[t]`` the velocities before it.
    """
    env = pusht.PushTEnv("state")
    n = len(data["action"])
    out = {
        "state": np.zeros((n, 5)),
        "velocity": np.zeros((n, 5)),
        "coverage": np.zeros(n),
        "n_contacts": np.zeros(n),
    }
    desc = "replay from seeded reset" if from_seed else "replay from recorded first state"
    for ep, (s, e) in enumerate(tqdm(spans(data), desc=desc)):
        if from_seed:
            env.reset(seed=ep)
        else:
            setter(env, data["state"][s])
        for t in range(s, e):
            out["velocity"][t] = env.get_velocities()
            _, _, _, _, info = env.step(data["action"][t])
            out["state"][t] = info["state"]
            out["coverage"][t] = info["coverage"]
            out["n_contacts"][t] = info["n_contacts"]
    return out


def teleport(
    pusht: ModuleType,
    data: dict,
    velocities: np.ndarray | None,
    desc: str,
    setter: Callable = env_setter,
) -> dict:
    """One step from each recorded state (with ``velocities[t]`` or zero) for all transitions."""
    env = pusht.PushTEnv("state")
    idx = transition_indices(data)
    pred = np.zeros((len(idx), 5))
    contacts = np.zeros(len(idx))
    for i, t in enumerate(tqdm(idx, desc=f"teleport, {desc}")):
        setter(env, data["state"][t], None if velocities is None else velocities[t])
        _, _, _, _, info = env.step(data["action"][t])
        pred[i], contacts[i] = info["state"], info["n_contacts"]
    errors = pose_errors(pred, data["state"][idx + 1])
    return {"errors": errors, "n_contacts": contacts}


def spans(data: dict) -> list[tuple[int, int]]:
    """(start, end) step indices of every episode."""
    return list(zip(data["starts"], data["ends"], strict=True))


def transition_indices(data: dict) -> np.ndarray:
    """Indices t whose successor t + 1 is in the same episode."""
    return np.concatenate([np.arange(s, e - 1) for s, e in spans(data)])


def contact_agreement(ours: np.ndarray, data: dict) -> dict[str, float]:
    """Agreement of (ours > 0) for the step from t with the dataset's flag at t + 1 and at t."""
    idx = transition_indices(data)
    flag = ours > 0
    rec = data["n_contacts"]
    return {
        "next": float(np.mean(flag == (rec[idx + 1] > 0))),
        "same": float(np.mean(flag == (rec[idx] > 0))),
        "count_next": float(np.mean(ours == rec[idx + 1])),
        "contact_rate": float(np.mean(rec[idx + 1] > 0)),
    }


def contact_mismatch_kinds(replay_contacts: np.ndarray, data: dict) -> tuple[int, int, int]:
    """Steps where the replay's flag and the dataset's (t+1 alignment) disagree, classified.

    Returns how many times the dataset's flag equals the replay's one step later (the dataset
    is ahead), one step earlier (behind), or neither.
    """
    ahead = behind = other = 0
    for s, e in spans(data):
        ours = replay_contacts[s : e - 1] > 0  # flag of the step producing state[k], k = 1..
        rec = data["n_contacts"][s + 1 : e] > 0
        for k in np.flatnonzero(ours != rec):
            if k + 1 < len(ours) and ours[k + 1] == rec[k]:
                ahead += 1
            elif k > 0 and ours[k - 1] == rec[k]:
                behind += 1
            else:
                other += 1
    return ahead, behind, other


def finite_difference_velocity(data: dict, dt: float) -> np.ndarray:
    """Agent velocity at t estimated as (p[t] - p[t-1]) / dt (zero at an episode's start)."""
    v = np.zeros((len(data["state"]), 5))
    for s, e in spans(data):
        v[s + 1 : e, :2] = np.diff(data["state"][s:e, :2], axis=0) / dt
    return v


def replay_summary(pusht: ModuleType, data: dict, rep: dict) -> dict:
    """Per-step and final errors of a replay against the recorded states, and its scores."""
    idx = transition_indices(data)
    errors = pose_errors(rep["state"][idx], data["state"][idx + 1])
    last = data["ends"] - 2  # the last action with a recorded successor
    final = pose_errors(rep["state"][last], data["state"][last + 1])
    per_episode_max = np.array(
        [errors["block_px"][(idx >= s) & (idx < e)].max() for s, e in spans(data)]
    )
    cov_max = np.array([rep["coverage"][s:e].max() for s, e in spans(data)])
    return {
        "errors": errors,
        "final": final,
        "per_episode_max_block_px": per_episode_max,
        "success_rate": float(np.mean(cov_max > pusht.SUCCESS_THRESHOLD)),
        "mean_score": float(score_of(cov_max, pusht.SUCCESS_THRESHOLD).mean()),
        "n_success": int(np.sum(cov_max > pusht.SUCCESS_THRESHOLD)),
    }


def physics(pusht: ModuleType, data: dict) -> dict:
    """Sections (b) and (c): teleport and replay measurements."""
    seeded = replay(pusht, data, from_seed=True)
    first_state = replay(pusht, data, from_seed=False)
    first_state_reidx = replay(pusht, data, from_seed=False, setter=reindexing_setter)
    dt = 1.0 / pusht.CONTROL_HZ
    agent_velocity = seeded["velocity"].copy()
    agent_velocity[:, 2:] = 0.0
    teleports = {
        "zero velocity": teleport(pusht, data, None, "zero velocity"),
        "replay velocity": teleport(pusht, data, seeded["velocity"], "replay velocity"),
        "replay agent velocity, block at rest": teleport(
            pusht, data, agent_velocity, "replay agent velocity, block at rest"
        ),
        "finite-difference velocity": teleport(
            pusht, data, finite_difference_velocity(data, dt), "finite-difference velocity"
        ),
        "zero velocity, with reindexing": teleport(
            pusht, data, None, "zero velocity, with reindexing", reindexing_setter
        ),
        "replay velocity, with reindexing": teleport(
            pusht, data, seeded["velocity"], "replay velocity, with reindexing", reindexing_setter
        ),
    }
    return {
        "seeded": seeded,
        "replays": {
            "from recorded first state": replay_summary(pusht, data, first_state),
            "from recorded first state, with reindexing": replay_summary(
                pusht, data, first_state_reidx
            ),
            "from reset(seed=episode)": replay_summary(pusht, data, seeded),
        },
        "teleports": teleports,
    }


def physics_numbers(phys: dict, data: dict) -> dict:
    """The scalar results of :func:`physics`, for the table that compares pymunk versions."""
    out = {}
    for name, tel in phys["teleports"].items():
        for k, v in tel["errors"].items():
            out[f"teleport {name}: {k}"] = percentiles(v)
        out[f"teleport {name}: contact agreement (t+1)"] = contact_agreement(
            tel["n_contacts"], data
        )["next"]
    for name, rep in phys["replays"].items():
        out[f"replay {name}: step block_px"] = percentiles(rep["errors"]["block_px"])
        out[f"replay {name}: final block_px mean"] = float(rep["final"]["block_px"].mean())
        out[f"replay {name}: final angle_rad mean"] = float(rep["final"]["angle_rad"].mean())
        out[f"replay {name}: agent_px max"] = float(rep["errors"]["agent_px"].max())
        out[f"replay {name}: success episodes"] = rep["n_success"]
        out[f"replay {name}: mean_score"] = rep["mean_score"]
    return out


def coverage_section(pusht: ModuleType, data: dict, seeded: dict) -> dict:
    """Section (a): coverage of the recorded states and after each episode's last action."""
    cov = np.array([pusht.coverage_of(s[2:5]) for s in tqdm(data["state"], desc="coverage")])
    ep_max = np.array([cov[s:e].max() for s, e in spans(data)])
    ep_final = np.array([cov[e - 1] for _, e in spans(data)])
    # After the last action: the seeded replay matches the recorded trajectory to ~1e-5 px, so
    # its state after the last (unrecorded-outcome) action is the demonstration's true end.
    after_last = seeded["coverage"][data["ends"] - 1]
    ep_max_all = np.maximum(ep_max, after_last)
    thr = pusht.SUCCESS_THRESHOLD
    return {
        "coverage": cov,
        "ep_max": ep_max,
        "ep_final": ep_final,
        "after_last": after_last,
        "highest": float(cov.max()),
        "highest_after_last": float(after_last.max()),
        "n_over_recorded": int(np.sum(ep_max > thr)),
        "n_over_after_last": int(np.sum(ep_max_all > thr)),
        "over_only_after_last": [
            int(i) for i in np.flatnonzero((ep_max_all > thr) & (ep_max <= thr))
        ],
        "score_recorded": float(score_of(ep_max, thr).mean()),
        "score_with_last": float(score_of(ep_max_all, thr).mean()),
    }


def image_section(pusht: ModuleType, path: Path) -> dict:
    """Section (d): mean absolute error of our 96x96 rendering vs the dataset's ``img``."""
    root = zarr.open_group(str(path), mode="r")
    img, states = root["data/img"], root["data/state"]
    rng = np.random.default_rng(IMAGE_SAMPLE_SEED)
    idx = np.sort(rng.choice(img.shape[0], size=N_IMAGE_SAMPLES, replace=False))
    chunk = img.chunks[0]
    mae = np.zeros(len(idx))
    differing = np.zeros(len(idx))
    example = None
    for c in tqdm(np.unique(idx // chunk), desc="images"):
        sel = idx[(idx // chunk) == c]
        block = img[c * chunk : (c + 1) * chunk]
        for t in sel:
            ours = pusht.render_state(states[t].astype(np.float64), 96).astype(np.float64)
            diff = np.abs(ours - block[t - c * chunk])
            i = np.searchsorted(idx, t)
            mae[i] = diff.mean()
            differing[i] = np.mean(diff.max(axis=-1) > 32)
            if example is None:
                example = (int(t), block[t - c * chunk].astype(np.uint8), ours.astype(np.uint8))
    return {"mae": mae, "differing": differing, "n": len(idx), "example": example}


def agent_overlaps_block(pusht: ModuleType, state: np.ndarray) -> bool:
    import shapely.geometry as sg

    tee = pusht.tee_geometry(*state[2:5])
    return bool(tee.distance(sg.Point(state[0], state[1])) < pusht.AGENT_RADIUS)


def fmt_pct(p: dict[str, float], digits: int = 3, sep: str = " | ") -> str:
    return sep.join(f"{p[k]:.{digits}f}" for k in ("p50", "p90", "p99", "max"))


def plot(path: Path, cov: dict, phys: dict, image: dict, threshold: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor = 1e-6
    bins = np.logspace(-6, 2, 81)
    fig, axes = plt.subplots(3, 3, figsize=(15, 13))
    ax = axes[0, 0]
    ax.hist(cov["ep_max"], bins=40, alpha=0.7, label="max over recorded states")
    ax.hist(cov["after_last"], bins=40, alpha=0.7, label="after the last action")
    ax.axvline(threshold, color="k", ls="--", lw=1, label=f"success {threshold}")
    ax.set(xlabel="coverage", ylabel="episodes", title="(a) coverage per episode")
    ax.legend(fontsize=8)
    for ax, key, title in (
        (axes[0, 1], "block_px", "(b) teleport: block position error"),
        (axes[0, 2], "agent_px", "(b) teleport: agent position error"),
    ):
        for name, tel in phys["teleports"].items():
            ax.hist(np.maximum(tel["errors"][key], floor), bins=bins, histtype="step", label=name)
        ax.set(xscale="log", yscale="log", xlabel="px (values < 1e-6 at 1e-6)", title=title)
        ax.set_ylabel("transitions")
        ax.legend(fontsize=8)
    ax = axes[1, 0]
    for name, tel in phys["teleports"].items():
        err = np.maximum(tel["errors"]["angle_rad"], floor)
        ax.hist(err, bins=bins, histtype="step", label=name)
    ax.set(xscale="log", yscale="log", xlabel="rad", ylabel="transitions")
    ax.set_title("(b) teleport: block angle error")
    ax.legend(fontsize=8)
    ax = axes[1, 1]
    for name, rep in phys["replays"].items():
        err = np.maximum(rep["errors"]["block_px"], floor)
        ax.hist(err, bins=bins, histtype="step", label=name)
    ax.set(xscale="log", yscale="log", xlabel="px (values < 1e-6 at 1e-6)", ylabel="steps")
    ax.set_title("(c) open-loop replay: block error per step")
    ax.legend(fontsize=8)
    ax = axes[1, 2]
    ax.hist(image["mae"], bins=40)
    ax.set(xlabel="mean |ours - dataset| (0-255)", ylabel="frames")
    ax.set_title(f"(d) image error, {image['n']} frames")
    t, recorded, ours = image["example"]
    diff = np.abs(ours.astype(np.int16) - recorded.astype(np.int16)).max(axis=-1)
    for ax, picture, title in (
        (axes[2, 0], recorded, f"(d) dataset img[{t}]"),
        (axes[2, 1], ours, f"(d) render_state(state[{t}], 96)"),
        (axes[2, 2], diff, "(d) max |difference| over channels"),
    ):
        ax.imshow(picture, cmap="magma" if picture.ndim == 2 else None, interpolation="nearest")
        ax.set_title(title)
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_pymunk6(args: argparse.Namespace) -> dict:
    """Sections (b) and (c) under pymunk 6, in a subprocess (one pymunk per process)."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--dataset",
        str(args.dataset),
        "--pymunk6-path",
        args.pymunk6_path,
        "--physics-json",
    ]
    result = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(result.stdout)


def write_report(args, pusht, data, cov, phys, image, pm6, timings) -> str:
    import pymunk

    thr = pusht.SUCCESS_THRESHOLD
    n_ep, n_tr = len(data["ends"]), len(transition_indices(data))
    script = os.path.relpath(__file__, REPO_ROOT)
    cmd = "python " + " ".join(shlex.quote(a) for a in [script, *sys.argv[1:]])
    p5, p50, p95 = np.percentile(cov["ep_final"], [5, 50, 95])
    m5, m50, m95 = np.percentile(cov["ep_max"], [5, 50, 95])
    a5, a50, a95 = np.percentile(cov["after_last"], [5, 50, 95])
    f = FACTS
    lines = [
        "# PushT environment fidelity against the real demonstrations",
        "",
        "Generated by:",
        "",
        "```",
        cmd,
        "```",
        "",
        f"- Machine: {describe_machine()}; Python {platform.python_version()}, "
        f"pymunk {pymunk.version} "
        f"(Chipmunk {pymunk.chipmunk_version.split('-')[0]}), numpy {np.__version__}.",
        f"- Dataset: `{os.path.relpath(args.dataset, REPO_ROOT)}`: {n_ep} episodes, "
        f"{len(data['state'])} steps, {n_tr} within-episode transitions.",
        "- Reference numbers ('facts') are those measured with gym-pusht 0.1.8 on pymunk 6.11.1 in "
        "`../shared/docs/PUSHT_FACTS.md`.",
        f"- Run time: {', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}.",
        "",
        "## (a) Coverage of the recorded states",
        "",
        "Coverage = fraction of the goal T covered by the block; reward = clip(coverage / "
        f"{thr}, 0, 1); success = coverage > {thr}. 'After the last action' is the state reached "
        "by applying each episode's last recorded action (whose outcome the dataset does not "
        "store), taken from the open-loop replay from the seeded reset, which follows the recorded "
        "states to ~1e-5 px (section c).",
        "",
        "| quantity | ours | facts (pymunk 6 reference) |",
        "|---|---|---|",
        f"| highest coverage of any recorded state | {cov['highest']:.3f} | "
        f"{f['highest_recorded_coverage']} |",
        f"| per-episode max coverage p5 / p50 / p95 | {m5:.3f} / {m50:.3f} / {m95:.3f} | "
        f"p50 {f['median_episode_max_coverage']} |",
        f"| final recorded state coverage p5 / p50 / p95 | {p5:.3f} / {p50:.3f} / {p95:.3f} | "
        + " / ".join(f"{v:.2f}" for v in f["final_coverage_p5_p50_p95"])
        + " |",
        f"| coverage after the last action p5 / p50 / p95 (max) | {a5:.3f} / {a50:.3f} / "
        f"{a95:.3f} ({cov['highest_after_last']:.3f}) | - |",
        f"| episodes > {thr} among recorded states | {cov['n_over_recorded']} of {n_ep} | 0 |",
        f"| episodes > {thr} including after the last action | {cov['n_over_after_last']} of "
        f"{n_ep} | {f['episodes_over_threshold']} of 206, only after the last action |",
        f"| teacher mean_score, recorded states only | {cov['score_recorded']:.3f} | "
        f"{f['teacher_mean_score']} |",
        f"| teacher mean_score, including after the last action | {cov['score_with_last']:.3f} | "
        f"{f['teacher_mean_score']} |",
        "",
        f"Episodes that exceed {thr} only after their last action: "
        f"{', '.join(map(str, cov['over_only_after_last'])) or 'none'}. "
        "The recorder stops an episode when it succeeds, so the success state itself is never "
        "stored: a policy that imitates the demos perfectly scores about "
        f"{cov['score_with_last']:.2f}, and the success rate of the demos is "
        f"{cov['n_over_after_last'] / n_ep:.1%}.",
        "",
        "## (b) One-step teleport",
        "",
        f"For each of the {n_tr} transitions t -> t+1 within an episode: `set_state(state[t], v)`, "
        "`step(action[t])`, compare with `state[t+1]`. The dataset does not record velocities, "
        "and both bodies' velocities matter. The agent's because the PD controller carries it "
        "from one action to the next. The block's because, although damping 0 removes the "
        "velocity a body carries into a physics step, Chipmunk moves each body by its current "
        "velocity before it applies the damping: the velocity that the last physics step's "
        "contact impulses leave on the block moves it at the next step, the first of action t. "
        "Variants of v:",
        "",
        "- *zero velocity*: v = 0.",
        "- *replay velocity*: the agent's and the block's velocities in the open-loop replay from "
        "the seeded reset just before action t. The agent is kinematic, so its trajectory "
        "depends only on its start and the actions, never on the block; every episode starts at "
        "rest after a reset, so integrating the PD law along the recorded actions gives the true "
        "agent velocity (the replay's agent error is below 1e-4 px, section c). The replay also "
        "follows the recorded block to ~1e-5 px, so its block velocity is the true one too. "
        "These are the exact velocities, not estimates.",
        "- *replay agent velocity, block at rest*: the replay's agent velocity, the block's set "
        "to zero (what the facts call 'the true agent velocity').",
        "- *finite-difference velocity*: (agent[t] - agent[t-1]) / 0.1 s, an estimate from the "
        "recorded positions alone (the mean velocity over the previous interval, not the final), "
        "the block at rest.",
        "- *..., with reindexing*: `set_state` followed by "
        "`space.reindex_shapes_for_body` for the block and the agent (`reindexing_setter` in this "
        "script), which is what our `set_state` did before it was made gym-pusht's setter (a "
        "fresh space, the agent, then the block's angle before its position, no reindexing). "
        "Reindexing changes the order in which Chipmunk's solver visits simultaneous contacts "
        "(e.g. the agent touching both the bar and the stem), which changes the step.",
        "",
        "| variant | error | p50 | p90 | p99 | max | max without episodes' first transition |",
        "|---|---|---|---|---|---|---|",
    ]
    units = {"agent_px": "agent px", "block_px": "block px", "angle_rad": "block angle rad"}
    later = ~np.isin(transition_indices(data), data["starts"])
    for name, tel in phys["teleports"].items():
        for key, label in units.items():
            digits = 4 if key == "angle_rad" else 3
            err = tel["errors"][key]
            lines.append(
                f"| {name} | {label} | {fmt_pct(percentiles(err), digits)} | "
                f"{err[later].max():.{digits}f} |"
            )
    lines += [
        "",
        "Facts (reference, zero velocity): agent p50 / p90 / max "
        + " / ".join(str(f["teleport_agent_px"][k]) for k in ("p50", "p90", "max"))
        + " px; block "
        + " / ".join(str(f["teleport_block_px"][k]) for k in ("p50", "p90", "max"))
        + f" px; angle p90 {f['teleport_angle_p90_rad']} rad; with the true agent velocity (the "
        f"block at rest) block p90 {f['teleport_true_velocity_block_p90_px']} px.",
        "",
        "Contact flag: agreement of `info['n_contacts'] > 0` after the step from t with the "
        "dataset's `n_contacts > 0`, for both index alignments.",
        "",
        "| variant | vs n_contacts[t+1] | vs n_contacts[t] | exact count = n_contacts[t+1] |",
        "|---|---|---|---|",
    ]
    idx = transition_indices(data)
    runs = {f"teleport, {k}": v["n_contacts"] for k, v in phys["teleports"].items()}
    runs["replay from seeded reset"] = phys["seeded"]["n_contacts"][idx]
    for label, contacts in runs.items():
        agr = contact_agreement(contacts, data)
        lines.append(
            f"| {label} | {agr['next']:.1%} | {agr['same']:.1%} | {agr['count_next']:.1%} |"
        )
    ahead, behind, other = contact_mismatch_kinds(phys["seeded"]["n_contacts"], data)
    lines += [
        "",
        f"The dataset flags contact on {agr['contact_rate']:.1%} of transitions; facts: "
        f"{f['contact_agreement']:.1%} agreement for the reference (zero-velocity teleport).",
        "",
        "Alignment used: **n_contacts[t+1]**. The recorder (Diffusion Policy's `demo_pusht.py`) "
        "stores, with state[t], the `info` returned by the step that *produced* state[t] (at an "
        "episode's first step, the reset's physics step), so the flag of the step from t is "
        "stored with state[t+1]. The shifted comparison with n_contacts[t] scores a little higher "
        "within episodes, but not because it is the right alignment: on the replay from the "
        "seeded reset, whose states equal the recorded ones to ~1e-5 px, the "
        f"{ahead + behind + other} steps that disagree under the t+1 alignment are contact "
        f"onsets and ends where the dataset's flag switches one step *earlier* than the physics "
        f"({ahead}), one step later ({behind}) or otherwise ({other}). With identical "
        "trajectories these ~3% are not a physics difference: the dataset's flag cannot be "
        "reproduced exactly from the recorded trajectory under either alignment.",
        "",
        "## (c) Open-loop replay of all episodes",
        "",
        "All recorded actions of an episode applied open loop, compared with the recorded states "
        "(per step: the state after action t vs state[t+1]). Starts:",
        "",
        "- *from recorded first state*: `set_state(state[0])` with zero velocities (a fresh "
        "space, set as gym-pusht sets it); gym-pusht 0.1.8 itself, started this way, gives the "
        "facts' replay numbers.",
        "- *..., with reindexing*: the same, followed by reindexing the moved shapes (see b).",
        "- *from reset(seed=episode)*: the demos were recorded in seed order (`demo_pusht.py` "
        "seeds episode i with i), and `reset(seed=i)` reproduces every episode's first recorded "
        "state (to float32 rounding, angle modulo 2 pi). The reset's legacy setter takes one "
        "physics step. Where the agent overlaps the block, that step resolves part of the "
        "overlap and leaves contact state in the solver (the velocities after it are zero) that "
        "carries into the first action; a state set from scratch lacks it.",
        "",
        "| start | step block px p50 / p90 / p99 / max | final block px mean "
        "| final angle rad mean | agent px max | success episodes | mean_score |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rep in phys["replays"].items():
        lines.append(
            f"| {name} | {fmt_pct(percentiles(rep['errors']['block_px']), sep=' / ')} | "
            f"{rep['final']['block_px'].mean():.4f} | {rep['final']['angle_rad'].mean():.2e} | "
            f"{rep['errors']['agent_px'].max():.1e} | {rep['n_success']} of {n_ep} "
            f"({rep['success_rate']:.1%}) | {rep['mean_score']:.3f} |"
        )
    lines += [
        f"| recorded states (+ after last action) | - | - | - | - | {cov['n_over_recorded']} "
        f"({cov['n_over_after_last']}) | {cov['score_recorded']:.3f} "
        f"({cov['score_with_last']:.3f}) |",
        "",
        f"Facts (reference, from recorded first state): final block error mean "
        f"{f['replay_final_error_mean_px']} px and {f['replay_final_angle_error_mean_rad']} rad, "
        f"worst block error at any step {f['replay_worst_block_error_px']} px, agent error at most "
        f"{f['replay_agent_error_max_px']} px.",
        "",
        f"Worst {N_WORST} episodes of the replays from the recorded first state, ranked by the "
        "larger of their block errors with and without reindexing (max, step and final error are "
        "those of `set_state`, without reindexing):",
        "",
        "| episode | max block px | at step | final block px | agent overlaps block at start "
        "| max block px, with reindexing | max block px from seeded reset |",
        "|---|---|---|---|---|---|---|",
    ]
    first = phys["replays"]["from recorded first state"]
    seeded = phys["replays"]["from reset(seed=episode)"]
    reidx = phys["replays"]["from recorded first state, with reindexing"]
    errs = first["errors"]["block_px"]
    worst = np.maximum(first["per_episode_max_block_px"], reidx["per_episode_max_block_px"])
    for ep in np.argsort(-worst)[:N_WORST]:
        s, e = data["starts"][ep], data["ends"][ep]
        mask = (idx >= s) & (idx < e)
        ep_err = errs[mask]
        overlap = agent_overlaps_block(pusht, data["state"][s])
        lines.append(
            f"| {ep} | {ep_err.max():.3f} | {int(np.argmax(ep_err))} | {ep_err[-1]:.3f} | "
            f"{'yes' if overlap else 'no'} | {reidx['per_episode_max_block_px'][ep]:.3f} | "
            f"{seeded['per_episode_max_block_px'][ep]:.2e} |"
        )
    n_overlap = sum(agent_overlaps_block(pusht, data["state"][s]) for s in data["starts"])
    lines += [
        "",
        f"{n_overlap} of {n_ep} episodes start with the agent overlapping the block.",
        "",
        "## (d) Image",
        "",
        f"`render_state(state[t], 96)` vs the dataset's `img[t]` on {image['n']} frames drawn "
        f"uniformly without replacement (seed {IMAGE_SAMPLE_SEED}); error in 0-255 units, averaged "
        "over pixels and channels.",
        "",
        "| mean abs error | p50 | p95 | max | pixels off by > 32 in some channel (mean) |",
        "|---|---|---|---|---|",
        f"| {image['mae'].mean():.2f} | {np.percentile(image['mae'], 50):.2f} | "
        f"{np.percentile(image['mae'], 95):.2f} | {image['mae'].max():.2f} | "
        f"{image['differing'].mean():.2%} |",
        "",
    ]
    if pm6 is not None:
        ours = physics_numbers(phys, data)
        lines += [
            "## pymunk 7.3.1 vs pymunk 6.11.1 (same env code)",
            "",
            "Sections (b) and (c) rerun in a subprocess with `--pymunk6-path` (a directory made "
            "by `pip install --target DIR pymunk==6.11.1`, the pymunk generation the data was "
            "recorded with; a shim maps `Space.on_collision` to `add_collision_handler`).",
            "",
            f"| quantity | pymunk {pymunk.version} | pymunk {pm6['pymunk_version']} |",
            "|---|---|---|",
        ]
        for key, value in ours.items():
            other = pm6["numbers"][key]
            if isinstance(value, dict):
                pair = f"{fmt_pct(value, sep=' / ')} | {fmt_pct(other, sep=' / ')}"
                lines.append(f"| {key} (p50 / p90 / p99 / max) | {pair} |")
            else:
                lines.append(f"| {key} | {value:.4g} | {other:.4g} |")
        lines.append("")
    lines += ["## What this means", "", what_this_means(pusht, data, cov, phys, image, n_ep), ""]
    return "\n".join(lines)


def what_this_means(
    pusht: ModuleType, data: dict, cov: dict, phys: dict, image: dict, n_ep: int
) -> str:
    first = phys["replays"]["from recorded first state"]
    reidx = phys["replays"]["from recorded first state, with reindexing"]
    seeded = phys["replays"]["from reset(seed=episode)"]
    worst_first = int(np.argmax(first["per_episode_max_block_px"]))
    worst = np.argsort(-reidx["per_episode_max_block_px"])[:2]
    worst_px = reidx["per_episode_max_block_px"][worst]
    overlapping = all(
        agent_overlaps_block(pusht, data["state"][data["starts"][ep]]) for ep in worst
    )
    tel_err = {k: v["errors"]["block_px"] for k, v in phys["teleports"].items()}
    tel = {k: percentiles(v) for k, v in tel_err.items()}
    full, agent_only = tel["replay velocity"], tel["replay agent velocity, block at rest"]
    full_reidx = tel["replay velocity, with reindexing"]
    first_transition = np.isin(transition_indices(data), data["starts"])
    changed = (
        np.abs(tel_err["replay velocity, with reindexing"] - tel_err["replay velocity"]) > 1e-6
    )
    n_changed_first = int((changed & first_transition).sum())
    mean_full = tel_err["replay velocity"].mean()
    mean_reidx = tel_err["replay velocity, with reindexing"].mean()
    gain = (
        "gains nothing"
        if mean_reidx >= mean_full
        else f"lowers the mean block error from {mean_full:.4f} to {mean_reidx:.4f} px"
    )
    p90_text = (
        f"p90 {full['p90']:.3f} px either way"
        if f"{full['p90']:.3f}" == f"{full_reidx['p90']:.3f}"
        else f"p90 {full_reidx['p90']:.3f} px against {full['p90']:.3f} px"
    )
    return (
        "The env scores the demonstrations as the reference does: the best recorded state covers "
        f"{cov['highest']:.3f} of the goal, and only {cov['n_over_after_last']} of {n_ep} demos "
        f"pass the {pusht.SUCCESS_THRESHOLD} success threshold, each only with the final action "
        "whose result the dataset does not store. So the demos' own mean_score is "
        f"{cov['score_with_last']:.3f} ({cov['score_recorded']:.3f} on stored states alone) and "
        f"their success rate {cov['n_over_after_last'] / n_ep:.1%}: a policy trained on them "
        "should be judged against those numbers, not against 100% success. The physics "
        "reproduces the recordings: replaying each episode's actions from its own seeded reset "
        f"stays within {seeded['errors']['block_px'].max():.1e} px of every recorded block "
        "position, so the env is, for practical purposes, the simulator the data came from. "
        "Starting instead from a stored first state with `set_state`, which sets it exactly as "
        "gym-pusht does, loses only the contact state of the reset step, which matters only where "
        "the agent starts overlapping the block: the worst block error at any step is "
        f"{first['errors']['block_px'].max():.2f} px (episode {worst_first}) and the mean final "
        f"error {first['final']['block_px'].mean():.3f} px, the facts' numbers. A single step "
        "from a recorded state is as exact as the velocities it starts with: with the agent's "
        "and the block's true velocities (from the replay) the block error p90 is "
        f"{full['p90']:.3f} px; with the agent's alone and the block at rest, "
        f"{agent_only['p90']:.3f} px (the facts' {FACTS['teleport_true_velocity_block_p90_px']} "
        "px), because the velocity the last contact impulse left on the block moves it at the "
        "next physics step; with zero velocity, which is all the dataset offers, a few pixels "
        f"(p90 {tel['zero velocity']['p90']:.2f} px). Reindexing the moved shapes after setting "
        "the state, as `set_state` used to, changes the order in which the solver handles the "
        f"agent's two contacts with the T. It changes {int(changed.sum())} of the "
        f"{len(changed)} teleports with the true velocities ({n_changed_first} of them episodes' "
        f"first transitions) and {gain} there ({p90_text}; worst "
        f"{full_reidx['max']:.1f} px against {full['max']:.2f} px), and it breaks the replay of "
        + (
            "episodes that start with the agent overlapping the block: "
            if overlapping
            else "some episodes: "
        )
        + f"episodes {worst[0]} and {worst[1]} drift by up to {worst_px[0]:.1f} and "
        f"{worst_px[1]:.1f} px. The env therefore follows the reference and does not reindex. "
        f"Rendered observations differ from the dataset's by {image['mae'].mean():.1f} / 255 per "
        "pixel on average, only along shape edges (anti-aliasing and sub-pixel outline "
        "placement), so image policies see the same scenes."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "eval/results")
    parser.add_argument("--pymunk6-path", default=None, help="dir with pymunk 6 (pip --target)")
    parser.add_argument("--physics-json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    pusht = load_env_module(args.pymunk6_path if args.physics_json else None)
    data = load_dataset(args.dataset)
    timings = {}
    t0 = time.perf_counter()
    phys = physics(pusht, data)
    timings["teleport + replay"] = time.perf_counter() - t0
    if args.physics_json:
        import pymunk

        numbers = physics_numbers(phys, data)
        print(json.dumps({"pymunk_version": pymunk.version, "numbers": numbers}))
        return
    t0 = time.perf_counter()
    cov = coverage_section(pusht, data, phys["seeded"])
    timings["coverage"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    image = image_section(pusht, args.dataset)
    timings["images"] = time.perf_counter() - t0
    pm6 = None
    if args.pymunk6_path is not None:
        t0 = time.perf_counter()
        pm6 = run_pymunk6(args)
        timings["pymunk 6 rerun"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    plot(args.out / "pusht_fidelity.png", cov, phys, image, pusht.SUCCESS_THRESHOLD)
    report = write_report(args, pusht, data, cov, phys, image, pm6, timings)
    (args.out / "pusht_fidelity.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
