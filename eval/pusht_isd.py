"""Closed-loop results of trained PushT iSD runs -> eval/results/pusht_isd.md (+ PNG).

Each run (trained with `cm-policy train ...`) is evaluated with its EMA weights at 1 and 2 network
steps per action chunk, over Diffusion Policy's 50 test seeds (100000..100049) and over 500 seeds
(100000..100499) for tight error bars. Training budget and wall time come from the run's log.

Usage:
  python eval/pusht_isd.py --run pusht_keypoints=outputs/pusht_keypoints_isd \
      --run pusht_state=outputs/pusht_state_isd [--n-envs 8] [--out eval/results]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from omegaconf import OmegaConf

from cm_policy.checkpoint import load_policy, resolve_checkpoint
from cm_policy.evaluation.machine import describe_machine
from cm_policy.evaluation.runner import evaluate_policy

TEST_START = 100000


def training_wall_s(log: list[dict]) -> float:
    """Total training time; a resumed run's log restarts its clock, so segments are added up."""
    total, last = 0.0, 0.0
    for record in log:
        if record["wall_s"] < last:
            total += last
        last = record["wall_s"]
    return total + last


def evaluate_run(run: Path, n_envs: int) -> list[dict]:
    policy = load_policy(run, weights="ema")
    rows = []
    for n_episodes in (50, 500):
        for steps in (1, 2):
            out = run / "eval_results" / f"n{n_episodes}_steps{steps}"
            metrics_file = out / "metrics.json"
            if metrics_file.exists():  # resumable: a finished evaluation is not redone
                metrics = json.loads(metrics_file.read_text())
            else:
                metrics = evaluate_policy(
                    policy,
                    list(range(TEST_START, TEST_START + n_episodes)),
                    out,
                    steps=steps,
                    n_envs=n_envs,
                    n_videos=2 if n_episodes == 50 else 0,
                )
            rows.append({"n_episodes": n_episodes, "steps": steps, **metrics})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", action="append", required=True, help="NAME=RUN_DIR")
    parser.add_argument("--n-envs", type=int, default=8)
    parser.add_argument("--out", default="eval/results")
    parser.add_argument("--note", default="", help="a paragraph on how the runs were made")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = dict(r.split("=", 1) for r in args.run)
    lines = [
        "# PushT with iSD: one-step policies trained on CPU",
        "",
        f"Command: `python eval/pusht_isd.py {' '.join('--run ' + r for r in args.run)} "
        f"--n-envs {args.n_envs} --note ...`",
        "",
        f"Machine: {describe_machine()}."
        " Policies: EMA weights of the last checkpoint. mean_score = mean over episodes "
        "of the episode's max reward clip(coverage / 0.95); success = coverage > 0.95 at some "
        "step; 300 env steps, n_obs_steps 2, n_action_steps 8, horizon 16. Intervals are 95% "
        "(normal for mean_score, Wilson for success).",
        "",
        *([args.note, ""] if args.note else []),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for name, run_dir in runs.items():
        run = Path(run_dir)
        cfg = OmegaConf.load(run / "config.yaml")
        log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
        folder = resolve_checkpoint(run)
        lines += [
            f"## {name}",
            "",
            f"Training: `cm-policy train task={cfg.task.name} method={cfg.method.name} "
            f"model=...` with down_dims {list(cfg.model.down_dims)}, {cfg.training.steps} steps "
            f"at batch {cfg.training.batch_size}, lr {cfg.training.lr}, dataset "
            f"`{Path(cfg.task.dataset_path).name}`; wall time {training_wall_s(log) / 60:.1f} min "
            f"(including periodic evaluations); checkpoint `{folder.name}`. Full config: "
            f"`{run / 'config.yaml'}`.",
            "",
            "| seeds | steps | mean_score | 95% CI | success | 95% CI |",
            "|---|---|---|---|---|---|",
        ]
        for row in evaluate_run(run, args.n_envs):
            lo, hi = row["mean_score_ci95"]
            slo, shi = row["success_rate_ci95"]
            lines.append(
                f"| {row['n_episodes']} | {row['steps']} | {row['mean_score']:.3f} | "
                f"[{lo:.3f}, {hi:.3f}] | {row['success_rate']:.3f} | [{slo:.3f}, {shi:.3f}] |"
            )
        lines.append("")
        steps = [r["step"] for r in log]
        axes[0].plot(steps, [r["loss_fm"] for r in log], label=f"{name} L_FM")
        axes[0].plot(steps, [r["loss_sd"] for r in log], label=f"{name} L_SD", ls="--")
        history = sorted((run / "eval").glob("step_*/metrics.json"))
        if history:
            xs = [int(p.parent.name.split("_")[1]) for p in history]
            ys = [json.loads(p.read_text())["mean_score"] for p in history]
            axes[1].plot(xs, ys, "o-", label=f"{name} (50 seeds, 1 step)")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].set_title("raw loss terms")
    axes[0].legend(fontsize=7)
    axes[1].set_xlabel("step")
    axes[1].set_ylim(0, 1)
    axes[1].set_title("closed-loop mean_score during training (EMA)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "pusht_isd.png", dpi=110)
    lines += ["![learning curves](pusht_isd.png)", ""]
    (out / "pusht_isd.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
