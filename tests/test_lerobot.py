"""LeRobotDataset -> replay buffer (cm_policy/data/formats/lerobot.py), against files that
LeRobot's own code wrote: codebase v3.0 by ``lerobot-dataset`` (LeRobot 0.4.4's dataset code)
and v2.1 by ``lerobot==0.3.3``, both run in a side virtualenv that
``cm_policy/experiments/lerobot_roundtrip.py`` creates on first use (about 2 minutes; kept under
/tmp, reused).

In CI (CI=true) a writer that cannot be installed, or a missing PushT dataset, fails the tests;
elsewhere they are skipped with the reason.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import in_ci
from omegaconf import OmegaConf

from cm_policy.cli import main, run_command
from cm_policy.configs import config_dir
from cm_policy.data import DatasetError, ReplayBuffer
from cm_policy.data.formats import data_formats
from cm_policy.data.formats.lerobot import (
    LeRobotFormat,
    OutputExistsError,
    _column,
    buffer_key,
    convert_lerobot,
    parse_resize,
    source_attrs,
)
from cm_policy.experiments import lerobot_roundtrip as roundtrip

REPO = Path(__file__).resolve().parents[1]

VERSIONS = ["v3.0", "v2.1"]
PUSHT_EPISODES = 3
# LeRobot's video encoding (AV1, yuv420p, crf 30) against the original PushT frames, in 0..255
# units. Measured on all 206 episodes (eval/results/lerobot_roundtrip.md): mean abs error 0.90
# (v3.0: lerobot 0.4.4 encodes with SVT-AV1's fastest preset) and 0.62 (v2.1); the worst frame's
# mean 2.72 and 1.30. The bounds leave room for other encoder builds.
MEAN_ABS_BOUND = 1.2
WORST_FRAME_BOUND = 4.0
# The synthetic dataset: every kind of feature a LeRobotDataset holds besides videos.
SYNTH_LENGTHS = [9, 3, 14]
SYNTH_FEATURES = {
    "observation.state": {"dtype": "float32", "shape": [6], "names": None},
    "action": {"dtype": "float32", "shape": [2], "names": ["x", "y"]},
    "observation.environment_state": {"dtype": "float32", "shape": [3, 2], "names": None},
    "observation.velocity": {"dtype": "float64", "shape": [4], "names": None},
    "next.reward": {"dtype": "float32", "shape": [1], "names": None},
    "next.done": {"dtype": "bool", "shape": [1], "names": None},
    "observation.counts": {"dtype": "int64", "shape": [2], "names": None},
    "observation.images.wrist": {
        "dtype": "image",
        "shape": [24, 32, 3],
        "names": ["height", "width", "channel"],
    },
    # A second camera of its own size: a robot's cameras rarely match.
    "observation.images.front": {
        "dtype": "image",
        "shape": [40, 56, 3],
        "names": ["height", "width", "channel"],
    },
}


def _synthetic_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    n = sum(SYNTH_LENGTHS)
    arrays: dict[str, np.ndarray] = {}
    for name, spec in SYNTH_FEATURES.items():
        shape = (n, *spec["shape"])
        if spec["dtype"] == "image":
            arrays[name] = rng.integers(0, 256, shape, dtype=np.uint8)
        elif spec["dtype"] == "bool":
            arrays[name] = rng.random(shape) < 0.3
        elif spec["dtype"] == "int64":
            arrays[name] = rng.integers(-1000, 1000, shape, dtype=np.int64)
        else:
            arrays[name] = (rng.normal(size=shape) * 10).astype(spec["dtype"])
    arrays["episode_ends"] = np.cumsum(SYNTH_LENGTHS)
    return arrays


@pytest.fixture(scope="session")
def writer_python() -> Path:
    try:
        return roundtrip.ensure_writer_venv()
    except Exception as exc:  # no package index, a changed release: say so
        message = f"LeRobot's dataset writers could not be installed: {exc}"
        if in_ci():
            pytest.fail(f"CI=true and {message}", pytrace=False)
        pytest.skip(message)


@pytest.fixture(scope="session")
def written(writer_python: Path, request: pytest.FixtureRequest, tmp_path_factory) -> dict:
    """LeRobotDatasets written by LeRobot's code, in one writer process: the synthetic dataset
    and (where the real data is) the first PushT episodes with their camera, in v3.0 and v2.1."""
    try:
        pusht_path = request.getfixturevalue("real_pusht")
    except pytest.skip.Exception:  # a visible skip of the PushT tests (a failure in CI)
        pusht_path = None
    work = tmp_path_factory.mktemp("lerobot")
    synth = _synthetic_arrays()
    npz = work / "synthetic.npz"
    np.savez(npz, **synth)
    specs = []
    for version in VERSIONS:
        root = work / f"synthetic_{version}"
        spec = {"version": version, "root": str(root), "fps": 15, "features": SYNTH_FEATURES}
        specs.append({**spec, "arrays": str(npz), "task": "synthetic"})
    pusht = None
    if pusht_path is not None:
        pusht = roundtrip.pusht_arrays(pusht_path, PUSHT_EPISODES)
        for version in VERSIONS:
            specs.append(roundtrip.pusht_spec(pusht, version, work / f"pusht_{version}", work))
    roundtrip.write_lerobot(writer_python, specs, work)
    return {"work": work, "synthetic": synth, "pusht": pusht}


def _root(written: dict, kind: str, version: str) -> Path:
    if kind == "pusht" and written["pusht"] is None:
        pytest.skip("the real PushT dataset is missing (see the real_pusht fixture)")
    return written["work"] / f"{kind}_{version}"


def _copy(written: dict, kind: str, version: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(_root(written, kind, version), tmp_path / f"{kind}_{version}"))


def _assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert list(out.parent.glob(f".{out.name}*")) == [], "a temporary folder was left behind"


def _episode_ends(lengths) -> np.ndarray:
    return np.cumsum(lengths)


# --- the format, its keys and options ----------------------------------------------------------
def test_the_format_is_discovered_and_keys_lose_their_dots():
    assert data_formats()["lerobot"] is LeRobotFormat
    options = OmegaConf.load(config_dir() / "convert/lerobot.yaml")  # its command-line options
    assert set(options) == {"keys", "resize", "overwrite"}
    assert buffer_key("observation.images.top") == "observation_images_top"
    assert buffer_key("action") == "action"
    assert parse_resize("96,128") == (96, 128) and parse_resize("96x128") == (96, 128)
    assert parse_resize(None) is None
    for bad in ("96", "0,5", "a,b", "1,2,3"):
        with pytest.raises(ValueError, match="resize must be H,W"):
            parse_resize(bad)


def test_parquet_columns_of_every_list_layout():
    """Scalars, fixed-size lists (LeRobot's writers), plain lists (older hub datasets) and
    nested lists (HF Array2D) all become (rows, *shape) arrays."""
    import pyarrow as pa

    rows = np.arange(12, dtype=np.float32).reshape(3, 2, 2)
    table = pa.table(
        {
            "scalar": pa.array([1.0, 2.0, 3.0], pa.float32()),
            "fixed": pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)[:6]), 2),
            "plain": pa.array(rows.reshape(3, 4).tolist(), pa.list_(pa.float32())),
            "nested": pa.array(rows.tolist(), pa.list_(pa.list_(pa.float32()))),
            "ragged": pa.array([[1.0], [1.0, 2.0], [3.0]], pa.list_(pa.float64())),
            "holes": pa.array([[1.0], None, [3.0]], pa.list_(pa.float64())),
        }
    )
    assert _column(table, "scalar", (1,), "t").shape == (3, 1)
    np.testing.assert_array_equal(
        _column(table, "fixed", (2,), "t"), rows.reshape(-1)[:6].reshape(3, 2)
    )
    np.testing.assert_array_equal(_column(table, "plain", (4,), "t"), rows.reshape(3, 4))
    np.testing.assert_array_equal(_column(table, "nested", (2, 2), "t"), rows)
    with pytest.raises(DatasetError, match="declares shape \\[5\\]"):
        _column(table, "plain", (5,), "t")
    with pytest.raises(DatasetError, match="lists of different lengths"):
        _column(table, "ragged", (1,), "t")
    with pytest.raises(DatasetError, match="missing \\(null\\) values"):
        _column(table, "holes", (1,), "t")


# --- round trips through LeRobot's writers -----------------------------------------------------
@pytest.mark.parametrize("version", VERSIONS)
def test_every_feature_kind_comes_back_exactly(written: dict, version: str, tmp_path: Path):
    src = _root(written, "synthetic", version)
    out = tmp_path / "synthetic.zarr"
    stats = convert_lerobot(src, out, progress=False)
    arrays = written["synthetic"]
    assert stats["codebase_version"] == [version]
    assert (stats["episodes"], stats["steps"]) == (len(SYNTH_LENGTHS), sum(SYNTH_LENGTHS))
    buffer = ReplayBuffer.open(out)
    np.testing.assert_array_equal(buffer.episode_ends, _episode_ends(SYNTH_LENGTHS))
    assert sorted(buffer.keys) == sorted(buffer_key(name) for name in SYNTH_FEATURES)
    for name, spec in SYNTH_FEATURES.items():
        mine = np.asarray(buffer[buffer_key(name)][:])
        expected = arrays[name]
        if spec["dtype"].startswith("float"):
            expected = expected.astype(np.float32)  # float64 features become float32
        assert mine.dtype == expected.dtype, name
        assert mine.shape == expected.shape, name
        np.testing.assert_array_equal(mine, expected, err_msg=name)  # images: PNG is lossless
    # Where it came from: the buffer's attributes and lerobot_source.json beside the arrays.
    attrs = source_attrs(out)
    [source] = attrs["sources"]
    assert source["source"] == str(src.resolve())
    assert (source["codebase_version"], source["fps"]) == (version, 15)
    assert source["features"]["observation_images_wrist"]["name"] == "observation.images.wrist"
    assert source["features"]["next_done"]["dtype"] == "bool"
    record = json.loads((out / "lerobot_source.json").read_text())
    assert record["info"][str(src.resolve())]["codebase_version"] == version


@pytest.mark.parametrize("version", VERSIONS)
def test_pusht_with_its_camera_comes_back(written: dict, version: str, tmp_path: Path):
    """The first PushT episodes: low-dim arrays equal, frames within the codec's error, each
    frame aligned with its row (v3.0: the episodes share one video file)."""
    src = _root(written, "pusht", version)
    if version == "v3.0":
        import pyarrow.parquet as pq

        [meta] = src.glob("meta/episodes/*/*.parquet")
        starts = pq.read_table(meta).column("videos/observation.image/from_timestamp").to_pylist()
        assert len(set(starts)) == PUSHT_EPISODES and max(starts) > 0, starts
    out = tmp_path / "pusht.zarr"
    convert_lerobot(src, out, progress=False)
    arrays = written["pusht"]
    equal, errors = roundtrip.compare_pusht(arrays, out)
    assert all(equal.values()), equal
    assert errors["mean_abs"] < MEAN_ABS_BOUND, errors
    assert errors["worst_frame_mean_abs"] < WORST_FRAME_BOUND, errors
    # Alignment: in every episode the frames are closer to their own originals than to their
    # neighbours' (consecutive PushT frames differ by about as much as the codec's error, so
    # this is a per-episode mean, not a per-frame test).
    images = np.asarray(ReplayBuffer.open(out)["observation_image"][:]).astype(np.int16)
    original = arrays["img"].astype(np.int16)
    ends = arrays["episode_ends"]
    for start, end in zip([0, *ends[:-1]], ends, strict=True):
        inner = slice(start + 1, end - 1)
        own = np.abs(images[inner] - original[inner]).mean()
        for shift in (-1, 1):
            shifted = slice(start + 1 + shift, end - 1 + shift)
            assert own < 0.9 * np.abs(images[inner] - original[shifted]).mean(), (start, shift)


def test_v30_episodes_read_in_any_order(written: dict):
    """A v3.0 video holds several episodes: read out of order (a seek, or a new pass from the
    start), each episode gets the same frames as in one front-to-back pass."""
    from cm_policy.data.formats.lerobot import LeRobotSource, _TableCache, _VideoReader

    source = LeRobotSource(_root(written, "pusht", "v3.0"))
    features = source.select(["observation.image"])
    [camera] = [f for f in features if f.dtype == "video"]

    def read(episodes) -> dict[int, np.ndarray]:
        reader, tables = _VideoReader(camera), _TableCache()
        try:
            return {
                e.index: source.read_episode(e, features, tables, {camera.name: reader}, None)[
                    "observation_image"
                ]
                for e in episodes
            }
        finally:
            reader.close()

    forward, backward = read(source.episodes), read(source.episodes[::-1])
    assert max(e.videos[camera.name][1] for e in source.episodes) > 2.0  # a seek happened
    for index, frames in forward.items():
        np.testing.assert_array_equal(frames, backward[index])


def test_cli_keys_resize_and_info(written: dict, tmp_path: Path, capsys):
    """``cm-policy data convert lerobot SRC OUT keys=... resize=H,W``: the named features (and
    action), frames resized; a channel-first declared shape reads the same; data info shows it."""
    src = _copy(written, "pusht", "v3.0", tmp_path)
    info_file = src / "meta/info.json"
    info = json.loads(info_file.read_text())
    info["features"]["observation.image"]["shape"] = [3, 96, 96]
    info["features"]["observation.image"]["names"] = ["channels", "height", "width"]
    info_file.write_text(json.dumps(info))
    out = tmp_path / "small.zarr"
    main(
        ["data", "convert", "lerobot", str(src), str(out), "keys=observation.image", "resize=48,64"]
    )
    stats = json.loads(capsys.readouterr().out)
    assert stats["keys"] == {"action": "action", "observation_image": "observation.image"}
    buffer = ReplayBuffer.open(out)
    assert sorted(buffer.keys) == ["action", "observation_image"]
    images = np.asarray(buffer["observation_image"][:])
    assert images.shape == (int(written["pusht"]["episode_ends"][-1]), 48, 64, 3)
    import cv2

    expected = np.stack(
        [cv2.resize(f, (64, 48), interpolation=cv2.INTER_AREA) for f in written["pusht"]["img"]]
    )
    assert roundtrip.image_errors(expected, images)["mean_abs"] < MEAN_ABS_BOUND
    main(["data", "info", str(out)])
    described = capsys.readouterr().out
    assert f"data/observation_image: shape ({len(images)}, 48, 64, 3), dtype uint8" in described
    # Buffer keys name features too; overwrite=true replaces, without it the output is kept.
    with pytest.raises(OutputExistsError, match="exists; remove it or pass overwrite=true"):
        convert_lerobot(src, out, keys="observation_image", progress=False)
    convert_lerobot(src, out, keys="observation_image", overwrite=True, progress=False)
    assert sorted(ReplayBuffer.open(out).keys) == ["action", "observation_image"]


def test_train_on_a_converted_dataset_from_the_task_config(written: dict, tmp_path: Path):
    out = tmp_path / "lerobot_pusht.zarr"
    convert_lerobot(_root(written, "pusht", "v2.1"), out, progress=False)
    run = tmp_path / "run"
    run_command(
        [
            "train",
            "task=lerobot_pusht",
            f"task.dataset_path={out}",
            "model=unet_tiny",
            "model.down_dims=[16,32]",
            "model.time_embed_dim=16",
            "training.steps=2",
            "training.batch_size=8",
            "training.warmup_steps=1",
            "training.num_threads=1",
            f"output_dir={run}",
        ]
    )
    from cm_policy.checkpoint import load_policy

    policy = load_policy(run)
    obs = {"observation_state": written["pusht"]["state"][None, :2]}
    assert policy.predict_action(obs).shape == (1, 8, 2)


def test_the_buffer_holds_its_task_config(written: dict, tmp_path: Path, capsys):
    """``data convert lerobot`` writes OUT/task.yaml: every feature LeRobot wrote (an int64 one
    too) at the dataset's fps, the bool and (3, 2) features named in comments as left out;
    ``data info`` shows that file; ``task=OUT/task.yaml`` composes it."""
    import yaml

    from cm_policy.configs import compose

    src = _root(written, "synthetic", "v3.0")
    out = tmp_path / "synthetic.zarr"
    main(["data", "convert", "lerobot", str(src), str(out)])
    stats = json.loads(capsys.readouterr().out)
    assert stats["task_file"] == str(out / "task.yaml")
    text = (out / "task.yaml").read_text()
    expected = {
        "name": "synthetic",
        "env": "dataset",
        "dataset_path": ".",
        "control_hz": 15,
        "action_dim": 2,
        "low_dim": {
            "next_reward": 1,
            "observation_counts": 2,
            "observation_state": 6,
            "observation_velocity": 4,
        },
        "image_keys": ["observation_images_front", "observation_images_wrist"],
        "image_shape": {
            "observation_images_front": [40, 56, 3],
            "observation_images_wrist": [24, 32, 3],
        },
    }
    assert yaml.safe_load(text) == expected
    assert OmegaConf.to_container(OmegaConf.load(out / "task.yaml")) == expected
    assert type(yaml.safe_load(text)["control_hz"]) is int  # as info.json records it
    assert "control_hz: 15           # the LeRobotDataset's fps (meta/info.json)" in text
    assert "  # next_done is left out: dtype bool" in text
    assert "  # observation_environment_state is left out: (3, 2) per step" in text
    main(["data", "info", str(out)])
    described = capsys.readouterr().out
    assert f"task config ({out / 'task.yaml'}, the buffer's own file" in described
    assert "it matches the buffer's arrays):\n" + text.rstrip() in described
    cfg = compose("config", [f"task={out}/task.yaml"])
    assert (cfg.task.dataset_path, cfg.task.control_hz) == (str(out.resolve()), 15)


def test_a_robot_s_dataset_trains_and_serves_from_its_own_task_file(written: dict, tmp_path: Path):
    """A new user's path, on files LeRobot's writer made (two cameras of their own sizes, one
    under 84 pixels; dotted names; an int feature; 15 fps): data convert, then train
    task=OUT/task.yaml with nothing written by hand, then a policy and a server that state each
    camera's shape and the rate, act on the dataset's own frames and refuse frames of another
    size naming the key and both shapes."""
    from tiny_config import TINY

    from cm_policy.checkpoint import load_policy
    from cm_policy.serve.server import PolicyServer

    out = tmp_path / "robot.zarr"
    main(["data", "convert", "lerobot", str(_root(written, "synthetic", "v3.0")), str(out)])
    run = tmp_path / "run"
    run_command(
        [
            "train",
            f"task={out}/task.yaml",
            *TINY,
            "model.resnet_widths=[8,8,8,8]",
            "training.steps=2",
            "training.batch_size=4",
            f"output_dir={run}",
        ]
    )
    policy = load_policy(run)
    cameras = {"observation_images_front": (40, 56, 3), "observation_images_wrist": (24, 32, 3)}
    assert policy.image_shapes == cameras
    assert policy.obs_encoder.crops == {  # the default crop, 0.875 of each side
        "observation_images_front": (35, 49),
        "observation_images_wrist": (21, 28),
    }
    metadata = PolicyServer(policy).metadata
    assert metadata["control_hz"] == 15.0
    for key, shape in cameras.items():
        assert metadata["observations"][key] == {"shape": list(shape), "dtype": "uint8"}
    assert metadata["observations"]["observation_counts"]["shape"] == [2]
    buffer = ReplayBuffer.open(out)
    obs = {k: np.asarray(buffer[k][:2])[None] for k in metadata["observations"]}
    actions = policy.predict_action(obs)
    assert actions.shape == (1, 8, 2) and np.isfinite(actions).all()
    swapped = {**obs, "observation_images_wrist": obs["observation_images_front"]}
    with pytest.raises(
        ValueError,
        match=r"obs\['observation_images_wrist'\] must have shape \(batch, >=2, 24, 32, 3\), "
        r"got \(1, 2, 40, 56, 3\)",
    ):
        policy.predict_action(swapped)


# --- clear errors, nothing half-written ---------------------------------------------------------
def test_missing_info_and_unsupported_version(written: dict, tmp_path: Path):
    src = _copy(written, "synthetic", "v2.1", tmp_path)
    out = tmp_path / "out.zarr"
    info = json.loads((src / "meta/info.json").read_text())
    (src / "meta/info.json").unlink()
    with pytest.raises(DatasetError, match=r"missing meta/info.json .*; found \[.*'meta'"):
        convert_lerobot(src, out, progress=False)
    (src / "meta/info.json").write_text(json.dumps({**info, "codebase_version": "v1.6"}))
    with pytest.raises(DatasetError, match=r"codebase_version 'v1.6' is not supported \(expected"):
        convert_lerobot(src, out, progress=False)
    with pytest.raises(DatasetError, match="no LeRobotDataset at"):
        convert_lerobot(tmp_path / "nowhere", out, progress=False)
    _assert_nothing_written(out)
    # v2.0 has v2.1's layout (v2.1 added per-episode stats, which are not read).
    (src / "meta/info.json").write_text(json.dumps({**info, "codebase_version": "v2.0"}))
    assert convert_lerobot(src, out, progress=False)["codebase_version"] == ["v2.0"]


def test_an_unknown_key_names_the_features(written: dict, tmp_path: Path):
    out = tmp_path / "out.zarr"
    src = _root(written, "synthetic", "v3.0")
    with pytest.raises(DatasetError, match=r"keys= names \['observation.nosuch'\], which .* "):
        convert_lerobot(src, out, keys="observation.state,observation.nosuch", progress=False)
    with pytest.raises(SystemExit):  # the CLI: one line on stderr, exit status 2
        main(["data", "convert", "lerobot", str(src), str(out), "keys=observation.nosuch"])
    _assert_nothing_written(out)


@pytest.mark.parametrize("version", VERSIONS)
def test_frame_counts_that_disagree_with_the_metadata(written: dict, version: str, tmp_path):
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    src = _copy(written, "synthetic", version, tmp_path)
    out = tmp_path / "out.zarr"
    if version == "v2.1":  # episode 2 says one frame more than its file holds
        meta = src / "meta/episodes.jsonl"
        rows = [json.loads(line) for line in meta.read_text().splitlines()]
        rows[2]["length"] += 1
        meta.write_text("".join(json.dumps(r) + "\n" for r in rows))
        with pytest.raises(DatasetError, match="total_frames is 26 but the episode metadata"):
            convert_lerobot(src, out, progress=False)
        info = json.loads((src / "meta/info.json").read_text())
        (src / "meta/info.json").write_text(json.dumps({**info, "total_frames": 27}))
    else:  # the data file loses the last row of episode 0
        [data] = src.glob("data/*/*.parquet")
        table = pq.read_table(data)
        keep = pc.invert(pc.equal(table.column("index"), SYNTH_LENGTHS[0] - 1))
        pq.write_table(table.filter(keep), data)
    with pytest.raises(DatasetError, match="frame rows, but the episode metadata says length"):
        convert_lerobot(src, out, progress=False)
    _assert_nothing_written(out)


def test_videos_that_cannot_be_decoded_or_are_short(written: dict, tmp_path: Path):
    src = _copy(written, "pusht", "v2.1", tmp_path)
    out = tmp_path / "out.zarr"
    videos = sorted(src.glob("videos/*/observation.image/episode_*.mp4"))
    assert len(videos) == PUSHT_EPISODES
    lengths = np.diff(written["pusht"]["episode_ends"], prepend=0)
    longest, shortest = int(np.argmax(lengths)), int(np.argmin(lengths))
    good = videos[longest].read_bytes()
    videos[longest].write_bytes(videos[shortest].read_bytes())  # fewer frames than its rows
    with pytest.raises(DatasetError, match=r"ends \(last frame at .*\) before the frame at"):
        convert_lerobot(src, out, progress=False)
    _assert_nothing_written(out)
    videos[longest].write_bytes(good[: len(good) // 3])  # truncated
    with pytest.raises(DatasetError, match=r"observation\.image"):
        convert_lerobot(src, out, progress=False)
    videos[longest].write_bytes(b"not a video at all" * 100)
    with pytest.raises(
        DatasetError, match=r"cannot (open|decode) the video of 'observation.image'"
    ):
        convert_lerobot(src, out, progress=False)
    videos[longest].unlink()
    with pytest.raises(DatasetError, match=r"video of 'observation.image' \(.*\) is missing"):
        convert_lerobot(src, out, progress=False)
    _assert_nothing_written(out)
