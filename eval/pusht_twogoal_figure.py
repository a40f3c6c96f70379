"""Where two-goal PushT episodes end: final block poses over the two goal outlines, per run.

Reads a pusht_twogoal campaign's cached evaluations (cm-policy campaign keeps each episode's
outcome) and draws, for every run and sampler at the last mark, the final T of the first
``--per-run`` episodes (seed 0's test episodes first): green where goal A or B was reached, red
where the episode ended between the goals, grey otherwise.

Usage: python eval/pusht_twogoal_figure.py eval/plans/pusht_twogoal.yaml [--per-run 100]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import yaml
from matplotlib.patches import Polygon

from cm_policy.envs.pusht import WINDOW_SIZE, tee_polygons
from cm_policy.tasks.pusht_twogoal import GOAL_NAMES, GOALS

REPO = Path(__file__).resolve().parents[1]


def draw_tee(ax, pose, **style) -> None:
    for part in tee_polygons(*pose):
        ax.add_patch(Polygon(part, closed=True, **style))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("plan", type=Path)
    parser.add_argument("--per-run", type=int, default=100)
    args = parser.parse_args()
    plan = yaml.safe_load(args.plan.read_text())
    results = REPO / plan.get("results", f"eval/results/{plan['name']}")
    panels = []
    for run in plan["runs"]:
        outcomes: dict[str, list[dict]] = {}
        for seed in run["seeds"]:
            path = results / "cache" / f"{run['name']}_s{seed}.json"
            if not path.exists():
                continue
            marks = json.loads(path.read_text())["marks"]
            if not marks:
                continue
            last = marks[max(marks, key=int)]
            for label, entry in last["entries"].items():
                outcomes.setdefault(label, []).extend(entry.get("outcomes", []))
        panels += [(f"{run['name']} {label}", o[: args.per_run]) for label, o in outcomes.items()]
    if not panels:
        raise SystemExit(f"no cached outcomes under {results / 'cache'}")
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (title, outcomes) in zip(axes.flat, panels, strict=False):
        for name, goal in zip(GOAL_NAMES, GOALS, strict=True):
            draw_tee(ax, goal, facecolor="none", edgecolor="tab:green", lw=1.5)
            ax.text(goal[0], goal[1] + 95, name, color="tab:green", ha="center", fontsize=9)
        for o in outcomes:
            color = "tab:green" if o["goal"] else "tab:red" if o["between"] else "0.5"
            draw_tee(ax, o["final_block"], facecolor=color, edgecolor="none", alpha=0.08)
        counts = ", ".join(f"{g} {sum(o['goal'] == g for o in outcomes)}" for g in GOAL_NAMES)
        between = sum(o["between"] for o in outcomes)
        ax.set_title(f"{title} ({len(outcomes)} episodes)\n{counts}, between {between}", fontsize=8)
        ax.set_xlim(0, WINDOW_SIZE)
        ax.set_ylim(WINDOW_SIZE, 0)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    fig.suptitle(
        "final block pose of each episode at the last mark: green on a goal, red between the "
        "goals, grey elsewhere",
        fontsize=9,
    )
    fig.tight_layout()
    out = results / f"{plan['name']}_final_poses.png"
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
