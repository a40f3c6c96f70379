"""The campaign runner (``cm-policy campaign``): marks at equal training compute, caching,
resuming, appended marks, reports."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from tiny_config import TINY_CAMPAIGN

from cm_policy.atomic import write_json_atomic
from cm_policy.experiments import campaign, score_bins

REPO = Path(__file__).resolve().parents[1]
CAMPAIGN = [sys.executable, "-m", "cm_policy.cli", "campaign"]


def test_campaign_trains_to_marks_evaluates_and_resumes(planner_pusht: Path, tmp_path: Path):
    results, root = tmp_path / "results", tmp_path / "runs"
    plan = {
        "name": "tiny",
        "task": "pusht_keypoints",
        "dataset": str(planner_pusht),
        "results": str(results),
        "common": list(TINY_CAMPAIGN),
        "marks_min": [0.01, 0.03],
        "grain": 2,
        "episodes_per_seed": 2,
        "n_envs": 2,
        "noise_draws": 2,
        "runs": [
            # The noise diagnostic on a sampler other than the method's headline (1 step).
            {
                "name": "isd",
                "method": "isd",
                "seeds": [0],
                "samplers": ["1", "2"],
                "noise_sampler": "2",
            },
            {"name": "reg", "method": "regression", "seeds": [0]},
        ],
    }
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump(plan))
    command = [*CAMPAIGN, str(plan_file), "--root", str(root)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]

    costs = json.loads((results / "step_costs.json").read_text())
    assert set(costs) == {"isd", "reg"} and costs["isd"] > costs["reg"] > 0
    for run, samplers in (("isd", {"1", "2"}), ("reg", {"1"})):
        cache = json.loads((results / "cache" / f"{run}_s0.json").read_text())
        # Marks are minutes of compute turned into steps by the run's own step cost.
        expected = sorted(max(2, round(m * 60 / costs[run] / 2) * 2) for m in plan["marks_min"])
        assert sorted(int(s) for s in cache["marks"]) == sorted(set(expected))
        for mark in cache["marks"].values():
            assert set(mark["entries"]) == samplers
            for entry in mark["entries"].values():
                assert entry["n_episodes"] == 2 and entry["seeds"] == [100000, 100001]
        final = cache["final"]
        assert set(final["latency_ms"]) == samplers
        # The noise diagnostic runs for the generative method only.
        assert set(final["noise"]) == ({"zero", "mean:2"} if run == "isd" else set())
        assert final["headline"] == ("2" if run == "isd" else "1")
        assert final["train"]["nonfinite_steps"] == 0 and final["step"] == max(expected)
        # The degeneracy check of generative runs: chunks vary across noise draws.
        if run == "isd":
            assert set(final["spread"]) == samplers
            assert all(v["spread"] > 0 and v["rmse_to_demo"] > 0 for v in final["spread"].values())
        else:
            assert "spread" not in final
        # Each mark carries its interval's stability evidence: gradients and raw loss terms.
        previous = 0
        for step in sorted(set(expected)):
            train = cache["marks"][str(step)]["train"]
            assert train["steps"] == [previous, step] and train["logged_steps"] == step - previous
            assert train["nonfinite_steps"] == 0 and train["grad_max"] >= train["grad_median"]
            raw = {"isd": {"loss", "loss_fm", "loss_sd"}, "reg": {"loss", "loss_mse"}}[run]
            assert set(train["loss"]) == raw
            previous = step
        # Only the marks' checkpoints and the last two stay (a long campaign would fill the disk).
        kept = {p.name for p in (root / f"{run}_s0" / "checkpoints").glob("step_*")}
        marks = {f"step_{s:07d}" for s in expected}
        assert marks <= kept and len(kept - marks) <= 1, (sorted(kept), sorted(marks))
    report = (results / "tiny.md").read_text()
    assert "| isd | 1 | 0.03 | 1/1 | 2 |" in report and (results / "tiny.png").stat().st_size
    # A second invocation finds everything done: nothing is trained or evaluated again.
    stamps = {p: p.stat().st_mtime_ns for p in (results / "cache").glob("*.json")}
    again = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 0 and "pairs to do" not in again.stdout
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    # Elsewhere (a GPU session's results): the plan's step costs travel along, so the marks stay
    # the same steps; a subset of the runs is reported alone; an unknown run name is refused.
    other = tmp_path / "gpu_results"
    subset = [*command, "--results", str(other), "--runs", "isd", "--report-only"]
    done = subprocess.run(subset, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((other / "step_costs.json").read_text()) == costs
    report = (other / "tiny.md").read_text()
    assert "| isd | isd |" in report and "| reg | regression |" not in report
    wrong = subprocess.run(
        [*command, "--runs", "nosuch", "--report-only"], capture_output=True, text=True, check=False
    )
    assert wrong.returncode != 0 and "nosuch" in wrong.stderr and "'isd'" in wrong.stderr
    wrong = subprocess.run(
        [*command, "--seeds", "0,7", "--report-only"], capture_output=True, text=True, check=False
    )
    assert wrong.returncode != 0 and "--seeds: [7]" in wrong.stderr, wrong.stderr[-2000:]
    # A noise diagnostic on a sampler the run does not evaluate is refused when the plan is read.
    bad = {**plan, "runs": [{**plan["runs"][0], "noise_sampler": "16"}]}
    bad_file = tmp_path / "bad.yaml"
    bad_file.write_text(yaml.safe_dump(bad))
    wrong = subprocess.run(
        [*CAMPAIGN, str(bad_file), "--report-only"], capture_output=True, text=True, check=False
    )
    assert wrong.returncode != 0 and "noise_sampler='16'" in wrong.stderr, wrong.stderr[-2000:]

    # A mark appended to the finished plan: every run trains on from its last checkpoint, the new
    # mark is evaluated, the last-mark diagnostics move there and the earlier ones are kept.
    before = {r: json.loads((results / "cache" / f"{r}_s0.json").read_text()) for r in costs}
    plan["marks_min"] = [*plan["marks_min"], 0.05]  # kept so for the rest of the test
    plan_file.write_text(yaml.safe_dump(plan))
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    for run in costs:
        cache = json.loads((results / "cache" / f"{run}_s0.json").read_text())
        new_step = max(2, round(0.05 * 60 / costs[run] / 2) * 2)
        old_last = before[run]["final"]["step"]
        assert set(cache["marks"]) == {*before[run]["marks"], str(new_step)}
        assert {k: cache["marks"][k] for k in before[run]["marks"]} == before[run]["marks"]
        assert cache["marks"][str(new_step)]["train"]["steps"] == [old_last, new_step]
        assert cache["final"]["step"] == new_step
        assert cache["earlier_finals"] == [before[run]["final"]]
    log = (root / "isd_s0.log").read_text()
    assert log.count("training isd on pusht_keypoints") == 3  # one training call per mark
    # Under the cosine schedule a run trained toward another last step is refused, not bent.
    assert campaign.schedule_problem(root / "isd_s0", 10**6) is None  # constant: fine
    config = root / "isd_s0" / "config.yaml"
    config.write_text(config.read_text().replace("lr_schedule: constant", "lr_schedule: cosine"))
    problem = campaign.schedule_problem(root / "isd_s0", 10**6)
    assert problem and "cosine" in problem and "lr_schedule=constant" in problem

    # A run of another plan that is the same training (a recipe study's winner in the main
    # campaign) is reused: its caches are copied, nothing is trained; any difference is refused.
    reuse = {
        **plan,
        "name": "tiny_reuse",
        "results": str(tmp_path / "reuse_results"),
        "runs": [
            {
                "name": "isd_again",
                "method": "isd",
                "seeds": [0],
                "samplers": ["1", "2"],
                "noise_sampler": "2",
                "reuse": f"{plan_file}:isd",
            }
        ],
    }
    reuse_file = tmp_path / "reuse.yaml"
    reuse_file.write_text(yaml.safe_dump(reuse))
    reuse_root = tmp_path / "reuse_runs"
    again = [
        *CAMPAIGN,
        str(reuse_file),
        "--root",
        str(reuse_root),
    ]
    done = subprocess.run(again, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "pairs to do" not in done.stdout and not (reuse_root / "isd_again_s0").exists()
    copied = json.loads((tmp_path / "reuse_results" / "cache" / "isd_again_s0.json").read_text())
    original = json.loads((results / "cache" / "isd_s0.json").read_text())
    assert copied["marks"] == original["marks"] and copied["reused_from"].endswith(":isd seed 0")
    report = (tmp_path / "reuse_results" / "tiny_reuse.md").read_text()
    assert "is the run `isd` of" in report and f"| {costs['isd']:.3f} |" in report
    # Its marks in this plan's minutes: its steps at the cost measured beside this plan's runs.
    here = json.loads((tmp_path / "reuse_results" / "step_costs.json").read_text())["isd_again"]
    minutes = ", ".join(f"{s * here / 60:.1f}" for s in sorted(map(int, original["marks"])))
    assert f"its marks are at {minutes} minutes" in report
    reuse["common"] = [*plan["common"], "training.lr=1.0e-3"]
    reuse_file.write_text(yaml.safe_dump(reuse))
    wrong = subprocess.run([*again, "--report-only"], capture_output=True, text=True, check=False)
    assert wrong.returncode != 0 and "training.lr=1.0e-3" in wrong.stderr, wrong.stderr[-2000:]

    # A session that trains some runs (--runs) measures every run's cost, and a run missing from
    # the cached costs is measured beside one that is there, the cached costs left as they were.
    costs_file = results / "step_costs.json"
    costs_file.write_text(json.dumps({"isd": costs["isd"]}))
    done = subprocess.run(
        [*command, "--runs", "isd", "--costs-only"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "step costs of ['reg'] measured beside 'isd'" in done.stdout, done.stdout[-2000:]
    measured = json.loads(costs_file.read_text())
    assert set(measured) == {"isd", "reg"} and measured["isd"] == costs["isd"]
    assert 0 < measured["reg"] < measured["isd"]


def report_plan(tmp_path: Path, **fields) -> dict:
    """A one-mark plan for report tests on hand-made caches in ``tmp_path``; ``fields`` added."""
    base = {
        "dataset": None,
        "results": str(tmp_path),
        "common": [],
        "marks_min": [10],
        "grain": 10,
    }
    return {**base, **fields}


def test_report_pools_task_rates_and_the_balance_of_two_outcomes(
    tmp_path: Path,
):
    """A two-goal style plan: shares of all episodes and the balance of A among A + B, pooled over
    seeds, in the score table and in the noise diagnostic's rates."""
    plan = report_plan(
        tmp_path,
        name="modes",
        task="pusht_twogoal",
        rate_metrics=["reached_A", "reached_B"],
        balance=["reached_A", "reached_B"],
        runs=[{"name": "gen", "method": "isd", "seeds": [0, 1], "samplers": ["1"]}],
    )
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump(plan))
    loaded = campaign.Plan.load(plan_file)

    def entry(n: int, a: int, b: int) -> dict:
        return {
            "n_episodes": n,
            "mean_score": 0.5,
            "success_rate": (a + b) / n,
            "mean_score_ci95": [0.4, 0.6],
            "reached_A": a / n,
            "reached_B": b / n,
        }

    step = campaign.mark_steps(loaded, 1.0)[0]
    final = {
        "headline": "1",
        "latency_ms": {"1": 1.0},
        "noise": {"zero": entry(100, 0, 40), "mean:4": entry(100, 20, 20)},
        "train": {"grad_median": 1.0, "grad_p99": 2.0, "nonfinite_steps": 0},
    }
    # Seed 0: 30 A, 10 B of 100; seed 1: 10 A, 30 B of 100 -> 40 A of 80 solved, pooled.
    for seed, (a, b) in ((0, (30, 10)), (1, (10, 30))):
        cache = {"marks": {str(step): {"minutes": 10, "entries": {"1": entry(100, a, b)}}}}
        write_json_atomic(tmp_path / "cache" / f"gen_s{seed}.json", {**cache, "final": final})
    text = campaign.write_report(loaded, {"gen": 1.0}, "cmd").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| gen | 1 | 10 | 2/2 |"))
    assert "| 0.200 [" in row  # reached_A pooled: 40 of 200 episodes
    assert row.rstrip().endswith("of 80 |") and "| 0.500 [0.393, 0.607] of 80 |" in row
    # The zero-noise diagnostic that reaches only B shows a balance of 0 among its 40 solved.
    assert "| gen | 0 | zero | 100 | 0.000 [" in text and "| 0.000 [0.000, 0.088] of 40 |" in text
    # A balance that names anything but two rate metrics is refused when the plan is read.
    plan_file.write_text(yaml.safe_dump({**plan, "balance": ["reached_A", "between"]}))
    with pytest.raises(SystemExit, match="balance must name two of rate_metrics"):
        campaign.Plan.load(plan_file)


def test_report_compares_every_entry_with_the_reference(
    tmp_path: Path,
):
    """Each entry minus the reference at a mark: the score difference with the two pooled
    intervals combined, the success difference with Newcombe's interval, and the reading."""
    plan = report_plan(
        tmp_path,
        name="versus",
        task="pusht_keypoints",
        reference="gen 1",
        runs=[
            {"name": "gen", "method": "isd", "seeds": [0, 1], "samplers": ["1"]},
            {"name": "avg", "method": "regression", "seeds": [0, 1]},
        ],
    )
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump(plan))
    loaded = campaign.Plan.load(plan_file)
    step = campaign.mark_steps(loaded, 1.0)[0]

    def entry(score: float, half: float, success: float) -> dict:
        return {
            "n_episodes": 100,
            "mean_score": score,
            "mean_score_ci95": [score - half, score + half],
            "success_rate": success,
        }

    for name, e in (("gen", entry(0.5, 0.1, 0.40)), ("avg", entry(0.8, 0.05, 0.45))):
        for seed in (0, 1):
            cache = {"marks": {str(step): {"minutes": 10, "entries": {"1": e}}}}
            write_json_atomic(tmp_path / "cache" / f"{name}_s{seed}.json", cache)
    text = campaign.write_report(loaded, {"gen": 1.0, "avg": 1.0}, "cmd").read_text()
    assert "## Against `gen 1`" in text
    row = next(line for line in text.splitlines() if line.startswith("| avg 1 | 10 |"))
    # Score: 0.3 +- hypot(0.1 / sqrt 2, 0.05 / sqrt 2) = 0.079, above; success: 0.05 with
    # Newcombe's interval from the Wilson intervals of 90/200 and 80/200, level.
    assert "| +0.300 +- 0.079 | +0.050 [-0.047, +0.145] | above, level |" in row
    assert row.endswith("| 0.800, 0.800; 0.500, 0.500 |")
    assert not any(line.startswith("| gen 1 | 10 |") for line in text.splitlines())
    assert campaign.reading(-0.15, -0.05) == "below" and campaign.reading(-0.04, 0.06) == "level"
    # Rates of 0 on both sides: an interval around 0 of the Wilson widths, not a point.
    zero = [{**e, "success_rate": 0.0} for e in (entry(0.3, 0.05, 0), entry(0.5, 0.1, 0))]
    pooled = [campaign.pooled_entry([z] * 2) for z in zero]
    _, _, d, (low, high) = campaign.difference(*pooled)
    assert d == 0 and low == pytest.approx(-0.0188, abs=1e-4) and high == -low
    # A reference that is not one of the plan's entries is refused when the plan is read.
    plan_file.write_text(yaml.safe_dump({**plan, "reference": "gen 16"}))
    with pytest.raises(SystemExit, match="reference must be one of"):
        campaign.Plan.load(plan_file)


def test_score_bins_split_what_the_mean_score_lacks(
    tmp_path: Path,
):
    """score_bins: episodes land in their bins by best reward (successes apart), the
    bins' shares add up to 1 - mean_score, and folders of evaluations are read in step order (the
    last mark's diagnostics last)."""
    rewards = [0.0, 0.3, 0.3, 0.7, 0.9, 0.96, 1.0, 1.0]
    episodes = [{"max_reward": r, "success": r == 1.0} for r in rewards]
    counts, lost = score_bins.bin_losses(episodes)
    assert counts.tolist() == [1, 2, 1, 1, 1, 2]
    assert lost.sum() == pytest.approx(1 - sum(rewards) / len(rewards))
    assert lost[1] == pytest.approx(1.4 / 8) and lost[-1] == 0.0
    with pytest.raises(ValueError, match="at least one episode"):
        score_bins.bin_losses([])

    for name in ("final_1_zero", "step900_1", "step10000_1", "step_000500", "step2000_2"):
        (tmp_path / "run" / "eval" / name).mkdir(parents=True)
        (tmp_path / "run" / "eval" / name / "episodes.json").write_text(json.dumps(episodes))
    out = tmp_path / "bins"
    subprocess.run(
        [sys.executable, "-m", "cm_policy.experiments.score_bins", str(tmp_path / "run" / "eval"),
         "--out", str(out)],
        cwd=Path(__file__).resolve().parents[1], check=True, capture_output=True,
    )  # fmt: skip
    rows = [line for line in (tmp_path / "bins.md").read_text().splitlines() if "| run " in line]
    assert [row.split("|")[1].strip() for row in rows] == [
        "run step_000500", "run step900_1", "run step2000_2", "run step10000_1", "run final_1_zero"
    ]  # fmt: skip
    assert all(row.split("|")[3].strip() == f"{sum(rewards) / 8:.3f}" for row in rows)
    assert (tmp_path / "bins.png").stat().st_size > 0
    with pytest.raises(FileNotFoundError, match=r"episodes\.json"):
        score_bins.evaluation_dirs([str(tmp_path)])

    # --pusht-angle: episodes split by the T's angle error at reset (read here from the env).
    from cm_policy.envs.pusht import GOAL_POSE, PushTEnv

    env, turned = PushTEnv(), {}
    for seed in range(100000, 100040):
        _, info = env.reset(seed=seed)
        error = (info["state"][4] - GOAL_POSE[2] + np.pi) % (2 * np.pi) - np.pi
        turned[seed] = abs(error) > np.pi / 2
    assert 0 < sum(turned.values()) < len(turned)
    episodes = [
        {"seed": s, "max_reward": float(not t), "success": not t} for s, t in turned.items()
    ]
    table = score_bins.angle_table(episodes)
    assert [row[0] for row in table] == ["0-45", "45-90", "90-135", "135-180"]
    assert sum(row[1] for row in table) == len(episodes)
    for name, n, score, rate, zero, stalled in table:
        if n:
            assert score == rate == (1.0 if name in ("0-45", "45-90") else 0.0)
            assert zero == (0 if score else n) and stalled == 0


def seed_entry(score: float, success: float) -> dict:
    """One seed's evaluation at a mark: 250 episodes, a mean_score interval of +-0.02."""
    return {
        "n_episodes": 250,
        "mean_score": score,
        "mean_score_ci95": [score - 0.02, score + 0.02],
        "success_rate": success,
    }


def test_report_reads_each_change_between_marks_and_equal_steps_plans(tmp_path: Path):
    """An equal-steps plan (marks_steps): every run's marks are the same steps; the report reads
    each entry's change from one mark to the next (rising / flat / falling), shows each seed, and
    lists the training statistics of each interval."""
    plan = report_plan(
        tmp_path,
        name="steps",
        task="pusht_keypoints",
        marks_min=[],
        marks_steps=[200, 100, 300],
        runs=[{"name": "gen", "method": "isd", "seeds": [0, 1], "samplers": ["1"]}],
    )
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump(plan))
    loaded = campaign.Plan.load(plan_file)
    assert campaign.mark_steps(loaded, 1.0) == campaign.mark_steps(loaded, 7.0) == [100, 200, 300]

    train = {
        "steps": [0, 100],
        "logged_steps": 100,
        "grad_median": 1.5,
        "grad_p99": 4.0,
        "grad_max": 9.0,
        "nonfinite_steps": 0,
        "lr_last": 3e-4,
        "loss": {"loss_fm": {"mean": 0.5, "last_tenth": 0.25}},
    }
    # 0.5 -> 0.8 (rising), 0.8 -> 0.79 (flat), success 0.3 -> 0.3 -> 0.1 (falling at the end).
    scores = {100: (0.5, 0.3), 200: (0.8, 0.3), 300: (0.79, 0.1)}
    for seed in (0, 1):
        marks = {
            str(k): {"minutes": k / 60, "entries": {"1": seed_entry(*v)}, "train": train}
            for k, v in scores.items()
        }
        write_json_atomic(tmp_path / "cache" / f"gen_s{seed}.json", {"marks": marks})
    text = campaign.write_report(loaded, {"gen": 1.0}, "cmd").read_text()
    assert (
        "equal training steps" in text
        and "| run sampler | 100 steps | 200 steps | 300 steps |" in text
    )
    rows = [line for line in text.splitlines() if line.startswith("| gen 1 | ")]
    assert any(
        r.startswith("| gen 1 | 100 -> 200 |") and r.endswith("| rising, flat |") for r in rows
    )
    assert any(
        r.startswith("| gen 1 | 200 -> 300 |") and r.endswith("| flat, falling |") for r in rows
    )
    assert "| gen | 1 | 300 | 2/2 | 500 | 0.790 +- 0.014 |" in text
    assert "| 0.790 / 0.10, 0.790 / 0.10 |" in text  # each seed beside the pooled figure
    assert "| gen | 0 | 0-100 | 1.5 | 4 | 9 | 0 | 0.0003 | loss_fm 0.5 (0.25) |" in text
    assert (tmp_path / "steps.png").stat().st_size > 0
    # Marks in both units, or in neither, are refused.
    plan_file.write_text(yaml.safe_dump({**plan, "marks_min": [10]}))
    with pytest.raises(SystemExit, match="either in minutes"):
        campaign.Plan.load(plan_file)


def test_changes_between_marks_are_read_on_the_seeds_that_have_both(tmp_path: Path):
    """While a second seed is still training, a change between marks (the table, the trend and
    the flat reading) is read on the seeds evaluated at both marks, and says so; it is never a
    change of seeds."""
    plan = report_plan(
        tmp_path,
        name="partial",
        task="pusht_keypoints",
        marks_min=[],
        marks_steps=[100, 200, 300],
        runs=[{"name": "gen", "method": "isd", "seeds": [0, 1], "samplers": ["1"]}],
        questions=[
            {"ask": "Does gen degrade?", "trend": ["gen 1"]},
            {"ask": "Which curves are flat?", "flat": True},
        ],
    )
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump(plan))
    loaded = campaign.Plan.load(plan_file)
    # Seed 0 has every mark (0.5 -> 0.8 -> 0.79); seed 1 only the first, far higher (0.9): pooled
    # into mark 100 it would turn the 100 -> 200 change into +0.1 (flat-looking) from +0.3.
    seed0 = {100: (0.5, 0.3), 200: (0.8, 0.3), 300: (0.79, 0.3)}
    for seed, scores in ((0, seed0), (1, {100: (0.9, 0.3)})):
        marks = {
            str(k): {"minutes": k / 60, "entries": {"1": seed_entry(*v)}} for k, v in scores.items()
        }
        write_json_atomic(tmp_path / "cache" / f"gen_s{seed}.json", {"marks": marks})
    text = campaign.write_report(loaded, {"gen": 1.0}, "cmd").read_text()
    assert "| gen | 1 | 100 | 2/2 | 500 | 0.700 +- 0.014 |" in text  # the mark itself: both seeds
    assert "| gen 1 | 100 -> 200 | 1/2 | +0.300 +- 0.028 |" in text
    assert "| gen 1 | 200 -> 300 | 1/2 | -0.010 +- 0.028 |" in text
    assert (
        "- `gen 1` (on seed 0 only, 1/2 seeds): 100 -> 200 rising (+0.300 +- 0.028); "
        "200 -> 300 flat (-0.010 +- 0.028). Mean_score best at 200, then -0.010 +- 0.028 by 300: "
        "holds" in text
    )
    assert "- flat: `gen 1` (200 -> 300, on seed 0 only, 1/2 seeds: mean_score -0.010" in text
    # Once seed 1 has every mark too, the readings pool both seeds and name none.
    write_json_atomic(
        tmp_path / "cache" / "gen_s1.json",
        {
            "marks": {
                str(k): {"minutes": k / 60, "entries": {"1": seed_entry(*v)}}
                for k, v in {100: (0.9, 0.3), 200: (0.8, 0.3), 300: (0.79, 0.3)}.items()
            }
        },
    )
    text = campaign.write_report(loaded, {"gen": 1.0}, "cmd").read_text()
    assert "| gen 1 | 100 -> 200 | 2/2 | +0.100 +- 0.020 |" in text
    assert "- `gen 1`: 100 -> 200 rising (+0.100 +- 0.020)" in text
    assert "seed 0 only" not in text


def test_report_answers_the_plan_s_questions(tmp_path: Path):
    """Each question of a plan gets its section: a comparison at every shared mark with its
    reading, a degradation read from the best mark to the last, the curves flat at their last
    mark, and the seeds' spread against one seed's episode interval."""
    plan = report_plan(
        tmp_path,
        name="asked",
        task="pusht_keypoints",
        marks_min=[],
        marks_steps=[100, 200, 300],
        runs=[
            {"name": "gen", "method": "isd", "seeds": [0, 1], "samplers": ["1", "2"]},
            {"name": "naive", "method": "meanflow", "seeds": [0, 1], "samplers": ["1"]},
            {"name": "base", "method": "ddpm", "seeds": [0, 1], "samplers": ["ddim:10"]},
        ],
        questions=[
            {"ask": "Does gen reach base?", "compare": ["gen 1", "base ddim:10"]},
            {"ask": "Does naive degrade while gen holds?", "trend": ["naive 1", "gen 1"]},
            {"ask": "Which curves are flat?", "flat": True},
            {"ask": "How far apart are the seeds?", "seeds": True},
        ],
    )
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump(plan))
    loaded = campaign.Plan.load(plan_file)

    # Per seed (0, 1): gen rises then holds; gen 2 the same with its success rising from 200
    # to 300; naive peaks at 200 and falls; base only reaches 200 and its seeds differ by 0.1
    # (beyond one seed's half-width 0.02). Success 0.4 unless a third value says otherwise.
    curves = {
        ("gen", "1"): {100: (0.80, 0.80), 200: (0.90, 0.90), 300: (0.91, 0.90)},
        ("gen", "2"): {100: (0.80, 0.80), 200: (0.90, 0.90), 300: (0.91, 0.90, 0.6)},
        ("naive", "1"): {100: (0.85, 0.85), 200: (0.93, 0.93), 300: (0.85, 0.85)},
        ("base", "ddim:10"): {100: (0.70, 0.80), 200: (0.85, 0.95)},
    }
    caches: dict = {}
    for (name, label), marks in curves.items():
        for seed in (0, 1):
            cache = caches.setdefault((name, seed), {"marks": {}})
            for k, v in marks.items():
                mark = cache["marks"].setdefault(str(k), {"minutes": k / 60, "entries": {}})
                mark["entries"][label] = seed_entry(v[seed], v[2] if len(v) > 2 else 0.4)
    for (name, seed), cache in caches.items():
        write_json_atomic(tmp_path / "cache" / f"{name}_s{seed}.json", cache)
    text = campaign.write_report(loaded, {"gen": 1.0, "naive": 1.0, "base": 1.0}, "cmd").read_text()
    section = text.split("## Does gen reach base?")[1].split("\n## ")[0]
    # 200 steps: gen 0.90 / 0.90 per seed -> 0.90; base 0.85 / 0.95 -> 0.90: level.
    assert "- at 100 steps (`gen 1` 2/2 seeds, `base ddim:10` 2/2 seeds): `gen 1` minus " in section
    assert "mean_score +0.050 +- 0.020 (above)" in section
    assert "- at 200 steps" in section and "mean_score +0.000 +- 0.020 (level)" in section
    assert "So far (not every mark or seed is in): at 200 steps, `gen 1` is level with" in section
    section = text.split("## Does naive degrade while gen holds?")[1].split("\n## ")[0]
    assert "- `naive 1`: 100 -> 200 rising (+0.080 +- 0.020); 200 -> 300 falling" in section
    assert "best at 200, then -0.080 +- 0.020 by 300: **degrades**" in section
    assert (
        "- `gen 1`: 100 -> 200 rising (+0.100 +- 0.020); 200 -> 300 flat (+0.005 +- 0.020)"
        in section
    )
    assert "Mean_score best at its last mark (300): no degradation" in section
    section = text.split("## Which curves are flat?")[1].split("\n## ")[0]
    # Flat: both changes' intervals hold 0; gen 2's score is as flat, its success rises.
    flat = "- flat: `gen 1` (200 -> 300: mean_score +0.005 +- 0.020 flat, success +0.000 ["
    assert flat in section and section.count("`gen 1`") == 1
    moving = section.split("- still moving: ")[1].split("\n")[0]
    assert "`gen 2` (200 -> 300: mean_score +0.005 +- 0.020 flat, success +0.200 [" in moving
    assert "] rising)" in moving.split("`gen 2`")[1].split("`")[0]
    assert "`naive 1` (200 -> 300: mean_score -0.080 +- 0.020 falling" in moving
    assert "`base ddim:10` (100 -> 200: mean_score +0.150 +- 0.020 rising" in moving
    section = text.split("## How far apart are the seeds?")[1].split("\n## ")[0]
    assert (
        "- `base ddim:10` at 200: 0.850, 0.950; spread 0.100 against 0.020 (**beyond**" in section
    )
    assert "- `gen 1` at 300: 0.910, 0.900; spread 0.010 against 0.020 (within)" in section
    # A question naming an entry the plan lacks, or of no known kind, is refused when read.
    for bad, words in (
        ({"ask": "x", "compare": ["gen 1", "gen 16"]}, "compare takes two of the plan's entries"),
        ({"ask": "x", "guess": True}, "expected exactly one of"),
        ({"compare": ["gen 1", "naive 1"]}, "expected a mapping with 'ask'"),
    ):
        plan_file.write_text(yaml.safe_dump({**plan, "questions": [bad]}))
        with pytest.raises(SystemExit, match=words):
            campaign.Plan.load(plan_file)


def test_report_reads_the_plan_s_targets_as_met_or_not(tmp_path: Path):
    """Each target of a plan is read as met or not met from the pooled figures, 'so far' while a
    seed or mark that could change it is still to come: a margin on mean_score with the success
    not below, a threshold over enough episodes at some mark, no fall between marks."""
    plan = report_plan(
        tmp_path,
        name="targets",
        task="pusht_keypoints",
        marks_min=[],
        marks_steps=[100, 200],
        runs=[
            {"name": "gen", "method": "isd", "seeds": [0, 1], "samplers": ["1"]},
            {"name": "base", "method": "ddpm", "seeds": [0, 1], "samplers": ["ddim:10"]},
        ],
        targets=[
            {"target": "T1", "not_below": ["gen 1", "base ddim:10"], "margin": 0.01},
            {"target": "T2", "reaches": "gen 1", "score": 0.9, "success": 0.5, "episodes": 500},
            {"target": "T3", "holds": ["gen 1"]},
            {"target": "T4", "not_below": ["base ddim:10", "gen 1"], "margin": 0.05},
            {"target": "T5", "holds": ["base ddim:10"]},
            {"target": "T6", "reaches": "gen 1", "score": 0.85, "success": 0.4, "episodes": 500},
        ],
    )
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump(plan))
    loaded = campaign.Plan.load(plan_file)
    costs = {"gen": 1.0, "base": 1.0}

    def write(name: str, seed: int, label: str, marks: dict) -> None:
        cache = {
            "marks": {
                str(k): {"minutes": k / 60, "entries": {label: seed_entry(*v)}}
                for k, v in marks.items()
            }
        }
        write_json_atomic(tmp_path / "cache" / f"{name}_s{seed}.json", cache)

    def statuses() -> dict[str, str]:
        text = campaign.write_report(loaded, costs, "cmd").read_text()
        section = text.split("## Targets")[1].split("\n## ")[0]
        rows = [line for line in section.splitlines() if line.startswith("- T")]
        return {r[2:4]: r.split(": ", 1)[1].split(". ", 1)[0] for r in rows}

    # base: both seeds, 0.97 / 0.5 at 100 and 0.935 / 0.45 at 200 (a fall of 0.035 +- 0.020).
    for seed in (0, 1):
        write("base", seed, "ddim:10", {100: (0.97, 0.5), 200: (0.935, 0.45)})
    # gen seed 0 at both marks, seed 1 at 100 only: pooled at 100 0.89 / 0.45 (short of T2);
    # at 200 seed 0 alone 0.92 / 0.6 would meet T2 but counts 250 episodes, not 500.
    write("gen", 0, "1", {100: (0.85, 0.4), 200: (0.92, 0.6)})
    write("gen", 1, "1", {100: (0.93, 0.5)})
    assert statuses() == {
        "T1": "*not met so far*",  # 0.92 - 0.935 = -0.015 < -0.01, seed 1 still to come
        "T2": "*not met so far*",
        "T3": "*met so far*",
        "T4": "*not met so far*",  # base - gen = +0.015 in score, success -0.15: below
        "T5": "**not met**",
        "T6": "**met**",  # at 100 over 500 episodes: met for good while seed 1 trains on
    }
    text = (tmp_path / "targets.md").read_text()
    assert "200: 0.920 / 0.600 (250 episodes, fewer than 500: not counted)" in text
    assert "mean_score -0.015 +- 0.024 (needs >= -0.010)" in text
    # Seed 1 reaches 200 (0.96 / 0.7): gen pooled 0.94 / 0.65 over 500 episodes.
    write("gen", 1, "1", {100: (0.93, 0.5), 200: (0.96, 0.7)})
    assert statuses() == {
        "T1": "**met**",  # +0.005 >= -0.01, success +0.2 (above)
        "T2": "**met**",
        "T3": "**met**",
        "T4": "**not met**",  # -0.005 >= -0.05, but success -0.2 lies below
        "T5": "**not met**",
        "T6": "**met**",
    }
    assert "first met at 200 steps" in (tmp_path / "targets.md").read_text()
    for bad, words in (
        ({"target": "x", "not_below": ["gen 1"]}, "not_below takes a list of two"),
        ({"target": "x", "reaches": "gen 1", "score": 0.9}, "reaches takes the options"),
        ({"target": "x", "holds": ["gen 1"], "margin": -1}, "holds takes the options"),
        ({"target": "x", "not_below": ["gen 1", "base ddim:10"], "margin": "a"}, "a number"),
        ({"target": "x", "holds": ["gen 1"], "reaches": "gen 1"}, "exactly one of"),
        ({"holds": ["gen 1"]}, "expected a mapping with 'target'"),
    ):
        plan_file.write_text(yaml.safe_dump({**plan, "targets": [bad]}))
        with pytest.raises(SystemExit, match=words):
            campaign.Plan.load(plan_file)


def test_status_says_where_each_run_stands_without_training(tmp_path: Path, capsys):
    """--status reads the caches and the run folders: the marks evaluated, the checkpoint a resume
    starts from, the next mark, the steps and one-thread hours to the last mark; it trains
    nothing and creates no run folder."""
    plan = report_plan(
        tmp_path,
        name="where",
        task="pusht_keypoints",
        marks_min=[60, 120],
        runs=[
            {"name": "gen", "method": "isd", "seeds": [0, 1], "samplers": ["1"]},
            {"name": "base", "method": "ddpm", "seeds": [0], "samplers": ["ddim:10"]},
        ],
    )
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump(plan))
    root = tmp_path / "runs"
    # No step costs yet: a minutes plan has no steps to read, and says so.
    with pytest.raises(SystemExit, match="no step costs for every run"):
        campaign.main([str(plan_file), "--status", "--root", str(root)])
    assert not root.exists()
    # gen: 36 s per step -> marks at 100 and 200 steps; base: 18 s -> 200 and 400.
    write_json_atomic(tmp_path / "step_costs.json", {"gen": 36.0, "base": 18.0})
    mark = {"minutes": 1.0, "entries": {"1": seed_entry(0.9, 0.5)}}
    # gen seed 0: both marks and its last-mark diagnostics; seed 1: the first mark, a checkpoint
    # at 180; base: nothing evaluated, a checkpoint at 300.
    write_json_atomic(
        tmp_path / "cache" / "gen_s0.json",
        {"marks": {"100": mark, "200": mark}, "final": {"step": 200}},
    )
    write_json_atomic(tmp_path / "cache" / "gen_s1.json", {"marks": {"100": mark}})
    for name, step in (("gen_s1", 180), ("base_s0", 300)):
        (root / name / "checkpoints").mkdir(parents=True)
        (root / name / "checkpoints" / "latest").write_text(f"step_{step:07d}\n")
    campaign.main([str(plan_file), "--status", "--root", str(root)])
    out = capsys.readouterr().out
    assert "| gen | 0 | 60, 120 | 200 | done | 0 | 0.0 |" in out
    assert "| gen | 1 | 60 | 180 | 200 | 20 | 0.2 |" in out  # 20 x 36 s
    assert "| base | 0 | - | 300 | 200 | 100 | 0.5 |" in out  # resumes past its first mark's step
    assert "0.7 one-thread hours of training left in all" in out
    assert sorted(p.name for p in root.iterdir()) == ["base_s0", "gen_s1"]


def test_plan_fields_change_on_the_command_line_and_steps_fit_a_time(tmp_path: Path):
    """--set FIELD=VALUE / runs.RUN.FIELD=VALUE / FIELD+=[...] change a plan as it is read (a
    mistyped field or run is refused by name); --fit-seconds places one mark at the steps that
    fit."""
    plan = report_plan(
        tmp_path,
        name="base",
        task="pusht_keypoints",
        common=["model=unet_tiny"],
        runs=[
            {"name": "gen", "method": "isd", "seeds": [0], "samplers": ["1"]},
            {"name": "den", "method": "ddpm", "seeds": [0]},
        ],
    )
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump(plan))
    changes = [
        "task=pusht_state",
        "marks_min=[]",
        "marks_steps=[300, 100]",
        "common+=[training.batch_size=64]",
        'runs.gen.samplers=["1", "2"]',
        "name=changed",
    ]
    loaded = campaign.Plan.load(plan_file, changes)
    assert loaded.task == "pusht_state" and loaded.name == "changed"
    assert loaded.marks_steps == [100, 300] and loaded.unit == "steps"
    assert loaded.common == ["model=unet_tiny", "training.batch_size=64"]
    assert loaded.runs[0].samplers == ["1", "2"] and loaded.runs[1].samplers == []
    assert campaign.Plan.load(plan_file).task == "pusht_keypoints"  # the file is unchanged
    for bad, message in (
        ("nosuch=1", "unknown plan keys"),
        ("runs.zzz.seeds=[1]", "has no run 'zzz'"),
        ("runs.gen.bogus=1", "unknown keys ['bogus']"),
        ("noequals", "expected FIELD=VALUE"),
    ):
        with pytest.raises(SystemExit, match=re.escape(message)):
            campaign.Plan.load(plan_file, [bad])
    # Two pairs, one job: two rounds of the runs' mean cost (0.2 s) times the trainer's overhead.
    from cm_policy.experiments.measure import RUN_OVERHEAD

    costs = {"gen": 0.1, "den": 0.3}
    steps = campaign.fitted_steps(loaded, costs, pairs=2, jobs=1, seconds=600)
    assert steps == int(600 / (RUN_OVERHEAD * 0.2 * 2)) // 10 * 10
    assert campaign.fitted_steps(loaded, costs, pairs=2, jobs=2, seconds=600) >= 2 * steps - 10
    assert campaign.fitted_steps(loaded, costs, pairs=2, jobs=1, seconds=0.01) == loaded.grain
