"""Two-goal PushT: reward and success against both goals, the planner's goal choice, the
mode metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
from tiny_config import TINY

from cm_policy.envs.pusht import COLOR_GOAL, coverage_of, tee_geometry
from cm_policy.envs.pusht_planner import goal_choice, plan_episode
from cm_policy.evaluation.runner import EpisodeResult
from cm_policy.tasks import load_task
from cm_policy.tasks.pusht_twogoal import GOALS, TwoGoalPushTEnv, is_between

TASK = {"env": "pusht_twogoal", "obs_type": "keypoints"}


def at(env: TwoGoalPushTEnv, block: tuple[float, float, float]) -> dict:
    """Info after one step with the agent parked far from a block placed at ``block``."""
    env.reset(options={"state": np.array([30.0, 480.0, *block])})
    _, reward, terminated, _, info = env.step(np.array([30.0, 480.0]))
    return {"reward": reward, "terminated": terminated, **info}


def test_goals_are_apart_and_either_one_succeeds():
    assert coverage_of(np.array(GOALS[0]), tee_geometry(*GOALS[1])) < 0.10
    env = load_task(TASK).make_env()
    for k, goal in enumerate(GOALS):
        info = at(env, goal)
        assert info["reached"] == k and info["is_success"] and info["terminated"]
        assert info["reward"] == 1.0 and info["goal_coverage"][1 - k] < 0.10
    # Half-way between the goals neither is covered enough; the reward is the better coverage.
    middle = tuple((np.array(GOALS[0]) + np.array(GOALS[1])) / 2)
    info = at(env, middle)
    assert info["reached"] == -1 and not info["is_success"] and not info["terminated"]
    assert info["reward"] == pytest.approx(min(1.0, max(info["goal_coverage"]) / 0.95))
    assert is_between(np.array(middle[:2]))
    assert not is_between(np.array(GOALS[0][:2])) and not is_between(np.array([249.2, 400.0]))
    # A block a little off goal B: the reward follows B's coverage, not A's.
    info = at(env, (GOALS[1][0] + 8.0, GOALS[1][1], GOALS[1][2]))
    assert info["reward"] == pytest.approx(info["goal_coverage"][1] / 0.95)
    assert 0.5 < info["goal_coverage"][1] < 0.95 and info["goal_coverage"][0] == 0.0


def test_renders_show_both_goals():
    env = TwoGoalPushTEnv(obs_type="image", video_size=256)
    env.reset(options={"state": np.array([30.0, 480.0, 249.2, 120.0, 0.0])})
    frame = env.render()
    for goal in GOALS:  # a point inside each goal's T (its bar), in frame pixels
        inside = tee_geometry(*goal).representative_point()
        x, y = round(inside.x / 512 * 256), round(inside.y / 512 * 256)
        assert tuple(frame[y, x]) == COLOR_GOAL, goal
    obs, _ = env.reset(seed=1)
    assert obs["image"].shape == (96, 96, 3)


def test_goal_choice_is_seeded_and_balanced():
    choices = [goal_choice(s, 2) for s in range(2000)]
    assert choices == [goal_choice(s, 2) for s in range(2000)]
    assert 0.46 < np.mean(choices) < 0.54  # 2000 fair draws: within 3.6 standard deviations


def test_planner_delivers_the_block_to_the_chosen_goal():
    seed = next(s for s in range(50) if goal_choice(s, 2) == 1)
    episode = plan_episode(seed, render_size=None, goal=GOALS[1])
    assert episode.success
    # Replayed from the recorded first state in the two-goal env, it ends on goal B.
    env = TwoGoalPushTEnv()
    env.reset(options={"state": episode.state[0].astype(np.float64)})
    for action in episode.action:
        _, _, terminated, _, info = env.step(action.astype(np.float64))
    assert terminated and info["reached"] == 1


def test_mode_metrics_on_hand_made_episodes():
    task = load_task(TASK)

    def episode(goal: str | None, block: tuple[float, float]) -> EpisodeResult:
        reached = {"A": 0, "B": 1, None: -1}[goal]
        state = np.array([0.0, 0.0, *block, math.pi / 4])
        outcome = task.episode_outcome({"reached": reached, "state": state})
        return EpisodeResult(0, 1.0 if goal else 0.3, goal is not None, 10, None, outcome)

    results = [episode("A", GOALS[0][:2])] * 3 + [episode("B", GOALS[1][:2])]
    results += [episode(None, (249.2, 256.0))] * 2 + [episode(None, (249.2, 450.0))] * 4
    metrics = task.summarize_outcomes(results)
    assert metrics["reached_A"] == 0.3 and metrics["reached_B"] == 0.1
    assert metrics["mode_balance_A"] == 0.75 and metrics["between"] == 0.2
    lo, hi = metrics["mode_balance_A_ci95"]
    assert lo < 0.75 < hi and hi - lo > 0.3  # four solved episodes say little
    assert results[0].outcome == {
        "goal": "A",
        "between": False,
        "final_block": [GOALS[0][0], GOALS[0][1], math.pi / 4],
    }


def test_generate_train_and_evaluate_with_mode_metrics(tmp_path):
    import json

    from cm_policy.cli import run_command
    from cm_policy.data import ReplayBuffer

    data = tmp_path / "twogoal.zarr"
    run_command(["data", "generate", "pusht_twogoal", "n=2", f"out={data}", "workers=1"])
    buffer = ReplayBuffer.load(data)
    stats = json.loads((data / "generation.json").read_text())
    goals = [int(buffer.get_episode(i)["goal"][0, 0]) for i in range(buffer.n_episodes)]
    assert goals == [goal_choice(s, 2) for s in range(2)]  # seeds 0 and 1 both succeed
    assert stats["episodes_per_goal"] == [goals.count(0), goals.count(1)]
    assert "goal" not in load_task(TASK).dataset_keys()  # never an observation
    run = tmp_path / "run"
    run_command(
        [
            "train",
            "task=pusht_twogoal",
            f"task.dataset_path={data}",
            *TINY,
            "training.steps=2",
            f"output_dir={run}",
        ]
    )
    out = tmp_path / "eval"
    metrics = run_command(
        ["eval", f"checkpoint={run}", "n_episodes=2", "n_envs=1", "n_videos=0",
         "max_steps=16", f"output_dir={out}"]
    )  # fmt: skip
    episodes = json.loads((out / "episodes.json").read_text())
    outcomes = [e["outcome"] for e in episodes]
    assert all(o["goal"] is None and len(o["final_block"]) == 3 for o in outcomes)
    assert metrics["reached_A"] == metrics["reached_B"] == 0.0
    assert metrics["between"] == np.mean([o["between"] for o in outcomes])


def test_still_agent_floor_follows_where_the_block_starts():
    """twogoal_still: an agent that never moves ends 'between' exactly when its block
    started there, and reaches no goal."""
    from cm_policy.experiments import twogoal_still

    task = load_task(TASK)
    env = task.make_env()
    started = {}
    for seed in range(100000, 100040):
        _, info = env.reset(seed=seed)
        started[seed] = is_between(info["state"][2:4])
    assert any(started.values()) and not all(started.values())
    for seed in [
        next(s for s, b in started.items() if b),
        next(s for s, b in started.items() if not b),
    ]:
        result = twogoal_still.still_episode(task, env, seed, steps=50)
        assert result.outcome["goal"] is None and not result.success
        assert result.outcome["between"] == started[seed] and 0.0 <= result.max_reward < 1.0


def test_mode_split_per_initial_state():
    """twogoal_modes on hand-made draws: a state whose draws reach both goals is split,
    one whose draws all reach A is not, and a state with one goal reached does not count."""
    from cm_policy.experiments import twogoal_modes

    ends = {1: ["A", "B", "A", "A"], 2: ["A", "A", "A", "A"], 3: ["B", "none", "between", "none"]}
    episodes = [
        {
            "seed": s,
            "ended": e,
            "success": e in ("A", "B"),
            "max_reward": 1.0 if e in ("A", "B") else 0.5,
        }
        for s, row in ends.items()
        for e in row
    ]
    summary = twogoal_modes.summarize_modes(episodes)
    assert summary["states"] == 3 and summary["episodes"] == 12
    assert summary["success_rate"] == pytest.approx(9 / 12)
    assert summary["balance_A"] == pytest.approx(7 / 9)
    assert summary["between"] == pytest.approx(1 / 12)
    assert summary["states_two_reached"] == 2 and summary["split"] == pytest.approx(0.5)
    assert summary["minority"] == pytest.approx((1 / 4 + 0) / 2)
    assert summary["all_alike"] == pytest.approx(1 / 3)
    assert twogoal_modes.outcome_name({"goal": None, "between": True}) == "between"
    assert twogoal_modes.outcome_name({"goal": "B", "between": False}) == "B"
    keys = {twogoal_modes.noise_key(s, d, 4) for s in range(100000, 100010) for d in range(4)}
    assert len(keys) == 40 and min(keys) > 10**6  # distinct, and apart from the env seeds
