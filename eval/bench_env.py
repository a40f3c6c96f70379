"""PushT env speed, ours against the reference gym-pusht, and SequenceSampler batch speed.

    python eval/bench_env.py --out eval/results

Both envs run the same loop (seeded random target actions, a seeded reset every
``--reset-every`` steps) in a fresh single process each. The reference, gym-pusht from PyPI, runs
in its own virtualenv (``--venv``, created on first use) because it pins pymunk 6 and pygame. Runs
alternate ours / reference ``--repeats`` times; the table gives the median and the range. Writes
``bench_env.md`` to ``--out``.

With ``--policy CHECKPOINT`` (a trained PushT policy), the closed-loop runner's throughput too: env
steps per second of ``evaluate_policy`` for several ``n_envs`` in both layouts (``sync``: every
env in the evaluating process, one batched forward per chunk; ``async``: a worker process per
env), beside a plain serial loop (one env, batch 1, one process) with 1 and 2 torch threads, each
in a fresh process, the same seeds for all.

The robomimic envs (robosuite Lift, Can, Square: low-dim and camera steps/s, and the scripted
experts' success) have their own benchmark, ``eval/bench_robomimic_env.py`` (robosuite is slow
to import and is not needed for PushT).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import zarr

from cm_policy.evaluation.machine import describe_machine

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATASET = REPO_ROOT.parent / "shared/data/pusht/pusht_cchi_v7_replay.zarr"
DEFAULT_VENV = Path("/tmp/cm_policy_bench/gym_pusht_venv")
REFERENCE_PACKAGE = "gym-pusht==0.1.8"  # the version measured in ../shared/docs/PUSHT_FACTS.md
ACTION_SEED = 0
# Diffusion Policy's PushT windows: horizon 16, 2 observation steps, 8 action steps.
HORIZON, N_OBS_STEPS, N_ACTION_STEPS = 16, 2, 8
BATCH_SIZE = 256

# One timing loop, run by both implementations; argv[1] is a JSON job description.
RUNNER = r"""
import json, os, sys, time
import numpy as np

job = json.loads(sys.argv[1])
if job["impl"] == "reference":
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    import pymunk
    from gym_pusht.envs.pusht import PushTEnv
    obs_types = {"state": "state", "image": "pixels_agent_pos"}
else:
    import pymunk
    from cm_policy.envs.pusht import PushTEnv
    obs_types = {"state": "state", "image": "image"}
env = PushTEnv(obs_type=obs_types[job["obs"]])
n, reset_every = job["steps"], job["reset_every"]
actions = np.random.default_rng(job["seed"]).uniform(0.0, 512.0, size=(n, 2))
start = time.perf_counter()
for i in range(n):
    if i % reset_every == 0:
        env.reset(seed=i // reset_every)
    env.step(actions[i])
elapsed = time.perf_counter() - start
print(json.dumps({"steps_per_s": n / elapsed, "pymunk": pymunk.version}))
"""


def ensure_reference_venv(venv: Path) -> Path:
    """The python of a virtualenv holding gym-pusht, created and installed on first use."""
    python = venv / "bin" / "python"
    if python.exists() and _has_gym_pusht(python):
        return python
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    result = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", REFERENCE_PACKAGE],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0 or not _has_gym_pusht(python):
        raise RuntimeError(
            f"pip install {REFERENCE_PACKAGE} into {venv} failed (exit {result.returncode}):\n"
            f"{result.stdout}\n{result.stderr}"
        )
    return python


def _has_gym_pusht(python: Path) -> bool:
    check = subprocess.run([str(python), "-c", "import gym_pusht"], capture_output=True)
    return check.returncode == 0


def run_env(python: Path | str, impl: str, obs: str, steps: int, reset_every: int) -> dict:
    job = {"impl": impl, "obs": obs, "steps": steps, "reset_every": reset_every}
    job["seed"] = ACTION_SEED
    env = dict(os.environ, SDL_VIDEODRIVER="dummy")
    result = subprocess.run(
        [str(python), "-c", RUNNER, json.dumps(job)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{impl} {obs} run failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def bench_sampler(dataset: Path, n_batches: int) -> list[tuple[str, float, str]]:
    """Batches/s of SequenceSampler.sample_batch at batch 256 on the real dataset's arrays."""
    from cm_policy.data.sampler import SequenceSampler

    root = zarr.open_group(str(dataset), mode="r")
    ends = root["meta/episode_ends"][:]
    low_dim = {k: root[f"data/{k}"][:] for k in ("state", "keypoint", "action")}
    sampler = SequenceSampler(ends, HORIZON, N_OBS_STEPS - 1, N_ACTION_STEPS - 1)
    idxs = np.random.default_rng(0).integers(0, len(sampler), size=(n_batches, BATCH_SIZE))
    rows = []
    start = time.perf_counter()
    for batch in idxs:
        sampler.sample_batch(low_dim, batch)
    rows.append(("state + keypoint + action", n_batches / (time.perf_counter() - start), ""))
    # The gather does not depend on pixel values: a filled uint8 array of the dataset's image
    # shape stands in for the 2.8 GB float32 images (filled, so its pages are really touched).
    images = {"img": np.full(root["data/img"].shape, 255, dtype=np.uint8), **low_dim}
    start = time.perf_counter()
    for batch in idxs:
        sampler.sample_batch(images, batch, first_k={"img": N_OBS_STEPS})
    rows.append(
        (
            "+ 96x96x3 uint8 images (first 2 steps)",
            n_batches / (time.perf_counter() - start),
            "`first_k={'img': 2}`",
        )
    )
    return rows


# One closed-loop evaluation; argv[1] is a JSON job description. Prints env steps per second.
EVAL_RUNNER = r"""
import json, sys, tempfile, time
import numpy as np, torch

job = json.loads(sys.argv[1])
torch.set_num_threads(job["threads"])
from cm_policy.checkpoint import load_policy
from cm_policy.evaluation.runner import evaluate_policy
from cm_policy.observations import push_obs, stack_obs
from cm_policy.tasks import load_task

policy = load_policy(job["checkpoint"])
seeds = list(range(job["start"], job["start"] + job["episodes"]))
started = time.perf_counter()
if job["layout"] == "serial":
    env, steps = load_task(policy.spec["task"]).make_env(), 0
    for seed in seeds:
        obs, _ = env.reset(seed=seed)
        history = stack_obs({k: v[None] for k, v in obs.items()}, policy.n_obs_steps)
        done, t = False, 0
        while not done and t < job["max_steps"]:
            for action in policy.predict_action(history)[0]:
                obs, _, done, _, _ = env.step(action)
                push_obs(history, {k: v[None] for k, v in obs.items()})
                t += 1
                if done or t >= job["max_steps"]:
                    break
        steps += t
else:
    with tempfile.TemporaryDirectory() as out:
        evaluate_policy(policy, seeds, out, n_envs=job["n_envs"], layout=job["layout"],
                        max_steps=job["max_steps"], n_videos=0, progress=False)
        episodes = json.loads(open(out + "/episodes.json").read())
    steps = sum(e["n_steps"] for e in episodes)
wall = time.perf_counter() - started
print(json.dumps({"steps": steps, "wall_s": wall, "steps_per_s": steps / wall}))
"""


def bench_runner(checkpoint: Path, episodes: int) -> list[tuple[str, int, int, dict]]:
    """(layout, n_envs, threads, result) of each runner configuration, in fresh processes."""
    jobs = [("serial", 1, 1), ("serial", 1, 2)]
    jobs += [("sync", n, 1) for n in (8, 25, 50)] + [("async", n, 1) for n in (2, 8)]
    rows = []
    for layout, n_envs, threads in jobs:
        job = {
            "checkpoint": str(checkpoint),
            "layout": layout,
            "n_envs": n_envs,
            "threads": threads,
            "episodes": episodes,
            "start": 100000,
            "max_steps": 300,
        }
        out = subprocess.run(
            [sys.executable, "-c", EVAL_RUNNER, json.dumps(job)],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "OMP_NUM_THREADS": str(threads)},
        )
        result = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"runner {layout:6s} n_envs {n_envs:3d} threads {threads}: "
            f"{result['steps_per_s']:7.0f} steps/s",
            flush=True,
        )
        rows.append((layout, n_envs, threads, result))
    return rows


def write_runner_report(args: argparse.Namespace, rows: list[tuple[str, int, int, dict]]) -> None:
    serial = next(r for layout, _, threads, r in rows if layout == "serial" and threads == 1)
    cmd = "python " + " ".join(
        shlex.quote(a) for a in [os.path.relpath(__file__, REPO_ROOT), *sys.argv[1:]]
    )
    lines = [
        "# Closed-loop evaluation speed (PushT)",
        "",
        f"Command: `{cmd}`",
        "",
        f"- Machine: {describe_machine()}; load average when the runs ended "
        f"{' / '.join(f'{x:.2f}' for x in os.getloadavg())} (1 / 5 / 15 min).",
        f"- Policy: `{args.policy}`; {args.episodes} episodes per configuration (test seeds from "
        "100000, at most 300 steps), each configuration in a fresh process, one after another.",
        "- serial: one env, batch 1, `predict_action` per chunk in one process (the plain loop); "
        "sync: `evaluate_policy` with every env in the evaluating process and one batched "
        "forward per chunk; async: a worker process per env.",
        "",
        "| layout | n_envs | torch threads | env steps/s | x serial (1 thread) |",
        "|---|---|---|---|---|",
    ]
    for layout, n_envs, threads, result in rows:
        ratio = result["steps_per_s"] / serial["steps_per_s"]
        lines.append(
            f"| {layout} | {n_envs} | {threads} | {result['steps_per_s']:,.0f} | {ratio:.2f}x |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_runner.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "eval/results")
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--state-steps", type=int, default=5000)
    parser.add_argument("--image-steps", type=int, default=2000)
    parser.add_argument("--reset-every", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sampler-batches", type=int, default=200)
    parser.add_argument("--policy", type=Path, default=None, help="a trained PushT checkpoint")
    parser.add_argument("--episodes", type=int, default=100, help="per runner configuration")
    parser.add_argument("--skip-env", action="store_true", help="only the runner section")
    args = parser.parse_args()
    if args.policy is not None:
        write_runner_report(args, bench_runner(args.policy, args.episodes))
        if args.skip_env:
            return

    load_before = os.getloadavg()
    reference_error = None
    try:
        reference_python = ensure_reference_venv(args.venv)
    except (RuntimeError, subprocess.CalledProcessError) as err:
        reference_python, reference_error = None, str(err)
    impls = [("ours", sys.executable)]
    if reference_python is not None:
        impls.append(("reference", reference_python))
    steps = {"state": args.state_steps, "image": args.image_steps}
    speeds: dict[tuple[str, str], list[float]] = {}
    versions: dict[str, dict] = {}
    for _ in range(args.repeats):
        for obs, n in steps.items():
            for impl, python in impls:
                result = run_env(python, impl, obs, n, args.reset_every)
                speeds.setdefault((impl, obs), []).append(result["steps_per_s"])
                versions[impl] = result
                print(f"{impl:9s} {obs:5s} {result['steps_per_s']:8.0f} steps/s", flush=True)

    try:
        sampler_rows, sampler_error = bench_sampler(args.dataset, args.sampler_batches), None
    except ImportError as err:
        sampler_rows, sampler_error = [], f"{type(err).__name__}: {err}"

    cmd = "python " + " ".join(
        shlex.quote(a) for a in [os.path.relpath(__file__, REPO_ROOT), *sys.argv[1:]]
    )
    lines = [
        "# PushT env and sampler speed",
        "",
        "Generated by:",
        "",
        "```",
        cmd,
        "```",
        "",
        f"- Machine: {describe_machine()}; load average before the run "
        f"{' / '.join(f'{x:.2f}' for x in load_before)} (1 / 5 / 15 min; other jobs share the "
        "machine, so compare the two implementations only within this run).",
        f"- Ours: cm_policy PushTEnv, pymunk {versions['ours']['pymunk']}, Python "
        f"{platform.python_version()}.",
    ]
    if reference_python is not None:
        lines.append(
            f"- Reference: `pip install {REFERENCE_PACKAGE}` into `{args.venv}` (pymunk "
            f"{versions['reference']['pymunk']}, pygame rendering with SDL_VIDEODRIVER=dummy)."
        )
    else:
        lines += ["- Reference: not measured; the install failed:", "", "```", reference_error]
        lines += ["```"]
    lines += [
        f"- Loop: {args.state_steps} steps (state obs) / {args.image_steps} steps (96x96 image + "
        f"agent position obs) of uniform random targets in [0, 512]^2 (numpy default_rng("
        f"{ACTION_SEED})), `reset(seed=k)` every {args.reset_every} steps (included in the time), "
        f"one fresh process per run, runs alternating ours / reference, {args.repeats} repeats.",
        "",
        "| obs | ours steps/s (median, range) | reference steps/s (median, range) "
        "| ours / reference |",
        "|---|---|---|---|",
    ]
    for obs in steps:
        ours = speeds[("ours", obs)]
        cells = [f"{statistics.median(ours):,.0f} ({min(ours):,.0f}-{max(ours):,.0f})"]
        if ("reference", obs) in speeds:
            ref = speeds[("reference", obs)]
            ratio = statistics.median(ours) / statistics.median(ref)
            cells += [f"{statistics.median(ref):,.0f} ({min(ref):,.0f}-{max(ref):,.0f})"]
            cells += [f"{ratio:.1f}x"]
        else:
            cells += ["-", "-"]
        label = "state" if obs == "state" else "image 96x96 + agent_pos"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Reference in ../shared/docs/PUSHT_FACTS.md (gym-pusht, a quieter machine of this class): "
        "about 5,200 steps/s (state) and 830 steps/s (pixels). gym-pusht 0.1.8 draws its reset "
        "states from the gymnasium generator, not from Diffusion Policy's legacy RandomState as "
        "ours does, so the same seeds start from different states; the loop is the same.",
        "",
        f"## SequenceSampler, batch {BATCH_SIZE}",
        "",
        f"`cm_policy.data.sampler.SequenceSampler(episode_ends, {HORIZON}, {N_OBS_STEPS - 1}, "
        f"{N_ACTION_STEPS - 1})` (Diffusion Policy's PushT windows) on the real dataset's arrays "
        f"in RAM, `sample_batch` with {args.sampler_batches} batches of uniform random window "
        "indices.",
        "",
    ]
    if sampler_error is None:
        lines += ["| arrays | batches/s | note |", "|---|---|---|"]
        lines += [f"| {name} | {rate:,.0f} | {note} |" for name, rate, note in sampler_rows]
    else:
        lines.append(f"Not measured: `cm_policy.data.sampler` failed to import ({sampler_error}).")
    lines.append("")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_env.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
