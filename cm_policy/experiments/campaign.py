"""Campaigns: long comparisons at equal training compute, resumable at any moment.

    cm-policy campaign eval/plans/pusht_recipe.yaml [--jobs 2] [--root DIR] [--report-only]
    cm-policy campaign PLAN --runs flow,regression --seeds 0   # train only these pairs now
    cm-policy campaign PLAN --device cuda --jobs 8 --threads 2 --n-envs 250 --results DIR

A plan (YAML) lists runs (a name, a method, training seeds, config overrides, sampler settings)
that share a task, a dataset, common overrides and a list of marks in minutes of one-thread
training compute. Each invocation:

1. measures every run's step cost side by side (``step_costs``: one process, one thread, the
   runs taking turns; cached in the results folder), so a mark of M minutes is the step
   ``M * 60 / cost`` of each run, rounded to the checkpoint grain: pauses, other jobs and machine
   noise do not move the x-axis;
2. works through the unfinished (run, seed) pairs in ``--jobs`` worker processes, one torch
   thread each (two on 2 cores; evaluation envs run in the same process): train to the next mark
   (``cm-policy train ... training.stop_after=STEP``, resuming from the latest checkpoint),
   evaluate that checkpoint's EMA weights with every sampler setting on the run seed's test
   episodes, cache the metrics, go on; the noise diagnostic (zero and mean-of-K initial noise)
   and the latency per chunk at the last mark;
3. rewrites the report (``<results>/<name>.md`` + PNG) from whatever is finished.

A run may name ``reuse: OTHER_PLAN.yaml:RUN``, the same training finished in another plan (a
recipe study's winner in the main campaign): the two are checked to be identical (every override,
seed, test episode and mark), the other plan's caches are copied, and nothing is trained again
(``--no-reuse`` trains it anyway, e.g. on a GPU).

Relative paths in a plan (dataset, results, ``reuse``) and ``--root`` are relative to the folder
the campaign runs from: the repository's root for the plans under ``eval/plans/``.

Training state lives under ``--root`` (default ``runs/<name>``, git-ignored; weights are never
committed); the evaluations live in ``<results>/cache/*.json``, small files meant to be committed,
so a campaign whose run folders are lost still reports what it measured.

On a GPU (``--device cuda``, ``eval/gpu_campaign.sh``) the same plan trains to the same steps
(the marks come from the CPU step costs in ``step_costs.json``, copied along when ``--results``
points elsewhere), so the GPU curves share the CPU campaign's x-axis; each cache records the
machine and the setup that produced it, and the report names them.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import multiprocessing as mp
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from tqdm import tqdm

from cm_policy.atomic import write_figure_atomic, write_json_atomic, write_text_atomic

GRAIN_DEFAULT = 50  # checkpoint every this many steps; marks round to it


@dataclass
class RunSpec:
    name: str
    method: str
    seeds: list[int]
    overrides: list[str] = field(default_factory=list)
    samplers: list[str] = field(default_factory=list)  # default: the method's eval_samplers
    # "PLAN.yaml:RUN" (PLAN relative to the repository): the same training and evaluation finished
    # in another plan. Checked to be identical (overrides, seeds, test episodes, marks), then its
    # caches are used here instead of training the run again.
    reuse: str | None = None
    # The sampler of the noise diagnostic (one of the run's samplers; default: the method's
    # headline). DDPM's ancestral sampler draws fresh noise at every step, so zero *initial* noise
    # does not make it deterministic: its diagnostic belongs to DDIM (eta 0).
    noise_sampler: str | None = None


@dataclass
class Plan:
    name: str
    task: str
    dataset: str | None
    common: list[str]
    runs: list[RunSpec]
    results: Path
    # The marks, in minutes of one-thread training compute (each run's step cost turns them into
    # its own steps) or, for an equal-steps comparison, in training steps (the same for every
    # run): exactly one of the two.
    marks_min: list[float] = field(default_factory=list)
    marks_steps: list[int] = field(default_factory=list)
    episodes_per_seed: int = 250
    test_start: int = 100000
    # Envs per evaluation batch and how they run ("sync": in the evaluating process, for cheap
    # physics; "async": a process per env): None is the task's own default.
    n_envs: int | None = None
    layout: str | None = None
    grain: int = GRAIN_DEFAULT
    noise_draws: int = 4  # K of the mean-of-K noise diagnostic
    # Task metrics that are shares of all episodes (e.g. two-goal PushT's reached_A, between):
    # pooled over seeds and shown beside score and success.
    rate_metrics: list[str] = field(default_factory=list)
    # Two of the rate metrics whose balance matters (e.g. the two goals): the share of the first
    # among the episodes that count for either, with its Wilson interval.
    balance: list[str] = field(default_factory=list)
    # "run sampler" (e.g. "isd 1"): every other entry is compared with it at each mark, the
    # difference with its 95% interval.
    reference: str = ""
    # The questions the report answers, each in its own section from the cached figures:
    # {ask: TEXT, compare: [A, B]} (A minus B at each shared mark), {ask, trend: [A, ...]}
    # (each entry's change between marks and from its best mark to its last), {ask, flat: true}
    # (which curves are flat at their last mark), {ask, seeds: true} (how far the seeds differ).
    questions: list[dict] = field(default_factory=list)
    # The targets the report reads as met or not met, each with its numbers (see TARGET_KINDS):
    # {target: TEXT, not_below: [A, B], margin: M} (at the last mark both reached, A's mean_score
    # >= B's - M and its success level with or above B's), {target, reaches: A, score: S,
    # success: P, episodes: N} (at some mark over >= N episodes, mean_score >= S and success
    # >= P), {target, holds: [A, ...]} (no change between consecutive marks falls beyond its
    # 95% interval).
    targets: list[dict] = field(default_factory=list)
    notes: str = ""

    def __post_init__(self) -> None:
        # Fixed when the plan is read, so that a subset of its runs (--runs) keeps the test blocks.
        self.all_seeds = sorted({s for r in self.runs for s in r.seeds})

    @property
    def marks(self) -> list[float]:
        """The marks in the plan's own unit (minutes or steps)."""
        return self.marks_steps or self.marks_min

    @property
    def unit(self) -> str:
        return "steps" if self.marks_steps else "min"

    def seed_index(self, seed: int) -> int:
        """Training seed k evaluates on the k-th block of test episodes."""
        return self.all_seeds.index(seed)

    @staticmethod
    def load(path: Path, changes: Sequence[str] = ()) -> Plan:
        """The plan in ``path``, with ``changes`` (``FIELD=VALUE`` or ``runs.RUN.FIELD=VALUE``,
        the value in YAML) applied first: ``cm-policy campaign PLAN --set ...``."""
        raw = yaml.safe_load(path.read_text())
        apply_changes(raw, changes, path)
        expected = {f for f in Plan.__dataclass_fields__}
        unknown = sorted(set(raw) - expected)
        if unknown:
            raise SystemExit(f"{path}: unknown plan keys {unknown}; expected some of {expected}")
        run_fields = set(RunSpec.__dataclass_fields__)
        for r in raw["runs"]:
            if set(r) - run_fields:
                raise SystemExit(
                    f"{path}: run {r.get('name')!r} has unknown keys {sorted(set(r) - run_fields)};"
                    f" expected some of {sorted(run_fields)}"
                )
        runs = [RunSpec(**r) for r in raw.pop("runs")]
        names = [r.name for r in runs]
        if len(set(names)) != len(names):
            raise SystemExit(f"{path}: run names must be unique, got {names}")
        for r in runs:
            if r.noise_sampler and r.noise_sampler not in samplers_of(r):
                raise SystemExit(
                    f"{path}: run {r.name!r} noise_sampler={r.noise_sampler!r} is not one of its "
                    f"samplers {samplers_of(r)}"
                )
        balance = raw.get("balance", [])
        if balance and (len(balance) != 2 or not set(balance) <= set(raw.get("rate_metrics", []))):
            raise SystemExit(
                f"{path}: balance must name two of rate_metrics {raw.get('rate_metrics', [])}, "
                f"got {balance}"
            )
        entries = [f"{r.name} {label}" for r in runs for label in samplers_of(r)]
        if raw.get("reference") and raw["reference"] not in entries:
            raise SystemExit(
                f"{path}: reference must be one of the plan's 'run sampler' entries {entries}, "
                f"got {raw['reference']!r}"
            )
        for q in raw.get("questions", []):
            problem = question_problem(q, entries)
            if problem:
                raise SystemExit(f"{path}: question {q!r}: {problem}")
        for t in raw.get("targets", []):
            problem = target_problem(t, entries)
            if problem:
                raise SystemExit(f"{path}: target {t!r}: {problem}")
        raw["results"] = Path(raw.get("results", f"eval/results/{raw['name']}")).resolve()
        if bool(raw.get("marks_min")) == bool(raw.get("marks_steps")):
            raise SystemExit(
                f"{path}: give the marks either in minutes of training compute (marks_min) or in "
                "training steps (marks_steps, an equal-steps comparison), not both or neither"
            )
        raw["marks_min"] = sorted(float(m) for m in raw.get("marks_min", []))
        raw["marks_steps"] = sorted(int(m) for m in raw.get("marks_steps", []))
        return Plan(runs=runs, **raw)


QUESTION_KINDS = ("compare", "trend", "flat", "seeds")


def question_problem(question: Any, entries: list[str]) -> str | None:
    """What is wrong with a plan's question (None: nothing): an ``ask`` and exactly one kind,
    whose entries are the plan's 'run sampler' entries."""
    if not isinstance(question, dict) or not isinstance(question.get("ask"), str):
        return "expected a mapping with 'ask' (the question's text) and one of " + str(
            list(QUESTION_KINDS)
        )
    kinds = [k for k in question if k != "ask"]
    if len(kinds) != 1 or kinds[0] not in QUESTION_KINDS:
        return f"expected exactly one of {list(QUESTION_KINDS)} beside 'ask', got {kinds}"
    value = question[kinds[0]]
    if kinds[0] in ("flat", "seeds"):
        return None if value is True else f"{kinds[0]} takes true, got {value!r}"
    names = value if isinstance(value, list) else []
    wanted = 2 if kinds[0] == "compare" else None
    if not names or (wanted and len(names) != wanted) or set(names) - set(entries):
        return (
            f"{kinds[0]} takes {'two' if wanted else 'a list of'} of the plan's entries "
            f"{entries}, got {value!r}"
        )
    return None


# Each kind of target with the options it takes beside its entries: (required, optional).
TARGET_KINDS: dict[str, tuple[set[str], set[str]]] = {
    "not_below": (set(), {"margin"}),
    "reaches": ({"score", "success"}, {"episodes"}),
    "holds": (set(), set()),
}


def target_problem(target: Any, entries: list[str]) -> str | None:
    """What is wrong with a plan's target (None: nothing): a ``target`` text, exactly one kind of
    TARGET_KINDS naming the plan's entries (two for not_below, one for reaches, a list for
    holds), the options its kind requires and no others, numbers where numbers go."""
    if not isinstance(target, dict) or not isinstance(target.get("target"), str):
        return "expected a mapping with 'target' (its text) and one of " + str(list(TARGET_KINDS))
    kinds = [k for k in target if k in TARGET_KINDS]
    if len(kinds) != 1:
        return f"expected exactly one of {list(TARGET_KINDS)}, got {kinds}"
    kind = kinds[0]
    required, optional = TARGET_KINDS[kind]
    options = set(target) - {"target", kind}
    if options - required - optional or required - options:
        return (
            f"{kind} takes the options {sorted(required)} and optionally {sorted(optional)}, "
            f"got {sorted(options)}"
        )
    for key in options:
        value = target[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            return f"{key} must be a number >= 0, got {value!r}"
    value = target[kind]
    names = [value] if kind == "reaches" else value if isinstance(value, list) else []
    wanted = {"not_below": 2, "reaches": 1}.get(kind)
    if (
        not names
        or not all(isinstance(n, str) for n in names)
        or (wanted and len(names) != wanted)
        or set(names) - set(entries)
    ):
        shape = {"not_below": "a list of two", "reaches": "one", "holds": "a list of"}[kind]
        return f"{kind} takes {shape} of the plan's entries {entries}, got {value!r}"
    return None


def apply_changes(raw: dict, changes: Sequence[str], path: Path) -> None:
    """Apply ``FIELD=VALUE`` / ``runs.RUN.FIELD=VALUE`` changes (values in YAML) to a raw plan."""
    for change in changes:
        key, sep, text = change.partition("=")
        if not sep:
            raise SystemExit(f"--set {change!r}: expected FIELD=VALUE or runs.RUN.FIELD=VALUE")
        value = yaml.safe_load(text)
        append = key.endswith("+")  # FIELD+=[...]: append to a list (common, a run's overrides)
        holder, field_name = changed_field(raw, key.removesuffix("+"), change, path)
        if append:
            value = [*(holder.get(field_name) or []), *value]
        holder[field_name] = value


def changed_field(raw: dict, key: str, change: str, path: Path) -> tuple[dict, str]:
    """The mapping that holds ``FIELD`` (the plan) or ``runs.RUN.FIELD`` (that run), and the
    field's name."""
    parts = key.split(".")
    if parts[0] == "runs" and len(parts) == 3:
        runs = {r["name"]: r for r in raw["runs"]}
        if parts[1] not in runs:
            raise SystemExit(f"--set {change!r}: {path} has no run {parts[1]!r}: {list(runs)}")
        return runs[parts[1]], parts[2]
    if len(parts) == 1 and key != "runs":
        return raw, key
    raise SystemExit(f"--set {change!r}: expected FIELD=VALUE or runs.RUN.FIELD=VALUE")


def fitted_steps(plan: Plan, costs: dict[str, float], pairs: int, jobs: int, seconds: float) -> int:
    """The training steps (on the checkpoint grain, at least one grain) with which ``pairs``
    (run, seed) trainings of these step costs, ``jobs`` at a time, end within ``seconds``: the
    bare costs times the trainer's overhead (RUN_OVERHEAD), the runs' mean cost per pair."""
    from cm_policy.experiments.measure import RUN_OVERHEAD

    mean_cost = sum(costs[r.name] for r in plan.runs) / len(plan.runs)
    rounds = math.ceil(pairs / jobs)
    steps = seconds / (RUN_OVERHEAD * mean_cost * rounds)
    return max(plan.grain, int(steps) // plan.grain * plan.grain)


@dataclass
class Setup:
    """Where the work runs: torch threads per job, the device, envs per evaluation batch."""

    jobs: int = 2
    threads: int = 1
    device: str = "cpu"
    n_envs: int | None = None  # None: the plan's

    def describe(self) -> str:
        where = "on the GPU" if self.device.startswith("cuda") else "on the CPU"
        return f"{self.jobs} jobs x {self.threads} torch thread(s), training and policy {where}"


def run_overrides(
    plan: Plan, run: RunSpec, seed: int, run_dir: Path, setup: Setup | None = None
) -> list[str]:
    setup = setup or Setup()
    # A relative dataset path is relative to where the campaign runs (the repository's root).
    dataset = [f"task.dataset_path={Path(plan.dataset).resolve()}"] if plan.dataset else []
    return [
        f"task={plan.task}",
        f"method={run.method}",
        *dataset,
        *plan.common,
        *run.overrides,
        f"seed={seed}",
        f"output_dir={run_dir}",
        f"training.num_threads={setup.threads}",
        f"training.device={setup.device}",
        f"training.checkpoint_every={plan.grain}",
        # The marks' checkpoints (training.keep_steps, set by work()) and the last two stay.
        "training.keep_checkpoints=2",
        "training.eval_every=null",  # no evaluation inside training: the marks evaluate
    ]


def reused_source(plan: Plan, run: RunSpec) -> tuple[Plan, str, RunSpec]:
    """The other plan (and its path as ``run.reuse`` writes it) and run that ``run.reuse`` names,
    after checking that they are the same training (every override, seed and test episode)
    evaluated at the same marks."""
    assert run.reuse
    where = f"{plan.name}: run {run.name!r} reuse={run.reuse!r}"
    path, _, name = run.reuse.rpartition(":")
    if not path or not Path(path).is_file():
        raise SystemExit(f"{where}: expected PLAN.yaml:RUN with PLAN a file in {Path.cwd()}")
    other = Plan.load(Path(path))
    match = [r for r in other.runs if r.name == name]
    if not match:
        names = [r.name for r in other.runs]
        raise SystemExit(f"{where}: {path} has no run {name!r}; its runs: {names}")
    source = match[0]
    problems = [
        f"{key} {getattr(plan, key)!r} there {getattr(other, key)!r}"
        for key in ("task", "marks_min", "marks_steps", "grain", "noise_draws", "episodes_per_seed")
        if getattr(plan, key) != getattr(other, key)
    ]
    if run.noise_sampler != source.noise_sampler:
        problems.append(f"noise_sampler {run.noise_sampler!r}, there {source.noise_sampler!r}")
    if set(samplers_of(run)) - set(samplers_of(source)):
        problems.append(f"samplers {samplers_of(run)}, there {samplers_of(source)}")
    for seed in run.seeds:
        if seed not in source.seeds:
            problems.append(f"seed {seed} is not among its seeds {source.seeds}")
            continue
        mine = set(run_overrides(plan, run, seed, Path("RUN")))
        theirs = set(run_overrides(other, source, seed, Path("RUN")))
        if mine != theirs:
            problems.append(
                f"seed {seed}: overrides only here {sorted(mine - theirs)}, only "
                f"there {sorted(theirs - mine)}"
            )
        first = [p.test_start + p.seed_index(seed) * p.episodes_per_seed for p in (plan, other)]
        if first[0] != first[1]:
            problems.append(f"seed {seed}: test episodes from {first[0]}, there from {first[1]}")
    if problems:
        raise SystemExit(f"{where}: not the same run: " + "; ".join(problems))
    return other, path, source


def take_reused(
    plan: Plan, costs: dict[str, float], sources: dict[str, tuple[Plan, str, RunSpec]]
) -> list[str]:
    """Copy the finished caches of every reused run (``sources``: from ``reused_source``) into
    this plan's cache folder and give the run the step cost its marks were placed with; returns
    the report's lines about them."""
    notes = []
    for run in plan.runs:
        if run.name not in sources:
            continue
        other, path, source = sources[run.name]
        costs_file = other.results / "step_costs.json"
        if not costs_file.exists():
            raise SystemExit(f"{run.reuse}: {costs_file} is missing: run {path} first")
        cost = json.loads(costs_file.read_text())[source.name]
        for seed in run.seeds:
            if pending(other, source, seed, {source.name: cost}):
                raise SystemExit(
                    f"{plan.name}: run {run.name!r} reuses {run.reuse}, whose seed {seed} is not "
                    f"finished: run cm-policy campaign {path} first"
                )
            cache = read_cache(cache_path(other, source, seed))
            cache["reused_from"] = f"{run.reuse} seed {seed}"
            target = cache_path(plan, run, seed)
            if read_cache(target) != cache:
                write_json_atomic(target, cache)
        here = ", ".join(f"{s * costs[run.name] / 60:.1f}" for s in mark_steps(plan, cost))
        notes.append(
            f"`{run.name}` is the run `{source.name}` of `{path}` (the same "
            f"overrides, seeds, test episodes and marks; its caches, not trained again): step cost "
            f"{cost:.3f} s there, which places its marks; {costs[run.name]:.3f} s measured here "
            f"beside this plan's other runs, by which its marks are at {here} minutes "
            "(the other runs' marks are measured by this plan's costs)."
        )
        costs[run.name] = cost
    return notes


def measured_costs(plan: Plan, root: Path, runs: list[RunSpec] | None = None) -> dict[str, float]:
    """Seconds per training step of each run's config, one thread, side by side (cached).

    ``runs``: every run of the plan (default ``plan.runs``), so that a session that trains only
    some of them (``--runs``) still measures them all together. A run added to the plan after the
    costs were cached is measured beside one run already there, and its cost scaled by that run's
    cached cost over its new measurement: a ratio taken side by side, on the cached footing.
    """
    from cm_policy.configs import compose
    from cm_policy.experiments.measure import cached, step_costs

    runs = runs or plan.runs
    path = plan.results / "step_costs.json"

    def config(run: RunSpec) -> Any:
        return compose("config", run_overrides(plan, run, run.seeds[0], root / "probe"))

    costs = cached(path, lambda: step_costs({r.name: config(r) for r in runs}))
    missing = [r for r in runs if r.name not in costs]
    if missing:
        anchor = next((r for r in runs if r.name in costs), None)
        if anchor is None:
            raise SystemExit(
                f"{path} has costs for {sorted(costs)}, none of the plan's runs "
                f"{[r.name for r in runs]}; delete it to measure them side by side"
            )
        fresh = step_costs({anchor.name: config(anchor), **{r.name: config(r) for r in missing}})
        scale = costs[anchor.name] / fresh[anchor.name]
        for run in missing:
            costs[run.name] = fresh[run.name] * scale
        print(
            f"step costs of {[r.name for r in missing]} measured beside {anchor.name!r} "
            f"(now {fresh[anchor.name]:.3f} s, cached {costs[anchor.name]:.3f} s) -> {path}",
            flush=True,
        )
        write_json_atomic(path, costs)
    return costs


def mark_steps(plan: Plan, cost: float) -> list[int]:
    """The training step of each mark for a run of ``cost`` s/step, on the checkpoint grain (an
    equal-steps plan's own steps)."""
    if plan.marks_steps:
        return list(plan.marks_steps)
    return [max(plan.grain, round(m * 60 / cost / plan.grain) * plan.grain) for m in plan.marks_min]


def samplers_of(run: RunSpec) -> list[str]:
    from cm_policy.methods import METHODS

    return run.samplers or list(METHODS[run.method].eval_samplers)


def cache_path(plan: Plan, run: RunSpec, seed: int) -> Path:
    return plan.results / "cache" / f"{run.name}_s{seed}.json"


def read_cache(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {"marks": {}}


def pending(plan: Plan, run: RunSpec, seed: int, costs: dict[str, float]) -> bool:
    cache = read_cache(cache_path(plan, run, seed))
    steps = mark_steps(plan, costs[run.name])
    # The last-mark diagnostics belong to the plan's last mark: a mark appended to a finished plan
    # makes them due again there.
    final = cache.get("final") or {}
    done = final.get("step", steps[-1] if final else None) == steps[-1]
    return not (done and all(str(s) in cache["marks"] for s in steps))


_TRAINING: subprocess.Popen | None = None  # a worker's training run in progress


def _worker_init() -> None:
    """A worker stopped by SIGTERM (the campaign under a time limit) stops its training run too;
    the run's checkpoints are written atomically, so the next invocation resumes from the last."""

    def stop(signum: int, frame: Any) -> None:
        # Signal only: the handler may interrupt _TRAINING.wait(), whose lock it cannot take.
        if _TRAINING is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(_TRAINING.pid, signal.SIGTERM)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def work(args: tuple[Plan, RunSpec, int, Path, dict[str, float], Setup]) -> str:
    """Train one (run, seed) mark by mark, evaluating each mark; returns a status line."""
    global _TRAINING
    plan, run, seed, root, costs, setup = args
    import torch

    from cm_policy.checkpoint import load_policy
    from cm_policy.configs import compose
    from cm_policy.evaluation.machine import describe_machine
    from cm_policy.experiments.measure import (
        chunk_latency_ms,
        chunk_spread,
        evaluate_entry,
        grad_stats,
        interval_stats,
        read_log,
    )

    torch.set_num_threads(setup.threads)
    n_envs = setup.n_envs or plan.n_envs
    run_dir = root / f"{run.name}_s{seed}"
    path = cache_path(plan, run, seed)
    cache = read_cache(path)
    # Who measured what: a cache filled on two machines lists both.
    made_by = f"{describe_machine()}; {setup.describe()}"
    if made_by not in cache.setdefault("machines", []):
        cache["machines"].append(made_by)
    steps = mark_steps(plan, costs[run.name])
    first = plan.test_start + plan.seed_index(seed) * plan.episodes_per_seed
    seeds = list(range(first, first + plan.episodes_per_seed))
    cli = [sys.executable, "-m", "cm_policy.cli", "train"]
    base = [
        *run_overrides(plan, run, seed, run_dir, setup),
        f"training.steps={steps[-1]}",
        f"training.keep_steps=[{','.join(map(str, steps))}]",
    ]
    log_file = root / f"{run.name}_s{seed}.log"
    problem = schedule_problem(run_dir, steps[-1])
    if problem:
        return f"{run.name} s{seed}: {problem}"
    previous = 0
    for step in steps:
        minutes = step * costs[run.name] / 60
        key, after = str(step), previous
        previous = step
        if key in cache["marks"]:
            continue
        checkpoint = run_dir / "checkpoints" / f"step_{step:07d}"
        latest = run_dir / "checkpoints" / "latest"
        reached = int(latest.read_text().split("_")[1]) if latest.exists() else 0
        if not checkpoint.is_dir() and reached >= step:
            return (
                f"{run.name} s{seed}: no checkpoint at step {step} (at {reached}; grain changed?)"
            )
        if not checkpoint.is_dir():
            resume = [f"resume={run_dir}"] if reached else []
            with open(log_file, "a") as log:
                _TRAINING = subprocess.Popen(
                    [*cli, *base, f"training.stop_after={step}", *resume],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "OMP_NUM_THREADS": str(setup.threads)},
                )
                returncode = _TRAINING.wait()
                _TRAINING = None
            if returncode or not checkpoint.is_dir():
                return f"{run.name} s{seed}: training to step {step} failed (see {log_file})"
        policy = load_policy(checkpoint, weights="ema", device=setup.device)
        entries = {}
        for label in samplers_of(run):
            out = run_dir / "eval" / f"step{step}_{label.replace(':', '')}"
            entries[label] = evaluate_entry(policy, label, seeds, out, n_envs, layout=plan.layout)
            episodes = json.loads((out / "episodes.json").read_text())
            if episodes and episodes[0].get("outcome"):  # kept for figures of where runs end
                entries[label]["outcomes"] = [e["outcome"] for e in episodes]
        # Stability evidence of the steps since the previous mark, beside the scores they led to.
        train = interval_stats(read_log(run_dir), after, step)
        cache["marks"][key] = {"minutes": minutes, "entries": entries, "train": train}
        write_json_atomic(path, cache)
    if cache.get("final") and cache["final"].get("step", steps[-1]) != steps[-1]:
        # A mark was appended: the diagnostics move to the new last mark, the old ones are kept.
        cache.setdefault("earlier_finals", []).append(cache.pop("final"))
    if not cache.get("final"):
        last = run_dir / "checkpoints" / f"step_{steps[-1]:07d}"
        policy = load_policy(last, weights="ema", device=setup.device)
        headline = run.noise_sampler or policy.method.headline
        final: dict[str, Any] = {
            "step": steps[-1],
            "headline": headline,
            "latency_ms": {},
            "noise": {},
        }
        for label in samplers_of(run):
            final["latency_ms"][label] = chunk_latency_ms(policy, label)
        if policy.method.uses_noise:
            for noise in ("zero", f"mean:{plan.noise_draws}"):
                out = run_dir / "eval" / f"final_{headline.replace(':', '')}_{noise}"
                final["noise"][noise] = evaluate_entry(
                    policy,
                    headline,
                    seeds,
                    out.with_name(out.name.replace(":", "")),
                    n_envs,
                    layout=plan.layout,
                    noise=noise,
                )
            # Degeneracy check: how much chunks vary across noise draws for fixed observations.
            cfg = compose("config", run_overrides(plan, run, seed, run_dir, setup))
            final["spread"] = {
                label: chunk_spread(policy, cfg, label) for label in samplers_of(run)
            }
        final["train"] = grad_stats(read_log(run_dir))
        cache["final"] = final
        write_json_atomic(path, cache)
    return f"{run.name} s{seed}: done ({len(steps)} marks)"


def schedule_problem(run_dir: Path, last_step: int) -> str | None:
    """Why a run folder cannot be continued to ``last_step``, or None.

    Under the cosine schedule the learning rate of every step depends on ``training.steps``, the
    plan's last mark: a run trained toward another last mark (a mark appended to its plan) would
    change schedule midway. The anytime schedule (``training.lr_schedule=constant``: warm-up,
    then constant) does not depend on it, so its runs continue across appended marks.
    """
    config = run_dir / "config.yaml"
    if not config.exists():
        return None
    trained = yaml.safe_load(config.read_text())["training"]
    if trained.get("lr_schedule", "cosine") == "constant" or int(trained["steps"]) == last_step:
        return None
    return (
        f"{run_dir} was trained with the cosine schedule toward step {trained['steps']}, the plan "
        f"now ends at step {last_step}: continuing would change its learning rates midway. Use "
        "training.lr_schedule=constant (the anytime schedule) for plans that grow, or start the "
        "run afresh in a new folder"
    )


def log_axis(plan: Plan) -> bool:
    """Marks spanning a factor of 4 or more (e.g. doubling ones) are plotted on a log axis."""
    return plan.marks[-1] >= 4 * plan.marks[0]


def pooled_entry(entries: list[dict]) -> dict:
    from cm_policy.experiments.measure import pooled

    return pooled(entries)


def pooled_rate(entries: list[dict], key: str) -> str:
    """A share of all episodes pooled over seeds, with its Wilson interval, as table text."""
    from cm_policy.stats import wilson_interval

    n = sum(e["n_episodes"] for e in entries)
    rate = sum(e[key] * e["n_episodes"] for e in entries) / n
    lo, hi = wilson_interval(rate, n)
    return f"{rate:.3f} [{lo:.3f}, {hi:.3f}]"


def pooled_balance(entries: list[dict], first: str, second: str) -> str:
    """The share of ``first`` among the episodes counted by ``first`` or ``second`` (two
    exclusive outcomes, e.g. the two goals), pooled over seeds, with its Wilson interval."""
    from cm_policy.stats import wilson_interval

    a = sum(e[first] * e["n_episodes"] for e in entries)
    b = sum(e[second] * e["n_episodes"] for e in entries)
    n = round(a + b)
    if n == 0:
        return "- (none)"
    lo, hi = wilson_interval(a / (a + b), n)
    return f"{a / (a + b):.3f} [{lo:.3f}, {hi:.3f}] of {n}"


def task_rates(plan: Plan, entries: list[dict]) -> str:
    """The plan's rate metrics (and balance) of pooled entries as table cells."""
    cells = "".join(f" {pooled_rate(entries, m)} |" for m in plan.rate_metrics)
    if plan.balance:
        cells += f" {pooled_balance(entries, *plan.balance)} |"
    return cells


def rate_headers(plan: Plan) -> tuple[str, str]:
    names = [*plan.rate_metrics]
    if plan.balance:
        a, b = plan.balance
        names.append(f"{a} / ({a} + {b})")
    return "".join(f"| {m} " for m in names), "---|" * len(names)


def difference(a: dict, b: dict) -> tuple[float, float, float, tuple]:
    """Entry ``a`` minus entry ``b`` (each pooled by ``pooled_entry``): the mean_score difference
    with the half-width of its 95% interval (the two pooled intervals combined as independent),
    the success difference with its 95% interval (Newcombe's, from the two Wilson intervals,
    which stays sound at rates of 0 or 1)."""
    score_half = math.hypot(a["score_half"], b["score_half"])
    (la, ua), (lb, ub) = a["success_ci"], b["success_ci"]
    pa, pb = a["success"], b["success"]
    d = pa - pb
    interval = (d - math.hypot(pa - la, ub - pb), d + math.hypot(ua - pa, pb - lb))
    return a["score"] - b["score"], score_half, d, interval


def reading(low: float, high: float) -> str:
    """'above' or 'below' when the 95% interval of a difference excludes 0, else 'level'."""
    return "above" if low > 0 else "below" if high < 0 else "level"


# How a change between two marks reads, from the reading of its interval (:func:`reading`).
TREND_WORDS = {"above": "rising", "below": "falling", "level": "flat"}


def against_reference(
    plan: Plan, pools: dict[tuple[str, float], tuple[list[dict], int, dict]]
) -> list:
    """Report lines: every entry minus the plan's reference entry at each mark."""
    ref = plan.reference
    lines = [
        "",
        f"## Against `{ref}`",
        "",
        f"Each entry minus `{ref}` at the same mark, pooled over the seeds done: the difference "
        "of mean_score +- the half-width of its 95% interval (the pooled intervals combined as "
        "independent) and of the success rate with its 95% interval (Newcombe's); above / "
        f"below when the interval excludes 0 (the entry above or below `{ref}`), level "
        "otherwise. The intervals count test episodes only: the last column shows each training "
        "seed's own score, the spread that 2 seeds cannot bound.",
        "",
        f"| entry | mark ({plan.unit}) | seeds done (entry; reference) | mean_score difference "
        "| success difference | score, success | seeds' scores (entry; reference) |",
        "|---|---|---|---|---|---|---|",
    ]
    names = entry_names(pools)
    for name in names:
        if name == ref:
            continue
        for mark in plan.marks:
            if (name, mark) not in pools or (ref, mark) not in pools:
                continue
            entries, n_seeds, pooled = pools[name, mark]
            reference, n_ref, ref_pooled = pools[ref, mark]
            ds, hs, dp, (lp, hp) = difference(pooled, ref_pooled)
            seeds = ", ".join(f"{e['mean_score']:.3f}" for e in entries)
            ref_seeds = ", ".join(f"{e['mean_score']:.3f}" for e in reference)
            lines.append(
                f"| {name} | {mark:g} | {len(entries)}/{n_seeds}; {len(reference)}/{n_ref} | "
                f"{ds:+.3f} +- {hs:.3f} | {dp:+.3f} [{lp:+.3f}, {hp:+.3f}] | "
                f"{reading(ds - hs, ds + hs)}, {reading(lp, hp)} | {seeds}; {ref_seeds} |"
            )
    return without_empty_table(lines, f"No entry and `{ref}` share a mark yet.")


def without_empty_table(lines: list[str], instead: str) -> list[str]:
    """``lines`` ending in a table's header and rule with no row: the sentence ``instead`` in
    place of the empty table."""
    if lines[-1].startswith("|---"):
        return [*lines[:-2], instead]
    return lines


def changes_between_marks(
    plan: Plan, pools: dict[tuple[str, float], tuple[list[dict], int, dict]]
) -> list[str]:
    """Report lines: each entry's change from one mark to the next, with the difference's 95%
    interval, read as rising / falling / flat (flat: the interval of the change holds 0)."""
    lines = [
        "",
        "## From one mark to the next",
        "",
        "Each entry at a mark minus the same entry at the mark before, pooled over the training "
        "seeds evaluated at both (column 'seeds'; a seed still training is left out of the pair): "
        "the change of mean_score +- its 95% interval and of the success rate with "
        "Newcombe's interval. A curve is read as **flat** at a mark when the interval of its "
        "mean_score change holds 0, **rising** / **falling** when it lies above / below 0; the "
        "success change is read the same way. Seeds disagree more than episodes do: a flat "
        "reading says the episodes cannot tell the two marks apart, not that training is over.",
        "",
        f"| entry | from -> to ({plan.unit}) | seeds | mean_score change | success change | "
        "reading (score, success) |",
        "|---|---|---|---|---|---|",
    ]
    names = entry_names(pools)
    for name in names:
        for before, after in itertools.pairwise(plan.marks):
            if (name, before) not in pools or (name, after) not in pools:
                continue
            seeds, pooled = on_common_seeds(pools, name, [before, after])
            if not seeds:
                continue
            ds, hs, dp, (lp, hp) = difference(pooled[after], pooled[before])
            lines.append(
                f"| {name} | {before:g} -> {after:g} | {len(seeds)}/{pools[name, after][1]} | "
                f"{ds:+.3f} +- {hs:.3f} | "
                f"{dp:+.3f} [{lp:+.3f}, {hp:+.3f}] | "
                f"{TREND_WORDS[reading(ds - hs, ds + hs)]}, {TREND_WORDS[reading(lp, hp)]} |"
            )
    return without_empty_table(lines, "No entry has a seed evaluated at two consecutive marks yet.")


Pools = dict[tuple[str, float], tuple[list[dict], int, dict]]


def entry_names(pools: Pools) -> list[str]:
    """The 'run sampler' entries that have a pooled figure, in the plan's order."""
    return list(dict.fromkeys(name for name, _ in pools))


def marks_of(plan: Plan, pools: Pools, name: str) -> list[float]:
    return [m for m in plan.marks if (name, m) in pools]


def on_common_seeds(
    pools: Pools, name: str, marks: list[float]
) -> tuple[list[int], dict[float, dict]]:
    """``name`` at each of ``marks`` pooled over the training seeds evaluated at all of them (a
    seed still training is left out, so that a change between marks is never a change of seeds),
    and those seeds; no seeds and no figures when none has every mark."""
    held = [{e["training_seed"] for e in pools[name, m][0]} for m in marks]
    seeds = sorted(set.intersection(*held)) if held else []
    pooled = {
        m: pooled_entry([e for e in pools[name, m][0] if e["training_seed"] in seeds])
        for m in marks
    }
    return seeds, pooled if seeds else {}


def seeds_note(pools: Pools, name: str, seeds: list[int]) -> str:
    """'' when every training seed of ``name`` is read, else which ones are."""
    total = pools[next(k for k in pools if k[0] == name)][1]
    if len(seeds) == total:
        return ""
    return f"on seed {', '.join(map(str, seeds))} only, {len(seeds)}/{total} seeds"


def seeds_done(pools: Pools, name: str, mark: float) -> str:
    entries, n_seeds, _ = pools[name, mark]
    return f"{len(entries)}/{n_seeds} seeds"


def compared(pools: Pools, a: tuple[str, float], b: tuple[str, float]) -> str:
    """``a`` minus ``b`` as text: both differences with their intervals and readings."""
    ds, hs, dp, (lp, hp) = difference(pools[a][2], pools[b][2])
    return (
        f"mean_score {ds:+.3f} +- {hs:.3f} ({reading(ds - hs, ds + hs)}), "
        f"success {dp:+.3f} [{lp:+.3f}, {hp:+.3f}] ({reading(lp, hp)})"
    )


def answer_compare(plan: Plan, pools: Pools, a: str, b: str) -> list[str]:
    shared = [m for m in marks_of(plan, pools, a) if (b, m) in pools]
    if not shared:
        return [f"Not answered yet: `{a}` and `{b}` share no mark."]
    lines = [
        f"- at {m:g} {plan.unit} (`{a}` {seeds_done(pools, a, m)}, `{b}` "
        f"{seeds_done(pools, b, m)}): `{a}` minus `{b}`: {compared(pools, (a, m), (b, m))}"
        for m in shared
    ]
    last = shared[-1]
    ds, hs, _, (lp, hp) = difference(pools[a, last][2], pools[b, last][2])
    word = {"above": "above", "below": "below", "level": "level with"}
    final = last == plan.marks[-1] and all(
        len(pools[n, last][0]) == pools[n, last][1] for n in (a, b)
    )
    lines += [
        "",
        f"{'Answer' if final else 'So far (not every mark or seed is in)'}: at {last:g} "
        f"{plan.unit}, `{a}` is {word[reading(ds - hs, ds + hs)]} `{b}` on mean_score and "
        f"{word[reading(lp, hp)]} it on success (95% intervals of the differences; level: "
        "the interval holds 0).",
    ]
    return lines


def answer_trend(plan: Plan, pools: Pools, names: list[str]) -> list[str]:
    lines = []
    for name in names:
        marks = marks_of(plan, pools, name)
        seeds, pooled = on_common_seeds(pools, name, marks)
        if len(marks) < 2 or not seeds:
            lines.append(f"- `{name}`: not answered yet (no seed has two marks in).")
            continue
        steps = []
        for before, after in itertools.pairwise(marks):
            ds, hs, _, _ = difference(pooled[after], pooled[before])
            trend = TREND_WORDS[reading(ds - hs, ds + hs)]
            steps.append(f"{before:g} -> {after:g} {trend} ({ds:+.3f} +- {hs:.3f})")
        best = max(marks, key=lambda m: pooled[m]["score"])
        last = marks[-1]
        if best == last:
            verdict = f"best at its last mark ({last:g}): no degradation"
        else:
            ds, hs, _, _ = difference(pooled[last], pooled[best])
            fell = reading(ds - hs, ds + hs) == "below"
            verdict = f"best at {best:g}, then {ds:+.3f} +- {hs:.3f} by {last:g}: " + (
                "**degrades** (the interval lies below 0)"
                if fell
                else "holds (the interval holds 0)"
            )
        lines.append(
            f"- `{name}`"
            + (f" ({note})" if (note := seeds_note(pools, name, seeds)) else "")
            + ": "
            + "; ".join(steps)
            + f". Mean_score {verdict}."
        )
    return lines


def answer_flat(plan: Plan, pools: Pools) -> list[str]:
    names = entry_names(pools)
    flat, moving, early = [], [], []
    for name in names:
        marks = marks_of(plan, pools, name)[-2:]
        seeds, pooled = on_common_seeds(pools, name, marks)
        if len(marks) < 2 or not seeds:
            early.append(f"`{name}`")
            continue
        ds, hs, ss, (lp, hp) = difference(pooled[marks[-1]], pooled[marks[-2]])
        readings = (reading(ds - hs, ds + hs), reading(lp, hp))
        on_score, on_success = (TREND_WORDS[r] for r in readings)
        text = (
            f"`{name}` ({marks[-2]:g} -> {marks[-1]:g}"
            + (f", {note}" if (note := seeds_note(pools, name, seeds)) else "")
            + ": "
            f"mean_score {ds:+.3f} +- {hs:.3f} "
            f"{on_score}, success {ss:+.3f} [{lp:+.3f}, {hp:+.3f}] {on_success})"
        )
        (flat if readings == ("level", "level") else moving).append(text)
    return [
        "A curve is flat at its last mark when the 95% intervals of its last changes of "
        "mean_score and of success both hold 0 (the table 'From one mark to the next'); a "
        "change of either beyond its interval keeps it moving.",
        "",
        f"- flat: {', '.join(flat) or 'none'}",
        f"- still moving: {', '.join(moving) or 'none'}",
        f"- no seed with two marks in: {', '.join(early) or 'none'}",
    ]


def answer_seeds(plan: Plan, pools: Pools) -> list[str]:
    names = entry_names(pools)
    lines = [
        "At each entry's last mark with two seeds or more: each seed's mean_score, the spread "
        "(largest minus smallest) and the largest half-width of one seed's own 95% episode "
        "interval. A spread beyond that half-width: the seeds differ by more than their "
        "episodes can explain.",
        "",
    ]
    rows = 0
    for name in names:
        marks = [m for m in marks_of(plan, pools, name) if len(pools[name, m][0]) > 1]
        if not marks:
            continue
        entries = pools[name, marks[-1]][0]
        scores = [e["mean_score"] for e in entries]
        half = max((e["mean_score_ci95"][1] - e["mean_score_ci95"][0]) / 2 for e in entries)
        spread = max(scores) - min(scores)
        lines.append(
            f"- `{name}` at {marks[-1]:g}: {', '.join(f'{x:.3f}' for x in scores)}; spread "
            f"{spread:.3f} against {half:.3f}"
            + (" (**beyond** the episodes)" if spread > half else " (within)")
        )
        rows += 1
    return lines if rows else ["Not answered yet: no entry has two seeds at one mark."]


def question_lines(plan: Plan, pools: Pools) -> list[str]:
    """Report lines: a section per question of the plan, answered from the pooled figures."""
    lines = []
    for q in plan.questions:
        lines += ["", f"## {q['ask']}", ""]
        if "compare" in q:
            lines += answer_compare(plan, pools, *q["compare"])
        elif "trend" in q:
            lines += answer_trend(plan, pools, q["trend"])
        elif "flat" in q:
            lines += answer_flat(plan, pools)
        else:
            lines += answer_seeds(plan, pools)
    return lines


def complete(plan: Plan, pools: Pools, name: str) -> bool:
    """Whether ``name`` has every mark of the plan with every training seed."""
    return all(
        (name, m) in pools and len(pools[name, m][0]) == pools[name, m][1] for m in plan.marks
    )


def target_not_below(
    plan: Plan, pools: Pools, a: str, b: str, margin: float
) -> tuple[bool, bool, str]:
    """At the last mark both entries reached: ``a``'s mean_score >= ``b``'s - ``margin`` (the
    point estimates) and its success not below ``b``'s (the difference's 95% interval).
    (met, decided, the numbers); decided once both have the plan's last mark on every seed."""
    shared = [m for m in marks_of(plan, pools, a) if (b, m) in pools]
    if not shared:
        return False, False, f"`{a}` and `{b}` share no mark yet"
    last = shared[-1]
    ds, hs, dp, (lp, hp) = difference(pools[a, last][2], pools[b, last][2])
    met = ds >= -margin and reading(lp, hp) != "below"
    decided = last == plan.marks[-1] and all(
        len(pools[n, last][0]) == pools[n, last][1] for n in (a, b)
    )
    text = (
        f"At {last:g} {plan.unit} (`{a}` {seeds_done(pools, a, last)}, `{b}` "
        f"{seeds_done(pools, b, last)}), `{a}` minus `{b}`: mean_score {ds:+.3f} +- {hs:.3f} "
        f"(needs >= {-margin:+.3f}), success {dp:+.3f} [{lp:+.3f}, {hp:+.3f}] "
        f"({reading(lp, hp)}; needs level or above)"
    )
    return met, decided, text


def target_reaches(
    plan: Plan, pools: Pools, name: str, score: float, success: float, episodes: int
) -> tuple[bool, bool, str]:
    """At some mark, pooled over ``episodes`` or more: mean_score >= ``score`` and success >=
    ``success`` (point estimates). (met, decided, the numbers); met is decided at once, not met
    once every mark is in on every seed."""
    readings, hit = [], None
    for m in marks_of(plan, pools, name):
        p = pools[name, m][2]
        counted = p["n"] >= episodes
        readings.append(
            f"{m:g}: {p['score']:.3f} / {p['success']:.3f} ({p['n']} episodes"
            + ("" if counted else f", fewer than {episodes}: not counted")
            + ")"
        )
        if hit is None and counted and p["score"] >= score and p["success"] >= success:
            hit = m
    met = hit is not None
    text = (
        f"`{name}` needs mean_score >= {score:g} and success >= {success:g} over >= {episodes} "
        "episodes at one mark"
        + (f"; first met at {hit:g} {plan.unit}" if met else "")
        + ". Mean_score / success per mark: "
        + ("; ".join(readings) or "none yet")
    )
    return met, met or complete(plan, pools, name), text


def target_holds(plan: Plan, pools: Pools, names: list[str]) -> tuple[bool, bool, str]:
    """No change of mean_score between consecutive marks falls beyond its 95% interval, each
    change read on the training seeds evaluated at both marks. (met, decided, the numbers);
    decided once every entry has every mark on every seed."""
    parts, fell = [], False
    for name in names:
        steps = []
        for before, after in itertools.pairwise(marks_of(plan, pools, name)):
            seeds, pooled = on_common_seeds(pools, name, [before, after])
            if not seeds:
                continue
            ds, hs, _, _ = difference(pooled[after], pooled[before])
            trend = TREND_WORDS[reading(ds - hs, ds + hs)]
            fell |= trend == "falling"
            note = seeds_note(pools, name, seeds)
            steps.append(
                f"{before:g} -> {after:g} {ds:+.3f} +- {hs:.3f} {trend}"
                + (f" ({note})" if note else "")
            )
        parts.append(f"`{name}`: " + ("; ".join(steps) or "no two marks yet"))
    decided = all(complete(plan, pools, n) for n in names)
    return not fell, decided, "; ".join(parts)


def target_lines(plan: Plan, pools: Pools) -> list[str]:
    """Report lines: each target of the plan read as met or not met with its numbers; 'so far'
    while marks or seeds that could change the reading are still to come."""
    if not plan.targets:
        return []
    lines = [
        "",
        "## Targets",
        "",
        "Each target of the plan read from the pooled figures: **met** or **not met** once "
        "every mark and seed that could change the reading is in, *so far* before.",
        "",
    ]
    for t in plan.targets:
        if "not_below" in t:
            met, decided, text = target_not_below(
                plan, pools, *t["not_below"], float(t.get("margin", 0.0))
            )
        elif "reaches" in t:
            met, decided, text = target_reaches(
                plan,
                pools,
                t["reaches"],
                float(t["score"]),
                float(t["success"]),
                int(t.get("episodes", 0)),
            )
        else:
            met, decided, text = target_holds(plan, pools, t["holds"])
        word = "met" if met else "not met"
        status = f"**{word}**" if decided else f"*{word} so far*"
        lines.append(f"- {t['target']}: {status}. {text}.")
    return lines


def stability_lines(plan: Plan, caches: dict, costs: dict[str, float]) -> list[str]:
    """Report lines: the gradient statistics and raw loss terms of each interval between marks,
    per run and seed, so that a change in score shows beside what training did meanwhile."""
    rows = []
    for r in plan.runs:
        for seed in r.seeds:
            for step in mark_steps(plan, costs[r.name]):
                train = caches[r.name, seed]["marks"].get(str(step), {}).get("train")
                if not train or not train.get("logged_steps"):
                    continue
                a, b = train["steps"]
                terms = ", ".join(
                    f"{k} {v['mean']:.4g} ({v['last_tenth']:.4g})"
                    for k, v in train.get("loss", {}).items()
                )
                rows.append(
                    f"| {r.name} | {seed} | {a}-{b} | {train['grad_median']:.3g} | "
                    f"{train['grad_p99']:.3g} | {train['grad_max']:.3g} | "
                    f"{train['nonfinite_steps']} | {train.get('lr_last', math.nan):.2g} | {terms} |"
                )
    if not rows:
        return []
    return [
        "",
        "## Training between marks",
        "",
        "Over the training steps of each interval between marks (from the run's log, every "
        "step): the total gradient norm before clipping (median, 99th percentile, max), the steps "
        "whose gradient had non-finite entries (zeroed), the learning rate at the interval's end, "
        "and each raw loss term (before any adaptive weight): its mean over the interval and, in "
        "brackets, over the interval's last tenth.",
        "",
        "| run | seed | steps | grad median | grad p99 | grad max | non-finite steps | lr "
        "| loss terms: mean (last tenth) |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]


def plot_curves(plan: Plan, curves: dict[str, list[dict]], stem: Path) -> None:
    """Score and success against training compute and against training steps: the pooled line
    with its 95% band and each seed's own points (open markers). A mark that not every training
    seed has reached yet is a square, and the line into it dotted: its pool holds other seeds
    than the marks before it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, axes = plt.subplots(2, 2, figsize=(13, 8.4), squeeze=False)
    spans = [[1.0, 0.0], [1.0, 0.0]]  # each row's lowest and highest value drawn
    for i, (name, pts) in enumerate(sorted(curves.items())):
        pts = sorted(pts, key=lambda q: q["step"])
        color = f"C{i % 10}"
        for col, x_key in enumerate(("minutes", "step")):
            x = np.array([q[x_key] for q in pts])
            for row, (y_key, band) in enumerate((("score", "score_band"), ("success", "ci"))):
                ax = axes[row][col]
                y = np.array([q[y_key] for q in pts])
                lo = np.array([q[band][0] for q in pts])
                hi = np.array([q[band][1] for q in pts])
                full = np.array([q.get("all_seeds", True) for q in pts])
                for a in range(len(pts) - 1):
                    style = "-" if full[a] and full[a + 1] else ":"
                    ax.plot(x[a : a + 2], y[a : a + 2], style, color=color)
                ax.plot(x[full], y[full], "o", color=color, label=name if row == col == 0 else None)
                ax.plot(x[~full], y[~full], "s", color=color, ms=6)
                ax.fill_between(x, lo, hi, color=color, alpha=0.12)
                seed_x = [q[x_key] for q in pts for _ in q["seeds"]]
                seed_y = [v[row] for q in pts for v in q["seeds"]]
                ax.plot(seed_x, seed_y, "o", mfc="none", color=color, ms=5, alpha=0.7)
                spans[row][0] = min(spans[row][0], *lo, *seed_y)
                spans[row][1] = max(spans[row][1], *hi, *seed_y)
    for row, title in enumerate(("mean_score", "success rate")):
        for col, xlabel in enumerate(
            ("training compute (minutes of one CPU thread)", "training steps")
        ):
            ax = axes[row][col]
            ax.set_xlabel(xlabel)
            if log_axis(plan):
                ax.set_xscale("log", base=2)
                if (col == 0) == (plan.unit == "min"):
                    ax.set_xticks(plan.marks, [f"{m:g}" for m in plan.marks])
                    ax.minorticks_off()
                else:  # plain numbers, not powers of 2
                    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.set_title(f"{title}: pooled (line, 95% band) and each seed (open)")
            # Zoomed to what is drawn (scores near 1 differ in the second decimal).
            low, high = spans[row]
            ax.set_ylim(max(0.0, low - 0.03), min(1.02, high + 0.03) if high > low else 1.02)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="best")
    if any(not q.get("all_seeds", True) for pts in curves.values() for q in pts):
        fig.text(
            0.5,
            0.005,
            "square, dotted line in: a mark not every training seed has reached yet",
            ha="center",
            fontsize=8,
        )
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    write_figure_atomic(stem.with_suffix(".png"), fig, dpi=110)
    plt.close(fig)


def write_report(
    plan: Plan, costs: dict[str, float], command: str, notes: list[str] | None = None
) -> Path:
    """``<results>/<name>.md`` and ``<name>.png`` from the cached evaluations."""
    from cm_policy.evaluation.machine import describe_machine

    caches = {(r.name, s): read_cache(cache_path(plan, r, s)) for r in plan.runs for s in r.seeds}
    rate_head, rate_rule = rate_headers(plan)
    machines = sorted({m for c in caches.values() for m in c.get("machines", [])})
    axis = (
        "training steps, the same for every run (an equal-steps comparison); the compute "
        "panel turns them into minutes of one-thread CPU training by each run's step cost"
        if plan.unit == "steps"
        else "minutes of one-thread CPU training = steps x the run's step cost measured side by "
        "side in one process (table below), so pauses, load and the device do not move it; the "
        "plot shows the same marks against training steps too"
    )
    lines = [
        f"# Campaign `{plan.name}`: {plan.task}, equal training "
        + ("steps" if plan.unit == "steps" else "compute"),
        "",
        f"Command: `{command}`.",
        "",
        f"Report written on: {describe_machine()}. Measured on: "
        + ("; ".join(f"{m}" for m in machines) or "nothing yet")
        + f". Marks: {axis}"
        + (" (on a log scale in the plot)" if log_axis(plan) else "")
        + ". Each mark evaluates the EMA weights on "
        f"{plan.episodes_per_seed} test episodes per training seed (from {plan.test_start}, "
        "disjoint per seed, the same for every run); +- is the 95% interval of the pooled "
        "mean_score, [a, b] the Wilson interval of the pooled success rate.",
        "",
        f"Common overrides: `{' '.join(plan.common)}`; dataset `{plan.dataset}`.",
        "",
        "| run | method | overrides | seeds | step cost (s, 1 thread) | marks (steps) |",
        "|---|---|---|---|---|---|",
    ]
    for r in plan.runs:
        steps = mark_steps(plan, costs[r.name])
        lines.append(
            f"| {r.name} | {r.method} | `{' '.join(r.overrides) or '-'}` | {r.seeds} | "
            f"{costs[r.name]:.3f} | {', '.join(map(str, steps))} |"
        )
    if notes:
        lines += ["", *(f"- {n}" for n in notes)]
    unit_head = "minutes" if plan.unit == "min" else "steps"
    lines += [
        "",
        "## Score at each mark",
        "",
        "The column 'each seed' holds every training seed's own mean_score / success rate: two "
        "seeds can differ by more than the episode interval says.",
        "",
        f"| run | sampler | {unit_head} | seeds done | episodes | mean_score | success "
        "| each seed: score / success " + rate_head + "|",
        "|---|---|---|---|---|---|---|---|" + rate_rule,
    ]
    curves: dict[str, list[dict]] = {}
    grid: dict[str, dict[float, str]] = {}
    # (entry, mark) -> the seeds' evaluations, the number of seeds, and their pooled figures
    pools: dict[tuple[str, float], tuple[list[dict], int, dict]] = {}
    for r in plan.runs:
        steps = mark_steps(plan, costs[r.name])
        for label in samplers_of(r):
            for mark, step in zip(plan.marks, steps, strict=True):
                entries = [
                    {**caches[r.name, s]["marks"][str(step)]["entries"][label], "training_seed": s}
                    for s in r.seeds
                    if str(step) in caches[r.name, s]["marks"]
                ]
                if not entries:
                    continue
                p = pooled_entry(entries)
                pools[f"{r.name} {label}", mark] = (entries, len(r.seeds), p)
                lo, hi = p["success_ci"]
                rates = task_rates(plan, entries)
                each = ", ".join(
                    f"{e['mean_score']:.3f} / {e['success_rate']:.2f}" for e in entries
                )
                lines.append(
                    f"| {r.name} | {label} | {mark:g} | {len(entries)}/{len(r.seeds)} | "
                    f"{p['n']} | {p['score']:.3f} +- {p['score_half']:.3f} | "
                    f"{p['success']:.3f} [{lo:.3f}, {hi:.3f}] | {each} |{rates}"
                )
                curves.setdefault(f"{r.name} {label}", []).append(
                    {
                        "minutes": step * costs[r.name] / 60,
                        "step": step,
                        "score": p["score"],
                        "score_band": (
                            p["score"] - p["score_half"],
                            p["score"] + p["score_half"],
                        ),
                        "success": p["success"],
                        "ci": (lo, hi),
                        "seeds": [(e["mean_score"], e["success_rate"]) for e in entries],
                        "all_seeds": len(entries) == len(r.seeds),
                    }
                )
                cell = f"{p['score']:.3f} +- {p['score_half']:.3f} / {p['success']:.2f}"
                if len(entries) < len(r.seeds):
                    cell += f" ({len(entries)}/{len(r.seeds)} seeds)"
                grid.setdefault(f"{r.name} {label}", {})[mark] = cell
    if grid:
        lines += [
            "",
            "## At equal training " + ("steps" if plan.unit == "steps" else "compute"),
            "",
            "mean_score +- 95% / success rate, pooled over the training seeds, at each mark "
            + ("(training steps; " if plan.unit == "steps" else "(minutes of one-thread training; ")
            + "the intervals are in the table above).",
            "",
            "| run sampler | " + " | ".join(f"{m:g} {plan.unit}" for m in plan.marks) + " |",
            "|---|" + "---|" * len(plan.marks),
        ]
        for name, row in grid.items():
            lines.append(f"| {name} | " + " | ".join(row.get(m, "-") for m in plan.marks) + " |")
    if len(plan.marks) > 1 and pools:
        lines += changes_between_marks(plan, pools)
    if plan.reference:
        lines += against_reference(plan, pools)
    lines += question_lines(plan, pools)
    lines += target_lines(plan, pools)
    lines += stability_lines(plan, caches, costs)
    finals = [(r, s, caches[r.name, s].get("final")) for r in plan.runs for s in r.seeds]
    finals = [(r, s, f) for r, s, f in finals if f]
    if finals:
        lines += [
            "",
            "## Last mark: noise diagnostic, latency, gradients",
            "",
            "Noise diagnostic: the run's diagnosed sampler (its method's headline unless the plan "
            "names another) with the initial noise set to zero, and the "
            f"chunk averaged over {plan.noise_draws} draws, beside random noise (the row above)."
            " A policy whose score does not move acts as a regressor. Latency: median "
            "`predict_action` at batch 1 on the measuring job's threads and device (see above). "
            "Chunk spread: the std of 16 sampled chunks for one observation (normalised action "
            "units, mean over 64 training observations), beside their RMSE to the demonstrated "
            "chunk: a spread near 0 is a collapsed generator. Gradients: over the whole run.",
            "",
            "| run | seed | step | diagnosed sampler | zero noise: score / success "
            "| mean of K: score / success | chunk spread / RMSE to demo | latency (ms) "
            "| grad median | grad p99 | non-finite steps |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r, s, f in finals:
            noise = f["noise"]
            cells = [
                f"{noise[k]['mean_score']:.3f} / {noise[k]['success_rate']:.3f}"
                if k in noise
                else "-"
                for k in ("zero", f"mean:{plan.noise_draws}")
            ]
            latency = ", ".join(f"{k}: {v:.1f}" for k, v in f["latency_ms"].items())
            spread = f.get("spread", {}).get(f["headline"])
            spread_cell = (
                f"{spread['spread']:.3f} / {spread['rmse_to_demo']:.3f}" if spread else "-"
            )
            t = f["train"]
            lines.append(
                f"| {r.name} | {s} | {f.get('step', '-')} | {f['headline']} | {cells[0]} | "
                f"{cells[1]} | {spread_cell} | {latency} | {t['grad_median']:.3g} | "
                f"{t['grad_p99']:.3g} | {t['nonfinite_steps']} |"
            )
    noisy = [(r, s, f) for r, s, f in finals if f["noise"]]
    if noisy and (plan.rate_metrics or plan.balance):
        lines += [
            "",
            "Task rates of the noise diagnostic (each row one training seed's test episodes):",
            "",
            "| run | seed | noise | episodes " + rate_head + "|",
            "|---|---|---|---|" + rate_rule,
        ]
        for r, s, f in noisy:
            for kind, entry in f["noise"].items():
                lines.append(
                    f"| {r.name} | {s} | {kind} | {entry['n_episodes']} |"
                    + task_rates(plan, [entry])
                )
    stem = plan.results / plan.name
    if curves:
        plot_curves(plan, curves, stem)
        lines += [
            "",
            f"![score and success against training compute and steps]({plan.name}.png)",
        ]
    if plan.notes:
        lines += ["", "## What the numbers show", "", plan.notes.strip()]
    path = stem.with_suffix(".md")
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def checkpoint_step(run_dir: Path) -> int:
    """The step of a run folder's latest checkpoint (where a resume starts), 0 when none."""
    latest = run_dir / "checkpoints" / "latest"
    match = re.fullmatch(r"step_(\d+)", latest.read_text().strip()) if latest.exists() else None
    return int(match[1]) if match else 0


def status_lines(plan: Plan, costs: dict[str, float], root: Path) -> list[str]:
    """Where each (run, seed) of the plan stands, read from the caches and the run folders under
    ``root`` without training anything: the marks evaluated, the step its latest checkpoint holds,
    the next mark, and the steps and one-thread hours to the last mark and its diagnostics."""
    lines = [
        f"| run | seed | marks evaluated ({plan.unit}) | checkpoint (step) | next mark (step) "
        "| steps to the last mark | one-thread hours left |",
        "|---|---|---|---|---|---|---|",
    ]
    total = 0.0
    for r in plan.runs:
        steps = mark_steps(plan, costs[r.name])
        for s in r.seeds:
            cache = read_cache(cache_path(plan, r, s))
            done = [m for m, st in zip(plan.marks, steps, strict=True) if str(st) in cache["marks"]]
            trained = max(
                [checkpoint_step(root / f"{r.name}_s{s}")]
                + [st for st in steps if str(st) in cache["marks"]]
            )
            upcoming = [st for st in steps if str(st) not in cache["marks"]]
            if not pending(plan, r, s, costs):
                upcoming_cell = "done"
            elif upcoming:
                upcoming_cell = str(upcoming[0])
            else:
                upcoming_cell = "last-mark diagnostics"
            left = max(0, steps[-1] - trained)
            hours = left * costs[r.name] / 3600 if r.name in costs else None
            total += hours or 0.0
            lines.append(
                f"| {r.name} | {s} | {', '.join(f'{m:g}' for m in done) or '-'} | {trained} | "
                f"{upcoming_cell} | {left} | {'-' if hours is None else f'{hours:.1f}'} |"
            )
    lines += [
        "",
        f"{total:.1f} one-thread hours of training left in all (at the plan's step costs"
        + ("" if set(costs) >= {r.name for r in plan.runs} else "; runs without one: '-'")
        + f"; evaluations come on top), under run folders in {root}.",
    ]
    return lines


def argument_parser() -> argparse.ArgumentParser:
    """The options of ``cm-policy campaign``."""
    parser = argparse.ArgumentParser(
        prog="cm-policy campaign",
        allow_abbrev=False,  # an option is spelt out: --job is no --jobs
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument("plan", type=Path)
    parser.add_argument("--jobs", type=int, default=2, help="worker processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--device", default="cpu", help="cpu | cuda[:index] (training and policy)")
    parser.add_argument("--n-envs", type=int, default=None, help="envs per batch (plan's)")
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help="results folder (the plan's); the plan's "
        "step_costs.json is copied there first, so the marks stay the same steps",
    )
    parser.add_argument("--runs", default=None, help="comma-separated run names (all)")
    parser.add_argument(
        "--seeds",
        default=None,
        help="comma-separated training seeds (all): e.g. only the pairs that finish in a session",
    )
    parser.add_argument("--dataset", default=None, help="the plan's data set elsewhere (a copy)")
    parser.add_argument("--root", type=Path, default=None, help="run folders (default runs/NAME)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="change a plan field (a YAML value), e.g. task=robomimic_lift_lowdim, "
        'marks_steps=[2000], runs.isd.samplers=["1"]; FIELD+=[...] appends to a list, e.g. '
        "common+=[training.batch_size=1024]; repeatable",
    )
    parser.add_argument(
        "--fit-seconds",
        type=float,
        default=None,
        help="train to the one mark whose steps fit this many seconds of training here: step "
        "costs measured first on this device and threads (an equal-steps plan for a short "
        "session, e.g. on a GPU)",
    )
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument(
        "--status",
        action="store_true",
        help="where each (run, seed) stands (marks evaluated, checkpoint, steps and one-thread "
        "hours to the last mark) from the caches and the run folders under --root; trains nothing",
    )
    parser.add_argument(
        "--costs-only",
        action="store_true",
        help="measure (or read) the runs' step costs and print them with samples/s; nothing else",
    )
    parser.add_argument(
        "--no-reuse", action="store_true", help="train runs that name reuse=... here as well"
    )
    return parser


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, Plan, list[RunSpec], set[int]]:
    """A campaign command line read and checked without running anything: its options, the plan
    (with ``--set`` applied), every run of the plan, and the training seeds to train now; an
    unknown option, plan field, run or seed raises SystemExit."""
    args = argument_parser().parse_args(argv)
    plan = Plan.load(args.plan, args.set)
    every_run = plan.runs  # step costs are measured for all of them, whatever --runs trains
    if args.runs:
        names = args.runs.split(",")
        unknown = sorted(set(names) - {r.name for r in plan.runs})
        if unknown:
            known = [r.name for r in plan.runs]
            raise SystemExit(f"--runs: {unknown} are not among the plan's runs {known}")
        plan.runs = [r for r in plan.runs if r.name in names]
    # --seeds chooses what is trained now (e.g. the pairs that finish in a session); the report
    # still covers every seed of the plan.
    seeds = {s for r in plan.runs for s in r.seeds}
    if args.seeds:
        wanted = {int(s) for s in args.seeds.split(",")}
        if not wanted <= seeds:
            raise SystemExit(f"--seeds: {sorted(wanted - seeds)} are not among {sorted(seeds)}")
        seeds = wanted
    return args, plan, every_run, seeds


def main(argv: list[str] | None = None) -> None:
    """``cm-policy campaign PLAN [options]`` (``argv``: the arguments after ``campaign``)."""
    args, plan, every_run, seeds = parse(argv)
    command = " ".join(["cm-policy campaign", str(args.plan), *(f"--set '{c}'" for c in args.set)])
    if args.no_reuse:
        for run in plan.runs:
            run.reuse = None
    # Checked against the plans as written, before --dataset moves the data set.
    sources = {r.name: reused_source(plan, r) for r in plan.runs if r.reuse}
    if args.results:
        costs_file = plan.results / "step_costs.json"
        args.results.mkdir(parents=True, exist_ok=True)
        if costs_file.exists() and not (args.results / "step_costs.json").exists():
            shutil.copy(costs_file, args.results / "step_costs.json")
        plan.results = args.results.resolve()
    if args.dataset:
        plan.dataset = str(Path(args.dataset).resolve())
    setup = Setup(args.jobs, args.threads, args.device, args.n_envs)
    root = (args.root or Path("runs") / plan.name).resolve()
    if args.status:
        costs_file = plan.results / "step_costs.json"
        known = json.loads(costs_file.read_text()) if costs_file.exists() else {}
        if {r.name for r in every_run} - set(known) and plan.unit == "min":
            raise SystemExit(
                f"--status: {costs_file} has no step costs for every run yet, so the marks have no "
                "steps; the campaign (or --costs-only) measures them"
            )
        print("\n".join(status_lines(plan, known, root)))
        return
    root.mkdir(parents=True, exist_ok=True)
    fit_note = []
    if args.fit_seconds:
        from cm_policy.configs import compose
        from cm_policy.experiments.measure import step_costs

        here = step_costs(
            {
                r.name: compose("config", run_overrides(plan, r, r.seeds[0], root / "probe", setup))
                for r in plan.runs
            }
        )
        n_pairs = sum(1 for r in plan.runs for s in r.seeds if s in seeds)
        steps = fitted_steps(plan, here, n_pairs, args.jobs, args.fit_seconds)
        plan.marks_steps, plan.marks_min = [steps], []
        shown = ", ".join(f"{k} {v:.3f} s" for k, v in here.items())
        print(f"== {steps} steps fit {args.fit_seconds:.0f} s of training ({shown} per step here)")
        costs_file = plan.results / "step_costs.json"
        if not costs_file.exists():
            # No CPU costs to place a compute axis: this device's, said so in the report.
            write_json_atomic(costs_file, here)
            fit_note = [
                f"Step costs measured on this machine's training setup ({setup.describe()}), "
                "not one CPU thread: the compute axis is in minutes of that setup."
            ]
    costs = measured_costs(plan, root, every_run)
    if args.costs_only:  # e.g. to choose a network size that the machine carries
        from cm_policy.configs import compose

        for r in plan.runs:
            batch = int(
                compose("config", run_overrides(plan, r, r.seeds[0], root)).training.batch_size
            )
            steps = mark_steps(plan, costs[r.name])
            print(
                f"{r.name}: {costs[r.name]:.3f} s per step at batch {batch} (1 thread) = "
                f"{batch / costs[r.name]:.1f} samples/s; marks at steps {steps}"
            )
        return
    notes = take_reused(plan, costs, sources) + fit_note
    # Seed by seed, so that every run's first seed is done (and comparable) before second seeds.
    pairs = sorted(
        ((r, s) for r in plan.runs for s in r.seeds if s in seeds),
        key=lambda rs: plan.seed_index(rs[1]),
    )
    todo = [(plan, r, s, root, costs, setup) for r, s in pairs if pending(plan, r, s, costs)]
    if todo and not args.report_only:
        started = time.time()
        print(f"{len(todo)} (run, seed) pairs to do, {setup.describe()} -> {root}", flush=True)
        # SIGTERM (a time limit) leaves the pool through its context, which terminates the workers.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        context = mp.get_context("spawn")
        with context.Pool(args.jobs, _worker_init, maxtasksperchild=1) as pool:
            bar = tqdm(pool.imap_unordered(work, todo), total=len(todo), desc="runs")
            for status in bar:
                bar.write(f"[{(time.time() - started) / 60:.0f} min] {status}")
                write_report(plan, costs, command, notes)
    print(f"report: {write_report(plan, costs, command, notes)}")


if __name__ == "__main__":
    main()
