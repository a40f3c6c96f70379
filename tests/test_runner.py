"""The closed-loop runner with simple policies, in parallel envs, and its outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cm_policy.envs.pusht import GOAL_POSE, PushTEnv
from cm_policy.evaluation.runner import evaluate, run_episodes
from cm_policy.evaluation.video import read_mp4
from cm_policy.tasks import load_task

TASK = {"env": "pusht", "obs_type": "state"}


class HoldStill:
    """Keeps the agent where it is: the block never moves."""

    def __init__(self):
        self.batches: list[tuple[int, ...]] = []

    def predict_action(self, obs):
        self.batches.append(obs["state"].shape)
        return np.repeat(obs["state"][:, -1:, :2], 8, axis=1)


def test_runner_parallel_envs_and_outputs(tmp_path: Path):
    policy = HoldStill()
    seeds = list(range(100000, 100005))
    metrics = evaluate(
        policy,
        load_task(TASK).env_factory(),
        seeds,
        tmp_path,
        n_envs=2,
        n_videos=2,
        max_steps=20,
        progress=False,
    )
    assert policy.batches[0] == (2, 2, 5)  # two envs, an observation history of two
    # The last wave has one seed: its padding env is not predicted for.
    assert policy.batches[-1] == (1, 2, 5) and policy.batches.count((1, 2, 5)) == 3
    episodes = json.loads((tmp_path / "episodes.json").read_text())
    assert [e["seed"] for e in episodes] == seeds
    # Holding still keeps each block at its initial pose: the score is its initial coverage.
    for episode in episodes:
        env = PushTEnv("state")
        _, info = env.reset(seed=episode["seed"])
        expected = min(1.0, info["coverage"] / 0.95)
        assert episode["max_reward"] == pytest.approx(expected, abs=1e-6)
        assert episode["n_steps"] == 20 and not episode["success"]
    assert metrics["mean_score"] == pytest.approx(np.mean([e["max_reward"] for e in episodes]))
    assert (tmp_path / "summary.png").stat().st_size > 0
    frames = read_mp4(tmp_path / "videos" / "seed_100000.mp4")
    assert frames.shape[0] == 21 and frames.shape[-1] == 3  # reset frame + 20 steps
    assert len(list((tmp_path / "videos").glob("*.mp4"))) == 2


class HoldStillSeeded(HoldStill):
    def predict_action(self, obs, generator=None):
        assert generator is not None and len(generator) == obs["state"].shape[0]
        return super().predict_action(obs)


class RecordNoise(HoldStill):
    """Holds still and records, per call, each row's first draw from its generator."""

    def __init__(self):
        super().__init__()
        self.draws: list[list[float]] = []

    def predict_action(self, obs, generator=None):
        import torch

        self.draws.append([float(torch.rand(1, generator=g)) for g in generator])
        return super().predict_action(obs)


def test_noise_keys_give_one_initial_state_several_draws():
    """With ``noise_keys`` the noise follows the key, not the env seed: one initial state under
    two keys gets two noise streams, the same key the same stream; a key per seed is required."""
    env_fn = load_task(TASK).env_factory()
    policy = RecordNoise()
    results = run_episodes(
        policy, env_fn, [7, 7, 7], n_envs=3, layout="sync", max_steps=16, progress=False,
        seeded_noise=True, noise_keys=[1, 2, 1],
    )  # fmt: skip
    assert [r.seed for r in results] == [7, 7, 7]
    assert len(policy.draws) == 2  # 16 steps of 8-action chunks
    for chunk in policy.draws:
        assert chunk[0] == chunk[2] and chunk[0] != chunk[1]
    assert policy.draws[0] != policy.draws[1]  # and per chunk
    plain = RecordNoise()
    run_episodes(plain, env_fn, [7], n_envs=1, max_steps=8, progress=False, seeded_noise=True)
    keyed = RecordNoise()
    run_episodes(
        keyed, env_fn, [5], n_envs=1, max_steps=8, progress=False, seeded_noise=True,
        noise_keys=[7],
    )  # fmt: skip
    assert plain.draws == keyed.draws  # without keys the seed is the key
    with pytest.raises(ValueError, match="one key per seed"):
        run_episodes(policy, env_fn, [7, 7], seeded_noise=True, noise_keys=[1], progress=False)
    with pytest.raises(ValueError, match="needs seeded_noise"):
        run_episodes(policy, env_fn, [7], noise_keys=[1], progress=False)


class Refuse:
    def predict_action(self, obs, generator=None):
        raise AssertionError("every episode was done: nothing should run")


def test_stopped_evaluation_resumes_from_its_finished_waves(tmp_path: Path):
    env_fn, seeds = load_task(TASK).env_factory(), list(range(100000, 100005))
    run = {"n_envs": 2, "max_steps": 10, "progress": False, "seeded_noise": True, "resume": True}
    full = evaluate(HoldStillSeeded(), env_fn, seeds, tmp_path / "full", **run)
    episodes = json.loads((tmp_path / "full" / "episodes.json").read_text())
    assert not (tmp_path / "full" / "episodes.partial.jsonl").exists()
    # Stopped after its first wave, mid-write of the second: the first wave's episodes are kept
    # (marked here by a changed score, so a rerun of them would show) and the rest run.
    out = tmp_path / "stopped"
    out.mkdir()
    kept = [{**episodes[0], "max_reward": 0.123}, episodes[1]]
    torn = json.dumps(episodes[2])[:20]
    (out / "episodes.partial.jsonl").write_text("".join(json.dumps(e) + "\n" for e in kept) + torn)
    resumed = evaluate(HoldStillSeeded(), env_fn, seeds, out, **run)
    again = json.loads((out / "episodes.json").read_text())
    assert again == [kept[0], *episodes[1:]] and resumed["resumed_episodes"] == 2
    assert resumed["mean_score"] == pytest.approx(
        full["mean_score"] + (0.123 - episodes[0]["max_reward"]) / len(seeds)
    )
    # Every episode finished before the stop: nothing runs, the metrics are the same.
    out = tmp_path / "all_done"
    out.mkdir()
    (out / "episodes.partial.jsonl").write_text("".join(json.dumps(e) + "\n" for e in episodes))
    assert evaluate(Refuse(), env_fn, seeds, out, **run)["mean_score"] == full["mean_score"]
    # Without seeded noise an episode's result does not follow its seed: refused.
    with pytest.raises(ValueError, match="seeded_noise"):
        evaluate(HoldStill(), env_fn, seeds, tmp_path / "x", **{**run, "seeded_noise": False})


class PlaceAtGoal:
    """A scripted 'policy' that cannot exist physically: the env is teleported to success."""

    def predict_action(self, obs):
        return np.repeat(obs["state"][:, -1:, :2], 8, axis=1)


def test_runner_records_success_and_stops_episode():
    class GoalEnv(PushTEnv):
        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            return super().reset(options={"state": [400.0, 100.0, *GOAL_POSE]})

    results = run_episodes(
        PlaceAtGoal(),
        lambda: GoalEnv("state"),
        [1, 2, 3],
        n_envs=1,
        max_steps=30,
        progress=False,
    )
    assert all(r.success and r.max_reward == 1.0 and r.n_steps == 1 for r in results)


def test_runner_rejects_bad_policy_output():
    class Wrong:
        def predict_action(self, obs):
            return np.zeros((5, 2))

    with pytest.raises(ValueError, match="n_action_steps"):
        run_episodes(Wrong(), load_task(TASK).env_factory(), [0], n_envs=1, progress=False)


@pytest.mark.parametrize(("method", "sampler", "steps"), [("isd", None, 1), ("ddpm", "ddpm", 3)])
def test_seeded_noise_makes_results_independent_of_the_layout(
    method: str, sampler: str | None, steps: int
):
    """Each episode's noise comes from its own seed and chunk index: the same episodes whether
    the envs run in one process in any number or in worker processes (stochastic DDPM steps
    included), and different ones without the seeding."""
    import torch

    from cm_policy.data import LinearNormalizer
    from cm_policy.evaluation.runner import evaluate_policy
    from cm_policy.policy import Policy

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    norm = LinearNormalizer()
    norm.fit(
        {"action": rng.uniform(50, 450, (100, 2)), "keypoints": rng.uniform(0, 512, (100, 20))}
    )
    spec = {
        "task": {"env": "pusht", "obs_type": "keypoints", "action_dim": 2,
                 "low_dim": {"keypoints": 20}, "image_keys": []},
        "horizon": 16, "n_obs_steps": 2, "n_action_steps": 8,
        "model": {"down_dims": [16, 32], "kernel_size": 3, "n_groups": 4, "time_embed_dim": 16},
        "method": {"name": method},
    }  # fmt: skip
    policy = Policy(spec, norm)
    seeds = list(range(100000, 100005))

    def episodes(**kwargs) -> list[tuple]:
        results = run_episodes_of(policy, seeds, **kwargs)
        return [(r.seed, r.max_reward, r.success, r.n_steps) for r in results]

    def run_episodes_of(policy, seeds, **kwargs):
        import tempfile

        with tempfile.TemporaryDirectory() as out:
            evaluate_policy(
                policy, seeds, out, steps=steps, sampler=sampler, max_steps=24, n_videos=0,
                progress=False, **kwargs,
            )  # fmt: skip
            return [type("R", (), e) for e in json.loads((Path(out) / "episodes.json").read_text())]

    # Equal up to float rounding, which differs between batch sizes (the convolutions' sums).
    reference = np.array(episodes(layout="sync", n_envs=5), dtype=float)
    for kwargs in (
        {"layout": "sync", "n_envs": 2},
        {"layout": "async", "n_envs": 2},
        {"n_envs": 1},
    ):
        np.testing.assert_allclose(episodes(**kwargs), reference, rtol=0, atol=1e-5)
    if method == "isd":  # the untrained DDPM's clipped chunks hardly depend on the noise
        torch.manual_seed(1)
        unseeded = np.array(episodes(layout="sync", n_envs=5, seeded_noise=False), dtype=float)
        assert np.abs(unseeded - reference).max() > 1e-3
