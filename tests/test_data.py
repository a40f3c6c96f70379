"""Tests of the replay buffer, the sequence sampler and the normalizer."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numcodecs
import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import load_file, save_file
from zarr.storage import LocalStore

from cm_policy.data import (
    DatasetError,
    LinearNormalizer,
    ReplayBuffer,
    SequenceSampler,
    describe,
    downsample_mask,
    get_val_mask,
)

EPISODE_LENGTHS = (5, 7, 3)


def make_episode(length: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "action": rng.normal(size=(length, 2)).astype(np.float32),
        "state": rng.normal(size=(length, 5)),
        "img": rng.integers(0, 256, size=(length, 8, 8, 3), dtype=np.uint8),
        "step": np.arange(length, dtype=np.int64)[:, None],
    }


@pytest.fixture
def episodes() -> list[dict[str, np.ndarray]]:
    return [make_episode(n, seed) for seed, n in enumerate(EPISODE_LENGTHS)]


def fill(buffer: ReplayBuffer, episodes: list[dict[str, np.ndarray]]) -> ReplayBuffer:
    for episode in episodes:
        buffer.add_episode(episode)
    return buffer


def assert_episode_equal(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, key
        np.testing.assert_array_equal(actual[key], value, err_msg=key)


@pytest.fixture
def saved(tmp_path: Path, episodes: list[dict[str, np.ndarray]]) -> Path:
    path = tmp_path / "tiny.zarr"
    fill(ReplayBuffer.create(path), episodes)
    return path


# -- replay buffer ------------------------------------------------------------------------------


def test_disk_round_trip(saved: Path, episodes: list[dict[str, np.ndarray]]) -> None:
    buffer = ReplayBuffer.open(saved)
    assert buffer.zarr_format == 3
    assert buffer.n_episodes == 3
    assert buffer.n_steps == sum(EPISODE_LENGTHS)
    np.testing.assert_array_equal(buffer.episode_ends, [5, 12, 15])
    np.testing.assert_array_equal(buffer.episode_lengths, EPISODE_LENGTHS)
    assert sorted(buffer.keys) == ["action", "img", "state", "step"]
    assert buffer.episode_slice(1) == slice(5, 12)
    assert buffer.episode_slice(-1) == slice(12, 15)
    for i, episode in enumerate(episodes):
        assert_episode_equal(buffer.get_episode(i), episode)
    assert_episode_equal(buffer.get_episode(-3), episodes[0])
    np.testing.assert_array_equal(buffer["img"][5:12], episodes[1]["img"])
    with pytest.raises(IndexError, match="episode 3 out of range"):
        buffer.get_episode(3)


def test_arrays_are_compressed_and_chunked_along_time(saved: Path) -> None:
    buffer = ReplayBuffer.open(saved)
    img, action = buffer["img"], buffer["action"]
    assert img.chunks[1:] == (8, 8, 3) and action.chunks[1:] == (2,)
    assert 64 <= img.chunks[0] <= 4096
    codec, checksum = img.compressors  # the compressor, then the CRC32C of its output
    assert type(checksum).__name__ == "Crc32cCodec"
    assert codec.cname.value == "zstd" and codec.clevel == 5
    assert codec.shuffle.value == "bitshuffle"
    assert action.compressors[0].shuffle.value == "shuffle"


def test_memory_buffer_and_save(tmp_path: Path, episodes: list[dict[str, np.ndarray]]) -> None:
    buffer = fill(ReplayBuffer.create(), episodes)
    assert buffer.path is None and buffer.zarr_format == 3
    assert_episode_equal(buffer.get_episode(1), episodes[1])

    buffer.save(tmp_path / "copy.zarr")
    assert_episode_equal(ReplayBuffer.open(tmp_path / "copy.zarr").get_episode(2), episodes[2])
    assert [p.name for p in tmp_path.iterdir()] == ["copy.zarr"]
    with pytest.raises(FileExistsError, match=r"copy\.zarr already exists"):
        buffer.save(tmp_path / "copy.zarr")
    buffer.drop_episode()
    buffer.save(tmp_path / "copy.zarr", overwrite=True)
    assert ReplayBuffer.open(tmp_path / "copy.zarr").n_episodes == 2
    assert [p.name for p in tmp_path.iterdir()] == ["copy.zarr"]


def test_load_into_ram_with_key_subset(saved: Path, episodes: list[dict[str, np.ndarray]]) -> None:
    buffer = ReplayBuffer.load(saved, keys=["action", "img"])
    assert buffer.keys == ["action", "img"] and buffer.zarr_format is None
    assert isinstance(buffer["img"], np.ndarray)
    np.testing.assert_array_equal(buffer["action"], np.concatenate([e["action"] for e in episodes]))
    assert_episode_equal(buffer.get_episode(2, keys=["img"]), {"img": episodes[2]["img"]})
    assert "state" not in buffer
    with pytest.raises(KeyError, match="no key 'state'"):
        buffer["state"]

    view = ReplayBuffer.open(saved, keys=["state"])
    assert view.keys == ["state"]
    with pytest.raises(ValueError, match="key subset is a read-only view"):
        ReplayBuffer.open(saved, mode="a", keys=["state"])


@pytest.mark.parametrize("backend", ["disk", "memory", "ram"])
def test_drop_episode(
    backend: str, tmp_path: Path, saved: Path, episodes: list[dict[str, np.ndarray]]
) -> None:
    if backend == "disk":
        buffer = ReplayBuffer.open(saved, mode="a")
    elif backend == "memory":
        buffer = fill(ReplayBuffer.create(), episodes)
    else:
        buffer = ReplayBuffer.load(saved)
    buffer.drop_episode()
    np.testing.assert_array_equal(buffer.episode_ends, [5, 12])
    assert buffer["img"].shape[0] == 12
    buffer.add_episode(episodes[2])
    buffer.drop_episode(0)
    np.testing.assert_array_equal(buffer.episode_ends, [7, 10])
    assert_episode_equal(buffer.get_episode(0), episodes[1])
    assert_episode_equal(buffer.get_episode(1), episodes[2])
    buffer.drop_episode(-1)
    buffer.drop_episode(0)
    assert buffer.n_episodes == 0 and buffer.n_steps == 0
    buffer.add_episode(episodes[0])
    assert_episode_equal(buffer.get_episode(0), episodes[0])
    if backend == "disk":
        reopened = ReplayBuffer.open(saved)
        assert reopened.n_episodes == 1
        assert_episode_equal(reopened.get_episode(0), episodes[0])


def test_append_to_existing_dataset(saved: Path, episodes: list[dict[str, np.ndarray]]) -> None:
    extra = make_episode(4, seed=9)
    ReplayBuffer.open(saved, mode="a").add_episode(extra)
    buffer = ReplayBuffer.open(saved)
    np.testing.assert_array_equal(buffer.episode_ends, [5, 12, 15, 19])
    assert_episode_equal(buffer.get_episode(-1), extra)
    assert_episode_equal(buffer.get_episode(0), episodes[0])
    with pytest.raises(ValueError, match="read-only"):
        buffer.add_episode(extra)


def test_add_episode_rejects_inconsistent_data(episodes: list[dict[str, np.ndarray]]) -> None:
    buffer = fill(ReplayBuffer.create(), episodes[:1])
    bad_keys = {k: v for k, v in episodes[1].items() if k != "state"}
    with pytest.raises(ValueError, match=r"episode keys .* differ from the buffer's keys"):
        buffer.add_episode(bad_keys)
    with pytest.raises(ValueError, match="same length"):
        buffer.add_episode({**episodes[1], "action": episodes[1]["action"][:2]})
    with pytest.raises(
        ValueError, match=r"img: expected per-step shape \(8, 8, 3\) and dtype uint8"
    ):
        buffer.add_episode({**episodes[1], "img": episodes[1]["img"].astype(np.float32)})
    with pytest.raises(ValueError, match=r"action: expected per-step shape \(2,\)"):
        buffer.add_episode({**episodes[1], "action": np.zeros((7, 3), np.float32)})
    with pytest.raises(ValueError, match=">= 1 steps"):
        buffer.add_episode({k: v[:0] for k, v in episodes[1].items()})
    assert buffer.n_episodes == 1 and buffer["action"].shape[0] == 5


def test_reads_diffusion_policy_v2_layout(tmp_path: Path) -> None:
    path = tmp_path / "v2.zarr"
    root = zarr.open_group(LocalStore(path), mode="w", zarr_format=2)
    blosc = numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.BITSHUFFLE)
    action = np.arange(20, dtype=np.float32).reshape(10, 2)
    root.create_group("data").create_array("action", data=action, chunks=(4, 2), compressors=blosc)
    root.create_group("meta").create_array(
        "episode_ends", data=np.array([4, 10]), chunks=(8,), compressors=blosc
    )
    buffer = ReplayBuffer.open(path, mode="a")
    assert buffer.zarr_format == 2
    np.testing.assert_array_equal(buffer.get_episode(1)["action"], action[4:])
    buffer.add_episode({"action": np.full((3, 2), -1, np.float32)})
    reopened = ReplayBuffer.open(path)
    np.testing.assert_array_equal(reopened.episode_ends, [4, 10, 13])
    np.testing.assert_array_equal(reopened["action"][10:], -1)
    assert "format:    zarr v2" in describe(path)


def test_describe(saved: Path, episodes: list[dict[str, np.ndarray]]) -> None:
    text = describe(saved)
    assert "format:    zarr v3" in text
    assert "episodes:  3" in text and "steps:     15" in text
    assert "episode length: min 3, mean 5.0, median 5.0, max 7" in text
    img_min = min(int(e["img"].min()) for e in episodes)
    img_line = next(line for line in text.splitlines() if "data/img" in line)
    assert "shape (15, 8, 8, 3), dtype uint8" in img_line
    assert "blosc(zstd, clevel=5, bitshuffle)" in img_line
    assert f"min {img_min}," in img_line


# -- invalid datasets ---------------------------------------------------------------------------


def corrupt_copy(saved: Path, tmp_path: Path) -> tuple[Path, zarr.Group]:
    path = tmp_path / "corrupt.zarr"
    shutil.copytree(saved, path)
    return path, zarr.open_group(LocalStore(path), mode="a")


def test_missing_episode_ends(saved: Path, tmp_path: Path) -> None:
    path, _ = corrupt_copy(saved, tmp_path)
    shutil.rmtree(path / "meta" / "episode_ends")
    with pytest.raises(
        DatasetError, match=re.escape(f"{path}: expected an array 'meta/episode_ends'")
    ):
        ReplayBuffer.open(path)


def test_missing_data_group_and_path(saved: Path, tmp_path: Path) -> None:
    path, _ = corrupt_copy(saved, tmp_path)
    shutil.rmtree(path / "data")
    with pytest.raises(DatasetError, match=r"expected a group 'data/'.*found nothing"):
        ReplayBuffer.load(path)
    with pytest.raises(
        DatasetError, match=r"no dataset at .*nowhere\.zarr: the path does not exist"
    ):
        ReplayBuffer.open(tmp_path / "nowhere.zarr")
    (tmp_path / "empty").mkdir()
    for mode in ("r", "a"):
        with pytest.raises(DatasetError, match="expected a zarr group"):
            ReplayBuffer.open(tmp_path / "empty", mode=mode)
    assert list((tmp_path / "empty").iterdir()) == []


def test_truncated_array(saved: Path, tmp_path: Path) -> None:
    path, root = corrupt_copy(saved, tmp_path)
    root["data/action"].resize((13, 2))
    expected = (
        "data/action has 13 steps but meta/episode_ends\\[-1\\] is 15 \\(expected equal\\): "
        "the dataset is truncated or corrupt"
    )
    with pytest.raises(DatasetError, match=re.escape(f"{path}: ") + expected):
        ReplayBuffer.open(path)
    with pytest.raises(DatasetError, match=expected):
        describe(path)


def test_non_increasing_episode_ends(saved: Path, tmp_path: Path) -> None:
    path, root = corrupt_copy(saved, tmp_path)
    root["meta/episode_ends"][:] = [5, 5, 15]
    with pytest.raises(
        DatasetError, match=r"strictly increasing, found \[0\]=5 followed by \[1\]=5"
    ):
        ReplayBuffer.open(path)
    root["meta/episode_ends"][:] = [0, 12, 15]
    with pytest.raises(DatasetError, match=r"episode_ends\[0\] is 0 \(expected > 0\)"):
        ReplayBuffer.open(path)


def test_nan_detected_on_load(saved: Path, tmp_path: Path) -> None:
    path, root = corrupt_copy(saved, tmp_path)
    root["data/action"][6, 1] = np.nan
    root["data/action"][13, 0] = np.inf
    assert ReplayBuffer.open(path).n_episodes == 3
    with pytest.raises(
        DatasetError,
        match=r"data/action has non-finite values \(NaN or inf\) at 2 step\(s\), "
        r"first at step 6 \(episode 1\)",
    ):
        ReplayBuffer.load(path)
    assert ReplayBuffer.load(path, keys=["state"]).n_steps == 15


def test_missing_requested_key(saved: Path) -> None:
    with pytest.raises(
        DatasetError,
        match=r"requested key\(s\) \['obs'\] not found in data/ \(available: "
        r"\['action', 'img', 'state', 'step'\]\)",
    ):
        ReplayBuffer.load(saved, keys=["action", "obs"])


@pytest.mark.filterwarnings("ignore::zarr.errors.UnstableSpecificationWarning")
def test_non_numeric_array(saved: Path, tmp_path: Path) -> None:
    path, root = corrupt_copy(saved, tmp_path)
    root["data"].create_array("label", shape=(15,), dtype="|S4", chunks=(15,))
    with pytest.raises(
        DatasetError, match=re.escape("data/label has dtype |S4 (expected a numeric")
    ):
        ReplayBuffer.open(path)


# -- real dataset -------------------------------------------------------------------------------


def test_real_pusht_dataset(real_pusht: Path) -> None:
    buffer = ReplayBuffer.open(real_pusht)
    assert buffer.zarr_format == 2
    assert buffer.n_episodes == 206 and buffer.n_steps == 25650
    assert buffer.episode_ends[0] == 161
    shapes = {key: tuple(buffer[key].shape) for key in buffer.keys}
    assert shapes == {
        "action": (25650, 2),
        "state": (25650, 5),
        "keypoint": (25650, 9, 2),
        "img": (25650, 96, 96, 3),
        "n_contacts": (25650, 1),
    }
    assert buffer["img"].dtype == np.float32
    last = buffer.get_episode(-1, keys=["img", "action"])
    assert last["img"].shape == (buffer.episode_lengths[-1], 96, 96, 3)

    ram = ReplayBuffer.load(real_pusht, keys=["action", "state"])
    np.testing.assert_array_equal(ram["action"][-3:], buffer["action"][-3:])
    # PushT coordinates live in a 512x512 workspace.
    assert 0 <= ram["action"].min() and ram["action"].max() <= 512
    sampler = SequenceSampler(ram.episode_ends, sequence_length=16, pad_before=1, pad_after=7)
    assert len(sampler) == 25650 - 7 * 206
    assert "episodes:  206" in describe(real_pusht)


# -- sampler ------------------------------------------------------------------------------------


def test_sampler_pads_with_edge_frames() -> None:
    # Two episodes of 9 and 10 steps; the value of a step is its absolute index.
    ends = np.array([9, 19])
    arrays = {"t": np.arange(19), "t2": np.stack([np.arange(19), -np.arange(19)], axis=1)}
    sampler = SequenceSampler(ends, sequence_length=16, pad_before=1, pad_after=7)
    expected = [
        [0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 8, 8, 8, 8, 8, 8],
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 8, 8, 8, 8, 8, 8, 8],
        [9, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 18, 18, 18, 18, 18],
        [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 18, 18, 18, 18, 18, 18],
        [10, 11, 12, 13, 14, 15, 16, 17, 18, 18, 18, 18, 18, 18, 18, 18],
    ]
    assert len(sampler) == 5
    for idx, window in enumerate(expected):
        sample = sampler.sample_sequence(arrays, idx)
        np.testing.assert_array_equal(sample["t"], window)
        np.testing.assert_array_equal(sample["t2"], np.stack([window, -np.array(window)], 1))

    batch = sampler.sample_batch(arrays, np.array([4, 0, 2, 2]))
    np.testing.assert_array_equal(batch["t"], np.array(expected)[[4, 0, 2, 2]])
    assert batch["t2"].shape == (4, 16, 2)
    first = sampler.sample_batch(arrays, np.array([0]), first_k={"t": 2})
    np.testing.assert_array_equal(first["t"], [[0, 0]])
    assert first["t2"].shape == (1, 16, 2)


def test_sampler_mask_and_short_episodes() -> None:
    ends = np.array([3, 20, 24, 30])
    sampler = SequenceSampler(ends, sequence_length=4, episode_mask=np.array([1, 1, 0, 1], bool))
    # Without padding: episode 0 (3 steps) is too short, episode 1 gives 14 windows, 3 gives 3.
    assert len(sampler) == 14 + 3
    starts = sampler.indices[:, 0]
    np.testing.assert_array_equal(starts, [*range(3, 17), 24, 25, 26])
    np.testing.assert_array_equal(sampler.indices[-1], [26, 27, 28, 29])
    with pytest.raises(ValueError, match=r"pad_after must be in \[0, sequence_length - 1\]"):
        SequenceSampler(ends, sequence_length=4, pad_after=4)
    with pytest.raises(ValueError, match="episode_mask has shape"):
        SequenceSampler(ends, sequence_length=4, episode_mask=np.ones(3, bool))


def test_sample_batch_matches_sample_sequence(saved: Path) -> None:
    lazy = ReplayBuffer.open(saved)
    ram = ReplayBuffer.load(saved)
    sampler = SequenceSampler(ram.episode_ends, sequence_length=4, pad_before=1, pad_after=3)
    arrays = {key: ram[key] for key in ram.keys}
    idxs = np.random.default_rng(0).integers(0, len(sampler), size=32)
    batch = sampler.sample_batch(arrays, idxs)
    for row, idx in enumerate(idxs):
        single = sampler.sample_sequence({key: lazy[key] for key in lazy.keys}, int(idx))
        for key in arrays:
            np.testing.assert_array_equal(batch[key][row], single[key])
    with pytest.raises(TypeError, match="needs numpy arrays in RAM"):
        sampler.sample_batch({"img": lazy["img"]}, idxs)


def test_val_split_by_episode() -> None:
    mask = get_val_mask(100, val_ratio=0.1, seed=3)
    assert mask.dtype == bool and mask.sum() == 10
    np.testing.assert_array_equal(mask, get_val_mask(100, val_ratio=0.1, seed=3))
    assert not np.array_equal(mask, get_val_mask(100, val_ratio=0.1, seed=4))
    assert get_val_mask(5, val_ratio=0.01, seed=0).sum() == 1
    assert get_val_mask(1, val_ratio=0.5, seed=0).sum() == 0
    assert get_val_mask(50, val_ratio=0.0, seed=0).sum() == 0

    ends = np.cumsum(np.full(100, 10))
    train = SequenceSampler(ends, 4, episode_mask=~mask)
    val = SequenceSampler(ends, 4, episode_mask=mask)
    train_episodes = set(np.searchsorted(ends, train.indices.ravel(), side="right"))
    val_episodes = set(np.searchsorted(ends, val.indices.ravel(), side="right"))
    assert val_episodes == set(np.flatnonzero(mask))
    assert train_episodes.isdisjoint(val_episodes)
    assert len(train_episodes | val_episodes) == 100

    capped = downsample_mask(~mask, max_n=20, seed=0)
    assert capped.sum() == 20 and not (capped & mask).any()
    np.testing.assert_array_equal(capped, downsample_mask(~mask, max_n=20, seed=0))
    np.testing.assert_array_equal(downsample_mask(~mask, max_n=None), ~mask)


# -- normalizer ---------------------------------------------------------------------------------


@pytest.fixture
def fit_data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    action = rng.uniform([0, -5, 100], [512, 5, 300], size=(1000, 3)).astype(np.float32)
    action[:, 1] = 7.0  # a constant dimension
    return {"action": action, "state": rng.normal(3.0, 20.0, size=(50, 20, 4))}


def test_limits_normalizer(fit_data: dict[str, np.ndarray]) -> None:
    normalizer = LinearNormalizer().fit(fit_data, mode="limits")
    action = fit_data["action"]
    out = normalizer.normalize("action", action)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_allclose(out[:, [0, 2]].min(0), -1, atol=1e-6)
    np.testing.assert_allclose(out[:, [0, 2]].max(0), 1, atol=1e-6)
    np.testing.assert_array_equal(out[:, 1], 0)
    assert normalizer.state_dict()["action.scale"][1] == 1
    np.testing.assert_allclose(normalizer.unnormalize("action", out), action, rtol=1e-6, atol=1e-4)

    batch = torch.from_numpy(action[:32]).reshape(2, 16, 3)
    normed = normalizer.normalize("action", batch)
    assert isinstance(normed, torch.Tensor) and normed.shape == (2, 16, 3)
    torch.testing.assert_close(normalizer.unnormalize("action", normed), batch)
    with pytest.raises(ValueError, match=r"expects trailing shape \(3,\), got .* \(4, 2\)"):
        normalizer.normalize("action", torch.zeros(4, 2))


def test_gaussian_normalizer(fit_data: dict[str, np.ndarray]) -> None:
    normalizer = LinearNormalizer().fit(fit_data, mode={"action": "limits", "state": "gaussian"})
    state = torch.from_numpy(fit_data["state"]).float()
    normed = normalizer.normalize("state", state)
    torch.testing.assert_close(normed.mean(dim=(0, 1)), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(normed.std(dim=(0, 1), correction=0), torch.ones(4))
    torch.testing.assert_close(normalizer.unnormalize("state", normed), state)
    normed_action = normalizer.normalize("action", fit_data["action"])
    assert normed_action.min() == pytest.approx(-1, abs=1e-6)

    constant = LinearNormalizer().fit({"x": np.full((10, 2), 4.0)}, mode="gaussian")
    np.testing.assert_array_equal(constant.normalize("x", np.full((3, 2), 4.0)), 0)
    np.testing.assert_array_equal(constant.normalize("x", np.full((1, 2), 5.0)), 1)


def test_identity_and_multi_dim_features() -> None:
    keypoint = np.random.default_rng(1).uniform(0, 500, size=(30, 9, 2)).astype(np.float32)
    normalizer = LinearNormalizer().fit(
        {"keypoint": keypoint, "img": np.zeros((2, 3))},
        mode={"keypoint": "limits", "img": "identity"},
        last_n_dims=2,
    )
    assert normalizer.state_dict()["keypoint.scale"].shape == (9, 2)
    out = normalizer.normalize("keypoint", keypoint)
    np.testing.assert_allclose(out.min(axis=0), -1, atol=1e-6)
    img = torch.rand(2, 2, 3, 8, 8)
    assert torch.equal(normalizer.normalize("img", img), img)
    normalizer.set_scale_offset("img", 2 / 255, -1.0)
    assert normalizer.normalize("img", torch.full((1, 3), 255.0)).allclose(torch.ones(1, 3))
    with pytest.raises(KeyError, match="normalizer has no key 'obs'"):
        normalizer.normalize("obs", img)


def test_normalizer_state_dict_round_trip(tmp_path: Path, fit_data: dict[str, np.ndarray]) -> None:
    normalizer = LinearNormalizer().fit(fit_data, mode={"state": "gaussian"})
    normalizer.set_identity("obs.image")
    state = normalizer.state_dict()
    assert {"action.scale", "action.offset", "action.min", "action.max", "action.mean"} <= set(
        state
    )
    assert {"obs.image.scale", "obs.image.offset"} <= set(state)
    save_file(state, tmp_path / "normalizer.safetensors")
    restored = LinearNormalizer.from_state_dict(load_file(tmp_path / "normalizer.safetensors"))
    assert sorted(restored.keys()) == sorted(normalizer.keys())
    for key, tensor in state.items():
        assert torch.equal(restored.state_dict()[key], tensor), key
    x = torch.randn(5, 20, 4)
    assert torch.equal(restored.normalize("state", x), normalizer.normalize("state", x))
    torch.testing.assert_close(
        restored.stats("action")["max"], torch.from_numpy(fit_data["action"].max(0))
    )
    with pytest.raises(ValueError, match=r"normalizer entry 'action' lacks \['offset'\]"):
        LinearNormalizer.from_state_dict({"action.scale": torch.ones(2)})
