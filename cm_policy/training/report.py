"""A Markdown report of a run: budget, wall time, closed-loop metrics, plots and videos."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from cm_policy.atomic import write_text_atomic
from cm_policy.evaluation.machine import describe_machine
from cm_policy.tasks import load_task


def eval_max_steps(cfg: DictConfig) -> int:
    """The step limit of the evaluation's episodes: ``eval.max_steps``, or when the config
    leaves it null the task's own evaluation horizon (what the runner uses then)."""
    max_steps = cfg.eval.max_steps
    return int(load_task(cfg.task).horizon if max_steps is None else max_steps)


def write_report(run_dir: Path, cfg: DictConfig, metrics: dict[str, Any]) -> Path:
    log = [json.loads(x) for x in (run_dir / "train_log.jsonl").read_text().splitlines()]
    wall = log[-1]["wall_s"] if log else float("nan")
    eval_dir = run_dir / "eval_final"
    videos = sorted(p.relative_to(run_dir) for p in (eval_dir / "videos").glob("*.mp4"))
    lo, hi = metrics["mean_score_ci95"]
    slo, shi = metrics["success_rate_ci95"]
    lines = [
        f"# {cfg.task.name} / {cfg.method.name}: run report",
        "",
        f"- Dataset: `{cfg.task.dataset_path}`",
        f"- Training: {cfg.training.steps} steps at batch {cfg.training.batch_size}, "
        f"model {list(cfg.model.down_dims)}, seed {cfg.seed}, wall time {wall / 60:.1f} min",
        f"- Machine: {describe_machine()}, {torch.get_num_threads()} torch threads",
        "",
        f"## Closed-loop evaluation (EMA weights, {metrics['steps']} network step(s) per chunk)",
        "",
        f"Test seeds {metrics['seeds'][0]}..{metrics['seeds'][1]} "
        f"({metrics['n_episodes']} episodes, max {eval_max_steps(cfg)} steps).",
        "",
        "| metric | value | 95% interval |",
        "|---|---|---|",
        f"| mean_score | {metrics['mean_score']:.3f} | [{lo:.3f}, {hi:.3f}] |",
        f"| success rate | {metrics['success_rate']:.3f} | [{slo:.3f}, {shi:.3f}] |",
        "",
        "![learning curves](learning_curves.png)",
        "",
        "![evaluation summary](eval_final/summary.png)",
        "",
        "Videos: " + ", ".join(f"[{v.name}]({v})" for v in videos),
        "",
    ]
    out = run_dir / "report.md"
    write_text_atomic(out, "\n".join(lines))
    return out
