"""Learning-curve plots from a run's ``train_log.jsonl`` and evaluation history."""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from cm_policy.atomic import write_figure_atomic


def logged_loss_terms(run_dir: Path) -> tuple[str, ...]:
    """The raw loss terms the run's method declares (its ``loss_keys``)."""
    from omegaconf import OmegaConf

    from cm_policy.methods import method_type

    return method_type(str(OmegaConf.load(run_dir / "config.yaml").method.name)).loss_keys


def eval_folder_step(name: str) -> tuple[int, str] | None:
    """(training step, label) from an evaluation folder's name: the trainer's ``step_000500``
    (label ``""``) or a campaign mark's ``step32900_1`` (label ``1``, the sampler); None for any
    other name."""
    match = re.fullmatch(r"step_?(\d+)(?:_(.+))?", name)
    return (int(match.group(1)), match.group(2) or "") if match else None


def eval_history(run_dir: str | Path, last_step: int) -> dict[str, list[tuple[int, float, float]]]:
    """(step, mean_score, success_rate) of every closed-loop evaluation of the run, by label:
    the trainer's periodic ones (``eval/step_000500``) and the final one (at ``last_step``, the
    log's last) under ``""``, a campaign's marks (``eval/step32900_1``: label ``1``, the
    sampler) under theirs."""
    run_dir = Path(run_dir)
    history: dict[str, list[tuple[int, float, float]]] = {}
    for metrics in (run_dir / "eval").glob("step*/metrics.json"):
        parsed = eval_folder_step(metrics.parent.name)
        if parsed is None:
            continue
        m = json.loads(metrics.read_text())
        history.setdefault(parsed[1], []).append((parsed[0], m["mean_score"], m["success_rate"]))
    final = run_dir / "eval_final" / "metrics.json"
    if final.exists() and not any(e[0] == last_step for e in history.get("", [])):
        m = json.loads(final.read_text())
        history.setdefault("", []).append((last_step, m["mean_score"], m["success_rate"]))
    return {label: sorted(entries) for label, entries in sorted(history.items())}


def plot_learning_curves(run_dir: str | Path) -> Path:
    """Raw loss terms, gradient norm, learning rate and eval scores -> learning_curves.png."""
    run_dir = Path(run_dir)
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in log]
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
    for label, entries in eval_history(run_dir, steps[-1]).items():
        es, score, success = zip(*entries, strict=True)
        suffix = f" (sampler {label})" if label else ""
        axes[3].plot(es, score, "o-", label=f"mean_score{suffix}")
        axes[3].plot(es, success, "s--", label=f"success rate{suffix}")
    if axes[3].lines:
        axes[3].set_ylim(0, 1.02)
        axes[3].legend(fontsize=7)
    else:
        axes[3].text(0.5, 0.5, "no closed-loop evaluation yet", ha="center", va="center")
    axes[3].set_title("closed-loop eval (EMA)")
    for ax in axes:
        ax.set_xlabel("step")
    fig.tight_layout()
    out = run_dir / "learning_curves.png"
    write_figure_atomic(out, fig, dpi=110)
    plt.close(fig)
    return out
