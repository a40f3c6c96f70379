"""Measurements the campaigns build on: training logs and gradient statistics, step
costs measured side by side, sample spread, latency per chunk, one cached evaluation per sampler
setting, and pooled intervals. Plans, orchestration and reports:
:mod:`cm_policy.experiments.campaign`.

A sampler setting is a label made by the method (:meth:`~cm_policy.methods.base.Method.label`):
``"N"`` (N network evaluations of the method's sampler) or ``"kind:N"`` for a method with several
sampler kinds (``"ddim:10"``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cm_policy.atomic import write_json_atomic
from cm_policy.stats import wilson_interval

# A training run's step costs more than step_costs' bare steps (batches drawn on the fly, EMA
# update, a log line every step, checkpoints): the factor that plans with step costs use.
RUN_OVERHEAD = 1.3


def read_log(run_dir: Path) -> list[dict]:
    path = run_dir / "train_log.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def train_run(cfg: Any, run_dir: Path) -> None:
    """Train, or continue an interrupted run from its latest checkpoint."""
    from omegaconf import OmegaConf

    from cm_policy.training.trainer import train

    latest = run_dir / "checkpoints" / "latest"
    if latest.exists():
        done = int(latest.read_text().strip().split("_")[1])
        if done >= cfg.training.steps:
            return
        cfg = OmegaConf.merge(cfg, {"resume": str(run_dir)})
    train(cfg)


def grad_stats(log: Sequence[dict]) -> dict[str, float]:
    norms = np.array([r["grad_norm"] for r in log], dtype=float)
    finite = norms[np.isfinite(norms)]
    return {
        "grad_median": float(np.median(finite)) if finite.size else math.nan,
        "grad_p99": float(np.percentile(finite, 99)) if finite.size else math.nan,
        "grad_max": float(finite.max()) if finite.size else math.nan,
        "nonfinite_steps": int((~np.isfinite(norms)).sum()),
        "wall_s": float(log[-1]["wall_s"]) if log else math.nan,
    }


def interval_stats(log: Sequence[dict], after: int, upto: int) -> dict[str, Any]:
    """Stability evidence of the training steps ``after < step <= upto`` of a run's log: the
    gradient-norm statistics (:func:`grad_stats`) and, for each raw loss term the method logs,
    its mean over the interval and over the interval's last tenth (where it ended up)."""
    rows = [r for r in log if after < r["step"] <= upto]
    out: dict[str, Any] = {"steps": [after, upto], "logged_steps": len(rows)}
    if not rows:
        return out
    out.update(grad_stats(rows))
    skip = {"step", "grad_norm", "nonfinite_grad_frac", "lr", "wall_s"}
    tail = rows[-max(1, len(rows) // 10) :]
    out["loss"] = {
        key: {
            "mean": float(np.mean([r[key] for r in rows])),
            "last_tenth": float(np.mean([r[key] for r in tail])),
        }
        for key in rows[0]
        if key not in skip
    }
    out["lr_last"] = float(rows[-1]["lr"])
    return out


def checkpoint_walls(run_dir: Path, log: Sequence[dict]) -> dict[int, float]:
    """Training wall time at each kept checkpoint."""
    wall = {r["step"]: r["wall_s"] for r in log}
    steps = [int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*")]
    return {s: wall[s] for s in sorted(steps) if s in wall}


def step_costs(cfgs: dict[str, Any], rounds: int = 3, steps: int = 4) -> dict[str, float]:
    """Seconds per training step of each method's config, measured side by side.

    The methods take turns (``rounds`` times ``steps`` timed steps each, after a warm-up), so a
    slow spell of a shared machine hits them alike; the median per method is returned. The
    equal-wall-time view uses these, not the long runs' wall clocks, which another process on
    the machine can stretch.
    """
    from cm_policy.device import resolve_device
    from cm_policy.policy import Policy
    from cm_policy.training.data import TrainingData, fit_normalizer
    from cm_policy.training.trainer import policy_spec

    first = next(iter(cfgs.values()))
    torch.set_num_threads(int(first.training.num_threads))
    device = resolve_device(str(first.training.device))
    data = TrainingData(first)
    normalizer = fit_normalizer(first, data)
    rng = np.random.default_rng(0)
    setups = {}
    for name, cfg in cfgs.items():
        torch.manual_seed(0)
        policy = Policy(policy_spec(cfg, data), normalizer).to(device)
        policy.method.set_progress(0, int(cfg.training.steps))
        setups[name] = (policy, torch.optim.AdamW(policy.parameters(), lr=1e-4))
    batch = int(first.training.batch_size)
    times: dict[str, list[float]] = {name: [] for name in cfgs}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for r in range(rounds + 1):
        for name, (policy, optimizer) in setups.items():
            batches = [
                data.windows(data.draw(rng, batch), policy.n_obs_steps, device)
                for _ in range(steps)
            ]
            sync()
            started = time.perf_counter()
            for obs, action in batches:
                loss, _ = policy.compute_loss(obs, action)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            sync()
            if r:  # round 0 warms up
                times[name].append((time.perf_counter() - started) / steps)
    return {name: float(np.median(t)) for name, t in times.items()}


@torch.no_grad()
def chunk_spread(policy: Any, cfg, sampler: str, n_obs: int = 64, n_draws: int = 16) -> dict:
    """Degeneracy check: for fixed observations, how much do chunks vary across noise draws?

    Returns, in normalised action units, the std across draws (mean over observations and chunk
    elements) and the RMS error of the draws against the demonstrated chunk.
    """
    from cm_policy.training.data import TrainingData

    data = TrainingData(cfg)
    rows = data.draw(np.random.default_rng(12345), n_obs)
    obs, action = data.windows(rows, policy.n_obs_steps, next(policy.parameters()).device)
    kind, steps = policy.method.parse_label(sampler)
    gen = torch.Generator().manual_seed(0)
    cond = policy.obs_encoder(policy.normalize_obs(obs))
    cond = cond.repeat_interleave(n_draws, dim=0)
    shape = (n_obs * n_draws, policy.horizon, policy.action_dim)
    chunks = policy.method.sample(policy.net, cond, shape, steps, gen, kind)
    chunks = chunks.view(n_obs, n_draws, policy.horizon, policy.action_dim)
    target = policy.normalizer.normalize("action", action).unsqueeze(1)
    return {
        "spread": float(chunks.std(dim=1).mean()),
        "rmse_to_demo": float((chunks - target).pow(2).mean().sqrt()),
    }


@torch.no_grad()
def chunk_latency_ms(policy: Any, sampler: str, repeats: int = 30) -> float:
    """Median wall time of ``predict_action`` at batch 1 (after a warm-up)."""
    kind, steps = policy.method.parse_label(sampler)
    rng = np.random.default_rng(0)
    obs = {
        k: rng.standard_normal((1, policy.n_obs_steps, d)).astype(np.float32)
        for k, d in policy.low_dim.items()
    }
    for k, shape in policy.image_shapes.items():
        obs[k] = rng.random((1, policy.n_obs_steps, *shape), dtype=np.float32)
    times = []
    for i in range(repeats + 3):
        started = time.perf_counter()
        policy.predict_action(obs, steps=steps, sampler=kind)
        if i >= 3:
            times.append(time.perf_counter() - started)
    return 1000 * float(np.median(times))


def evaluate_entry(
    policy: Any,
    sampler: str,
    seeds: Sequence[int],
    out: Path,
    n_envs: int | None = None,
    max_steps: int | None = None,
    layout: str | None = None,
    noise: str = "random",
) -> dict:
    """Metrics of ``policy`` at sampler setting ``sampler`` on ``seeds``, written to ``out``
    (read back if there); envs, layout and horizon default to the task's."""
    from cm_policy.evaluation.runner import evaluate_policy

    metrics_file = out / "metrics.json"
    if metrics_file.exists():
        return json.loads(metrics_file.read_text())
    kind, steps = policy.method.parse_label(sampler)
    return evaluate_policy(
        policy,
        seeds,
        out,
        steps=steps,
        sampler=kind,
        noise=noise,
        n_envs=n_envs,
        layout=layout,
        n_videos=0,
        max_steps=max_steps,
        progress=False,
        extra={"label": sampler},
        resume=True,  # a stopped campaign keeps the waves of episodes it finished
    )


def cached(path: Path, compute: Callable[[], Any]) -> Any:
    """``compute()``'s JSON value, computed once: read back from ``path`` when it is there,
    else written atomically (an interrupted write leaves no half file behind)."""
    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    write_json_atomic(path, value, indent=2)
    return value


def pooled(entries: Sequence[dict]) -> dict:
    """Pool per-seed evaluations (each with n episodes) into one mean and a 95% interval."""
    n = sum(e["n_episodes"] for e in entries)
    score = sum(e["mean_score"] * e["n_episodes"] for e in entries) / n
    success = sum(e["success_rate"] * e["n_episodes"] for e in entries) / n
    # Interval half-widths from the per-seed intervals, combined as independent estimates.
    half = math.sqrt(
        sum(
            ((e["mean_score_ci95"][1] - e["mean_score_ci95"][0]) / 2 * e["n_episodes"] / n) ** 2
            for e in entries
        )
    )
    return {
        "n": n,
        "score": score,
        "score_half": half,
        "success": success,
        "success_ci": tuple(float(v) for v in np.clip(wilson_interval(success, n), 0.0, 1.0)),
        "score_seed_std": float(np.std([e["mean_score"] for e in entries], ddof=1))
        if len(entries) > 1
        else math.nan,
        "success_seed_std": float(np.std([e["success_rate"] for e in entries], ddof=1))
        if len(entries) > 1
        else math.nan,
    }
