"""Episode storage on zarr: time-major arrays under ``data/`` and cumulative ends in ``meta/``.

The layout is that of Diffusion Policy's replay buffers, so its zarr v2 datasets open unchanged;
new datasets are written as zarr v3 with Blosc/zstd compression and a CRC32C checksum in every
chunk (zarr's ``crc32c`` codec, after the compressor: a chunk whose stored bytes changed fails to
decode). A finished buffer also carries ``manifest.json`` (:mod:`cm_policy.data.manifest`): every
chunk file with its size and SHA-256, which catches what no codec can (a lost chunk file, which
zarr reads as zeros) and covers zarr v2 arrays, whose format Diffusion Policy's readers must keep
reading and so gets no checksum codec. Opening a buffer checks its chunk files' presence and
sizes against the manifest; ``cm-policy data verify`` (:mod:`cm_policy.data.verify`) decodes and
hashes everything.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
import traceback
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numcodecs
import numpy as np
import zarr
import zarr.errors
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.storage import LocalStore, MemoryStore

from cm_policy.data.manifest import (
    MANIFEST,
    ManifestError,
    array_problems,
    build_manifest,
    file_problem,
    has_checksums,
    read_manifest,
    remove_manifest,
    stored_arrays,
    write_manifest,
)
from cm_policy.data.outputs import MARKER_KEY, marker, prepare_output

DATA_GROUP = "data"
META_GROUP = "meta"
EPISODE_ENDS = "episode_ends"
BUFFER_GROUPS = (DATA_GROUP, META_GROUP)

# Chunks of a few MiB keep zstd efficient and random access cheap; the step bounds give roughly
# 64-150 frames for 96x96 images and a few thousand steps for low-dimensional arrays.
_CHUNK_TARGET_BYTES = 4 << 20
_CHUNK_MIN_STEPS = 64
_CHUNK_MAX_STEPS = 4096
_BLOSC_CNAME = "zstd"
_BLOSC_CLEVEL = 5

# Numeric kinds only: booleans, signed/unsigned integers and floats.
_NUMERIC_KINDS = "biuf"

# Above this many elements `describe` estimates min/max from a few chunks instead of reading all.
_DESCRIBE_FULL_SCAN_LIMIT = 50_000_000
_DESCRIBE_SAMPLE_CHUNKS = 8

ArrayLike = zarr.Array | np.ndarray


class DatasetError(ValueError):
    """A dataset on disk or in memory does not have the expected layout or contents."""


# What a user can do about a chunk that cannot be decoded: the file itself is damaged.
DAMAGED_HINT = (
    "the dataset is damaged (a corrupted, truncated or missing chunk file): download it again, "
    "or convert / generate it again from its source (cm-policy data convert / data generate)"
)


def _verify_hint(where: str) -> str:
    return f"cm-policy data verify {where} lists every damaged chunk"


def _damaged(where: str, key: str, coords: tuple[int, ...], file: str, what: str) -> DatasetError:
    """The one-line error of a damaged chunk: the array, the chunk, its file, what is wrong."""
    return DatasetError(
        f"{where}: {key} chunk {coords}, file {file}: {what}: {DAMAGED_HINT}; {_verify_hint(where)}"
    )


def decode_failure(exc: BaseException) -> str:
    """What a failed chunk decode means, in one line: a CRC32C that does not match the stored
    bytes (zarr raises a bare ValueError for it) or the codec's own complaint."""
    message = " ".join(str(exc).split())
    if "checksum" in message.lower():
        return "checksum mismatch (CRC32C: the stored bytes changed)"
    return f"cannot be decoded ({type(exc).__name__}: {message})"


def _raised_by_zarr(exc: BaseException) -> bool:
    """Whether ``exc`` was raised inside zarr or its codecs (numcodecs): only then can it come
    from an undecodable chunk, and is it worth scanning the chunks to find one."""
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        module = frame.f_globals.get("__name__", "")
        if module.split(".")[0] in ("zarr", "numcodecs"):
            return True
    return False


def _undecodable_chunk(
    arr: zarr.Array, rows: slice = slice(None)
) -> tuple[tuple[int, ...], Exception] | None:
    """The first chunk of ``arr`` holding any of the time steps ``rows`` that fails to decode,
    with its error; None when each of them decodes on its own. Reads the chunks one at a time:
    only for a read that already failed, never on the normal path."""
    grid = arr.cdata_shape
    if not grid:  # a 0-d array: one chunk
        blocks: Iterable[tuple[int, ...]] = [()]
    else:
        start, stop, _ = rows.indices(arr.shape[0])
        block = arr.chunks[0]
        first, last = start // block, min(grid[0], -(-stop // block))
        blocks = itertools.product(range(first, last), *(range(n) for n in grid[1:]))
    for coords in blocks:
        try:
            arr.get_block_selection(coords)
        except MemoryError:
            raise
        except Exception as exc:
            return tuple(coords), exc
    return None


def _chunk_file(arr: zarr.Array, coords: tuple[int, ...]) -> str:
    """Where chunk ``coords`` of ``arr`` is stored: a file path for a dataset on disk."""
    key = arr.metadata.encode_chunk_key(coords)
    root = getattr(arr.store_path.store, "root", None)
    return str(Path(root) / arr.path / key) if root is not None else f"{arr.path}/{key} (in memory)"


def _damaged_chunk_error(
    arr: zarr.Array, where: str, rows: slice = slice(None)
) -> DatasetError | None:
    """A DatasetError naming the array, the chunk and its file when one of ``arr``'s chunks (in
    ``rows``) cannot be decoded, else None (the failed read had another cause)."""
    found = _undecodable_chunk(arr, rows)
    if found is None:
        return None
    coords, exc = found
    return _damaged(where, arr.path, coords, _chunk_file(arr, coords), decode_failure(exc))


def read_array(arr: ArrayLike, where: str, rows: slice = slice(None)) -> np.ndarray:
    """``arr[rows]`` as a numpy array. A zarr chunk that cannot be decoded (a damaged file,
    which zarr reports as a bare codec error such as "error during blosc decompression: -1" or
    a CRC32C's "Stored and computed checksum do not match") becomes a DatasetError naming the
    array, the chunk and its file; ``where`` (the dataset's path) starts the message."""
    try:
        return np.asarray(arr[rows])
    except MemoryError:
        raise
    except Exception as exc:
        if isinstance(arr, zarr.Array) and _raised_by_zarr(exc):
            damaged = _damaged_chunk_error(arr, where, rows)
            if damaged is not None:
                raise damaged from exc
        raise


def _time_chunk(step_shape: tuple[int, ...], dtype: np.dtype) -> int:
    step_bytes = max(1, int(np.prod(step_shape, dtype=np.int64)) * dtype.itemsize)
    return int(np.clip(_CHUNK_TARGET_BYTES // step_bytes, _CHUNK_MIN_STEPS, _CHUNK_MAX_STEPS))


def _compressor(dtype: np.dtype, zarr_format: int) -> Any:
    # Byte-shuffle groups the bytes of multi-byte numbers; for 1-byte types it is a no-op, so
    # bit-shuffle is used there instead.
    bitshuffle = dtype.itemsize == 1
    if zarr_format == 2:
        shuffle = numcodecs.Blosc.BITSHUFFLE if bitshuffle else numcodecs.Blosc.SHUFFLE
        return numcodecs.Blosc(cname=_BLOSC_CNAME, clevel=_BLOSC_CLEVEL, shuffle=shuffle)
    shuffle = "bitshuffle" if bitshuffle else "shuffle"
    return BloscCodec(cname=_BLOSC_CNAME, clevel=_BLOSC_CLEVEL, shuffle=shuffle)


def _codecs(dtype: np.dtype, zarr_format: int) -> Any:
    """The compressor, then (zarr v3) the CRC32C of the compressed bytes. A zarr v2 array (one
    appended to a Diffusion Policy buffer) keeps that format's readers: no checksum codec, the
    manifest covers it."""
    if zarr_format == 2:
        return _compressor(dtype, zarr_format)
    return (_compressor(dtype, zarr_format), Crc32cCodec())


def _create_data_array(
    group: zarr.Group, key: str, step_shape: tuple[int, ...], dtype: np.dtype, length: int
) -> zarr.Array:
    zarr_format = group.metadata.zarr_format
    return group.create_array(
        key,
        shape=(length, *step_shape),
        dtype=dtype,
        chunks=(_time_chunk(step_shape, dtype), *step_shape),
        compressors=_codecs(dtype, zarr_format),
    )


def _new_root(store: LocalStore | MemoryStore) -> zarr.Group:
    # The marker is in the group's first metadata write: a half-written buffer is ours too.
    root = zarr.open_group(store, mode="w", zarr_format=3, attributes={MARKER_KEY: marker()})
    root.create_group(DATA_GROUP)
    root.create_group(META_GROUP).create_array(
        EPISODE_ENDS,
        shape=(0,),
        dtype=np.int64,
        chunks=(_CHUNK_MAX_STEPS,),
        compressors=_codecs(np.dtype(np.int64), 3),
    )
    return root


def _check_episode_ends(ends: np.ndarray, where: str) -> None:
    if ends.ndim != 1 or ends.dtype.kind not in "iu":
        raise DatasetError(
            f"{where}: meta/{EPISODE_ENDS} must be a 1-D integer array, "
            f"found shape {ends.shape} dtype {ends.dtype}"
        )
    if ends.size and ends[0] <= 0:
        raise DatasetError(
            f"{where}: meta/{EPISODE_ENDS}[0] is {ends[0]} (expected > 0): every episode needs "
            "at least one step"
        )
    steps = np.diff(ends)
    if steps.size and (steps <= 0).any():
        bad = int(np.flatnonzero(steps <= 0)[0]) + 1
        raise DatasetError(
            f"{where}: meta/{EPISODE_ENDS} must be strictly increasing, found "
            f"[{bad - 1}]={ends[bad - 1]} followed by [{bad}]={ends[bad]}"
        )


def _check_data_arrays(data: Mapping[str, Any], ends: np.ndarray, where: str) -> None:
    n_steps = int(ends[-1]) if ends.size else 0
    if ends.size and not data:
        raise DatasetError(
            f"{where}: meta/{EPISODE_ENDS}[-1] is {n_steps} but {DATA_GROUP}/ holds no arrays"
        )
    for key, arr in data.items():
        dtype = np.dtype(arr.dtype)
        if dtype.kind not in _NUMERIC_KINDS:
            raise DatasetError(
                f"{where}: {DATA_GROUP}/{key} has dtype {dtype} (expected a numeric dtype: "
                "bool, integer or float)"
            )
        if len(arr.shape) == 0:
            raise DatasetError(
                f"{where}: {DATA_GROUP}/{key} is a scalar (expected a time-major array)"
            )
        if arr.shape[0] != n_steps:
            raise DatasetError(
                f"{where}: {DATA_GROUP}/{key} has {arr.shape[0]} steps but "
                f"meta/{EPISODE_ENDS}[-1] is {n_steps} (expected equal): the dataset is "
                "truncated or corrupt"
            )


def _check_finite(key: str, arr: np.ndarray, ends: np.ndarray, where: str) -> None:
    # min/max propagate NaN and surface inf without allocating a mask as large as the array;
    # the exact per-step scan only runs to report a failure.
    if arr.dtype.kind != "f" or arr.size == 0 or np.isfinite([arr.min(), arr.max()]).all():
        return
    finite = np.isfinite(arr.reshape(len(arr), -1)).all(axis=1)
    bad_steps = np.flatnonzero(~finite)
    step = int(bad_steps[0])
    episode = int(np.searchsorted(ends, step, side="right"))
    raise DatasetError(
        f"{where}: {DATA_GROUP}/{key} has non-finite values (NaN or inf) at {bad_steps.size} "
        f"step(s), first at step {step} (episode {episode}); expected finite floats"
    )


def _select_keys(available: Iterable[str], keys: Iterable[str] | None, where: str) -> list[str]:
    available = list(available)
    if keys is None:
        return available
    keys = list(keys)
    missing = [k for k in keys if k not in available]
    if missing:
        raise DatasetError(
            f"{where}: requested key(s) {missing} not found in {DATA_GROUP}/ "
            f"(available: {sorted(available)})"
        )
    return keys


def _open_root(path: str | Path, mode: Literal["r", "a"]) -> zarr.Group:
    path = Path(path)
    if not path.exists():
        hint = "" if mode == "r" else "; use ReplayBuffer.create to make a new one"
        raise DatasetError(f"no dataset at {path}: the path does not exist{hint}")
    try:
        # "r+" rather than "a": opening must never create a group inside an unrelated directory.
        zarr_mode = "r" if mode == "r" else "r+"
        return zarr.open_group(LocalStore(path, read_only=mode == "r"), mode=zarr_mode)
    except zarr.errors.BaseZarrError as exc:
        raise DatasetError(f"{path}: expected a zarr group (dataset root), found: {exc}") from exc


def _read_layout(root: zarr.Group, where: str) -> tuple[dict[str, zarr.Array], np.ndarray]:
    data_group = root.get(DATA_GROUP)
    if not isinstance(data_group, zarr.Group):
        raise DatasetError(
            f"{where}: expected a group '{DATA_GROUP}/' holding the time-major arrays, "
            f"found {'nothing' if data_group is None else type(data_group).__name__}"
        )
    meta_group = root.get(META_GROUP)
    ends_array = meta_group.get(EPISODE_ENDS) if isinstance(meta_group, zarr.Group) else None
    if not isinstance(ends_array, zarr.Array):
        raise DatasetError(
            f"{where}: expected an array 'meta/{EPISODE_ENDS}' of cumulative episode ends, "
            "found none"
        )
    ends = read_array(ends_array, where)
    _check_episode_ends(ends, where)
    data = dict(sorted(data_group.arrays()))
    _check_data_arrays(data, ends, where)
    return data, ends.astype(np.int64)


def _buffer_manifest(path: Path) -> dict[str, Any] | None:
    try:
        return read_manifest(path)
    except ManifestError as exc:
        raise DatasetError(
            f"{exc}: the buffer's record of its chunk files is damaged; cm-policy data verify "
            f"{path} checks the chunks themselves (removing {MANIFEST} lets the buffer be read "
            "without the record)"
        ) from None


def _check_chunk_files(path: Path, manifest: Mapping[str, Any], arrays: set[str] | None) -> None:
    """Every chunk file the manifest records (of ``arrays``, default all) is there at its
    recorded size: one stat per file, cheap enough for every open (data verify hashes them)."""
    problems = [
        (relative, record, what)
        for relative, record in manifest["files"].items()
        if arrays is None or record["array"] in arrays
        if (what := file_problem(path, relative, record, hashed=False))
    ]
    if problems:
        relative, record, what = problems[0]
        if len(problems) > 1:
            what += f" (and {len(problems) - 1} more damaged chunk file(s))"
        raise _damaged(str(path), record["array"], record["chunk"], str(path / relative), what)


def _check_layout(
    path: Path, manifest: Mapping[str, Any], arrays: Mapping[str, zarr.Array], ends: np.ndarray
) -> None:
    """The arrays (shape, dtype, chunks) and episode ends are those the manifest records."""
    problems = array_problems(manifest, arrays, every=False)
    if [int(e) for e in manifest["episode_ends"]] != ends.tolist():
        problems.append(
            f"meta/{EPISODE_ENDS}: {len(ends)} episodes, {int(ends[-1]) if ends.size else 0} "
            f"steps, the manifest records {manifest.get('episodes')} episodes, "
            f"{manifest.get('steps')} steps"
        )
    if problems:
        raise DatasetError(
            f"{path} differs from its {MANIFEST}: {'; '.join(problems)}: it changed after the "
            f"manifest was written (remove {MANIFEST} if that change was meant), or is damaged; "
            f"{_verify_hint(str(path))}"
        )


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """A path to write a directory at, moved into place as ``path`` when the block ends without
    an exception (replacing what was there) and removed otherwise.

    The work happens in a hidden temporary directory beside ``path``, so the final rename stays
    on one filesystem and is atomic: a crash or an error leaves a hidden directory, never a
    half-written one at ``path``.
    """
    path = Path(path).resolve()
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent))
    try:
        work = tmp / path.name
        yield work
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=parent))
            os.replace(path, old / path.name)
            os.replace(work, path)
            shutil.rmtree(old)
        else:
            os.replace(work, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class ReplayBuffer:
    """Episodes of equal-length time-major arrays, on zarr (disk or memory) or numpy in RAM.

    Build one with `create`, `open` or `load` rather than the constructor.
    """

    def __init__(
        self,
        data: Mapping[str, ArrayLike],
        episode_ends: np.ndarray,
        root: zarr.Group | None = None,
        path: Path | None = None,
        writable: bool = True,
    ) -> None:
        self._data: dict[str, ArrayLike] = dict(data)
        self._ends = np.asarray(episode_ends, dtype=np.int64)
        self._root = root
        self._path = path
        self._writable = writable
        # Changed on disk since the manifest was written (or removed): close() writes it anew.
        self._unfinished = False
        self.validate()

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | Path | None = None, overwrite: bool = False) -> ReplayBuffer:
        """An empty zarr v3 buffer at `path`, or in memory when `path` is None. `overwrite`
        replaces only a buffer this package wrote
        (:func:`~cm_policy.data.outputs.prepare_output`)."""
        if path is None:
            return cls({}, np.zeros(0, np.int64), root=_new_root(MemoryStore()))
        path = Path(path)
        target = prepare_output(path, overwrite)
        if target.exists():
            shutil.rmtree(target)  # a buffer of ours, which overwrite replaces
        buffer = cls({}, np.zeros(0, np.int64), root=_new_root(LocalStore(target)), path=path)
        buffer._unfinished = True
        return buffer

    @classmethod
    def open(
        cls,
        path: str | Path,
        mode: Literal["r", "a"] = "r",
        keys: Iterable[str] | None = None,
    ) -> ReplayBuffer:
        """Open a dataset on disk lazily (zarr v2 or v3); `keys` restricts a read-only view.

        A buffer with a manifest (one the package wrote) must hold every chunk file of the
        opened arrays at its recorded size, and the arrays and episode ends it records: else a
        DatasetError names the first damaged chunk and its file."""
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
        if keys is not None and mode != "r":
            raise ValueError("a key subset is a read-only view: open with mode='r' to use keys")
        path = Path(path)
        root = _open_root(path, mode)
        manifest = _buffer_manifest(path)
        ends_key = f"{META_GROUP}/{EPISODE_ENDS}"
        if manifest is not None:
            # episode_ends first: a lost chunk of it would read as zeros.
            wanted = None if keys is None else {ends_key, *(f"{DATA_GROUP}/{k}" for k in keys)}
            _check_chunk_files(path, manifest, wanted)
        data, ends = _read_layout(root, str(path))
        selected = _select_keys(data, keys, str(path))
        if manifest is not None:
            arrays = {f"{DATA_GROUP}/{k}": data[k] for k in selected}
            _check_layout(path, manifest, arrays | {ends_key: root[ends_key]}, ends)
        return cls({k: data[k] for k in selected}, ends, root=root, path=path, writable=mode == "a")

    @classmethod
    def load(cls, path: str | Path, keys: Iterable[str] | None = None) -> ReplayBuffer:
        """Read a dataset fully into RAM as numpy arrays, rejecting NaN/inf in float arrays."""
        source = cls.open(path, mode="r", keys=keys)
        data = {}
        for key in source.keys:
            data[key] = read_array(source[key], str(path))
            _check_finite(key, data[key], source.episode_ends, str(path))
        return cls(data, source.episode_ends, path=Path(path))

    def save(self, path: str | Path, overwrite: bool = False) -> None:
        """Write a zarr v3 copy to `path`, via a temporary directory renamed into place.
        `overwrite` replaces only a buffer this package wrote, never the one this buffer reads
        from (:func:`~cm_policy.data.outputs.prepare_output`)."""
        # A buffer on zarr reads its arrays from its path while it is copied: its source.
        sources = [self._path] if self._path is not None and self._root is not None else []
        path = prepare_output(path, overwrite, sources=sources)
        with atomic_directory(path) as tmp:
            root = _new_root(LocalStore(tmp))
            for key, src in self._data.items():
                dst = _create_data_array(
                    root[DATA_GROUP], key, tuple(src.shape[1:]), np.dtype(src.dtype), self.n_steps
                )
                block = dst.chunks[0]
                for start in range(0, self.n_steps, block):
                    dst[start : start + block] = src[start : start + block]
            _write_ends(root, self._ends)
            write_manifest(tmp, build_manifest(tmp, root, BUFFER_GROUPS, self._ends))

    def close(self) -> None:
        """Finish a buffer written on disk: record its arrays and chunk files (size, SHA-256) in
        ``manifest.json`` (:mod:`cm_policy.data.manifest`), which every later open and
        ``cm-policy data verify`` check it against. Writers call it last, before their folder
        is renamed into place. Nothing to do for a buffer unchanged since it was opened or
        closed, or one in memory; a later change removes the manifest until the next close."""
        if self._unfinished and self._path is not None and self._root is not None:
            manifest = build_manifest(self._path, self._root, BUFFER_GROUPS, self._ends)
            write_manifest(self._path, manifest)
        self._unfinished = False

    def __enter__(self) -> ReplayBuffer:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        """Close (write the manifest) unless the block raised: a buffer left half-written
        carries no manifest that would vouch for it."""
        if exc_type is None:
            self.close()

    # -- properties ---------------------------------------------------------------------------

    @property
    def path(self) -> Path | None:
        """Where the buffer lives or was loaded from; None for an in-memory buffer."""
        return self._path

    @property
    def keys(self) -> list[str]:
        return list(self._data)

    @property
    def episode_ends(self) -> np.ndarray:
        """Cumulative episode ends (read-only view)."""
        view = self._ends.view()
        view.flags.writeable = False
        return view

    @property
    def episode_lengths(self) -> np.ndarray:
        return np.diff(self._ends, prepend=0)

    @property
    def n_episodes(self) -> int:
        return len(self._ends)

    @property
    def n_steps(self) -> int:
        return int(self._ends[-1]) if self._ends.size else 0

    @property
    def zarr_format(self) -> int | None:
        """2 or 3 for a zarr-backed buffer, None for numpy arrays in RAM."""
        return None if self._root is None else self._root.metadata.zarr_format

    def __getitem__(self, key: str) -> ArrayLike:
        if key not in self._data:
            raise KeyError(f"no key {key!r} in buffer (available: {self.keys})")
        return self._data[key]

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __repr__(self) -> str:
        where = self._path if self._path is not None else "memory"
        return (
            f"ReplayBuffer({where}, episodes={self.n_episodes}, steps={self.n_steps}, "
            f"keys={self.keys})"
        )

    # -- episodes -----------------------------------------------------------------------------

    def _episode_index(self, i: int) -> int:
        if not -self.n_episodes <= i < self.n_episodes:
            raise IndexError(f"episode {i} out of range for a buffer of {self.n_episodes} episodes")
        return i % self.n_episodes

    def episode_slice(self, i: int) -> slice:
        """Time steps of episode `i` (negative indices count from the end)."""
        i = self._episode_index(i)
        start = int(self._ends[i - 1]) if i > 0 else 0
        return slice(start, int(self._ends[i]))

    def get_episode(self, i: int, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Episode `i` as numpy arrays."""
        span = self.episode_slice(i)
        where = str(self._path) if self._path is not None else "<memory>"
        return {k: read_array(self[k], where, span) for k in (self.keys if keys is None else keys)}

    @contextmanager
    def naming_damaged_chunks(self) -> Iterator[None]:
        """A block in which other code reads this buffer's zarr arrays itself (a task converting
        images a chunk at a time): a read that fails on a chunk that cannot be decoded becomes
        the DatasetError of :func:`read_array`, naming the array, the chunk and its file.

        Only errors raised inside zarr are checked, by decoding the chunks one at a time, so
        the normal path costs nothing and other errors pass through unchanged."""
        try:
            yield
        except (DatasetError, MemoryError):
            raise
        except Exception as exc:
            if _raised_by_zarr(exc):
                where = str(self._path) if self._path is not None else "<memory>"
                for arr in self._data.values():
                    damaged = (
                        _damaged_chunk_error(arr, where) if isinstance(arr, zarr.Array) else None
                    )
                    if damaged is not None:
                        raise damaged from exc
            raise

    def _require_writable(self) -> None:
        if not self._writable:
            raise ValueError(
                f"buffer at {self._path} is read-only (opened with mode='r'); "
                "open it with mode='a' to modify it"
            )

    def _begin_change(self) -> None:
        """Remove the manifest before the first change to a finished buffer on disk: it would
        describe the buffer as it was (close() writes the new one)."""
        if not self._unfinished and self._path is not None and self._root is not None:
            remove_manifest(self._path)
            self._unfinished = True

    def _check_new_episode(self, data: Mapping[str, np.ndarray]) -> int:
        if not data:
            raise ValueError("an episode needs at least one array, got an empty dict")
        if self._data and set(data) != set(self._data):
            raise ValueError(
                f"episode keys {sorted(data)} differ from the buffer's keys {sorted(self._data)}"
            )
        lengths = {k: np.shape(v)[0] if np.ndim(v) else None for k, v in data.items()}
        length = next(iter(lengths.values()))
        if any(n is None for n in lengths.values()) or length == 0:
            raise ValueError(f"every array needs a time axis with >= 1 steps, got {lengths}")
        if len(set(lengths.values())) != 1:
            raise ValueError(f"all arrays of an episode need the same length, got {lengths}")
        for key, value in data.items():
            if not key or "/" in key:
                raise ValueError(f"key {key!r} is not a valid array name (non-empty, no '/')")
            value = np.asarray(value)
            if value.dtype.kind not in _NUMERIC_KINDS:
                raise ValueError(f"{key}: expected a numeric dtype, got {value.dtype}")
            if key in self._data:
                existing = self._data[key]
                if tuple(existing.shape[1:]) != value.shape[1:] or existing.dtype != value.dtype:
                    raise ValueError(
                        f"{key}: expected per-step shape {tuple(existing.shape[1:])} and dtype "
                        f"{existing.dtype} like the stored episodes, got {value.shape[1:]} "
                        f"and {value.dtype}"
                    )
        return length

    def add_episode(self, data: Mapping[str, np.ndarray]) -> None:
        """Append one episode; all arrays share the length T >= 1 and match the stored keys."""
        self._require_writable()
        length = self._check_new_episode(data)
        self._begin_change()
        old_steps = self.n_steps
        if self._root is None:
            for key, value in data.items():
                value = np.asarray(value)
                self._data[key] = (
                    np.concatenate([self._data[key], value]) if key in self._data else value.copy()
                )
        else:
            group = self._root[DATA_GROUP]
            try:
                for key, value in data.items():
                    value = np.asarray(value)
                    if key not in self._data:
                        self._data[key] = _create_data_array(
                            group, key, value.shape[1:], value.dtype, 0
                        )
                    self._data[key].append(value, axis=0)
            except Exception:
                # Undo partial appends so the stored arrays still agree with episode_ends.
                for arr in self._data.values():
                    if arr.shape[0] != old_steps:
                        arr.resize((old_steps, *arr.shape[1:]))
                raise
        # episode_ends is written last: an interrupted write leaves arrays longer than the last
        # end, which validation reports, instead of an end that points past the data.
        self._set_ends(np.append(self._ends, old_steps + length))

    def drop_episode(self, i: int = -1) -> None:
        """Remove episode `i` (default: the last one), shifting later episodes down."""
        self._require_writable()
        span = self.episode_slice(i)
        i = self._episode_index(i)
        self._begin_change()
        length = span.stop - span.start
        new_steps = self.n_steps - length
        for key, arr in self._data.items():
            if self._root is None:
                self._data[key] = np.concatenate([arr[: span.start], arr[span.stop :]])
                continue
            # Copy the tail down chunk by chunk so that image arrays never need to fit in RAM.
            block = arr.chunks[0]
            for src in range(span.stop, self.n_steps, block):
                stop = min(src + block, self.n_steps)
                arr[src - length : stop - length] = arr[src:stop]
            arr.resize((new_steps, *arr.shape[1:]))
        self._set_ends(np.concatenate([self._ends[:i], self._ends[i + 1 :] - length]))

    def _set_ends(self, ends: np.ndarray) -> None:
        self._ends = ends.astype(np.int64)
        if self._root is not None:
            _write_ends(self._root, self._ends)

    def validate(self) -> None:
        """Raise DatasetError unless episode ends and array lengths are consistent."""
        where = str(self._path) if self._path is not None else "<memory>"
        _check_episode_ends(self._ends, where)
        _check_data_arrays(self._data, self._ends, where)


def _write_ends(root: zarr.Group, ends: np.ndarray) -> None:
    array = root[META_GROUP][EPISODE_ENDS]
    array.resize(ends.shape)
    if ends.size:
        array[:] = ends


def _format_compressor(arr: zarr.Array) -> str:
    names = []
    for codec in arr.compressors:
        cname = getattr(codec, "cname", None)
        if isinstance(codec, Crc32cCodec):
            names.append("crc32c")
            continue
        if cname is None:
            names.append(repr(codec))
            continue
        shuffle = codec.shuffle
        if isinstance(shuffle, int):
            shuffle = {0: "noshuffle", 1: "shuffle", 2: "bitshuffle"}.get(shuffle, str(shuffle))
        names.append(
            f"blosc({getattr(cname, 'value', cname)}, clevel={codec.clevel}, "
            f"{getattr(shuffle, 'value', shuffle)})"
        )
    return ", ".join(names) or "none"


def _format_range(arr: zarr.Array, where: str) -> str:
    n_steps = arr.shape[0]
    if n_steps == 0:
        return "empty"
    if arr.size <= _DESCRIBE_FULL_SCAN_LIMIT:
        values = read_array(arr, where)
        return f"min {float(values.min()):.6g}, max {float(values.max()):.6g}"
    # Whole chunks spread over the array: one decompression per sampled chunk.
    block = arr.chunks[0]
    starts = np.linspace(0, n_steps - 1, _DESCRIBE_SAMPLE_CHUNKS).astype(int) // block * block
    samples = [read_array(arr, where, slice(s, s + block)) for s in np.unique(starts)]
    sampled = sum(len(s) for s in samples)
    lo = min(float(s.min()) for s in samples)
    hi = max(float(s.max()) for s in samples)
    return f"min {lo:.6g}, max {hi:.6g} (sampled {sampled} of {n_steps} steps)"


def describe(path: str | Path) -> str:
    """A human-readable summary of the dataset at `path` (for ``cm-policy data info``)."""
    buffer = ReplayBuffer.open(path, mode="r")
    lengths = buffer.episode_lengths
    lines = [
        f"path:      {Path(path).resolve()}",
        f"format:    zarr v{buffer.zarr_format}",
        f"episodes:  {buffer.n_episodes}",
        f"steps:     {buffer.n_steps}",
    ]
    if lengths.size:
        lines.append(
            f"episode length: min {lengths.min()}, mean {lengths.mean():.1f}, "
            f"median {np.median(lengths):.1f}, max {lengths.max()}"
        )
    lines.append(f"integrity: {integrity(path)}")
    lines.append("arrays:")
    for key in buffer.keys:
        arr = buffer[key]
        lines.append(
            f"  {DATA_GROUP}/{key}: shape {tuple(arr.shape)}, dtype {arr.dtype}, "
            f"chunks {tuple(arr.chunks)}, compressor {_format_compressor(arr)}, "
            f"{_format_range(arr, str(path))}"
        )
    attrs = _root_attrs(path)
    if attrs:
        # Where the data came from, as a converter recorded it (e.g. a LeRobot dataset's path,
        # version, fps and original feature names).
        lines.append("attributes:")
        for key, value in attrs.items():
            text = json.dumps(value, default=str)
            lines.append(f"  {key}: {text if len(text) <= 300 else text[:297] + '...'}")
    return "\n".join(lines)


def integrity(path: str | Path) -> str:
    """How damage to the buffer at ``path`` can be detected: its checksums and its manifest."""
    root = zarr.open_group(LocalStore(Path(path), read_only=True), mode="r")
    arrays = stored_arrays(root, BUFFER_GROUPS)
    summed = sum(has_checksums(arr) for arr in arrays.values())
    if summed == len(arrays):
        codec = "CRC32C in every chunk"
    else:
        codec = f"CRC32C in {summed} of {len(arrays)} arrays" if summed else "no chunk checksums"
    manifest = _buffer_manifest(Path(path))
    if manifest is None:
        record = f"no {MANIFEST} (a lost chunk file, which zarr reads as zeros, goes unnoticed)"
    else:
        record = f"{MANIFEST} of {len(manifest['files'])} chunk files (size, SHA-256)"
    return f"{codec}; {record}; cm-policy data verify {path} checks every chunk"


def _root_attrs(path: str | Path) -> dict:
    from zarr.storage import LocalStore

    return dict(zarr.open_group(LocalStore(Path(path), read_only=True), mode="r").attrs)
