"""Train every selected method on one task with the same budget, evaluate, and report.

Writes eval/results/compare_<task>.md and its PNGs (gradient norms, loss terms, score vs steps and
vs latency). Resumable: rerun the same command after an interruption and finished work is reused.

Usage:
  python eval/compare.py --task pusht_keypoints --budget small \
      --dataset ../shared/data/pusht/pusht_cchi_v7_replay.zarr
  python eval/compare.py --task pusht_keypoints --budget large --dataset ...   # on a GPU
  options: --methods isd,ddpm,... --seeds 0,1 --n-envs 8 --out-dir DIR --results DIR --notes FILE
           --steps N --batch-size B --lr LR (change the budget; the report says so)
           --train-seconds S (steps that fit S s of training, from measured step costs)
           --device auto|cpu|cuda (the evaluated policies) --name STEM (report file name)
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from harness import BUDGETS, all_entries, run_compare, write_report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--task", default="pusht_keypoints")
    parser.add_argument("--budget", default="small", choices=sorted(BUDGETS))
    parser.add_argument("--methods", default=",".join(all_entries()))
    parser.add_argument("--seeds", default="", help="comma-separated training seeds")
    parser.add_argument("--dataset", default=None, help="replay buffer (default: the task's)")
    parser.add_argument("--n-envs", type=int, default=None)
    parser.add_argument("--out-dir", default=None, help="default outputs/compare_<task>_<budget>")
    parser.add_argument("--results", default="eval/results")
    parser.add_argument("--notes", default=None, help="markdown interpreting the results")
    parser.add_argument(
        "--samplers",
        default=None,
        help='JSON narrowing the evaluated samplers, e.g. \'{"isd": ["1"], "ddpm": ["ddpm:100"]}\'',
    )
    parser.add_argument("--steps", type=int, default=None, help="change the budget's steps")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--device", default="auto", help="for the evaluated policies")
    parser.add_argument(
        "--train-seconds",
        type=float,
        default=None,
        help="replace --steps by as many as fit this training time (all runs together)",
    )
    parser.add_argument("--name", default=None, help="report stem (default compare_<task>)")
    args = parser.parse_args()
    changes = {
        k: v
        for k, v in {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr}.items()
        if v is not None
    }
    out_dir = args.out_dir or f"outputs/compare_{args.task}_{args.budget}"
    results = run_compare(
        args.task,
        args.budget,
        [m for m in args.methods.split(",") if m],
        out_dir,
        dataset=args.dataset,
        seeds=[int(s) for s in args.seeds.split(",") if s],
        n_envs=args.n_envs,
        samplers=json.loads(args.samplers) if args.samplers else None,
        device=args.device,
        train_seconds=args.train_seconds,
        **changes,
    )
    notes = Path(args.notes).read_text() if args.notes else ""
    shown, skip = [], False  # the command as run, without the notes file
    for arg in sys.argv:
        if skip or arg.startswith("--notes"):
            skip = arg == "--notes"
            continue
        shown.append(shlex.quote(arg))
    path = write_report(results, args.results, "python " + " ".join(shown), notes, args.name)
    print(path.read_text())


if __name__ == "__main__":
    main()
