"""Two-goal PushT: the T may go to either of two goal poses, and nothing says which.

The task where averaging fails. The demonstrations (``cm-policy data generate pusht_twogoal``)
each deliver the block to one of the two goals, drawn 50/50 per seed; the observations are those
of PushT (the images show both goal outlines), so a demonstration's goal is a mode of the
conditional action distribution, not something the policy is told. A policy that averages the
demonstrations pushes towards the mean of the two goals, where neither is covered.

The goals: the reference's goal angle (pi/4) at two positions 180 px apart on the line y = 256,
centred at x = 249.2, where the mean distance of the reference's initial block positions to
either goal is the same (138.43 vs 138.45 px over the initial states of seeds 0..99999, 50.0% of
them nearer to A). The T on one goal covers none of the other.

Reward and success as in PushT, against the nearer-covered goal: reward = clip(max coverage /
0.95, 0, 1), success = coverage > 0.95 of either goal. Each evaluated episode records which goal
was reached (A, B or none) and whether it ended with the block *between* the goals: unsolved,
with the block's origin on the middle half of the segment between the two goal positions and
within 60 px of it (half the T's bar), where the mean of the two goal poses lies.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import shapely

from cm_policy.envs.pusht import SUCCESS_THRESHOLD, PushTEnv, coverage_of, tee_geometry
from cm_policy.stats import wilson_interval
from cm_policy.tasks.pusht import PushT

GOALS: tuple[tuple[float, float, float], ...] = (
    (159.2, 256.0, math.pi / 4),  # A
    (339.2, 256.0, math.pi / 4),  # B
)
GOAL_NAMES = ("A", "B")
BETWEEN_SPAN = (0.25, 0.75)  # the middle half of the segment from goal A to goal B
BETWEEN_DISTANCE = 60.0  # px from that segment: half the T's bar


class TwoGoalPushTEnv(PushTEnv):
    """PushT scored against two goals: coverage, reward and success take the better-covered
    one; ``info`` adds ``goal_coverage`` (per goal) and ``reached`` (goal index, or -1)."""

    def __init__(self, obs_type: str = "state", render_size: int = 96, video_size: int = 256):
        super().__init__(obs_type, render_size, video_size, goal=GOALS[0])
        self.goals = GOALS
        self.goal_geometries = [tee_geometry(*g) for g in GOALS]
        for geometry in self.goal_geometries:
            shapely.prepare(geometry)
        self._pose: tuple[float, float, float] | None = None
        self._coverages = [0.0] * len(GOALS)

    def _coverage(self) -> float:
        b = self.block.position
        pose = (b.x, b.y, self.block.angle)
        if pose != self._pose:
            self._pose = pose
            self._coverages = [coverage_of(np.array(pose), g) for g in self.goal_geometries]
        return max(self._coverages)

    def _get_info(self, coverage: float) -> dict:
        info = super()._get_info(coverage)
        best = int(np.argmax(self._coverages))
        info["goal_coverage"] = np.array(self._coverages)
        info["reached"] = best if self._coverages[best] > SUCCESS_THRESHOLD else -1
        return info


def is_between(block_xy: np.ndarray) -> bool:
    """Whether a block origin lies between the goals (see the module's docstring)."""
    a, b = np.array(GOALS[0][:2]), np.array(GOALS[1][:2])
    along = float((np.asarray(block_xy) - a) @ (b - a) / ((b - a) @ (b - a)))
    closest = a + np.clip(along, 0.0, 1.0) * (b - a)
    near = float(np.linalg.norm(np.asarray(block_xy) - closest)) <= BETWEEN_DISTANCE
    return BETWEEN_SPAN[0] <= along <= BETWEEN_SPAN[1] and near


class TwoGoalPushT(PushT):
    name = "pusht_twogoal"
    success_rule = f"coverage > {SUCCESS_THRESHOLD} of either goal at some step"
    outcome_keys = ("reached", "state")
    demo_goals = GOALS

    def make_env(self) -> gym.Env:
        return TwoGoalPushTEnv(obs_type=self.cfg["obs_type"])

    def episode_outcome(self, info: Mapping[str, Any]) -> dict[str, Any]:
        reached = int(info["reached"])
        state = np.asarray(info["state"], dtype=np.float64)
        return {
            "goal": GOAL_NAMES[reached] if reached >= 0 else None,
            "between": reached < 0 and is_between(state[2:4]),
            "final_block": [float(v) for v in state[2:5]],
        }

    def summarize_outcomes(self, results: Sequence[Any]) -> dict[str, Any]:
        n = len(results)
        goals = [r.outcome["goal"] for r in results]
        solved = [g for g in goals if g is not None]
        out: dict[str, Any] = {}
        for name in GOAL_NAMES:
            share = goals.count(name) / n
            out[f"reached_{name}"] = share
            out[f"reached_{name}_ci95"] = list(wilson_interval(share, n))
        # Mode balance: the share of goal A among the solved episodes (0.5: both modes alike).
        balance = solved.count(GOAL_NAMES[0]) / len(solved) if solved else math.nan
        out["mode_balance_A"] = balance
        out["mode_balance_A_ci95"] = list(wilson_interval(balance, len(solved))) if solved else None
        between = sum(r.outcome["between"] for r in results) / n
        out["between"] = between
        out["between_ci95"] = list(wilson_interval(between, n))
        return out
