"""The method comparison: same network, data, batch, optimiser and steps for every method.

For each selected method and training seed the harness trains a policy with the package's trainer
(every step logged, so gradient-norm statistics are exact), then evaluates it closed-loop at the
method's evaluated sampler settings on shared test seeds, measures its latency per action chunk,
and checks for degenerate solutions (how much the sampled chunks vary across noise draws for one
observation). A second view compares methods at equal training wall time: each method's latest
checkpoint that fits within the fastest method's wall time is evaluated too.

Everything is resumable: a finished training run, evaluation or measurement is read back, not
redone. ``eval/compare.py`` is the command line; :func:`write_report` writes the markdown and PNGs.
The methods, their sampler settings and logged loss terms come from the method registry.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cm_policy.configs import compose
from cm_policy.evaluation.machine import describe_machine
from cm_policy.experiments.measure import (
    RUN_OVERHEAD,
    cached,
    checkpoint_walls,
    chunk_latency_ms,
    chunk_spread,
    evaluate_entry,
    grad_stats,
    pooled,
    read_log,
    step_costs,
    train_run,
)
from cm_policy.methods import METHODS, make_method
from cm_policy.tasks import load_task

# Compared entries that are a registered method with other settings: label -> (method, overrides).
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "meanflow_noadapt": ("meanflow", ["method.adaptive_p=0"]),
}


def method_of(label: str) -> str:
    """The registered method behind a compared entry."""
    name = VARIANTS.get(label, (label, []))[0]
    if name not in METHODS:
        raise ValueError(
            f"unknown method {label!r}; expected one of {sorted([*METHODS, *VARIANTS])}"
        )
    return name


def method_overrides(label: str) -> list[str]:
    return [f"method={method_of(label)}", *VARIANTS.get(label, (label, []))[1]]


def headline(label: str) -> str:
    """The sampler setting the entry's method is known by (its config's default)."""
    return make_method(method_of(label)).headline


def all_entries() -> list[str]:
    return [*METHODS, *VARIANTS]


@dataclass(frozen=True)
class Budget:
    model: str
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    seeds: tuple[int, ...]
    episodes_per_seed: int
    n_envs: int
    max_steps: int = 300
    n_snapshots: int = 5  # checkpoints kept for the equal-wall-time view
    threads: int = 2  # torch threads for training
    overrides: tuple[str, ...] = field(default_factory=tuple)
    # "sync": all envs in the evaluating process (no IPC; for cheap physics such as PushT's,
    # with a large n_envs = inference batch); "async": one process per env (robosuite).
    vector: str = "async"
    # Evaluated samplers per method where not METHODS' full list (to fit a CPU budget).
    samplers: dict[str, list[str]] | None = None

    def samplers_of(self, method: str) -> list[str]:
        default = METHODS[method_of(method)].eval_samplers
        return list((self.samplers or {}).get(method, default))


BUDGETS = {
    # Pytest: seconds on 2 CPU cores, checks that the machinery runs.
    "tiny": Budget(
        model="unet_tiny",
        steps=4,
        batch_size=8,
        lr=3e-4,
        warmup_steps=1,
        seeds=(0,),
        episodes_per_seed=2,
        n_envs=1,
        max_steps=16,
        n_snapshots=2,
        threads=1,
        overrides=("model.down_dims=[16,32]", "model.time_embed_dim=16"),
    ),
    # About 1.5 h on 2 CPU cores for PushT keypoints (67 min of 1-thread training by the measured
    # step costs, ~25 min of evaluation); 500 episodes per entry (250 per seed).
    # One training thread: a 2-thread run slows down up to 10x whenever anything else runs.
    "small": Budget(
        model="unet_tiny",
        steps=1000,
        batch_size=128,
        lr=3e-4,
        warmup_steps=100,
        seeds=(0, 1),
        episodes_per_seed=250,
        n_envs=50,
        vector="sync",
        threads=1,
        samplers={
            "isd": ["1", "2"],
            "ddpm": ["ddpm:100", "ddim:10"],
            "flow": ["1", "16"],
            "meanflow": ["1"],
            "meanflow_noadapt": ["1"],
            "ict": ["1"],
        },
    ),
    # Robomimic low-dim tasks on 2 CPU cores: robomimic's protocol (50 seeded initial states,
    # 400 steps), one training seed.
    "robomimic_small": Budget(
        model="unet_tiny",
        steps=2000,
        batch_size=128,
        lr=3e-4,
        warmup_steps=100,
        seeds=(0,),
        episodes_per_seed=50,
        n_envs=2,
        max_steps=400,
        threads=1,
    ),
    # Robomimic low-dim tasks on one GPU within minutes (the machine's CPU cores run the envs):
    # the 5M-parameter U-Net at a larger batch. A short GPU session sets --steps from step costs
    # it measures first (eval/gpu_robomimic.sh).
    "robomimic_gpu": Budget(
        model="unet_cpu",
        steps=8000,
        batch_size=512,
        lr=3e-4,
        warmup_steps=200,
        seeds=(0,),
        episodes_per_seed=50,
        n_envs=25,
        max_steps=400,
        n_snapshots=4,
        threads=4,
        samplers={"isd": ["1", "2"], "ddpm": ["ddpm:100"]},
    ),
    # The same comparison at Diffusion Policy's scale, for one GPU.
    "large": Budget(
        model="unet_dp",
        steps=20000,
        batch_size=256,
        lr=1e-4,
        warmup_steps=500,
        seeds=(0, 1, 2),
        episodes_per_seed=500,
        n_envs=16,
        n_snapshots=10,
    ),
}

TEST_START = 100000


def sampler_label(method: str, sampler: str) -> str:
    kind, _, n = sampler.rpartition(":")
    return f"{kind}-{n}" if kind else f"{method}-{n}"


def n_evals(sampler: str) -> int:
    return int(sampler.rpartition(":")[2])


def training_config(
    task: str, method: str, budget: Budget, seed: int, dataset: str | None, run_dir: Path
) -> Any:
    b = budget
    overrides = [
        f"task={task}",
        *method_overrides(method),
        f"model={b.model}",
        *b.overrides,
        f"seed={seed}",
        f"output_dir={run_dir}",
        f"training.steps={b.steps}",
        f"training.batch_size={b.batch_size}",
        f"training.lr={b.lr}",
        f"training.warmup_steps={b.warmup_steps}",
        f"training.num_threads={b.threads}",
        "training.log_every=1",
        "training.eval_every=null",
        f"training.checkpoint_every={max(1, b.steps // b.n_snapshots)}",
        "training.keep_checkpoints=0",
        f"eval.max_steps={b.max_steps}",
    ]
    if dataset:
        overrides.append(f"task.dataset_path={dataset}")
    return compose("config", overrides)


def plan_steps(
    costs: dict[str, float], methods: Sequence[str], n_seeds: int, seconds: float
) -> int:
    """Training steps (a multiple of 100, at least 100) with which every (method, seed) run
    trains within ``seconds`` together, from bare step costs times ``RUN_OVERHEAD``."""
    missing = sorted(set(methods) - set(costs))
    if missing:
        raise ValueError(f"no step cost for {missing}; measured: {sorted(costs)}")
    per_step = RUN_OVERHEAD * sum(costs[m] for m in methods) * n_seeds
    return max(100, int(seconds / per_step) // 100 * 100)


def run_compare(
    task: str,
    budget_name: str,
    methods: Sequence[str],
    out_dir: str | Path,
    dataset: str | None = None,
    seeds: Sequence[int] | None = None,
    n_envs: int | None = None,
    samplers: dict[str, list[str]] | None = None,
    device: str = "auto",
    train_seconds: float | None = None,
    **changes: Any,
) -> dict:
    """Train and evaluate every (method, seed); return the collected results (also saved).

    ``samplers`` ({method: [sampler, ...]}) narrows the budget's evaluated samplers; ``changes``
    replace budget fields (e.g. ``steps=5000``), and the report names the changed budget.
    ``device`` runs the evaluated policies (auto: the GPU when there is one); training uses
    the config's ``training.device`` (auto too). ``train_seconds`` replaces the budget's steps by
    as many as fit that training time for all runs together (a GPU session's fixed time).
    """
    from tqdm import tqdm

    from cm_policy.checkpoint import load_policy

    for method in methods:
        method_of(method)
    if budget_name not in BUDGETS:
        raise ValueError(f"unknown budget {budget_name!r}; expected one of {sorted(BUDGETS)}")
    budget = BUDGETS[budget_name]
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(Budget)})
    if unknown:
        raise ValueError(f"unknown budget fields {unknown}; expected Budget's fields")
    budget = dataclasses.replace(budget, **changes)
    if samplers:
        budget = dataclasses.replace(budget, samplers={**(budget.samplers or {}), **samplers})
    seeds = tuple(seeds) if seeds else budget.seeds
    n_envs = n_envs or budget.n_envs
    out = Path(out_dir)
    runs = {(m, s): out / f"{m}_s{s}" for s in seeds for m in methods}  # seed by seed
    runs_first = next(iter(runs))
    if train_seconds:
        # As many steps as let every run train within train_seconds, by step costs measured
        # first (cached: a resumed comparison keeps its steps).
        probe = {m: training_config(task, m, budget, seeds[0], dataset, out) for m in methods}
        costs = cached(out / "step_costs.json", lambda: step_costs(probe))
        steps = plan_steps(costs, methods, len(seeds), train_seconds)
        print(f"== {steps} steps fit {train_seconds:g} s of training")
        budget = dataclasses.replace(budget, steps=steps)
        changes = {**changes, "steps": steps}
    cfgs = {}
    for (method, seed), run_dir in runs.items():
        cfgs[method, seed] = training_config(task, method, budget, seed, dataset, run_dir)
        print(f"== train {method} seed {seed} -> {run_dir}")
        train_run(cfgs[method, seed], run_dir)

    logs = {key: read_log(run_dir) for key, run_dir in runs.items()}
    # Equal wall time: the fastest method's training time is everyone's budget, from per-step
    # costs measured side by side (the long runs' clocks include whatever else ran meanwhile).
    costs = cached(
        out / "step_costs.json",
        lambda: step_costs({m: cfgs[m, seeds[0]] for m in methods}),
    )
    wall_budget = min(costs[m] for m in methods) * budget.steps
    torch.set_num_threads(1)  # the env workers use the other core
    n_work = sum(len(budget.samplers_of(m)) + 1 for m in methods) * len(seeds)
    bar = tqdm(total=n_work, desc="evaluate")
    results: dict[str, Any] = {"runs": {}}
    for (method, seed), run_dir in runs.items():
        k = seeds.index(seed)
        test_seeds = list(
            range(
                TEST_START + k * budget.episodes_per_seed,
                TEST_START + (k + 1) * budget.episodes_per_seed,
            )
        )
        policy = load_policy(run_dir, weights="ema", device=device)
        entries = {}
        for sampler in budget.samplers_of(method):
            tag = sampler.replace(":", "")
            metrics = evaluate_entry(
                policy,
                sampler,
                test_seeds,
                run_dir / "compare" / tag,
                n_envs,
                budget.max_steps,
                budget.vector,
            )
            latency = cached(
                run_dir / "compare" / f"{tag}_latency.json",
                lambda s=sampler, p=policy: {"latency_ms": chunk_latency_ms(p, s)},
            )
            entries[sampler] = {**metrics, **latency}
            bar.update()
        known_by = headline(method)
        degeneracy = cached(
            run_dir / "compare" / "spread.json",
            lambda h=known_by, p=policy, c=cfgs[method, seed]: chunk_spread(p, c, h),
        )
        walls = checkpoint_walls(run_dir, logs[method, seed])
        affordable = wall_budget / costs[method]  # steps this method makes in the budget
        snap = max([s for s in walls if s <= affordable * 1.001] or [min(walls)])
        if snap == budget.steps and known_by in entries:  # the fastest method: already done
            equal_wall = {k: v for k, v in entries[known_by].items() if k != "latency_ms"}
        else:
            wall_dir = run_dir / "compare" / f"wall_step{snap}_{known_by.replace(':', '')}"
            if (wall_dir / "metrics.json").exists():  # done: the snapshot's weights not needed
                equal_wall = json.loads((wall_dir / "metrics.json").read_text())
            else:
                snap_policy = load_policy(
                    run_dir / "checkpoints" / f"step_{snap:07d}", weights="ema", device=device
                )
                equal_wall = evaluate_entry(
                    snap_policy,
                    known_by,
                    test_seeds,
                    wall_dir,
                    n_envs,
                    budget.max_steps,
                    budget.vector,
                )
        bar.update()
        results["runs"][f"{method}_s{seed}"] = {
            "method": method,
            "seed": seed,
            "entries": entries,
            "train": grad_stats(logs[method, seed]),
            "degeneracy": {"sampler": known_by, **degeneracy},
            "equal_wall": {"step": snap, "affordable_steps": affordable, **equal_wall},
        }
    bar.close()
    results.update(
        {
            "task": task,
            "out_dir": str(out),
            "budget": budget_name + "".join(f" {k}={v}" for k, v in sorted(changes.items())),
            "budget_detail": budget.__dict__ | {"seeds": list(seeds), "n_envs": n_envs},
            "methods": list(methods),
            "samplers": {m: budget.samplers_of(m) for m in methods},
            "wall_budget_s": wall_budget,
            "train_seconds": train_seconds,
            "step_costs_s": costs,
            "machine": describe_machine(),
            "success_rule": load_task(cfgs[runs_first].task).success_rule,
        }
    )
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


def fmt(value: float, digits: int = 3) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def write_report(
    results: dict, results_dir: str | Path, command: str, notes: str = "", name: str | None = None
) -> Path:
    """``<name>.md`` (default ``compare_<task>``) and PNGs from :func:`run_compare` results."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    task, methods = results["task"], results["methods"]
    runs = results["runs"]
    by_method = {m: [r for r in runs.values() if r["method"] == m] for m in methods}
    b = results["budget_detail"]
    stem = name or f"compare_{task}"
    lines = [
        f"# Method comparison on {task}",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {results['machine']}.",
        "",
        f"Budget `{results['budget']}`, identical for every method: model `{b['model']}`"
        f"{' ' + ' '.join(b['overrides']) if b['overrides'] else ''}, {b['steps']} gradient "
        f"steps at batch {b['batch_size']}, AdamW lr {b['lr']} (warm-up {b['warmup_steps']}, "
        f"cosine), same data and observation encoder; training seeds {b['seeds']}. "
        f"Each training seed is evaluated on its own {b['episodes_per_seed']} test seeds "
        f"(from {TEST_START}), the same ones for every method, so each row pools "
        f"{b['episodes_per_seed'] * len(b['seeds'])} episodes. EMA weights, "
        f"{b['max_steps']} env steps per episode. mean_score = mean of each episode's max "
        "reward; success = " + results["success_rule"] + ". +- is the 95% interval of the pooled "
        "mean_score, [a, b] the 95% Wilson interval of the pooled success rate; 'seed "
        "spread' is the standard deviation of the per-seed means. Latency: "
        "median `predict_action` time for one observation (batch 1, "
        + ("on the GPU)." if "GPU" in results["machine"] else "1 torch thread)."),
        "",
        *(
            [
                f"The {b['steps']} steps are what fit {results['train_seconds']:g} s of training "
                f"for all runs together (`--train-seconds`), planned from the step costs below "
                f"times {RUN_OVERHEAD} (data, EMA and logging overhead).",
                "",
            ]
            if results.get("train_seconds")
            else []
        ),
        "## Same number of gradient steps",
        "",
        "| method | sampler | NFE | mean_score | seed spread | success | latency / chunk (ms) "
        "| train step (ms) | training wall (min) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    curves: dict[str, list[tuple[int, float, float, float]]] = {}
    for m in methods:
        rs = by_method[m]
        wall = np.mean([r["train"]["wall_s"] for r in rs]) / 60
        for sampler in results["samplers"][m]:
            entries = [r["entries"][sampler] for r in rs]
            p = pooled(entries)
            latency = float(np.mean([e["latency_ms"] for e in entries]))
            curves.setdefault(m, []).append(
                (n_evals(sampler), p["score"], p["score_half"], latency)
            )
            lines.append(
                f"| {m} | {sampler_label(m, sampler)} | {n_evals(sampler)} | "
                f"{p['score']:.3f} +- {p['score_half']:.3f} | {fmt(p['score_seed_std'])} | "
                f"{p['success']:.3f} [{p['success_ci'][0]:.3f}, {p['success_ci'][1]:.3f}] | "
                f"{latency:.2f} | "
                f"{1000 * results['step_costs_s'][m]:.0f} | {wall:.1f} |"
            )
    lines += [
        "",
        "## Equal training wall time",
        "",
        f"Every method gets the fastest method's training time "
        f"({results['wall_budget_s'] / 60:.1f} min = its step time x {b['steps']} steps): "
        "its latest checkpoint within that time (checkpoints every "
        f"{max(1, b['steps'] // b['n_snapshots'])} steps; EMA weights, the learning rate not "
        "yet annealed) is evaluated at the method's usual sampler (for the fastest method that "
        "is its final checkpoint: its row above is reused). Step times ('train step' "
        "above) are measured side by side in one process, the methods taking turns, so they "
        "compare fairly even where the long runs' wall clocks ('training wall') were stretched "
        "by other work on the machine.",
        "",
        "| method | sampler | steps reached (per seed) | mean_score | success |",
        "|---|---|---|---|---|",
    ]
    for m in methods:
        rs = by_method[m]
        p = pooled([r["equal_wall"] for r in rs])
        reached = ", ".join(str(r["equal_wall"]["step"]) for r in rs)
        lines.append(
            f"| {m} | {sampler_label(m, headline(m))} | {reached} | "
            f"{p['score']:.3f} +- {p['score_half']:.3f} | {p['success']:.3f} |"
        )
    lines += [
        "",
        "## Stability",
        "",
        "Gradient norm of every training step (before any clipping; none is applied), over all "
        "seeds' steps: median, 99th percentile, max, the spikiness ratios p99/median and "
        "max/median (worst seed; they do not depend on the loss's scale, which the adaptive "
        "weights of isd and meanflow change: dividing each sample's loss by ~(loss + c) "
        "multiplies the gradient by ~1/(loss + c)), and the number of steps with a non-finite "
        "gradient. Degeneracy: 64 training observations, 16 noise draws each, at the method's "
        "usual sampler; 'spread' is the std of the sampled chunks across draws (normalised "
        "action units, mean over observations and chunk elements): a collapsed generator gives "
        "~0 whatever the noise; 'RMSE to demo' is the error of the draws against the "
        "demonstrated chunk.",
        "",
        "| method | grad median | grad p99 | grad max | p99 / median | max / median "
        "| non-finite steps | spread | RMSE to demo |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        rs = by_method[m]
        stats = [r["train"] for r in rs]
        lines.append(
            f"| {m} | {np.median([s['grad_median'] for s in stats]):.3g} | "
            f"{max(s['grad_p99'] for s in stats):.3g} | {max(s['grad_max'] for s in stats):.3g} | "
            f"{max(s['grad_p99'] / s['grad_median'] for s in stats):.2f} | "
            f"{max(s['grad_max'] / s['grad_median'] for s in stats):.2f} | "
            f"{sum(s['nonfinite_steps'] for s in stats)} | "
            f"{np.mean([r['degeneracy']['spread'] for r in rs]):.3f} | "
            f"{np.mean([r['degeneracy']['rmse_to_demo'] for r in rs]):.3f} |"
        )
    lines += ["", f"![gradient norms]({stem}_grad.png)", "", f"![loss terms]({stem}_loss.png)"]
    lines += ["", f"![score vs steps and latency]({stem}_score.png)", ""]
    if notes:
        lines += ["## What the numbers show", "", notes.strip(), ""]

    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    fig, ax = plt.subplots(figsize=(9, 4))
    fig_l, ax_l = plt.subplots(figsize=(9, 4))
    for m in methods:
        for r in by_method[m]:
            log = read_log(Path(results.get("out_dir", ".")) / f"{m}_s{r['seed']}")
            if not log:
                continue
            steps = np.array([x["step"] for x in log])
            g = np.array([x["grad_norm"] for x in log], dtype=float)
            label = m if r["seed"] == b["seeds"][0] else None
            ax.plot(steps, g, color=colors[m], alpha=0.5, lw=0.6, label=label)
            loss_keys = METHODS[method_of(m)].loss_keys
            for key, style in zip(loss_keys, ("-", "--", ":"), strict=False):
                if key in log[0]:
                    v = np.array([x[key] for x in log], dtype=float)
                    k = min(25, len(v))
                    smooth = np.convolve(v, np.ones(k) / k, mode="valid")
                    ax_l.plot(
                        steps[k - 1 :],
                        smooth,
                        color=colors[m],
                        ls=style,
                        lw=0.9,
                        label=f"{m} {key}" if label else None,
                    )
    for a, title in ((ax, "gradient norm per step"), (ax_l, "raw loss terms (25-step mean)")):
        a.set_yscale("log")
        a.set_xlabel("training step")
        a.set_title(title)
        a.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / f"{stem}_grad.png", dpi=110)
    fig_l.tight_layout()
    fig_l.savefig(out / f"{stem}_loss.png", dpi=110)
    plt.close(fig)
    plt.close(fig_l)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for m, pts in curves.items():
        pts = sorted(pts)
        x = [p[0] for p in pts]
        y = [p[1] for p in pts]
        err = [p[2] for p in pts]
        lat = [p[3] for p in pts]
        axes[0].errorbar(x, y, yerr=err, marker="o", capsize=3, color=colors[m], label=m)
        axes[1].errorbar(lat, y, yerr=err, marker="o", capsize=3, color=colors[m], label=m)
    axes[0].set_xlabel("network evaluations per action chunk")
    axes[1].set_xlabel("latency per action chunk, batch 1 (ms)")
    for a in axes:
        a.set_xscale("log")
        a.set_ylabel("mean_score")
        a.set_ylim(0, 1)
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"{stem}_score.png", dpi=110)
    plt.close(fig)
    path = out / f"{stem}.md"
    path.write_text("\n".join(lines))
    return path
