"""Benchmark the PushT demonstration planner: success rate, episode length and speed.

    python eval/bench_planner.py --n 100 --workers 2

Attempts episodes on seeds ``--seed``, ``--seed + 1``, ... without images and writes
``eval/results/pusht_planner.md``.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from cm_policy.envs.pusht_planner import generate
from cm_policy.evaluation.machine import describe_machine

RESULTS = Path(__file__).parent / "results" / "pusht_planner.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="episodes to attempt")
    parser.add_argument("--seed", type=int, default=0, help="first env seed")
    parser.add_argument("--workers", type=int, default=2, help="planning processes")
    parser.add_argument("--out", type=Path, default=RESULTS, help="markdown report to write")
    args = parser.parse_args()

    start = time.perf_counter()
    episodes = list(generate(args.n, seed=args.seed, workers=args.workers, render=False))
    wall = time.perf_counter() - start

    success = np.array([e.success for e in episodes])
    lengths = np.array([e.n_steps for e in episodes])
    kept = lengths[success]
    coverage = np.array([e.max_coverage for e in episodes])
    failed = [e.seed for e in episodes if not e.success]
    command = shlex.join(["python", "eval/bench_planner.py", *sys.argv[1:]])
    report = f"""# PushT demonstration planner

`cm_policy.envs.pusht_planner` attempts episodes from the reference initial states of seeds
{args.seed}..{args.seed + args.n - 1}; an attempt succeeds when the coverage exceeds 0.95 within 300
control steps. Images are not rendered here (a 96x96 frame takes about 0.2 ms per step, a few
percent of the planning time).

Command: `{command}`

Machine: {describe_machine()}, Python {platform.python_version()}; {args.workers} worker
process(es).

| metric | value |
|---|---|
| attempts | {len(episodes)} |
| successful (coverage > 0.95) | {success.sum()} ({success.mean():.1%}) |
| episode length, successful: mean / median / p90 / max | {kept.mean():.1f} / \
{np.median(kept):.0f} / {np.percentile(kept, 90):.0f} / {kept.max()} |
| mean max coverage, all attempts | {coverage.mean():.3f} |
| wall time | {wall:.1f} s |
| attempts per minute (wall) | {len(episodes) / wall * 60:.1f} |
| successful episodes per minute (wall) | {success.sum() / wall * 60:.1f} |

Failed seeds: {", ".join(map(str, failed)) or "none"}.
"""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
