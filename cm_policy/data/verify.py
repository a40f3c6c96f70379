"""``cm-policy data verify PATH``: decode every chunk of a replay buffer and check every chunk
file against its manifest, naming each damaged one.

A buffer the package wrote carries a CRC32C in every chunk (zarr v3) and ``manifest.json``
(:mod:`cm_policy.data.manifest`): a chunk whose bytes changed, a truncated file and a lost one
(which zarr silently reads as zeros) are all found. A buffer without them (Diffusion Policy's
zarr v2 files) can only be decoded: a damaged chunk that still decodes goes unnoticed, and the
report says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zarr
import zarr.errors
from zarr.storage import LocalStore

from cm_policy.data.manifest import (
    MANIFEST,
    ManifestError,
    array_problems,
    chunk_grid,
    chunk_path,
    file_problem,
    has_checksums,
    read_manifest,
    stored_arrays,
)
from cm_policy.data.replay_buffer import (
    BUFFER_GROUPS,
    DAMAGED_HINT,
    DatasetError,
    ReplayBuffer,
    decode_failure,
)

# How to get a buffer that can be checked fully, for one that cannot.
_GET_CHECKSUMS = (
    "a copy written by cm-policy has both (ReplayBuffer.open(PATH).save(OUT) in Python, or "
    "cm-policy data convert / data generate from the source)"
)


@dataclass
class Verification:
    """What :func:`verify_buffer` found: ``damaged`` holds one line per damaged array, chunk or
    file (empty when the buffer is sound)."""

    path: Path
    header: list[str]
    damaged: list[str] = field(default_factory=list)
    summary: str = ""

    @property
    def ok(self) -> bool:
        return not self.damaged

    def lines(self) -> list[str]:
        return [*self.header, *(f"damaged: {line}" for line in self.damaged), self.summary]

    def raise_if_damaged(self) -> None:
        """A DatasetError (the command line's one-line error, exit status 2) when damaged."""
        if self.damaged:
            raise DatasetError(
                f"{self.path}: {len(self.damaged)} damaged (listed above): {DAMAGED_HINT}"
            )


def _chunk_findings(
    folder: Path,
    arr: zarr.Array,
    coords: tuple[int, ...],
    record: dict[str, Any] | None,
    recorded: bool,
) -> tuple[list[str], bool]:
    """What is wrong with one chunk (its file against its manifest ``record``, its decoding),
    and whether its file exists. ``recorded``: the manifest records the array, so a file it does
    not list is one written after it."""
    relative = chunk_path(arr, coords)
    exists = (folder / relative).is_file()
    found = []
    if record is not None:
        problem = file_problem(folder, relative, record, hashed=True)
        if problem:
            found.append(problem)
    elif recorded and exists:
        found.append(f"not in {MANIFEST} (written after it; zarr reads it instead of zeros)")
    if exists:
        try:
            arr.get_block_selection(coords)
        except MemoryError:
            raise
        except Exception as exc:
            failure = decode_failure(exc)
            if failure.startswith("checksum") and found and found[0].startswith("checksum"):
                found = ["checksum mismatch (CRC32C and SHA-256: the stored bytes changed)"]
            else:
                found.append(failure)
    return found, exists


def verify_buffer(path: str | Path, progress: bool = True) -> Verification:
    """Decode every chunk of every array of the buffer at ``path`` and, where it has a
    manifest, check every chunk file's presence, size and SHA-256 against it, then the layout
    (episode ends against the arrays). Reads only: nothing is written. ``progress``: a bar (on
    a terminal) over the chunks."""
    from tqdm import tqdm

    path = Path(path)
    if not path.exists():
        raise DatasetError(f"no dataset at {path}: the path does not exist")
    try:
        root = zarr.open_group(LocalStore(path, read_only=True), mode="r")
    except zarr.errors.BaseZarrError as exc:
        raise DatasetError(f"{path}: expected a zarr group (dataset root), found: {exc}") from exc
    arrays = stored_arrays(root, BUFFER_GROUPS)
    report = Verification(path, [])
    try:
        manifest = read_manifest(path)
    except ManifestError as exc:
        report.damaged.append(str(exc))
        manifest = None
    files = manifest["files"] if manifest is not None else {}
    if manifest is not None:
        report.damaged += array_problems(manifest, arrays)
    summed = [key for key, arr in arrays.items() if has_checksums(arr)]
    n_chunks = sum(math.prod(arr.cdata_shape) for arr in arrays.values())
    report.header = [
        f"{path}: zarr v{root.metadata.zarr_format}, {len(arrays)} arrays, {n_chunks} chunks; "
        f"CRC32C in {len(summed)} of {len(arrays)} arrays; "
        + (f"{MANIFEST} of {len(files)} chunk files" if manifest is not None else f"no {MANIFEST}")
    ]
    stored = unstored = 0
    with tqdm(
        total=n_chunks, desc="verify", unit="chunk", disable=None if progress else True
    ) as bar:
        for key, arr in arrays.items():
            recorded = manifest is not None and key in manifest["arrays"]
            for coords in chunk_grid(arr):
                relative = chunk_path(arr, coords)
                found, exists = _chunk_findings(path, arr, coords, files.get(relative), recorded)
                stored += exists
                unstored += not exists
                if found:
                    report.damaged.append(
                        f"{key} chunk {coords}, file {path / relative}: {'; '.join(found)}"
                    )
                bar.update(1)
    checked = f"{len(arrays)} arrays, {n_chunks} chunks checked"
    if report.damaged:
        report.summary = f"{len(report.damaged)} damaged ({checked})"
        return report
    try:
        # The layout (episode ends, array lengths) and the manifest's record of it.
        buffer = ReplayBuffer.open(path)
    except DatasetError as exc:
        report.damaged.append(str(exc))
        report.summary = f"1 damaged: the layout ({checked})"
        return report
    decoded = f"ok: {buffer.n_episodes} episodes, {buffer.n_steps} steps; every chunk of "
    decoded += f"{len(arrays)} arrays decodes"
    if len(summed) == len(arrays):
        decoded += " and passes its CRC32C"
    if manifest is not None:
        report.summary = f"{decoded}, and all {len(files)} chunk files match {MANIFEST}"
        return report
    lost = f"; {unstored} chunks have no file" if unstored else ""
    if len(summed) == len(arrays):
        report.summary = (
            f"{decoded} ({stored} chunk files); no {MANIFEST} (changed since it was written, "
            "without ReplayBuffer.close()), so a lost chunk file, which zarr reads as zeros, "
            f"cannot be detected{lost}"
        )
        return report
    absent = "no CRC32C codec" if not summed else f"CRC32C in only {len(summed)} arrays"
    report.summary = (
        f"{decoded} ({stored} chunk files); but it has no checksums ({absent}, no {MANIFEST}): "
        "a damaged chunk that still decodes cannot be detected, nor a lost chunk file (zarr reads "
        f"it as zeros){lost}; {_GET_CHECKSUMS}"
    )
    return report
