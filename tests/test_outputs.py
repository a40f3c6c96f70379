"""Users' own data: overwrite=true replaces only what cm-policy wrote (cm_policy/data/outputs.py),
never a source of the conversion nor anything else; and the command line's error line (its text
as raised, on its own line after a progress bar)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr
from zarr.storage import LocalStore

from cm_policy.cli import main
from cm_policy.data import ReplayBuffer
from cm_policy.data.formats.lerobot import convert_lerobot
from cm_policy.data.outputs import (
    MARKER_KEY,
    OutputError,
    OutputExistsError,
    marker,
    prepare_output,
    written_by_package,
)
from cm_policy.data.robomimic_hdf5 import RobomimicWriter, convert_to_zarr

META = {"env_name": "Lift", "type": 1, "env_kwargs": {"robots": ["Panda"]}}
LOW_DIM = {"object": 10, "robot0_eef_pos": 3, "robot0_eef_quat": 4, "robot0_gripper_qpos": 2}
NOT_OURS = "is not a buffer cm-policy wrote"
NO_MARKER = "no cm_policy marker in its zarr attributes"


# --- small datasets ------------------------------------------------------------------------------
def write_hdf5(path: Path, lengths=(4, 3)) -> Path:
    """A robomimic HDF5 file of fake low-dim demos, by the package's writer."""
    rng = np.random.default_rng(0)
    with RobomimicWriter(path, META) as writer:
        for n in lengths:
            obs = {k: rng.normal(size=(n, d)) for k, d in LOW_DIM.items()}
            writer.add_demo(rng.normal(size=(n, 8)), rng.uniform(-1, 1, (n, 7)), obs)
    return path


def write_lerobot(root: Path, lengths=(5, 3)) -> Path:
    """A LeRobotDataset v2.1 folder of numeric features, written by hand (meta/info.json,
    meta/episodes.jsonl, one parquet file per episode)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(1)
    features = {
        "action": {"dtype": "float32", "shape": [2], "names": None},
        "observation.state": {"dtype": "float32", "shape": [3], "names": None},
    }
    data_path = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
    info = {
        "codebase_version": "v2.1",
        "fps": 10,
        "features": features,
        "data_path": data_path,
        "chunks_size": 1000,
        "total_episodes": len(lengths),
        "total_frames": sum(lengths),
    }
    (root / "meta").mkdir(parents=True)
    (root / "meta/info.json").write_text(json.dumps(info))
    rows = [{"episode_index": i, "tasks": ["push"], "length": n} for i, n in enumerate(lengths)]
    (root / "meta/episodes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    start = 0
    for i, n in enumerate(lengths):
        columns = {
            name: pa.FixedSizeListArray.from_arrays(
                pa.array(rng.normal(size=n * spec["shape"][0]).astype(np.float32)),
                spec["shape"][0],
            )
            for name, spec in features.items()
        }
        columns["frame_index"] = pa.array(np.arange(n, dtype=np.int64))
        columns["episode_index"] = pa.array(np.full(n, i, dtype=np.int64))
        columns["index"] = pa.array(np.arange(start, start + n, dtype=np.int64))
        columns["timestamp"] = pa.array(np.arange(n, dtype=np.float32) / 10)
        path = root / data_path.format(episode_chunk=0, episode_index=i)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(columns), path)
        start += n
    return root


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (or ``root`` itself) with its bytes."""
    if root.is_file():
        return {root.name: root.read_bytes()}
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def user_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "thesis.txt").write_text("years of work")
    return path


def old_buffer(path: Path) -> Path:
    """A buffer as cm-policy wrote it before the marker: the same layout, no written_by."""
    buffer = ReplayBuffer.create(path)
    buffer.add_episode({"action": np.zeros((3, 2), np.float32)})
    root = zarr.open_group(LocalStore(path), mode="r+")
    del root.attrs[MARKER_KEY]
    assert not written_by_package(path)
    return path


def cli_error(capsys, argv: list[str]) -> str:
    """The one error line ``cm-policy argv`` prints (exit status 2)."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    [line] = [line for line in err.splitlines() if line.startswith("error: ")]
    return line


# --- the marker ----------------------------------------------------------------------------------
def test_everything_written_carries_the_marker_from_its_creation(tmp_path: Path):
    assert marker()["package"] == "cm-policy" and marker()["version"]
    buffer = ReplayBuffer.create(tmp_path / "live.zarr")  # as an interrupted writer leaves it
    assert written_by_package(tmp_path / "live.zarr")
    buffer.add_episode({"action": np.ones((2, 2), np.float32)})
    buffer.save(tmp_path / "copy.zarr")
    assert written_by_package(tmp_path / "copy.zarr")
    hdf5 = write_hdf5(tmp_path / "demos.hdf5")
    assert written_by_package(hdf5, kind="hdf5")
    with h5py.File(hdf5, "r") as f:
        assert json.loads(f.attrs[MARKER_KEY])["package"] == "cm-policy"
    convert_to_zarr(hdf5, tmp_path / "demos.zarr", progress=False)
    assert written_by_package(tmp_path / "demos.zarr")
    assert not written_by_package(hdf5)  # a zarr buffer is asked for, not an HDF5 file


# --- never the source ----------------------------------------------------------------------------
def test_lerobot_convert_onto_its_own_source_is_refused(tmp_path: Path, capsys):
    src = write_lerobot(tmp_path / "parent" / "dataset")
    before = snapshot(src)
    line = cli_error(capsys, ["data", "convert", "lerobot", str(src), str(src), "overwrite=true"])
    assert f"OUT {src.resolve()} is the source" in line and "choose another path" in line
    # Inside the source folder, a folder holding it, a symlink to it: refused, with or without
    # overwrite.
    inside = src / "converted.zarr"
    line = cli_error(capsys, ["data", "convert", "lerobot", str(src), str(inside)])
    assert "is inside the source" in line and "choose a path outside it" in line
    holder = src.parent
    line = cli_error(
        capsys, ["data", "convert", "lerobot", str(src), str(holder), "overwrite=true"]
    )
    assert "contains the source" in line and "would delete the source" in line
    link = tmp_path / "link"
    link.symlink_to(src, target_is_directory=True)
    line = cli_error(capsys, ["data", "convert", "lerobot", str(src), str(link), "overwrite=true"])
    assert "is the source" in line
    assert snapshot(src) == before
    assert sorted(p.name for p in holder.iterdir()) == ["dataset"]  # no temporary folder either
    # The second of several sources counts too.
    other = write_lerobot(tmp_path / "other")
    with pytest.raises(OutputError, match="is the source"):
        convert_lerobot([other, src], src, overwrite=True, progress=False)
    assert snapshot(src) == before


def test_robomimic_convert_onto_its_own_hdf5_is_refused(tmp_path: Path, capsys):
    hdf5 = write_hdf5(tmp_path / "demos.hdf5")
    before = snapshot(hdf5)
    line = cli_error(
        capsys, ["data", "convert", "robomimic", str(hdf5), str(hdf5), "overwrite=true"]
    )
    assert "is the source" in line
    assert snapshot(hdf5) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demos.hdf5"]


def test_saving_a_buffer_onto_the_path_it_reads_from_is_refused(tmp_path: Path):
    path = tmp_path / "b.zarr"
    buffer = ReplayBuffer.create(path)
    buffer.add_episode({"action": np.arange(6, dtype=np.float32).reshape(3, 2)})
    with pytest.raises(OutputError, match="is the source"):
        ReplayBuffer.open(path).save(path, overwrite=True)
    with pytest.raises(OutputError, match="is inside the source"):
        ReplayBuffer.open(path).save(path / "inner.zarr")
    np.testing.assert_array_equal(ReplayBuffer.load(path)["action"], buffer["action"][:])
    # Loaded into RAM, it reads nothing from its path any more: a buffer of ours, replaced.
    loaded = ReplayBuffer.load(path)
    loaded.add_episode({"action": np.ones((1, 2), np.float32)})
    loaded.save(path, overwrite=True)
    assert ReplayBuffer.open(path).n_episodes == 2


# --- never anything else -------------------------------------------------------------------------
def test_a_users_folder_is_never_replaced(tmp_path: Path, capsys):
    src = write_lerobot(tmp_path / "dataset")
    folder = user_folder(tmp_path / "mine")
    line = cli_error(
        capsys, ["data", "convert", "lerobot", str(src), str(folder), "overwrite=true"]
    )
    assert NOT_OURS in line and "remove it yourself" in line and "zarr.json" in line
    file = tmp_path / "notes.txt"
    file.write_text("keep me")
    line = cli_error(capsys, ["data", "convert", "lerobot", str(src), str(file), "overwrite=true"])
    assert NOT_OURS in line and "a file, not a zarr folder" in line
    # The library calls, which opened the store in mode "w" (clearing it) before.
    with pytest.raises(OutputExistsError, match=NOT_OURS):
        ReplayBuffer.create(folder, overwrite=True)
    buffer = ReplayBuffer.create()
    buffer.add_episode({"action": np.zeros((2, 2), np.float32)})
    with pytest.raises(OutputExistsError, match=NOT_OURS):
        buffer.save(folder, overwrite=True)
    hdf5 = write_hdf5(tmp_path / "demos.hdf5")
    with pytest.raises(OutputExistsError, match=NOT_OURS):
        convert_to_zarr(hdf5, folder, overwrite=True, progress=False)
    with pytest.raises(OutputExistsError, match="not an HDF5 dataset cm-policy wrote"):
        RobomimicWriter(file, META, overwrite=True)
    assert (folder / "thesis.txt").read_text() == "years of work"
    assert sorted(p.name for p in folder.iterdir()) == ["thesis.txt"]
    assert file.read_text() == "keep me"


def test_an_unmarked_old_buffer_is_refused_and_says_why(tmp_path: Path, capsys):
    src = write_lerobot(tmp_path / "dataset")
    old = old_buffer(tmp_path / "old.zarr")
    before = snapshot(old)
    line = cli_error(capsys, ["data", "convert", "lerobot", str(src), str(old), "overwrite=true"])
    assert NOT_OURS in line and NO_MARKER in line
    assert "written before cm-policy marked its outputs" in line and "remove it yourself" in line
    assert snapshot(old) == before
    # An HDF5 file without the marker (robomimic's own datasets, older demos).
    foreign = tmp_path / "foreign.hdf5"
    with h5py.File(foreign, "w") as f:
        f.create_group("data")
    with pytest.raises(OutputExistsError, match="no cm_policy marker in its HDF5 root"):
        RobomimicWriter(foreign, META, overwrite=True)
    with h5py.File(foreign, "r") as f:
        assert list(f) == ["data"]


def test_a_buffer_cm_policy_wrote_is_replaced(tmp_path: Path, capsys):
    src = write_lerobot(tmp_path / "dataset")
    out = tmp_path / "out.zarr"
    main(["data", "convert", "lerobot", str(src), str(out), "keys=observation.state"])
    capsys.readouterr()
    assert sorted(ReplayBuffer.open(out).keys) == ["action", "observation_state"]
    line = cli_error(capsys, ["data", "convert", "lerobot", str(src), str(out), "keys=action"])
    assert "already exists; remove it or pass overwrite=true" in line
    main(["data", "convert", "lerobot", str(src), str(out), "keys=action", "overwrite=true"])
    assert json.loads(capsys.readouterr().out)["episodes"] == 2
    assert ReplayBuffer.open(out).keys == ["action"] and written_by_package(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset", "out.zarr"]
    # robomimic: the converter's buffer and the writer's HDF5 file.
    hdf5 = write_hdf5(tmp_path / "demos.hdf5")
    convert_to_zarr(hdf5, out, overwrite=True, progress=False)
    assert ReplayBuffer.open(out).n_episodes == 2
    with pytest.raises(OutputExistsError, match="already exists"):
        write_hdf5(hdf5, lengths=(2,))
    with RobomimicWriter(hdf5, META, overwrite=True) as writer:
        n = 2
        obs = {k: np.zeros((n, d)) for k, d in LOW_DIM.items()}
        writer.add_demo(np.zeros((n, 8)), np.zeros((n, 7)), obs)
    with h5py.File(hdf5, "r") as f:
        assert list(f["data"]) == ["demo_0"]
    # A buffer of ours on disk, replaced by ReplayBuffer.create.
    ReplayBuffer.create(out, overwrite=True)
    assert ReplayBuffer.open(out).n_episodes == 0


def test_prepare_output_rules(tmp_path: Path):
    assert prepare_output(tmp_path / "new.zarr") == (tmp_path / "new.zarr").resolve()
    with pytest.raises(ValueError, match="kind must be one of"):
        prepare_output(tmp_path / "x", kind="csv")  # type: ignore[arg-type]
    ours = tmp_path / "ours.json"
    ours.write_text(json.dumps({"n": 1, MARKER_KEY: marker()}))
    assert prepare_output(ours, overwrite=True, kind="json") == ours.resolve()
    theirs = tmp_path / "theirs.json"
    theirs.write_text(json.dumps({"n": 1}))
    with pytest.raises(OutputExistsError, match="no cm_policy marker in its JSON"):
        prepare_output(theirs, overwrite=True, kind="json")
    other = tmp_path / "other.zarr"
    zarr.open_group(LocalStore(other), mode="w", attributes={MARKER_KEY: {"package": "x"}})
    with pytest.raises(OutputExistsError, match="its written_by marker names"):
        prepare_output(other, overwrite=True)


# --- data generate -------------------------------------------------------------------------------
def test_generate_replaces_only_its_own_buffer(tmp_path: Path, capsys):
    from cm_policy.data.pusht_demos import generate_pusht_dataset

    folder = user_folder(tmp_path / "mine")
    base = ["data", "generate", "pusht", "n=1", "workers=1", "images=false"]
    # config/generate/pusht.yaml has no overwrite: an existing out is never written.
    line = cli_error(capsys, [*base, f"out={folder}"])
    assert "already exists; remove it" in line
    with pytest.raises(OutputExistsError, match=NOT_OURS):
        generate_pusht_dataset(folder, 1, workers=1, images=False, overwrite=True)
    old = old_buffer(tmp_path / "old.zarr")
    with pytest.raises(OutputExistsError, match=NO_MARKER):
        generate_pusht_dataset(old, 1, workers=1, images=False, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ["thesis.txt"]
    out = tmp_path / "pusht.zarr"
    main([*base, f"out={out}"])
    assert ReplayBuffer.open(out).n_episodes == 1 and written_by_package(out)
    generate_pusht_dataset(out, 1, seed=1, workers=1, images=False, overwrite=True)
    assert json.loads((out / "generation.json").read_text())["seeds"] == [1, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "old.zarr", "pusht.zarr"]


def test_robomimic_generate_checks_every_output_before_it_starts(tmp_path: Path, capsys):
    folder = user_folder(tmp_path / "mine")
    base = ["data", "generate", "robomimic", "task=lift", "n=1", "overwrite=true"]
    line = cli_error(capsys, [*base, f"out={folder}"])
    assert "is not an HDF5 dataset cm-policy wrote (a folder, not a file)" in line
    # Its buffer (out with .zarr) and statistics (.json) are outputs too.
    user_folder(tmp_path / "lift.zarr")
    line = cli_error(capsys, [*base, f"out={tmp_path / 'lift.hdf5'}"])
    assert NOT_OURS in line and "lift.zarr" in line
    (tmp_path / "lift2.json").write_text('{"mine": true}')
    line = cli_error(capsys, [*base, f"out={tmp_path / 'lift2.hdf5'}"])
    assert "no cm_policy marker in its JSON" in line
    line = cli_error(capsys, [*base, f"out={tmp_path / 'lift3.zarr'}"])
    assert "ends in .zarr" in line
    assert (folder / "thesis.txt").read_text() == "years of work"
    assert not (tmp_path / "lift.hdf5").exists() and not (tmp_path / "lift2.hdf5").exists()


# --- the error line ------------------------------------------------------------------------------
def raising(monkeypatch, error) -> None:
    """``cm-policy`` runs a command that raises ``error`` (an exception, or a function that
    raises one)."""

    def run(argv):
        if isinstance(error, BaseException):
            raise error
        error()

    monkeypatch.setattr("cm_policy.cli.run_command", run)


def test_quotes_of_a_message_are_kept(monkeypatch, capsys):
    raising(monkeypatch, ValueError("batch_size: expected an integer, got '32'"))
    assert cli_error(capsys, []) == "error: batch_size: expected an integer, got '32'"
    raising(monkeypatch, ValueError('"quoted" at both ends"'))
    assert cli_error(capsys, []) == 'error: "quoted" at both ends"'
    raising(monkeypatch, FileNotFoundError("no file 'a.zarr'"))
    assert cli_error(capsys, []) == "error: no file 'a.zarr'"


def test_a_key_error_shows_its_key_without_the_quotes_repr_adds(monkeypatch, capsys):
    raising(monkeypatch, KeyError("x"))
    assert cli_error(capsys, []) == "error: x"
    raising(monkeypatch, KeyError("no key 'img' in buffer"))
    assert cli_error(capsys, []) == "error: no key 'img' in buffer"


def test_an_open_progress_bar_is_closed_before_the_error_line(monkeypatch, capsys):
    from tqdm import tqdm

    bars = []

    def fail():
        bar = tqdm(total=10, desc="convert", file=sys.stderr, mininterval=0)
        bar.update(3)
        bars.append(bar)  # left open, as a failed loop leaves it
        raise ValueError("episode 3 is damaged")

    raising(monkeypatch, fail)
    line = cli_error(capsys, [])
    assert line == "error: episode 3 is damaged"
    [bar] = bars
    assert bar.disable and bar not in tqdm._instances
    del bars[:]
    # The bar's line ends before the error line starts.
    raising(monkeypatch, fail)
    with pytest.raises(SystemExit):
        main([])
    err = capsys.readouterr().err
    assert "3/10" in err
    assert re.search(r"(^|\n)error: episode 3 is damaged\n", err), repr(err)
    assert "3/10" not in err.split("error: ")[1]  # no bar redrawn after it
