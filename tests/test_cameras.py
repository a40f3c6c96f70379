"""Cameras of any size (issue 38): each camera keeps its own frame shape from the data to the
policy's spec, its crop, the server's metadata and the ONNX export; frames of another size are
refused with the key and both shapes; a task config that does not match its buffer is one line
before the first training step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_config import TINY

from cm_policy.checkpoint import load_policy
from cm_policy.cli import run_command
from cm_policy.data import DatasetError, ReplayBuffer
from cm_policy.observations import camera_shapes

# Two cameras of different sizes, one smaller than the classic 84-pixel crop.
CAMERAS = {"front": (30, 40), "wrist": (12, 20)}
LENGTHS = (20, 25)


def robot_buffer(path: Path) -> Path:
    """A robot's data: a float state, an integer feature, two cameras, 2-D actions."""
    buffer = ReplayBuffer.create(path)
    rng = np.random.default_rng(0)
    for length in LENGTHS:
        episode = {
            "observation_state": rng.normal(size=(length, 3)).astype(np.float32),
            "observation_counts": rng.integers(-5, 5, (length, 2)).astype(np.int64),
            "action": rng.normal(size=(length, 2)).astype(np.float32),
        }
        for key, (h, w) in CAMERAS.items():
            episode[key] = rng.integers(0, 256, (length, h, w, 3), dtype=np.uint8)
        buffer.add_episode(episode)
    return path


def robot_task(data: Path, *extra: str) -> list[str]:
    """The dataset task on the robot buffer, no image_shape declared: taken from the data."""
    return [
        "task=lerobot_pusht",
        "task.name=robot",
        f"task.dataset_path={data}",
        "task.low_dim={observation_state:3,observation_counts:2}",
        "task.image_keys=[front,wrist]",
        "task.control_hz=15",
        *extra,
    ]


def frames(batch: int, steps: int, sizes: dict[str, tuple[int, int]]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    obs = {
        "observation_state": rng.normal(size=(batch, steps, 3)).astype(np.float32),
        "observation_counts": rng.integers(-5, 5, (batch, steps, 2)).astype(np.float32),
    }
    for key, (h, w) in sizes.items():
        obs[key] = rng.integers(0, 256, (batch, steps, h, w, 3), dtype=np.uint8)
    return obs


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cameras")
    data = robot_buffer(root / "robot.zarr")
    run = root / "run"
    run_command(
        [
            "train",
            *robot_task(data),
            *TINY,
            "model.resnet_widths=[8,8,8,8]",
            "training.steps=2",
            "training.batch_size=4",
            f"output_dir={run}",
        ]
    )
    return run


def test_each_camera_keeps_its_shape_and_crop_through_training(trained: Path):
    """No image_shape in the config: the checkpoint's spec carries each camera's shape from the
    data, and the default crop (0.875 of each side) fits both, the one under 84 pixels too."""
    policy = load_policy(trained)
    assert policy.spec["task"]["image_shape"] == {"front": [30, 40, 3], "wrist": [12, 20, 3]}
    assert policy.image_shapes == {"front": (30, 40, 3), "wrist": (12, 20, 3)}
    assert policy.obs_encoder.crops == {"front": (26, 35), "wrist": (10, 17)}
    assert policy.predict_action(frames(2, 2, CAMERAS)).shape == (2, 8, 2)


def test_frames_of_another_size_are_refused_by_policy_server_and_onnx(
    trained: Path, tmp_path: Path
):
    """Each camera's frames at the other camera's size: the policy, the server and the ONNX
    policy each refuse them naming the key and both shapes."""
    from cm_policy.serve.protocol import ProtocolError
    from cm_policy.serve.server import PolicyServer

    policy = load_policy(trained)
    swapped = frames(1, 2, {"front": CAMERAS["front"], "wrist": CAMERAS["front"]})
    with pytest.raises(
        ValueError,
        match=r"obs\['wrist'\] must have shape \(batch, >=2, 12, 20, 3\), got \(1, 2, 30, 40, 3\)",
    ):
        policy.predict_action(swapped)
    server = PolicyServer(policy)
    assert server.metadata["observations"] == {
        "observation_state": {"shape": [3], "dtype": "float32"},
        "observation_counts": {"shape": [2], "dtype": "float32"},
        "front": {"shape": [30, 40, 3], "dtype": "uint8"},
        "wrist": {"shape": [12, 20, 3], "dtype": "uint8"},
    }
    assert server.metadata["control_hz"] == 15.0
    from cm_policy.serve.protocol import encode_array

    with pytest.raises(ProtocolError, match=r"obs\['wrist'\] has the wrong shape") as refused:
        server._read_obs({k: encode_array(v) for k, v in swapped.items()}, "window")
    assert (refused.value.expected, refused.value.got) == (
        "(batch, >=2, 12, 20, 3)",
        [1, 2, 30, 40, 3],
    )

    pytest.importorskip("onnxruntime")
    from cm_policy.export import export_policy
    from cm_policy.serve.onnx_policy import OnnxPolicy

    meta = export_policy(policy, tmp_path / "robot.onnx")
    assert meta["observations"]["front"]["shape"] == [30, 40, 3]
    assert meta["observations"]["wrist"]["shape"] == [12, 20, 3]
    onnx_policy = OnnxPolicy(tmp_path / "robot.onnx")
    obs = frames(3, 2, CAMERAS)
    noise = torch.randn(3, policy.horizon, 2, generator=torch.Generator().manual_seed(0)).numpy()
    got = onnx_policy.predict_action(obs, z=noise)
    assert got.shape == (3, 8, 2) and np.isfinite(got).all()
    with pytest.raises(ValueError, match=r"obs\['wrist'\] must have shape .*12, 20, 3.*30, 40, 3"):
        onnx_policy.predict_action(swapped)


def test_a_task_config_that_does_not_match_its_buffer_is_one_line_before_training(
    tmp_path: Path,
):
    """Every difference (a low-dim size, a camera's declared shape, the action dim) in one
    line, before the first step: no checkpoint is written."""
    data = robot_buffer(tmp_path / "robot.zarr")
    run = tmp_path / "run"
    wrong = robot_task(
        data,
        "task.low_dim={observation_state:4,observation_counts:2}",
        "+task.image_shape={front:[32,40,3],wrist:[12,20,3]}",
        "task.action_dim=3",
    )
    with pytest.raises(DatasetError) as refused:
        run_command(["train", *wrong, *TINY, "training.steps=2", f"output_dir={run}"])
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"task 'robot' does not match the data in {data}: ")
    for difference in (
        "low_dim observation_state: declared size 4, the data has size 3",
        "camera front: declared image_shape [32, 40, 3], the data has [30, 40, 3]",
        "action: declared action_dim 3, the data has size 2",
    ):
        assert difference in message
    assert "wrist" not in message  # the camera that matches is not listed
    assert not (run / "checkpoints").exists()
    # One shape for every camera (the simulated tasks' form) is checked camera by camera.
    with pytest.raises(DatasetError, match=r"camera wrist: declared image_shape \[30, 40, 3\]"):
        run_command(
            [
                "train",
                *robot_task(data, "+task.image_shape=[30,40,3]"),
                *TINY,
                "training.steps=2",
                f"output_dir={run}",
            ]
        )


def test_camera_shapes_of_a_spec():
    """The per-camera mapping, one shape for all, and each malformed declaration refused."""
    both = {"image_keys": ["a", "b"]}
    assert camera_shapes({**both, "image_shape": [8, 9, 3]}) == {"a": (8, 9, 3), "b": (8, 9, 3)}
    mapping = {"a": [8, 9, 3], "b": [4, 5, 3]}
    assert camera_shapes({**both, "image_shape": mapping}) == {"a": (8, 9, 3), "b": (4, 5, 3)}
    assert camera_shapes({"image_keys": []}) == {}
    with pytest.raises(ValueError, match=r"no image_shape: .*task.image_shape=\{a:\[96,96,3\],b:"):
        camera_shapes(both)
    with pytest.raises(ValueError, match=r"missing \['b'\], not a camera \['c'\]"):
        camera_shapes({**both, "image_shape": {"a": [8, 9, 3], "c": [8, 9, 3]}})
    for bad in ([8, 9], [8, 9, 1], [8, 0, 3], {"a": [8, 9, 3], "b": "96"}):
        with pytest.raises(ValueError, match=r"must be \[height, width, 3\]"):
            camera_shapes({**both, "image_shape": bad})
