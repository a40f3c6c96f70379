"""What two-goal PushT scores without a policy: the floor under its metrics.

An agent that holds its starting position for the whole episode (300 steps) leaves the block
roughly where it started, so its episodes score the initial coverage and end 'between' the goals
wherever the block starts there. Run in the task's env from the campaign's test seeds, with the
task's own outcome rule, so a method's 'between' share can be read against this floor.

Usage: python eval/twogoal_still.py [--first 100000] [--n 500] [--steps 300]
"""

from __future__ import annotations

import argparse

import numpy as np
from tqdm import tqdm

from cm_policy.evaluation.runner import wilson_interval
from cm_policy.tasks.pusht_twogoal import GOAL_NAMES, TwoGoalPushTEnv, is_between


def still_episode(env: TwoGoalPushTEnv, seed: int, steps: int) -> tuple[float, int, bool]:
    """(best reward, goal index reached or -1, ended between) of an agent that never moves."""
    _, info = env.reset(seed=seed)
    hold = np.asarray(info["state"][:2], dtype=np.float64)
    best = 0.0
    for _ in range(steps):
        _, reward, terminated, _, info = env.step(hold)
        best = max(best, reward)
        if terminated:
            break
    reached = int(info["reached"])
    return best, reached, reached < 0 and is_between(np.asarray(info["state"][2:4]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--first", type=int, default=100000, help="first test seed")
    parser.add_argument("--n", type=int, default=500, help="episodes")
    parser.add_argument("--steps", type=int, default=300, help="steps per episode")
    args = parser.parse_args()
    env = TwoGoalPushTEnv()
    seeds = range(args.first, args.first + args.n)
    outcomes = [still_episode(env, s, args.steps) for s in tqdm(seeds, desc="episodes")]
    rewards = np.array([o[0] for o in outcomes])
    half = 1.96 * rewards.std(ddof=1) / np.sqrt(len(rewards))
    print(f"an agent that never moves, test seeds {seeds.start}..{seeds.stop - 1}:")
    print(f"  mean_score {rewards.mean():.3f} +- {half:.3f}")
    rates = {f"reached_{name}": [o[1] == i for o in outcomes] for i, name in enumerate(GOAL_NAMES)}
    rates["between"] = [o[2] for o in outcomes]
    for name, hits in rates.items():
        rate = float(np.mean(hits))
        lo, hi = wilson_interval(rate, len(hits))
        print(f"  {name} {rate:.3f} [{lo:.3f}, {hi:.3f}]")


if __name__ == "__main__":
    main()
