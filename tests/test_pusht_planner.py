"""The PushT demonstration planner: it succeeds, and what it records is faithful and repeatable."""

import numpy as np
import pytest

from cm_policy.envs.pusht import PushTEnv, block_keypoints, render_state
from cm_policy.envs.pusht_planner import PlannedEpisode, generate, plan_episode

SEEDS = (0, 1)


@pytest.fixture(scope="module")
def episodes() -> dict[int, PlannedEpisode]:
    return {seed: plan_episode(seed, render_size=None) for seed in SEEDS}


@pytest.mark.parametrize("seed", SEEDS)
def test_planned_episode_succeeds_within_the_eval_horizon(episodes, seed):
    episode = episodes[seed]
    assert episode.success
    assert episode.max_coverage > 0.95
    assert 0 < episode.n_steps <= 300


@pytest.mark.parametrize("seed", SEEDS)
def test_arrays_follow_the_dataset_schema(episodes, seed):
    episode = episodes[seed]
    n = episode.n_steps
    assert episode.state.shape == (n, 5) and episode.state.dtype == np.float32
    assert episode.keypoint.shape == (n, 9, 2) and episode.keypoint.dtype == np.float32
    assert episode.action.shape == (n, 2) and episode.action.dtype == np.float32
    assert episode.n_contacts.shape == (n, 1) and episode.n_contacts.dtype == np.float32
    assert episode.img is None
    assert np.all((episode.action >= 0) & (episode.action <= 512))
    assert np.all((episode.state[:, 4] >= 0) & (episode.state[:, 4] < 2 * np.pi))
    assert episode.n_contacts.max() > 0


@pytest.mark.parametrize("seed", SEEDS)
def test_keypoints_follow_the_block(episodes, seed):
    episode = episodes[seed]
    expected = np.stack([block_keypoints(s[2:5].astype(np.float64)) for s in episode.state])
    np.testing.assert_allclose(episode.keypoint, expected, atol=1e-3)


@pytest.mark.parametrize("seed", SEEDS)
def test_open_loop_replay_reproduces_the_recording(episodes, seed):
    episode = episodes[seed]
    env = PushTEnv()
    env.reset(options={"state": episode.state[0]})
    for t, action in enumerate(episode.action):
        state = env.get_state()
        state[4] %= 2 * np.pi
        np.testing.assert_array_equal(state.astype(np.float32), episode.state[t])
        _, _, terminated, _, info = env.step(action)
        assert info["n_contacts"] == episode.n_contacts[t, 0]
        assert terminated == (t == episode.n_steps - 1)
    assert info["is_success"]


def test_same_seed_gives_the_same_episode(episodes):
    again = plan_episode(SEEDS[0], render_size=None)
    first = episodes[SEEDS[0]]
    for name in ("state", "keypoint", "action", "n_contacts"):
        np.testing.assert_array_equal(getattr(again, name), getattr(first, name))


def test_images_are_the_rendered_states():
    episode = plan_episode(SEEDS[0], max_steps=3)
    assert episode.n_steps == 3 and not episode.success
    assert episode.img.shape == (3, 96, 96, 3) and episode.img.dtype == np.float32
    np.testing.assert_array_equal(episode.img[2], render_state(episode.state[2], 96))


def test_generate_yields_every_attempt_in_seed_order():
    episodes = list(generate(2, seed=5, workers=2, render=False, progress=False))
    assert [e.seed for e in episodes] == [5, 6]
    np.testing.assert_array_equal(episodes[1].action, plan_episode(6, render_size=None).action)
