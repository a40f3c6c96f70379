"""Verified data: every replay buffer the package writes carries a CRC32C in every chunk and a
manifest of its chunk files; ``cm-policy data verify`` names each damaged chunk (changed bytes,
a truncated file, a lost one that zarr would read as zeros) and exits 2; training and
``data info`` refuse a damaged buffer in one line that names the chunk and points at data
verify; an interrupted conversion or generation leaves nothing behind."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numcodecs
import numpy as np
import pytest
import zarr
from test_outputs import snapshot, write_hdf5, write_lerobot
from tiny_config import TINY
from zarr.codecs import BloscCodec
from zarr.storage import LocalStore

from cm_policy.cli import main
from cm_policy.data import DatasetError, ReplayBuffer, describe
from cm_policy.data import replay_buffer as replay_buffer_module
from cm_policy.data.formats.lerobot import convert_lerobot
from cm_policy.data.manifest import MANIFEST, file_sha256, has_checksums, stored_arrays
from cm_policy.data.pusht_demos import generate_pusht_dataset
from cm_policy.data.robomimic_hdf5 import convert_to_zarr
from cm_policy.data.verify import verify_buffer

LENGTHS = (12, 10, 14)  # 36 steps: five chunks of 8 steps per array (see `small_chunks`)
DAMAGE_PARTS = ("is damaged", "download it again", "convert / generate it again")


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 8 time steps, so that a tiny buffer has several per array."""
    monkeypatch.setattr(replay_buffer_module, "_CHUNK_MIN_STEPS", 8)
    monkeypatch.setattr(replay_buffer_module, "_CHUNK_MAX_STEPS", 8)


def pusht_episode(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "state": rng.uniform(0, 512, (n, 5)).astype(np.float32),
        "action": rng.uniform(0, 512, (n, 2)).astype(np.float32),
        "img": rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8),
    }


@pytest.fixture
def buffer(tmp_path: Path) -> Path:
    """A PushT-shaped buffer (state, action, 96x96 images) written by the package."""
    path = tmp_path / "pusht.zarr"
    rng = np.random.default_rng(0)
    with ReplayBuffer.create(path) as written:
        for n in LENGTHS:
            written.add_episode(pusht_episode(n, rng))
    return path


def chunk(path: Path, key: str, index: int) -> Path:
    """The file of time chunk ``index`` of ``data/key``."""
    arr = ReplayBuffer.open(path)[key]
    return path / arr.path / arr.metadata.encode_chunk_key((index,) + (0,) * (arr.ndim - 1))


def flip_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))


def one_error_line(stderr: str, *parts: str) -> str:
    """The ``error: ...`` line of a command that failed on a user error: one line and the
    --debug hint, no traceback, holding every one of ``parts``."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: "), stderr
    for part in parts:
        assert part in lines[0], f"{part!r} not in {lines[0]!r}"
    return lines[0]


def verify_cli(path: Path, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """``cm-policy data verify PATH``: exit status, stdout, stderr."""
    try:
        main(["data", "verify", str(path)])
        code = 0
    except SystemExit as exc:
        code = int(exc.code)
    out, err = capsys.readouterr()
    return code, out, err


def train_error(path: Path, tmp_path: Path, capsys: pytest.CaptureFixture, *parts: str) -> str:
    """Training on ``path`` refuses: exit status 2 and one error line holding ``parts``."""
    capsys.readouterr()
    args = ["train", *TINY, "task=pusht_image", f"task.dataset_path={path}", "training.steps=1"]
    with pytest.raises(SystemExit) as info:
        main([*args, f"output_dir={tmp_path / 'run'}"])
    assert info.value.code == 2
    return one_error_line(capsys.readouterr().err, *parts)


# --- what the package writes ---------------------------------------------------------------------
def fake_planner(n_steps: int = 9, fail_after: int | None = None):
    """A stand-in for the PushT planner's ``generate``: successful episodes of random data,
    raising after ``fail_after`` of them (an interrupted generation)."""

    def generate(batch, seed, workers, render, goals):
        rng = np.random.default_rng(seed)
        for i in range(batch):
            if fail_after is not None and i == fail_after:
                raise RuntimeError("the planner stopped")
            arrays = pusht_episode(n_steps, rng)
            yield SimpleNamespace(
                success=True,
                goal=0,
                n_steps=n_steps,
                state=arrays["state"],
                keypoint=rng.normal(size=(n_steps, 9, 2)),
                action=arrays["action"],
                n_contacts=np.ones((n_steps, 1)),
                img=arrays["img"].astype(np.float32),
            )

    return generate


def write_with(writer: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, out: Path) -> None:
    """Write a small buffer at ``out`` through one of the package's writers."""
    if writer == "save":
        memory = ReplayBuffer.create()
        for n in LENGTHS:
            memory.add_episode(pusht_episode(n, np.random.default_rng(n)))
        memory.save(out)
    elif writer == "lerobot":
        convert_lerobot(write_lerobot(tmp_path / "src", lengths=(9, 8)), out, progress=False)
    elif writer == "robomimic":
        convert_to_zarr(write_hdf5(tmp_path / "demos.hdf5", lengths=(9, 8)), out, progress=False)
    elif writer == "pusht":
        monkeypatch.setattr("cm_policy.data.pusht_demos.generate", fake_planner())
        generate_pusht_dataset(out, n_episodes=2, workers=1)
    else:
        raise AssertionError(writer)


WRITERS = ["save", "lerobot", "robomimic", "pusht"]


@pytest.mark.parametrize("writer", ["create", *WRITERS])
def test_every_writer_adds_checksums_and_a_manifest(
    writer: str, buffer: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    out = buffer if writer == "create" else tmp_path / "out" / "written.zarr"
    if writer != "create":
        write_with(writer, tmp_path, monkeypatch, out)
    root = zarr.open_group(LocalStore(out, read_only=True), mode="r")
    arrays = stored_arrays(root, ("data", "meta"))
    assert "meta/episode_ends" in arrays and len(arrays) >= 3
    assert all(has_checksums(arr) for arr in arrays.values()), {
        key: arr.compressors for key, arr in arrays.items()
    }
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["written_by"]["package"] == "cm-policy"
    assert sorted(manifest["arrays"]) == sorted(arrays)
    ends = ReplayBuffer.open(out).episode_ends
    assert manifest["episode_ends"] == ends.tolist() and manifest["steps"] == ends[-1]
    for key, arr in arrays.items():
        assert manifest["arrays"][key]["shape"] == list(arr.shape)
        assert manifest["arrays"][key]["codecs"][-1] == "crc32c"
    # Every chunk file on disk is recorded with its size and SHA-256, and nothing else is.
    files = {
        str(p.relative_to(out)): p
        for key in arrays
        for p in (out / key).rglob("*")
        if p.is_file() and p.name != "zarr.json"
    }
    assert files and sorted(manifest["files"]) == sorted(files)
    for relative, file in files.items():
        record = manifest["files"][relative]
        assert record["bytes"] == file.stat().st_size
        assert record["sha256"] == file_sha256(file)
    assert verify_buffer(out, progress=False).ok


def test_a_clean_buffer_verifies_with_exit_status_0(buffer: Path, capsys):
    code, out, err = verify_cli(buffer, capsys)
    assert code == 0, err
    assert "damaged" not in out and err == ""
    assert "ok: 3 episodes, 36 steps" in out
    assert "passes its CRC32C" in out and f"all 16 chunk files match {MANIFEST}" in out
    assert "integrity: CRC32C in every chunk; manifest.json of 16 chunk files" in describe(buffer)


# --- damage --------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["action", "img"])  # read whole, and lazily a chunk at a time
def test_a_flipped_byte_is_a_checksum_mismatch(
    key: str, buffer: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    file = chunk(buffer, key, 2)
    flip_byte(file)
    index = (2, 0) if key == "action" else (2, 0, 0, 0)
    before = snapshot(buffer)
    code, out, err = verify_cli(buffer, capsys)
    assert snapshot(buffer) == before  # verify only reads
    assert code == 2
    damaged = [line for line in out.splitlines() if line.startswith("damaged: ")]
    assert damaged == [
        f"damaged: data/{key} chunk {index}, file {file}: checksum mismatch (CRC32C and SHA-256: "
        "the stored bytes changed)"
    ]
    one_error_line(err, f"{buffer}: 1 damaged (listed above)", *DAMAGE_PARTS)
    line = train_error(
        buffer, tmp_path, capsys, f"data/{key} chunk {index}", str(file), "checksum mismatch"
    )
    assert f"cm-policy data verify {buffer}" in line


def test_a_deleted_chunk_file_is_reported_missing(
    buffer: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    file = chunk(buffer, "state", 3)
    size = file.stat().st_size
    file.unlink()
    code, out, _ = verify_cli(buffer, capsys)
    assert code == 2
    assert (
        f"damaged: data/state chunk (3, 0), file {file}: missing (zarr would read zeros); the "
        f"manifest records {size} bytes"
    ) in out.splitlines()
    assert out.count("damaged: ") == 1
    parts = ("data/state chunk (3, 0)", str(file), "missing (zarr would read zeros)")
    line = train_error(buffer, tmp_path, capsys, *parts, *DAMAGE_PARTS)
    assert f"cm-policy data verify {buffer}" in line
    # Without the manifest the lost chunk reads as zeros, silently: what the manifest prevents.
    (buffer / MANIFEST).unlink()
    assert not ReplayBuffer.load(buffer)["state"][24:32].any()


def test_a_truncated_file_is_reported_with_both_sizes(
    buffer: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    file = chunk(buffer, "action", 0)
    size = file.stat().st_size
    file.write_bytes(file.read_bytes()[: size // 2])
    code, out, _ = verify_cli(buffer, capsys)
    assert code == 2
    [line] = [line for line in out.splitlines() if line.startswith("damaged: ")]
    assert line.startswith(f"damaged: data/action chunk (0, 0), file {file}: ")
    assert f"size {size // 2}, the manifest records {size}" in line
    assert "checksum mismatch (CRC32C" in line  # and it cannot be decoded either
    train_error(buffer, tmp_path, capsys, "data/action chunk (0, 0)", f"size {size // 2}")


def test_data_info_on_a_damaged_buffer_is_one_line(buffer: Path, capsys):
    file = chunk(buffer, "state", 1)
    flip_byte(file)
    with pytest.raises(SystemExit) as info:
        main(["data", "info", str(buffer)])
    assert info.value.code == 2
    parts = ("data/state chunk (1, 0)", str(file), "checksum mismatch", *DAMAGE_PARTS)
    line = one_error_line(capsys.readouterr().err, *parts)
    assert f"cm-policy data verify {buffer}" in line
    file.unlink()  # a lost file is found by the manifest, before any chunk is read
    with pytest.raises(DatasetError, match=r"data/state chunk \(1, 0\).*missing"):
        describe(buffer)


def test_a_damaged_manifest_is_reported(buffer: Path, capsys):
    (buffer / MANIFEST).write_text('{"arrays": {}, "files": []}')
    with pytest.raises(DatasetError, match=f"{MANIFEST} cannot be read"):
        ReplayBuffer.open(buffer)
    code, out, _ = verify_cli(buffer, capsys)
    assert code == 2
    assert f"damaged: {buffer / MANIFEST} cannot be read (TypeError: files is a list)" in out


# --- buffers without checksums -------------------------------------------------------------------
def plain_buffer(path: Path, zarr_format: int) -> Path:
    """A buffer written with plain zarr, as Diffusion Policy's are: Blosc, no checksum, no
    manifest; data/action in three chunks."""
    root = zarr.open_group(LocalStore(path), mode="w", zarr_format=zarr_format)
    blosc = numcodecs.Blosc() if zarr_format == 2 else BloscCodec()
    action = np.arange(24, dtype=np.float32).reshape(12, 2) + 1
    root.create_group("data").create_array("action", data=action, chunks=(4, 2), compressors=blosc)
    root.create_group("meta").create_array(
        "episode_ends", data=np.array([4, 12]), chunks=(8,), compressors=blosc
    )
    return path


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_a_buffer_without_checksums_is_decoded_and_says_so(
    zarr_format: int, tmp_path: Path, capsys
):
    path = plain_buffer(tmp_path / "plain.zarr", zarr_format)
    before = snapshot(path)
    code, out, err = verify_cli(path, capsys)
    assert code == 0, err
    assert snapshot(path) == before  # no manifest written into a buffer the package did not write
    assert "ok: 2 episodes, 12 steps; every chunk of 2 arrays decodes (4 chunk files)" in out
    assert "no checksums (no CRC32C codec, no manifest.json)" in out
    assert "a damaged chunk that still decodes cannot be detected" in out
    assert "passes its CRC32C" not in out
    # A chunk that no longer decodes is still found, by decoding.
    arr = zarr.open_group(LocalStore(path), mode="r")["data/action"]
    file = path / arr.path / arr.metadata.encode_chunk_key((1, 0))
    file.write_bytes(b"not a blosc chunk" * 4)
    code, out, _ = verify_cli(path, capsys)
    assert code == 2
    [line] = [line for line in out.splitlines() if line.startswith("damaged: ")]
    assert line.startswith(f"damaged: data/action chunk (1, 0), file {file}: cannot be decoded (")


# --- changes after the manifest ------------------------------------------------------------------
def test_the_manifest_follows_the_package_s_own_changes(buffer: Path, capsys):
    appended = ReplayBuffer.open(buffer, mode="a")
    appended.add_episode(pusht_episode(5, np.random.default_rng(7)))
    assert not (buffer / MANIFEST).exists()  # it no longer describes the buffer
    code, out, _ = verify_cli(buffer, capsys)
    assert code == 0 and "passes its CRC32C" in out
    assert "no manifest.json (changed since it was written" in out and "lost chunk" in out
    appended.close()
    assert json.loads((buffer / MANIFEST).read_text())["episode_ends"] == [12, 22, 36, 41]
    with ReplayBuffer.open(buffer, mode="a") as dropped:
        dropped.drop_episode(0)
    assert json.loads((buffer / MANIFEST).read_text())["steps"] == 29
    assert verify_cli(buffer, capsys)[0] == 0


def test_a_change_behind_the_package_s_back_is_found(buffer: Path, capsys):
    """Chunks rewritten by plain zarr carry a valid CRC32C: only the manifest tells."""
    root = zarr.open_group(LocalStore(buffer), mode="r+")
    root.create_array("data/extra", shape=(36, 1), chunks=(8, 1), dtype=np.float32)[:] = 1.0
    with pytest.raises(DatasetError, match=f"differs from its {MANIFEST}: data/extra: not in"):
        ReplayBuffer.open(buffer)
    code, out, _ = verify_cli(buffer, capsys)
    assert code == 2
    assert "damaged: data/extra: not in the manifest (added after it was written)" in out
    del root["data/extra"]
    root["data/action"][8:16] = 5.0
    file = chunk(buffer, "action", 1)
    code, out, _ = verify_cli(buffer, capsys)
    assert code == 2
    assert out.count("damaged: ") == 1
    assert f"damaged: data/action chunk (1, 0), file {file}: " in out
    assert "checksum mismatch (its SHA-256 differs from the manifest's)" in out
    assert "(CRC32C" not in out  # zarr wrote a valid one


def test_a_chunk_file_the_manifest_does_not_list_is_damage(tmp_path: Path, capsys):
    """zarr stores no file for a chunk of fill values: one that appears later, which zarr would
    read instead of zeros, is not the buffer that was finished."""
    path = tmp_path / "zeros.zarr"
    with ReplayBuffer.create(path) as written:
        written.add_episode({"action": np.zeros((16, 2), np.float32)})
    assert verify_cli(path, capsys)[0] == 0
    zarr.open_group(LocalStore(path), mode="r+")["data/action"][8:16] = 1.0
    file = chunk(path, "action", 1)
    code, out, _ = verify_cli(path, capsys)
    assert code == 2
    assert (
        f"damaged: data/action chunk (1, 0), file {file}: not in {MANIFEST} (written after it; "
        "zarr reads it instead of zeros)"
    ) in out


# --- interrupted writes --------------------------------------------------------------------------
@pytest.mark.parametrize("writer", ["lerobot", "robomimic", "pusht"])
def test_an_interrupted_write_leaves_no_out_and_no_temporary_folder(
    writer: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    if writer == "pusht":
        monkeypatch.setattr("cm_policy.data.pusht_demos.generate", fake_planner(fail_after=1))
        with pytest.raises(RuntimeError, match="the planner stopped"):
            generate_pusht_dataset(tmp_path / "out" / "demos.zarr", n_episodes=3, workers=1)
    else:
        added = []
        original = ReplayBuffer.add_episode

        def add_then_fail(self, data):
            if added:
                raise RuntimeError("interrupted")
            added.append(original(self, data))

        monkeypatch.setattr(ReplayBuffer, "add_episode", add_then_fail)
        with pytest.raises(RuntimeError, match="interrupted"):
            write_with(writer, tmp_path, monkeypatch, tmp_path / "out" / "demos.zarr")
        assert added  # it did write into its temporary folder before the stop
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []
