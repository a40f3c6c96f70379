"""robomimic env speed (Lift; low-dim and 84x84 two-camera observations) and expert success rates.

    python eval/bench_robomimic_env.py --out eval/results

Env speed: one process, one thread; seeded random delta actions (uniform in [-0.5, 0.5], the
gripper alternating every 20 steps), a seeded reset every ``--reset-every`` steps (reset time is
reported apart). Experts: one attempt per seed 0..``--expert-seeds``-1 and task; an attempt
succeeds when the task's own ``_check_success`` does. Writes ``bench_robomimic.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from cm_policy.envs.robomimic_experts import expert_episodes
from cm_policy.envs.robosuite_env import RobosuiteEnv, import_robosuite
from cm_policy.evaluation.machine import describe_machine

ACTION_SEED = 0


def bench_env(obs_type: str, steps: int, reset_every: int) -> dict[str, float]:
    started = time.perf_counter()
    env = RobosuiteEnv(task="lift", obs_type=obs_type)
    make_s = time.perf_counter() - started
    rng = np.random.default_rng(ACTION_SEED)
    actions = rng.uniform(-0.5, 0.5, size=(steps, 7))
    actions[:, 6] = np.where((np.arange(steps) // 20) % 2, 1.0, -1.0)
    step_s = reset_s = 0.0
    resets = 0
    try:
        for i in range(steps):
            if i % reset_every == 0:
                t = time.perf_counter()
                env.reset(seed=i // reset_every)
                reset_s += time.perf_counter() - t
                resets += 1
            t = time.perf_counter()
            env.step(actions[i])
            step_s += time.perf_counter() - t
    finally:
        env.close()
    return {"steps_per_s": steps / step_s, "reset_s": reset_s / resets, "make_s": make_s}


def bench_expert(task: str, n_seeds: int) -> dict[str, float]:
    started = time.perf_counter()
    lengths, wins = [], 0
    for episode in expert_episodes(task, range(n_seeds)):
        wins += episode.success
        if episode.success:
            lengths.append(episode.n_steps)
    wall = time.perf_counter() - started
    return {
        "attempts": n_seeds,
        "successes": wins,
        "mean_length": float(np.mean(lengths)) if lengths else float("nan"),
        "demos_per_min": wins / wall * 60,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("eval/results"))
    parser.add_argument("--steps", type=int, default=2000, help="low-dim env steps")
    parser.add_argument("--image-steps", type=int, default=400)
    parser.add_argument("--reset-every", type=int, default=200)
    parser.add_argument("--expert-seeds", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    robosuite = import_robosuite()
    import mujoco

    load = os.getloadavg()[0]
    state = bench_env("lowdim", args.steps, args.reset_every)
    image = bench_env("image", args.image_steps, args.reset_every)
    experts = {task: bench_expert(task, args.expert_seeds) for task in ("lift", "can", "square")}
    lines = [
        "# robomimic envs: speed and scripted-expert success",
        "",
        "Command: `python eval/bench_robomimic_env.py "
        f"--steps {args.steps} --image-steps {args.image_steps} --reset-every "
        f"{args.reset_every} --expert-seeds {args.expert_seeds}`",
        "",
        f"- Machine: {describe_machine()}; load average before the run {load:.2f} (another job "
        "may share the cores: figures are lower bounds).",
        f"- robosuite {robosuite.__version__}, mujoco {mujoco.__version__}, "
        f"MUJOCO_GL={os.environ.get('MUJOCO_GL', '')}; one process, one thread.",
        "",
        "## Lift env speed (Panda, OSC_POSE, 20 Hz control, 25 physics steps per env step)",
        "",
        "| observations | env steps/s | reset (s) | make (s) |",
        "|---|---|---|---|",
        f"| low-dim (object + proprioception) | {state['steps_per_s']:.0f} | "
        f"{state['reset_s']:.3f} | {state['make_s']:.2f} |",
        f"| + two 84x84 cameras (EGL, CPU) | {image['steps_per_s']:.1f} | "
        f"{image['reset_s']:.3f} | {image['make_s']:.2f} |",
        "",
        f"## Scripted experts ({args.expert_seeds} seeds each, seeds 0..{args.expert_seeds - 1})",
        "",
        "| task | attempts | successes | success rate | mean length (steps) | demos/min |",
        "|---|---|---|---|---|---|",
    ]
    for task, r in experts.items():
        lines.append(
            f"| {task} | {r['attempts']} | {r['successes']} | "
            f"{r['successes'] / r['attempts']:.0%} | {r['mean_length']:.0f} | "
            f"{r['demos_per_min']:.0f} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bench_robomimic.md"
    path.write_text("\n".join(lines) + "\n")
    print(path.read_text())


if __name__ == "__main__":
    main()
