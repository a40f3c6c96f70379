"""Does the noise choose the goal? Two-goal PushT from shared initial states.

The campaign's test episodes each start from their own state, so a policy whose goal is a function
of the start state (a regressor: its chunk is a function of the observation) and one that draws
the goal from its noise can score alike. Here each of N initial states (the campaign's first test
seeds) is run M times, the draws differing only in the policy's noise (seeded per (state, draw)
and chunk). A policy that generates from the demonstrations' two ways reaches A in some draws and
B in others from the same state; one whose goal follows from the state reaches the same goal in
all M (the physics is deterministic). The demonstrations' planner picks its goal 50/50, so from a
state where k of the M draws reach a goal, both goals appear with probability 1 - 2^(1 - k).

Per entry (run, training seed, sampler): success over the N x M episodes, the pooled mode balance,
and over the states where at least two draws reached a goal: the share of them that reached both
("split") and the mean minority share min(A, B) / (A + B). Cached per entry under
RESULTS/modes/; the table goes to RESULTS/modes.md and the figure (one row per entry, one stacked
bar of outcomes per state) to RESULTS/modes.png.

Usage:
    python -m cm_policy.experiments.twogoal_modes eval/plans/pusht_twogoal.yaml --root RUNS
       [--states 30] [--draws 16] [--entries "isd 1,flow 16"] [--seeds 0] [--report-only]
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cm_policy.atomic import write_figure_atomic, write_text_atomic
from cm_policy.experiments.campaign import Plan, RunSpec, mark_steps, samplers_of

OUTCOMES = ("A", "B", "between", "none")
COLORS = {"A": "tab:blue", "B": "tab:orange", "between": "tab:red", "none": "0.8"}
NOISE_KEY_BASE = 10**8  # noise keys apart from every env seed the campaigns use


def noise_key(seed: int, draw: int, draws: int) -> int:
    """The noise key of draw ``draw`` from initial state ``seed``: distinct per (seed, draw)."""
    return NOISE_KEY_BASE + seed * draws + draw


def outcome_name(outcome: dict[str, Any]) -> str:
    """A, B, between or none: how an episode ended, from the task's outcome record."""
    if outcome["goal"] is not None:
        return str(outcome["goal"])
    return "between" if outcome["between"] else "none"


def state_counts(episodes: Sequence[dict[str, Any]]) -> dict[int, dict[str, int]]:
    """Per initial state (env seed), how many of its draws ended in each of :data:`OUTCOMES`."""
    counts: dict[int, dict[str, int]] = {}
    for e in episodes:
        row = counts.setdefault(int(e["seed"]), dict.fromkeys(OUTCOMES, 0))
        row[e["ended"]] += 1
    return counts


def summarize_modes(episodes: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Success, mode balance and the per-state split of ``episodes`` (dicts with ``seed``,
    ``ended`` in :data:`OUTCOMES`, ``success``, ``max_reward``)."""
    from cm_policy.stats import wilson_interval

    if not episodes:
        raise ValueError("no episodes to summarize")
    counts = state_counts(episodes)
    n = len(episodes)
    wins = sum(bool(e["success"]) for e in episodes)
    a = sum(c["A"] for c in counts.values())
    b = sum(c["B"] for c in counts.values())
    # States where at least two draws reached a goal: only there can the draws disagree.
    two = [c for c in counts.values() if c["A"] + c["B"] >= 2]
    split = sum(1 for c in two if c["A"] and c["B"])
    out: dict[str, Any] = {
        "states": len(counts),
        "episodes": n,
        "mean_score": float(np.mean([e["max_reward"] for e in episodes])),
        "success_rate": wins / n,
        "success_rate_ci95": list(wilson_interval(wins / n, n)),
        "between": sum(c["between"] for c in counts.values()) / n,
        "balance_A": a / (a + b) if a + b else None,
        "states_two_reached": len(two),
        "split": split / len(two) if two else None,
        "split_ci95": list(wilson_interval(split / len(two), len(two))) if two else None,
        "minority": float(np.mean([min(c["A"], c["B"]) / (c["A"] + c["B"]) for c in two]))
        if two
        else None,
        # States whose draws all ended alike (same goal, or all between, or all neither).
        "all_alike": sum(1 for c in counts.values() if max(c.values()) == sum(c.values()))
        / len(counts),
    }
    return out


def last_checkpoint(
    plan: Plan, run: RunSpec, seed: int, root: Path, costs: dict[str, float]
) -> Path:
    """The checkpoint of ``run``'s last mark for training seed ``seed`` under ``root``, the marks
    placed by the plan's step ``costs``."""
    step = mark_steps(plan, costs[run.name])[-1]
    return root / f"{run.name}_s{seed}" / "checkpoints" / f"step_{step:07d}"


def run_entry(
    checkpoint: Path, label: str, states: Sequence[int], draws: int, n_envs: int
) -> list[dict[str, Any]]:
    """Every state of ``states`` ``draws`` times under the sampler ``label``, each draw with its
    own noise; one record per episode."""
    from cm_policy.checkpoint import load_policy
    from cm_policy.evaluation.runner import run_episodes
    from cm_policy.tasks import load_task

    policy = load_policy(checkpoint, weights="ema", device="cpu")
    policy.eval()
    task = load_task(policy.spec["task"])
    kind, steps = policy.method.parse_label(label)
    episodes = [(s, d) for s in states for d in range(draws)]
    results = run_episodes(
        policy,
        task.env_factory(),
        [s for s, _ in episodes],
        n_obs_steps=policy.n_obs_steps,
        n_action_steps=policy.n_action_steps,
        max_steps=task.horizon,
        n_envs=n_envs,
        layout="sync",
        predict_kwargs={"steps": steps, "sampler": kind, "noise": "random"},
        seeded_noise=True,
        noise_keys=[noise_key(s, d, draws) for s, d in episodes],
        outcome_keys=task.outcome_keys,
        outcome=task.episode_outcome,
        progress=True,
    )
    return [
        {
            "seed": r.seed,
            "draw": d,
            "ended": outcome_name(r.outcome),
            "success": r.success,
            "max_reward": r.max_reward,
        }
        for r, (_, d) in zip(results, episodes, strict=True)
    ]


def entry_name(run: str, seed: int, label: str) -> str:
    return f"{run}_s{seed}_{label.replace(':', '')}"


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def report(plan: Plan, folder: Path) -> None:
    """Table (``modes.md``) and figure (``modes.png``) of every cached entry in ``folder``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = [(r.name, s, lab) for r in plan.runs for s in r.seeds for lab in samplers_of(r)]
    cached = {}
    for run, seed, label in order:
        path = folder / f"{entry_name(run, seed, label)}.json"
        if path.exists():
            cached[run, seed, label] = json.loads(path.read_text())
    if not cached:
        raise SystemExit(f"no cached entries under {folder}")
    ranges = sorted({(c["states"][0], c["states"][1], c["draws"]) for c in cached.values()})
    note = "; ".join(f"initial states: test seeds {a}..{b}, {d} draws each" for a, b, d in ranges)
    lines = [
        f"# `{plan.name}`: does the noise choose the goal?",
        "",
        "Command: `python -m cm_policy.experiments.twogoal_modes "
        f"eval/plans/{plan.name}.yaml --root RUNS`. "
        f"{note[0].upper()}{note[1:]}. Each entry: the run's checkpoint at the plan's last mark "
        "(EMA weights), its sampler with random initial noise, every initial state run once per "
        "draw with its own noise (the env and its physics are the same in every draw).",
        "",
        "split: among the states where two or more draws reached a goal, the share where both "
        "goals were reached [Wilson 95%]; minority: the mean of min(A, B) / (A + B) over those "
        "states (0 for a policy whose goal follows from the state, 0.5 for a fair coin); all "
        "alike: the share of all states whose draws all ended the same way. A planner that picks "
        "its goal 50/50 splits a state with k goals reached with probability 1 - 2^(1 - k).",
        "",
        "| run | seed | sampler | states x draws | mean_score | success | A / (A + B) | between "
        "| states with >= 2 reached | split | minority | all alike | measured on |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (run, seed, label), c in cached.items():
        s = c["summary"]
        lo, hi = s["success_rate_ci95"]
        split = fmt(s["split"])
        if s["split_ci95"]:
            split += f" [{s['split_ci95'][0]:.2f}, {s['split_ci95'][1]:.2f}]"
        lines.append(
            f"| {run} | {seed} | {label} | {s['states']} x {c['draws']} | {s['mean_score']:.3f} "
            f"| {s['success_rate']:.3f} [{lo:.3f}, {hi:.3f}] | {fmt(s['balance_A'])} "
            f"| {s['between']:.3f} | {s['states_two_reached']} | {split} | {fmt(s['minority'])} "
            f"| {s['all_alike']:.3f} | {c['machine']} |"
        )
    lines += ["", "![outcomes per initial state](modes.png)", ""]
    write_text_atomic(folder.parent / "modes.md", "\n".join(lines))

    fig, axes = plt.subplots(
        len(cached), 1, figsize=(9, 1.1 * len(cached) + 0.6), squeeze=False, sharex=True
    )
    for ax, ((run, seed, label), c) in zip(axes[:, 0], cached.items(), strict=True):
        counts = state_counts(c["episodes"])
        states = sorted(counts)
        bottom = np.zeros(len(states))
        for name in OUTCOMES:
            share = np.array([counts[s][name] / c["draws"] for s in states])
            ax.bar(range(len(states)), share, bottom=bottom, color=COLORS[name], width=0.9,
                   label=name)  # fmt: skip
            bottom += share
        ax.set_yticks([])
        ax.set_ylabel(f"{run} s{seed}\n{label}", rotation=0, ha="right", va="center", fontsize=8)
    axes[0, 0].legend(ncol=4, fontsize=7, loc="lower left", bbox_to_anchor=(0, 1.02))
    axes[-1, 0].set_xlabel("initial state (test seed order); bar = shares of the draws' endings")
    fig.tight_layout()
    write_figure_atomic(folder.parent / "modes.png", fig, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("plan", type=Path)
    parser.add_argument("--root", type=Path, help="the campaign's run folders")
    parser.add_argument("--states", type=int, default=30)
    parser.add_argument("--draws", type=int, default=16)
    parser.add_argument("--entries", default="", help='e.g. "isd 1,flow 16" (default: all)')
    parser.add_argument("--seeds", default="", help="training seeds, e.g. 0,1 (default: all)")
    parser.add_argument("--n-envs", type=int, default=50)
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    if args.draws < 2:
        raise SystemExit(f"--draws must be >= 2 to compare draws, got {args.draws}")
    plan = Plan.load(args.plan)
    folder = plan.results / "modes"
    if not args.report_only:
        import torch

        from cm_policy.atomic import write_json_atomic
        from cm_policy.evaluation.machine import describe_machine

        if args.root is None:
            raise SystemExit("--root (the campaign's run folders) is needed to evaluate")
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        wanted = {e.strip() for e in args.entries.split(",") if e.strip()}
        seeds = {int(s) for s in args.seeds.split(",") if s.strip()}
        states = list(range(plan.test_start, plan.test_start + args.states))
        costs = json.loads((plan.results / "step_costs.json").read_text())
        folder.mkdir(parents=True, exist_ok=True)
        for run in plan.runs:
            for seed in run.seeds:
                if seeds and seed not in seeds:
                    continue
                for label in samplers_of(run):
                    if wanted and f"{run.name} {label}" not in wanted:
                        continue
                    path = folder / f"{entry_name(run.name, seed, label)}.json"
                    if path.exists():
                        continue
                    checkpoint = last_checkpoint(plan, run, seed, args.root, costs)
                    if not checkpoint.is_dir():
                        print(f"{run.name} s{seed} {label}: no checkpoint {checkpoint}, skipped")
                        continue
                    print(f"{run.name} s{seed} {label}: {args.states} states x {args.draws}")
                    episodes = run_entry(checkpoint, label, states, args.draws, args.n_envs)
                    record = {
                        "checkpoint": str(checkpoint.relative_to(args.root)),
                        "states": [states[0], states[-1]],
                        "draws": args.draws,
                        "machine": f"{describe_machine()}, {torch.get_num_threads()} thread(s)",
                        "summary": summarize_modes(episodes),
                        "episodes": episodes,
                    }
                    write_json_atomic(path, record)
    report(plan, folder)
    print(f"wrote {folder.parent / 'modes.md'}")


if __name__ == "__main__":
    main()
