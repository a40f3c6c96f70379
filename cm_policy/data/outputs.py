"""What the package may write over: the marker its datasets carry and the one guard of outputs.

Every replay buffer (zarr) and robomimic HDF5 file the package writes carries a marker from the
moment it is created, so that even a half-written one (an interrupted conversion) is recognised:
the zarr root attribute ``written_by`` and the HDF5 root attribute ``written_by`` (the same
object as a JSON string), ``{"package": "cm-policy", "version": ...}``. A JSON side file
(``cm-policy data generate robomimic``'s statistics) carries it as its top-level key.

:func:`prepare_output` is the check every writer makes before it writes ``out``:

- ``out`` is never a source of the conversion, inside one, or a folder holding one (after
  resolving symlinks), with or without ``overwrite``;
- an ``out`` that does not exist is written;
- an existing ``out`` is kept unless ``overwrite`` is asked for, and even then it is replaced
  only when it is what the writer writes (a zarr buffer, an HDF5 file, a JSON file) and carries
  the marker; a buffer written before the marker existed has none and is refused too (remove
  it by hand, once).

Each refusal is an :class:`OutputError` (a ValueError: the command line reports it in one line)
that says why and what to do.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

MARKER_KEY = "written_by"
PACKAGE = "cm-policy"

Kind = Literal["zarr", "hdf5", "json"]
_WHAT = {"zarr": "a buffer", "hdf5": "an HDF5 dataset", "json": "a file"}
_WHERE = {"zarr": "its zarr attributes", "hdf5": "its HDF5 root attributes", "json": "its JSON"}
_YOURSELF = "remove it yourself or choose another path"


class OutputError(ValueError):
    """An output path the package refuses to write (a user's error: reported in one line)."""


class OutputExistsError(OutputError, FileExistsError):
    """The output exists and may not be replaced (no overwrite, or it is not the package's)."""


def _version() -> str:
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:  # a checkout on sys.path, not installed
        return "unknown"


def marker() -> dict[str, str]:
    """The ``written_by`` value of everything the package writes."""
    return {"package": PACKAGE, "version": _version()}


def hdf5_marker() -> str:
    """The marker as an HDF5 attribute holds it (a JSON string)."""
    return json.dumps(marker())


def _is_ours(value: Any) -> bool:
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return False
    return isinstance(value, dict) and value.get("package") == PACKAGE


def _zarr_attrs(path: Path) -> dict[str, Any] | None:
    """The root attributes of the zarr group at ``path`` (v3 ``zarr.json`` or v2 ``.zattrs``),
    or None when ``path`` holds no zarr group."""
    try:
        v3 = path / "zarr.json"
        if v3.is_file():
            meta = json.loads(v3.read_text())
            if not isinstance(meta, dict) or meta.get("node_type") != "group":
                return None
            attrs = meta.get("attributes") or {}
            return attrs if isinstance(attrs, dict) else {}
        if (path / ".zgroup").is_file():
            v2 = path / ".zattrs"
            attrs = json.loads(v2.read_text()) if v2.is_file() else {}
            return attrs if isinstance(attrs, dict) else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return None


def _hdf5_marker(path: Path) -> tuple[bool, Any]:
    """(whether ``path`` is an HDF5 file, its root ``written_by`` attribute or None)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return True, f.attrs.get(MARKER_KEY)
    except OSError:
        return False, None


def _json_marker(path: Path) -> tuple[bool, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False, None
    return True, value.get(MARKER_KEY) if isinstance(value, dict) else None


def written_by_package(path: str | Path, kind: Kind = "zarr") -> bool:
    """Whether ``path`` is a ``kind`` output that carries the package's marker."""
    path = Path(path)
    if kind == "zarr":
        attrs = _zarr_attrs(path) if path.is_dir() else None
        return attrs is not None and _is_ours(attrs.get(MARKER_KEY))
    if not path.is_file():
        return False
    _, value = _hdf5_marker(path) if kind == "hdf5" else _json_marker(path)
    return _is_ours(value)


def _not_ours(out: Path, kind: Kind) -> str | None:
    """Why overwrite=true may not replace ``out`` (which exists), or None when it may."""
    what = _WHAT[kind]
    lead = f"OUT {out} is not {what} cm-policy wrote"
    if kind == "zarr":
        if not out.is_dir():
            return f"{lead} (a file, not a zarr folder): {_YOURSELF}"
        attrs = _zarr_attrs(out)
        if attrs is None:
            return f"{lead} (a folder that is not a zarr group: no zarr.json): {_YOURSELF}"
        value = attrs.get(MARKER_KEY)
    else:
        if not out.is_file():
            return f"{lead} (a folder, not a file): {_YOURSELF}"
        readable, value = _hdf5_marker(out) if kind == "hdf5" else _json_marker(out)
        if not readable:
            form = "an HDF5 file" if kind == "hdf5" else "a JSON file"
            return f"{lead} (not {form}): {_YOURSELF}"
    if _is_ours(value):
        return None
    if value is None:
        return (
            f"{lead} (no cm_policy marker in {_WHERE[kind]}; those written before cm-policy "
            "marked its outputs have none): remove it yourself (once, for an old one) or choose "
            "another path"
        )
    return f"{lead} (its {MARKER_KEY} marker names {value!r}): {_YOURSELF}"


def _overlap(out: Path, source: Path) -> str | None:
    if out == source:
        return (
            f"OUT {out} is the source {source}: it would be replaced by its own conversion; "
            "choose another path"
        )
    if source in out.parents:
        return (
            f"OUT {out} is inside the source {source}: writing there would change the source "
            "dataset; choose a path outside it"
        )
    if out in source.parents:
        return (
            f"OUT {out} contains the source {source}: replacing it would delete the source; "
            "choose another path"
        )
    return None


def prepare_output(
    out: str | Path,
    overwrite: bool = False,
    sources: Iterable[str | Path] = (),
    kind: Kind = "zarr",
) -> Path:
    """Check that ``out`` may be written (the rules of the module's doc) and return it resolved.

    Raises :class:`OutputError` when ``out`` is, lies inside or holds one of ``sources``, and
    :class:`OutputExistsError` when it exists and is not to be replaced. Removes nothing: the
    writer replaces ``out`` itself (atomically where it writes under a temporary name).
    """
    if kind not in _WHAT:
        raise ValueError(f"kind must be one of {sorted(_WHAT)}, got {kind!r}")
    resolved = Path(out).resolve()
    for source in sources:
        reason = _overlap(resolved, Path(source).resolve())
        if reason is not None:
            raise OutputError(reason)
    if not os.path.lexists(resolved):
        return resolved
    if not overwrite:
        raise OutputExistsError(
            f"{out} already exists; remove it or pass overwrite=true (which replaces only "
            f"{_WHAT[kind]} cm-policy wrote)"
        )
    reason = _not_ours(resolved, kind)
    if reason is not None:
        raise OutputExistsError(reason)
    return resolved
