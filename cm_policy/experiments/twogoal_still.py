"""What two-goal PushT scores without a policy: the floor under its metrics.

An agent that holds its starting position for the whole episode (300 steps) leaves the block
roughly where it started, so its episodes score the initial coverage and end 'between' the goals
wherever the block starts there. Run in the task's env from the campaign's test seeds and scored by
the evaluation's own summaries (the task's outcome rule), so a method's 'between' share can be read
against this floor.

Usage: python -m cm_policy.experiments.twogoal_still [--first 100000] [--n 500] [--steps 300]
"""

from __future__ import annotations

import argparse

import gymnasium as gym
import numpy as np
from tqdm import tqdm

from cm_policy.evaluation.runner import EpisodeResult, summarize
from cm_policy.tasks import load_task
from cm_policy.tasks.pusht_twogoal import TwoGoalPushT

TASK = {"env": "pusht_twogoal", "obs_type": "keypoints"}


def still_episode(task: TwoGoalPushT, env: gym.Env, seed: int, steps: int) -> EpisodeResult:
    """One episode of an agent that never moves, with the task's account of how it ended."""
    _, info = env.reset(seed=seed)
    hold = np.asarray(info["state"][:2], dtype=np.float64)
    best, n = 0.0, 0
    while n < steps:
        _, reward, terminated, _, info = env.step(hold)
        n += 1
        best = max(best, reward)
        if terminated:
            break
    return EpisodeResult(
        seed, best, bool(info["is_success"]), n, outcome=task.episode_outcome(info)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--first", type=int, default=100000, help="first test seed")
    parser.add_argument("--n", type=int, default=500, help="episodes")
    parser.add_argument("--steps", type=int, default=300, help="steps per episode")
    args = parser.parse_args()
    task = load_task(TASK)
    env = task.make_env()
    seeds = range(args.first, args.first + args.n)
    results = [still_episode(task, env, s, args.steps) for s in tqdm(seeds, desc="episodes")]
    metrics = {**summarize(results), **task.summarize_outcomes(results)}
    print(f"an agent that never moves, test seeds {seeds.start}..{seeds.stop - 1}:")
    low, high = metrics["mean_score_ci95"]
    print(f"  mean_score {metrics['mean_score']:.3f} [{low:.3f}, {high:.3f}]")
    for name in ("success_rate", "reached_A", "reached_B", "between"):
        low, high = metrics[f"{name}_ci95"]
        print(f"  {name} {metrics[name]:.3f} [{low:.3f}, {high:.3f}]")


if __name__ == "__main__":
    main()
