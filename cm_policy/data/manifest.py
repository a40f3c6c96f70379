"""The manifest of a replay buffer: what a finished buffer holds, so that a damaged one can be
told from a good one.

``manifest.json`` lies in the buffer's folder. The package writes it when a buffer is finished
(a writer's last step, before its temporary folder is renamed into place; ``ReplayBuffer.close``)
and removes it at the first change after that, so a manifest always describes its buffer::

    {"version": 1, "written_by": {"package": "cm-policy", "version": ...}, "written": "...Z",
     "zarr_format": 3, "episodes": E, "steps": N, "episode_ends": [...],
     "arrays": {"data/action": {"shape": [N, 2], "dtype": "float32", "chunks": [4096, 2],
                                "codecs": ["bytes", "blosc", "crc32c"]}, ...},
     "files": {"data/action/c/0/0": {"array": "data/action", "chunk": [0, 0], "bytes": 812,
                                     "sha256": HEX}, ...}}

``files`` names every stored chunk file (its path relative to the buffer's folder). zarr stores
no file for a chunk that holds only the fill value and reads a missing file as that value
(zeros): without the list, a lost file could not be told from an empty chunk.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from cm_policy.atomic import write_json_atomic
from cm_policy.data.outputs import marker

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
MISSING = "missing (zarr would read zeros)"


class ManifestError(ValueError):
    """A ``manifest.json`` that cannot be read as one."""


def stored_arrays(root: zarr.Group, groups: Iterable[str]) -> dict[str, zarr.Array]:
    """Every array of the subgroups ``groups`` of ``root``, by its path (``data/action``), in
    sorted order. Only the named groups are listed: zarr warns about every file beside them
    (the manifest, a task file) when it lists the root."""
    arrays = {}
    for name in groups:
        group = root.get(name)
        if isinstance(group, zarr.Group):
            arrays |= {f"{name}/{key}": arr for key, arr in group.arrays()}
    return dict(sorted(arrays.items()))


def chunk_grid(arr: zarr.Array) -> Iterator[tuple[int, ...]]:
    """The coordinates of every chunk of ``arr`` (one, ``()``, for a 0-d array)."""
    return itertools.product(*(range(n) for n in arr.cdata_shape))


def chunk_path(arr: zarr.Array, coords: tuple[int, ...]) -> str:
    """Where chunk ``coords`` of ``arr`` is stored, relative to the group's folder."""
    return f"{arr.path}/{arr.metadata.encode_chunk_key(coords)}"


def has_checksums(arr: zarr.Array) -> bool:
    """Whether every chunk of ``arr`` carries a CRC32C of its stored bytes (a zarr v3 codec)."""
    codecs = getattr(arr.metadata, "codecs", ())
    return any(isinstance(codec, Crc32cCodec) for codec in codecs)


def codec_names(arr: zarr.Array) -> list[str]:
    if arr.metadata.zarr_format == 3:
        return [codec.to_dict()["name"] for codec in arr.metadata.codecs]
    filters = [getattr(f, "codec_id", repr(f)) for f in arr.filters]
    return filters + [getattr(c, "codec_id", repr(c)) for c in arr.compressors]


def file_sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def build_manifest(
    folder: Path, root: zarr.Group, groups: Iterable[str], episode_ends: np.ndarray
) -> dict[str, Any]:
    """The manifest of the buffer in ``folder`` (its zarr group ``root``, whose arrays lie in
    the subgroups ``groups``), as it is on disk."""
    arrays, files = {}, {}
    for key, arr in stored_arrays(root, groups).items():
        arrays[key] = {
            "shape": list(arr.shape),
            "dtype": str(np.dtype(arr.dtype)),
            "chunks": list(arr.chunks),
            "codecs": codec_names(arr),
        }
        for coords in chunk_grid(arr):
            relative = chunk_path(arr, coords)
            path = folder / relative
            if path.is_file():
                files[relative] = {
                    "array": key,
                    "chunk": list(coords),
                    "bytes": path.stat().st_size,
                    "sha256": file_sha256(path),
                }
    ends = [int(e) for e in episode_ends]
    return {
        "version": MANIFEST_VERSION,
        "written_by": marker(),
        "written": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "zarr_format": root.metadata.zarr_format,
        "episodes": len(ends),
        "steps": ends[-1] if ends else 0,
        "episode_ends": ends,
        "arrays": arrays,
        "files": files,
    }


def write_manifest(folder: Path, manifest: Mapping[str, Any]) -> None:
    """Write ``folder/manifest.json`` through a temporary file and a rename: a stop mid-write
    leaves the old manifest or none, never half of one."""
    write_json_atomic(folder / MANIFEST, dict(manifest), sync=True)


def remove_manifest(folder: Path) -> None:
    """Remove ``folder/manifest.json``: the buffer is about to change."""
    (folder / MANIFEST).unlink(missing_ok=True)


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of the buffer in ``folder``, or None when it has none (a buffer the package
    did not write, or one changed since). Raises ManifestError when it cannot be read."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        for key, kind in (("arrays", dict), ("files", dict), ("episode_ends", list)):
            if not isinstance(manifest[key], kind):
                raise TypeError(f"{key} is a {type(manifest[key]).__name__}")
        for relative, record in manifest["files"].items():
            if not isinstance(record["sha256"], str) or not isinstance(record["array"], str):
                raise TypeError(f"the record of {relative!r} lacks its array or sha256")
            int(record["bytes"])
            record["chunk"] = tuple(int(c) for c in record["chunk"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:  # JSON errors too
        raise ManifestError(
            f"{path} cannot be read ({type(exc).__name__}: {exc}); expected the JSON the "
            "package writes, with 'arrays', 'files' and 'episode_ends'"
        ) from None
    return manifest


def file_problem(folder: Path, relative: str, record: Mapping[str, Any], hashed: bool) -> str:
    """What is wrong with the chunk file ``relative`` against its manifest ``record`` ("" when
    nothing): missing, another size or (``hashed``) another SHA-256."""
    path = folder / relative
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{MISSING}; the manifest records {record['bytes']} bytes"
    if size != int(record["bytes"]):
        return f"size {size}, the manifest records {record['bytes']}"
    if hashed and file_sha256(path) != record["sha256"]:
        return "checksum mismatch (its SHA-256 differs from the manifest's)"
    return ""


def array_problems(
    manifest: Mapping[str, Any], arrays: Mapping[str, zarr.Array], every: bool = True
) -> list[str]:
    """How the arrays ``arrays`` differ from what the manifest records of them: shape, dtype
    and chunks, and (``every``: ``arrays`` are all the buffer's) which recorded ones are gone."""
    recorded = manifest["arrays"]
    problems = [
        f"{key}: missing (the manifest records it)"
        for key in recorded
        if every and key not in arrays
    ]
    for key, arr in arrays.items():
        want = recorded.get(key)
        if want is None:
            problems.append(f"{key}: not in the manifest (added after it was written)")
            continue
        found = {
            "shape": list(arr.shape),
            "dtype": str(np.dtype(arr.dtype)),
            "chunks": list(arr.chunks),
        }
        for field, value in found.items():
            if value != want.get(field):
                problems.append(f"{key}: {field} {value}, the manifest records {want.get(field)}")
    return problems
