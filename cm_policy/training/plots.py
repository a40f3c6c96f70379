"""Learning-curve plots from a run's ``train_log.jsonl`` and evaluation history."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def logged_loss_terms(run_dir: Path) -> tuple[str, ...]:
    """The raw loss terms the run's method declares (its ``loss_keys``)."""
    from omegaconf import OmegaConf

    from cm_policy.methods import method_type

    return method_type(str(OmegaConf.load(run_dir / "config.yaml").method.name)).loss_keys


def plot_learning_curves(run_dir: str | Path) -> Path:
    """Raw loss terms, gradient norm, learning rate and eval scores -> learning_curves.png."""
    run_dir = Path(run_dir)
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    evals = []
    for metrics in sorted((run_dir / "eval").glob("step_*/metrics.json")):
        m = json.loads(metrics.read_text())
        evals.append((int(metrics.parent.name.split("_")[1]), m["mean_score"], m["success_rate"]))
    steps = [r["step"] for r in log]
    final = run_dir / "eval_final" / "metrics.json"
    if final.exists() and not any(e[0] == steps[-1] for e in evals):
        m = json.loads(final.read_text())
        evals.append((steps[-1], m["mean_score"], m["success_rate"]))
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    for key in (*logged_loss_terms(run_dir), "loss"):
        if key in log[0]:
            axes[0].plot(steps, [r[key] for r in log], label=key)
    axes[0].set_yscale("log")
    axes[0].set_title("raw loss terms")
    axes[0].legend()
    axes[1].plot(steps, [r["grad_norm"] for r in log], color="tab:red")
    axes[1].set_yscale("log")
    axes[1].set_title("gradient norm (before clipping)")
    axes[2].plot(steps, [r["lr"] for r in log], color="tab:gray")
    axes[2].set_title("learning rate")
    if evals:
        es, score, success = zip(*evals, strict=True)
        axes[3].plot(es, score, "o-", label="mean_score")
        axes[3].plot(es, success, "s-", label="success rate")
        axes[3].set_ylim(0, 1.02)
        axes[3].legend()
    axes[3].set_title("closed-loop eval (EMA)")
    for ax in axes:
        ax.set_xlabel("step")
    fig.tight_layout()
    out = run_dir / "learning_curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
