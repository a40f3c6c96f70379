"""Where an evaluation loses its score: episodes binned by their score, and each bin's share of
what the mean_score lacks of 1.

mean_score is the mean over episodes of the best reward; 1 - mean_score is the sum over bins of
(episodes in the bin x what each lacks of 1) / episodes, so the table says whether the missing
score is a few episodes that never reach the goal, a cluster stuck half-way, or many near misses.
Reads the ``episodes.json`` that ``cm-policy eval`` (and the campaign's marks) write.
With ``--pusht-angle`` (PushT evaluations only) each evaluation is also split by how far the T
starts from the goal's angle (the reference's initial state for each episode's seed), which says
whether the lost episodes are the ones that need the T turned.

Usage:
  python -m cm_policy.experiments.score_bins RUNS/tiny_s0/eval RUNS/mid_s0/eval \
      --out eval/results/x/score_bins
      [--pusht-angle]
  (each argument is an evaluation folder or a folder of them, e.g. a campaign run's eval/;
   writes OUT.md and OUT.png)
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from cm_policy.atomic import write_figure_atomic, write_text_atomic

# Failed episodes are binned by their best reward (upper edges exclusive); successes form the last.
EDGES = (0.0, 0.05, 0.5, 0.8, 0.95)
NAMES = ("< 0.05", "0.05-0.5", "0.5-0.8", "0.8-0.95", ">= 0.95, failed", "success")
# Bins of |initial block angle - goal angle| for --pusht-angle, in degrees (upper edge inclusive).
ANGLE_EDGES = (0, 45, 90, 135, 180)


def bin_losses(episodes: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(episodes per bin, each bin's share of 1 - mean_score) for ``episodes`` with
    ``max_reward`` and ``success``; the shares sum to 1 - mean_score."""
    if not episodes:
        raise ValueError("expected at least one episode, found none")
    counts, lost = np.zeros(len(NAMES), dtype=int), np.zeros(len(NAMES))
    for episode in episodes:
        reward = float(episode["max_reward"])
        if episode["success"]:
            index = len(NAMES) - 1
        else:
            index = int(np.searchsorted(EDGES, reward, side="right")) - 1
        counts[index] += 1
        lost[index] += 1.0 - reward
    return counts, lost / len(episodes)


def angle_table(episodes: list[dict]) -> list[tuple[str, int, float, float, int, int]]:
    """PushT episodes split by how far the T starts from the goal angle: per bin of
    :data:`ANGLE_EDGES`, (bin, episodes, mean_score, success rate, episodes scoring < 0.05,
    failed episodes scoring 0.5-0.8)."""
    from cm_policy.envs.pusht import GOAL_POSE, PushTEnv
    from cm_policy.envs.pusht_planner import wrap_angle

    start = np.array([PushTEnv.initial_state(int(e["seed"]))[4] for e in episodes])
    error = np.abs(np.degrees(wrap_angle(start - GOAL_POSE[2])))
    reward = np.array([float(e["max_reward"]) for e in episodes])
    success = np.array([bool(e["success"]) for e in episodes])
    rows = []
    for low, high in itertools.pairwise(ANGLE_EDGES):
        m = ((error > low) | (low == 0)) & (error <= high)
        n = int(m.sum())
        score = float(reward[m].mean()) if n else float("nan")
        rate = float(success[m].mean()) if n else float("nan")
        stalled = int(np.sum(m & ~success & (reward >= 0.5) & (reward < 0.8)))
        rows.append((f"{low}-{high}", n, score, rate, int(np.sum(m & (reward < 0.05))), stalled))
    return rows


def evaluation_dirs(paths: list[str]) -> list[Path]:
    """Each path's evaluation folders (the path itself when it holds episodes.json, else the
    folders inside it that do, ordered by the training step in their names, ``step32900_1`` or
    ``step_000500``; the ones without a step, a campaign's last-mark diagnostics
    ``final_1_zero``, after them)."""
    from cm_policy.training.plots import eval_folder_step

    def key(d: Path) -> tuple[float, str]:
        parsed = eval_folder_step(d.name)
        return (parsed[0] if parsed else math.inf, d.name)

    found = []
    for path in map(Path, paths):
        if (path / "episodes.json").is_file():
            found.append(path)
            continue
        inner = [d for d in path.glob("*") if (d / "episodes.json").is_file()]
        if not inner:
            raise FileNotFoundError(f"expected episodes.json in {path} or its folders, found none")
        found.extend(sorted(inner, key=key))
    return found


def label(path: Path) -> str:
    """``tiny_s0 step32900_1`` for RUNS/tiny_s0/eval/step32900_1."""
    parent = path.parent.parent.name if path.parent.name == "eval" else path.parent.name
    return f"{parent} {path.name}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("paths", nargs="+", help="evaluation folders, or folders of them")
    parser.add_argument("--out", required=True, help="output stem: writes OUT.md and OUT.png")
    parser.add_argument(
        "--pusht-angle", action="store_true", help="also split by the T's initial angle error"
    )
    args = parser.parse_args()
    rows, angles = [], []
    for d in evaluation_dirs(args.paths):
        episodes = json.loads((d / "episodes.json").read_text())
        counts, lost = bin_losses(episodes)
        score = float(np.mean([e["max_reward"] for e in episodes]))
        rows.append((label(d), len(episodes), score, counts, lost))
        if args.pusht_angle:
            angles.append((label(d), angle_table(episodes)))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = "| evaluation | episodes | mean_score | " + " | ".join(NAMES) + " |"
    lines = [
        "# Where the score is lost",
        "",
        "Command: `python -m cm_policy.experiments.score_bins "
        + " ".join(args.paths)
        + f" --out {args.out}{' --pusht-angle' if args.pusht_angle else ''}`.",
        "",
        "Each cell: episodes in the bin (by best reward; successes apart) / the bin's share of "
        "1 - mean_score. The shares of a row add up to 1 - mean_score.",
        "",
        header,
        "|" + "---|" * (3 + len(NAMES)),
    ]
    for name, n, score, counts, lost in rows:
        cells = [f"{c} / {v:.3f}" for c, v in zip(counts, lost, strict=True)]
        lines.append(f"| {name} | {n} | {score:.3f} | " + " | ".join(cells) + " |")
    lines += ["", f"![score lost per bin]({out.name}.png)", ""]
    if angles:
        lines += [
            "## By the T's initial angle error",
            "",
            "|initial block angle - goal angle| in degrees (the reference's initial state for "
            "each episode's seed); stalled = failed with a best reward of 0.5-0.8.",
            "",
            "| evaluation | angle error | episodes | mean_score | success | < 0.05 | stalled |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, table in angles:
            for bin_name, n, score, rate, zero, stalled in table:
                lines.append(
                    f"| {name} | {bin_name} | {n} | {score:.3f} | {rate:.2f} | {zero} | {stalled} |"
                )
        lines.append("")
    write_text_atomic(out.with_suffix(".md"), "\n".join(lines))

    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.6))
    left = np.zeros(len(rows))
    colours = plt.get_cmap("RdYlGn")(np.linspace(0.05, 0.75, len(NAMES) - 1))
    for j, name in enumerate(NAMES[:-1]):
        width = np.array([r[4][j] for r in rows])
        ax.barh(range(len(rows)), width, left=left, color=colours[j], label=name)
        left += width
    ax.set_yticks(range(len(rows)), [r[0] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("1 - mean_score, split by the failed episodes' best reward")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    write_figure_atomic(out.with_suffix(".png"), fig, dpi=110)
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
