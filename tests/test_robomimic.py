"""robomimic tasks: rotations, the HDF5 layout, the robosuite env, the scripted experts."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from cm_policy.data.replay_buffer import DatasetError, ReplayBuffer
from cm_policy.data.robomimic_hdf5 import (
    ENV_ARGS_FILE,
    RobomimicDataset,
    RobomimicWriter,
    convert_to_zarr,
)
from cm_policy.envs.robosuite_env import (
    abs_action_to_env,
    axis_angle_to_matrix,
    convert_controller_config,
    env_to_abs_action,
    matrix_to_axis_angle,
    matrix_to_quaternion,
    matrix_to_rot6d,
    rot6d_to_matrix,
)

torch.set_num_threads(1)
HAS_ROBOSUITE = importlib.util.find_spec("robosuite") is not None
# Set to 1 to skip the tests that need robosuite where it is not installed; without it they fail
# (CI never sets it: a missing robosuite must not pass there as a row of silent skips).
SKIP_ROBOSUITE_ENV = "CM_POLICY_SKIP_ROBOSUITE"
ROBOSUITE_INSTALL = "pip install --no-deps robosuite==1.5.2"  # the README's test command


def require_robosuite() -> None:
    """Fail the calling test when robosuite is missing, saying how to install it, or skip it
    when the user opted out with CM_POLICY_SKIP_ROBOSUITE=1."""
    if HAS_ROBOSUITE:
        return
    if os.environ.get(SKIP_ROBOSUITE_ENV, "").strip() not in ("", "0"):
        pytest.skip(f"robosuite is not installed and {SKIP_ROBOSUITE_ENV}=1 skips its tests")
    pytest.fail(
        f"robosuite is not installed: install it with `{ROBOSUITE_INSTALL}` (as the README's "
        f"test command does), or set {SKIP_ROBOSUITE_ENV}=1 to skip the tests that need it",
        pytrace=False,
    )


@pytest.fixture
def robosuite_installed() -> None:
    require_robosuite()


needs_robosuite = pytest.mark.usefixtures("robosuite_installed")
TASK_DIR = Path(__file__).resolve().parents[1] / "config" / "task"
FAKE_META = {"env_name": "Lift", "type": 1, "env_kwargs": {"robots": ["Panda"]}}


def random_axis_angles(rng: np.random.Generator, n: int, max_angle: float = np.pi) -> np.ndarray:
    axes = rng.normal(size=(n, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    return axes * rng.uniform(0.0, max_angle, (n, 1))


# --- rotations ---------------------------------------------------------------------------------
def test_rotation_round_trips():
    rng = np.random.default_rng(0)
    aa = random_axis_angles(rng, 2000, max_angle=np.pi - 1e-6)
    aa[:3] = [[0.0, 0.0, 0.0], [1e-12, 0.0, 0.0], [0.0, 0.0, np.pi - 1e-9]]
    mats = axis_angle_to_matrix(aa)
    np.testing.assert_allclose(
        mats @ np.swapaxes(mats, -1, -2), np.broadcast_to(np.eye(3), mats.shape), atol=1e-12
    )
    np.testing.assert_allclose(np.linalg.det(mats), 1.0, atol=1e-12)
    np.testing.assert_allclose(matrix_to_axis_angle(mats), aa, atol=1e-7)
    np.testing.assert_allclose(rot6d_to_matrix(matrix_to_rot6d(mats)), mats, atol=1e-12)
    # 6D is the first two columns.
    np.testing.assert_array_equal(matrix_to_rot6d(mats)[:, :3], mats[:, :, 0])
    np.testing.assert_array_equal(matrix_to_rot6d(mats)[:, 3:], mats[:, :, 1])


def test_rotation_against_known_values():
    quarter_z = axis_angle_to_matrix(np.array([0.0, 0.0, np.pi / 2]))
    np.testing.assert_allclose(quarter_z, [[0, -1, 0], [1, 0, 0], [0, 0, 1]], atol=1e-15)
    # A half turn about x: the axis-angle comes back with angle pi (either sign of the axis).
    half_x = np.diag([1.0, -1.0, -1.0])
    np.testing.assert_allclose(np.abs(matrix_to_axis_angle(half_x)), [np.pi, 0, 0], atol=1e-12)
    np.testing.assert_allclose(matrix_to_quaternion(np.eye(3)), [1, 0, 0, 0])


def test_rot6d_gram_schmidt_projects_noisy_outputs():
    rng = np.random.default_rng(1)
    mats = axis_angle_to_matrix(random_axis_angles(rng, 100))
    noisy = matrix_to_rot6d(mats) * rng.uniform(0.5, 2.0, (100, 1)) + rng.normal(0, 1e-3, (100, 6))
    out = rot6d_to_matrix(noisy)
    np.testing.assert_allclose(np.linalg.det(out), 1.0, atol=1e-12)
    np.testing.assert_allclose(out, mats, atol=5e-3)


def test_abs_action_round_trip():
    rng = np.random.default_rng(2)
    env_actions = np.concatenate(
        [
            rng.normal(size=(50, 3)),
            random_axis_angles(rng, 50, np.pi - 1e-3),
            rng.choice([-1.0, 1.0], (50, 1)),
        ],
        axis=1,
    )
    policy_actions = env_to_abs_action(env_actions)
    assert policy_actions.shape == (50, 10)
    np.testing.assert_allclose(abs_action_to_env(policy_actions), env_actions, atol=1e-9)
    with pytest.raises(ValueError, match="10 values"):
        abs_action_to_env(np.zeros(7))


@needs_robosuite
def test_controller_config_of_robomimic_v1_4():
    old = {
        "type": "OSC_POSE", "input_max": 1, "input_min": -1, "kp": 150, "damping": 1,
        "damping_limits": [0, 10], "impedance_mode": "fixed", "control_delta": True,
        "uncouple_pos_ori": True, "interpolation": None, "ramp_ratio": 0.2,
    }  # fmt: skip
    new = convert_controller_config(old)
    arm = new["body_parts"]["right"]
    assert arm["type"] == "OSC_POSE" and arm["damping_ratio"] == 1 and "damping" not in arm
    assert arm["damping_ratio_limits"] == [0, 10] and arm["input_type"] == "delta"
    absolute = convert_controller_config(old, abs_action=True)["body_parts"]["right"]
    assert absolute["input_type"] == "absolute" and absolute["input_ref_frame"] == "world"
    with pytest.raises(ValueError, match="composite config"):
        convert_controller_config({"type": "MYSTERY"})


# --- HDF5 layout without a simulator -------------------------------------------------------------
def fake_demo(n: int, rng: np.random.Generator) -> dict:
    obs = {
        "object": rng.normal(size=(n, 10)),
        "robot0_eef_pos": rng.normal(size=(n, 3)),
        "robot0_eef_quat": rng.normal(size=(n, 4)),
        "robot0_gripper_qpos": rng.normal(size=(n, 2)),
    }
    return {"states": rng.normal(size=(n, 32)), "actions": rng.uniform(-1, 1, (n, 7)), "obs": obs}


def write_fake(path, lengths=(5, 3)):
    rng = np.random.default_rng(0)
    demos = [fake_demo(n, rng) for n in lengths]
    with RobomimicWriter(path, FAKE_META) as writer:
        for d in demos:
            writer.add_demo(
                d["states"], d["actions"], d["obs"], next_obs=d["obs"], model_xml="<m/>"
            )
        writer.add_mask("train", ["demo_0"])
    return demos


def test_hdf5_write_read_layout(tmp_path):
    path = tmp_path / "fake.hdf5"
    demos = write_fake(path)
    with h5py.File(path, "r") as f:
        assert json.loads(f["data"].attrs["env_args"]) == FAKE_META
        assert f["data"].attrs["total"] == 8
        assert f["data/demo_1"].attrs["num_samples"] == 3
        assert list(f["data/demo_0"]) == [
            "actions",
            "dones",
            "next_obs",
            "obs",
            "rewards",
            "states",
        ]
        np.testing.assert_array_equal(f["data/demo_0/dones"][:], [0, 0, 0, 0, 1])
    with RobomimicDataset(path) as ds:
        assert ds.demo_names == ["demo_0", "demo_1"] and ds.n_steps == 8
        assert ds.mask("train") == ["demo_0"]
        got = ds.demo("demo_1", next_obs=True)
        np.testing.assert_array_equal(got["actions"], demos[1]["actions"])
        np.testing.assert_array_equal(got["obs"]["object"], demos[1]["obs"]["object"])
        assert got["model_xml"] == "<m/>" and "next_obs" in got
        with pytest.raises(DatasetError, match="no mask 'valid'"):
            ds.mask("valid")


def test_hdf5_convert_delta_actions(tmp_path):
    path = tmp_path / "fake.hdf5"
    demos = write_fake(path)
    convert_to_zarr(path, tmp_path / "out.zarr", progress=False)
    buffer = ReplayBuffer.load(tmp_path / "out.zarr")
    assert sorted(buffer.keys) == sorted(["action", *demos[0]["obs"]])
    np.testing.assert_array_equal(buffer.episode_ends, [5, 8])
    np.testing.assert_allclose(buffer["action"][5:], demos[1]["actions"], rtol=1e-6)
    assert buffer["robot0_eef_pos"].dtype == np.float32
    assert json.loads((tmp_path / "out.zarr" / ENV_ARGS_FILE).read_text()) == FAKE_META
    with pytest.raises(DatasetError, match=r"missing observation key\(s\) \['agentview_image'"):
        convert_to_zarr(path, tmp_path / "img.zarr", image=True, progress=False)
    assert not (tmp_path / "img.zarr").exists()


def test_convert_several_files_into_one_buffer(tmp_path):
    first, second = tmp_path / "a.hdf5", tmp_path / "b.hdf5"
    demos_a, demos_b = write_fake(first), write_fake(second, lengths=(4,))
    convert_to_zarr([first, second], tmp_path / "ab.zarr", progress=False)
    buffer = ReplayBuffer.load(tmp_path / "ab.zarr")
    np.testing.assert_array_equal(buffer.episode_ends, [5, 8, 12])
    np.testing.assert_allclose(buffer["action"][8:], demos_b[0]["actions"], rtol=1e-6)
    np.testing.assert_allclose(buffer["action"][:5], demos_a[0]["actions"], rtol=1e-6)
    # The filter key applies to each file: demo_0 of both.
    stats = convert_to_zarr(
        [first, second], tmp_path / "train.zarr", filter_key="train", progress=False
    )
    assert stats["episodes"] == 2
    # Files of different tasks (or controllers) do not mix.
    with h5py.File(second, "a") as f:
        f["data"].attrs["env_args"] = json.dumps({**FAKE_META, "env_name": "PickPlaceCan"})
    with pytest.raises(DatasetError, match=r"env_args differ.*'PickPlaceCan' vs 'Lift'"):
        convert_to_zarr([first, second], tmp_path / "mixed.zarr", progress=False)
    assert not (tmp_path / "mixed.zarr").exists()


def test_cli_convert_options_from_the_config(tmp_path, capsys):
    """``cm-policy data convert robomimic``: config/convert/robomimic.yaml's defaults (no filter
    key: every demo), its keys as overrides."""
    from cm_policy.cli import UsageError, run_command

    path = tmp_path / "fake.hdf5"
    write_fake(path)
    run_command(["data", "convert", "robomimic", str(path), str(tmp_path / "all.zarr")])
    assert json.loads(capsys.readouterr().out)["episodes"] == 2
    out = str(tmp_path / "train.zarr")
    run_command(["data", "convert", "robomimic", str(path), out, "filter_key=train"])
    assert json.loads(capsys.readouterr().out)["episodes"] == 1
    with pytest.raises(UsageError, match="its keys: abs_action, image, filter_key, overwrite"):
        run_command(["data", "convert", "robomimic", str(path), out, "filter=train"])


def test_recovery_attempts_are_spread_evenly():
    from cm_policy.envs.robomimic_experts import is_recovery_attempt

    def kinds(fraction: float) -> list[bool]:
        return [is_recovery_attempt(i, fraction) for i in range(8)]

    assert kinds(0.0) == [False] * 8 and kinds(1.0) == [True] * 8
    assert kinds(0.5) == [False, True] * 4
    assert sum(kinds(0.25)) == 2


def test_bad_hdf5_clear_errors(tmp_path):
    path = tmp_path / "bad.hdf5"
    write_fake(path)
    with h5py.File(path, "a") as f:
        del f["data"].attrs["env_args"]
    with pytest.raises(DatasetError, match="no 'env_args' attribute"):
        RobomimicDataset(path)

    write_fake(path.with_name("b2.hdf5"))
    with h5py.File(path.with_name("b2.hdf5"), "a") as f:
        del f["data/demo_1/actions"]
    with pytest.raises(DatasetError, match=r"demo_1: missing \['actions'\]"):
        RobomimicDataset(path.with_name("b2.hdf5"))

    write_fake(path.with_name("b3.hdf5"))
    with h5py.File(path.with_name("b3.hdf5"), "a") as f:
        del f["data/demo_0/obs/object"]
        f["data/demo_0/obs"].create_dataset("object", data=np.zeros((4, 10)))
    with pytest.raises(DatasetError, match=r"5 steps like actions; found \{'obs/object': 4\}"):
        RobomimicDataset(path.with_name("b3.hdf5"))

    write_fake(path.with_name("b4.hdf5"))
    with h5py.File(path.with_name("b4.hdf5"), "a") as f:
        f["data"].attrs["env_args"] = json.dumps({"env_name": "Lift"})
    with pytest.raises(DatasetError, match=r"missing \['env_kwargs'\]"):
        RobomimicDataset(path.with_name("b4.hdf5"))

    with h5py.File(path.with_name("b5.hdf5"), "w") as f:
        f.create_group("demos")
    with pytest.raises(DatasetError, match="expected a group 'data'"):
        RobomimicDataset(path.with_name("b5.hdf5"))
    with pytest.raises(DatasetError, match="does not exist"):
        RobomimicDataset(tmp_path / "missing.hdf5")


def test_writer_rejects_length_mismatch(tmp_path):
    demo = fake_demo(4, np.random.default_rng(0))
    with (
        pytest.raises(ValueError, match="4 steps"),
        RobomimicWriter(tmp_path / "x.hdf5", FAKE_META) as w,
    ):
        w.add_demo(demo["states"][:3], demo["actions"], demo["obs"])
    assert not list(tmp_path.iterdir())  # an aborted write leaves nothing behind


# --- with robosuite ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lift_demos(tmp_path_factory):
    """Two Lift expert demos written to HDF5 (and the env that recorded them)."""
    require_robosuite()
    from cm_policy.envs.robomimic_experts import expert_episodes
    from cm_policy.envs.robosuite_env import default_env_meta

    path = tmp_path_factory.mktemp("robomimic") / "lift.hdf5"
    episodes = list(expert_episodes("lift", range(3)))
    with RobomimicWriter(path, default_env_meta("lift")) as writer:
        for ep in episodes[:2]:
            writer.add_demo(
                ep.states, ep.actions, ep.obs, ep.next_obs, ep.rewards, ep.dones, ep.model_xml
            )
    return path, episodes


@needs_robosuite
def test_lift_expert_succeeds(lift_demos):
    _, episodes = lift_demos
    assert [ep.success for ep in episodes] == [True, True, True]
    assert all(20 < ep.n_steps < 120 for ep in episodes)
    # The episodes differ (randomised initial states and expert styles).
    assert not np.allclose(episodes[0].actions[:10], episodes[1].actions[:10])


@needs_robosuite
def test_can_expert_succeeds():
    from cm_policy.envs.robomimic_experts import expert_episodes

    (episode,) = expert_episodes("can", range(1))
    assert episode.success and episode.n_steps < 300
    assert episode.rewards[-1] == 1.0 and episode.dones[-1] == 1


@needs_robosuite
def test_recovery_demos_start_off_course_and_replay(tmp_path):
    from cm_policy.data.robomimic_demos import generate_robomimic_dataset
    from cm_policy.envs.robomimic_experts import run_expert
    from cm_policy.envs.robosuite_env import RobosuiteEnv

    path = tmp_path / "lift.hdf5"
    stats = generate_robomimic_dataset(
        "lift", path, n_episodes=2, seed=7, recovery=0.5, convert=False, progress=False
    )
    assert stats["recovery_demos"] == 1 and stats["recovery_attempts"] >= 1
    with RobomimicDataset(path) as ds:
        assert len(ds.mask("full")) == 1
        (recovery,) = ds.mask("recovery")
        attrs = ds.demo_attrs(recovery)
        skipped, seed = int(attrs["recorded_from"]), int(attrs["seed"])
        demo = ds.demo(recovery)
        env = RobosuiteEnv(env_meta=ds.env_meta)
    try:
        reference = run_expert(env, seed)  # the undisturbed expert from the same initial state
        assert 10 <= skipped < reference.n_steps
        # The recording starts where the push left the gripper, centimetres off the expert's path.
        off = np.linalg.norm(
            demo["obs"]["robot0_eef_pos"][0] - reference.obs["robot0_eef_pos"][skipped]
        )
        assert off > 0.01, off
        # It replays: the recorded actions are the executed ones.
        env.reset_to(demo["states"][0], demo["model_xml"])
        for action in demo["actions"]:
            *_, info = env.step(action)
        assert info["is_success"]
    finally:
        env.close()


@needs_robosuite
def test_regrasp_demos_start_from_a_missed_grasp_and_replay(tmp_path):
    from cm_policy.data.robomimic_demos import generate_robomimic_dataset
    from cm_policy.envs.robomimic_experts import run_expert
    from cm_policy.envs.robosuite_env import RobosuiteEnv

    path = tmp_path / "lift.hdf5"
    stats = generate_robomimic_dataset(
        "lift",
        path,
        1,
        seed=3,
        recovery=1.0,
        recovery_kind="regrasp",
        convert=False,
        progress=False,
    )
    assert stats["recovery_demos"] == 1 and stats["recovery_kind"] == "regrasp"
    with RobomimicDataset(path) as ds:
        (name,) = ds.mask("recovery")
        attrs = ds.demo_attrs(name)
        assert attrs["recovery_kind"] == "regrasp"
        skipped, seed = int(attrs["recorded_from"]), int(attrs["seed"])
        demo = ds.demo(name)
        env = RobosuiteEnv(env_meta=ds.env_meta)
    try:
        reference = run_expert(env, seed)
        assert skipped >= 10
        # The undisturbed expert ends holding the cube between its fingers; the recording starts
        # with the fingers closed on nothing and the cube still resting on the table.
        assert reference.obs["robot0_gripper_qpos"][-1][0] > 0.015
        assert demo["obs"]["robot0_gripper_qpos"][0][0] < 0.012

        def cube_z(state):
            env.reset_to(state, demo["model_xml"])
            return float(env.sim_env.sim.data.body_xpos[env.sim_env.cube_body_id][2])

        # (the cube settles onto the table in the first steps)
        assert abs(cube_z(demo["states"][0]) - cube_z(reference.states[10])) < 0.003
        env.reset_to(demo["states"][0], demo["model_xml"])
        for action in demo["actions"]:
            *_, info = env.step(action)
        assert info["is_success"]
    finally:
        env.close()


def test_regrasp_recovery_is_checked():
    from cm_policy.envs.robomimic_experts import expert_episodes

    with pytest.raises(ValueError, match="regrasp recovery demos exist for"):
        next(expert_episodes("square", range(1), recovery=1.0, recovery_kind="regrasp"))
    with pytest.raises(ValueError, match="recovery_kind must be one of"):
        next(expert_episodes("can", range(1), recovery=1.0, recovery_kind="shove"))


@needs_robosuite
def test_env_from_metadata_reproduces_recorded_states(lift_demos):
    from cm_policy.envs.robosuite_env import RobosuiteEnv

    path, _ = lift_demos
    with RobomimicDataset(path) as ds:
        demo = ds.demo("demo_1", next_obs=True)
        env = RobosuiteEnv(env_meta=ds.env_meta)
    try:
        obs = env.reset_to(demo["states"][0], demo["model_xml"])
        np.testing.assert_allclose(obs["object"], demo["obs"]["object"][0], atol=1e-5)
        # Open-loop replay of the recorded actions from the first state.
        for t, action in enumerate(demo["actions"]):
            obs, _, terminated, _, info = env.step(action)
            if t + 1 < len(demo["states"]):
                np.testing.assert_allclose(env.get_state(), demo["states"][t + 1], atol=1e-3)
        np.testing.assert_allclose(
            obs["robot0_eef_pos"], demo["next_obs"]["robot0_eef_pos"][-1], atol=1e-3
        )
        assert terminated and info["is_success"]
        # One step from a mid-episode state, following the episode state by state.
        t = len(demo["actions"]) // 2
        env.reset_to(demo["states"][0])
        for k in range(t + 1):
            env.reset_to(demo["states"][k], new_episode=False)
            env.step(demo["actions"][k])
        np.testing.assert_allclose(env.get_state(), demo["states"][t + 1], atol=1e-4)
        with pytest.raises(ValueError, match="flattened MuJoCo state of 32 values"):
            env.reset_to(np.zeros(5))
    finally:
        env.close()


@needs_robosuite
def test_seeded_reset_is_deterministic():
    from cm_policy.envs.robosuite_env import RobosuiteEnv

    first, second = RobosuiteEnv(task="lift"), RobosuiteEnv(task="lift")
    try:
        a, _ = first.reset(seed=100000)
        first.step(first.action_space.sample())
        first.reset(seed=7)
        b, _ = second.reset(seed=100000)
        c, _ = first.reset(seed=100000)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
            np.testing.assert_array_equal(a[key], c[key])
        np.testing.assert_array_equal(first.get_state(), second.get_state())
        d, _ = second.reset(seed=100001)
        assert not np.allclose(a["object"], d["object"])
    finally:
        first.close()
        second.close()


@needs_robosuite
def test_convert_with_absolute_actions_replays(lift_demos, tmp_path):
    from cm_policy.envs.robosuite_env import RobosuiteEnv

    path, _ = lift_demos
    convert_to_zarr(path, tmp_path / "abs.zarr", abs_action=True, progress=False)
    buffer = ReplayBuffer.load(tmp_path / "abs.zarr")
    assert buffer["action"].shape[1] == 10
    with RobomimicDataset(path) as ds:
        demo = ds.demo("demo_0")
        env = RobosuiteEnv(env_meta=ds.env_meta, abs_action=True)
    try:
        env.reset_to(demo["states"][0], demo["model_xml"])
        actions = buffer.get_episode(0)["action"]
        np.testing.assert_allclose(actions[:, 9], demo["actions"][:, 6])
        for t, action in enumerate(actions):
            _, _, terminated, _, _ = env.step(action)
            if t + 1 < len(demo["states"]):
                # The absolute targets are the delta controller's own goals: the arm and the
                # cube follow the recording to float32 precision.
                np.testing.assert_allclose(
                    env.get_state()[1:17], demo["states"][t + 1][1:17], atol=2e-3
                )
        assert terminated
    finally:
        env.close()


@needs_robosuite
def test_image_env_and_tasks(tmp_path):
    from cm_policy.tasks import load_task

    task = OmegaConf.to_container(OmegaConf.load(TASK_DIR / "robomimic_lift_image.yaml"))
    assert load_task(task).dataset_keys() == [
        "action", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos",
        "agentview_image", "robot0_eye_in_hand_image",
    ]  # fmt: skip
    env = load_task(task).make_env()
    try:
        obs, info = env.reset(seed=0)
        assert set(obs) == set(task["low_dim"]) | set(task["image_keys"])
        for key in task["image_keys"]:
            assert obs[key].shape == tuple(task["image_shape"]) and obs[key].dtype == np.uint8
            assert obs[key].std() > 10  # a real picture, not a blank buffer
        for key, dim in task["low_dim"].items():
            assert obs[key].shape == (dim,)
        assert env.observation_space.contains(obs) and info["is_success"] is False
        frame = env.render()
        assert frame.shape == (256, 256, 3) and frame.dtype == np.uint8
        recorded = {k: v[None] for k, v in env.full_obs().items()}
        assert set(load_task(task).dataset_obs(recorded)) == set(obs)
    finally:
        env.close()
    lowdim = OmegaConf.to_container(OmegaConf.load(TASK_DIR / "robomimic_lift_lowdim.yaml"))
    env = load_task(lowdim).make_env()
    try:
        obs, _ = env.reset(seed=0)
        assert {k: v.shape[0] for k, v in obs.items()} == lowdim["low_dim"]
        assert env.render().shape == (256, 256, 3)  # the GL context is made on demand
    finally:
        env.close()


@needs_robosuite
def test_cli_convert(lift_demos, tmp_path, capsys):
    from cm_policy.cli import run_command as main

    path, _ = lift_demos
    main(["data", "convert", "robomimic", str(path), str(tmp_path / "cli.zarr")])
    assert json.loads(capsys.readouterr().out)["episodes"] == 2
    assert ReplayBuffer.open(tmp_path / "cli.zarr").n_episodes == 2
    # Several inputs, options after them.
    main(
        [
            "data",
            "convert",
            "robomimic",
            str(path),
            str(path),
            str(tmp_path / "x2.zarr"),
            "overwrite=true",
        ]
    )
    assert json.loads(capsys.readouterr().out)["episodes"] == 4


@needs_robosuite
@pytest.mark.parametrize("setting", [None, "glfw"])
def test_importing_robosuite_leaves_mujoco_gl_as_the_user_set_it(setting: str | None):
    # robosuite sets MUJOCO_GL=egl on import; env workers started afterwards inherit the
    # environment, and one that then loads EGL dies on a machine without libEGL.
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "MUJOCO_GL"}
    if setting is not None:
        env["MUJOCO_GL"] = setting
    code = (
        "import os; from cm_policy.envs.robosuite_env import import_robosuite; "
        "import_robosuite(); print(os.environ.get('MUJOCO_GL'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == str(setting)
