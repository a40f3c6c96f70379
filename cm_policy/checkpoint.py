"""Checkpoints: safetensors weights + JSON/YAML state, written atomically, loaded without pickle.

Everything that reads or writes a checkpoint is here: saving (training state included), finding
a checkpoint from a run folder, rebuilding its policy, and the split of a weights file into
network and normaliser tensors. It depends on the policy, never on the training code, so loading
a policy for inference imports no training module.

A checkpoint is a folder ``<run>/checkpoints/step_XXXXXXX`` holding

- ``policy.json``: the policy spec (task shapes, horizon, model, method) that rebuilds the policy;
- ``config.yaml``: the resolved training config (for resuming and for people);
- ``ema.safetensors`` / ``model.safetensors``: EMA and raw policy weights with the normaliser;
- ``optimizer.safetensors`` + ``trainer_state.json`` + ``rng.safetensors``: optimiser moments,
  step, LR schedule and RNG states, so that resuming continues bit for bit;
- ``manifest.json``, written last: the step, the time written (UTC) and the SHA-256 and size of
  every other file, ``{"version": 1, "step": N, "written": "...Z", "files": {NAME: {"sha256":
  HEX, "bytes": N}}}``.

The folder is written under a temporary name (``.step_XXXXXXX.tmp-PID``) and renamed into place,
and ``checkpoints/latest`` is replaced atomically afterwards, so a crash never leaves a
half-written checkpoint behind; the next save removes what a killed one left (the temporary
folders and files of processes that are gone). Loading checks every file it reads against the
manifest (the sizes when the folder is resolved, each file's SHA-256 before it is loaded) and
refuses a damaged one (:class:`DamagedCheckpointError`, naming the file and the run's checkpoints
that verify); a checkpoint written before manifests existed loads unchecked, with a one-line
warning. ``cm-policy checkpoints RUN`` lists a run's checkpoints with their state.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from cm_policy.atomic import process_alive, write_text_atomic
from cm_policy.data.normalizer import LinearNormalizer
from cm_policy.device import resolve_device
from cm_policy.policy import Policy

REQUIRED_FILES = ("policy.json", "ema.safetensors", "model.safetensors")
NORMALIZER = "normalizer."  # the prefix of the normaliser's tensors in a weights file
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
# What a stopped save leaves in a checkpoints folder: ``.step_XXXXXXX.tmp-PID`` (a checkpoint being
# written), ``.step_XXXXXXX.old-PID`` (one being replaced or pruned), ``.latest.tmp-PID``.
LEFTOVER = re.compile(r"\.(?:step_\d+|latest)\.(?:tmp|old)-(\d+)$")

log = logging.getLogger(__name__)


class DamagedCheckpointError(ValueError):
    """A checkpoint file that is missing or differs from what its folder's manifest records."""


def policy_weights(policy: Policy) -> dict[str, torch.Tensor]:
    """A policy's network and normaliser tensors, flat, for safetensors."""
    out = {k: v.detach().contiguous() for k, v in policy.state_dict().items()}
    out.update({f"{NORMALIZER}{k}": v for k, v in policy.normalizer.state_dict().items()})
    return out


def split_weights(
    weights: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], LinearNormalizer]:
    """A weights file's network tensors and its normaliser."""
    network = {k: v for k, v in weights.items() if not k.startswith(NORMALIZER)}
    norm = {k[len(NORMALIZER) :]: v for k, v in weights.items() if k.startswith(NORMALIZER)}
    return network, LinearNormalizer.from_state_dict(norm)


def policy_from_weights(spec: dict[str, Any], weights: dict[str, torch.Tensor]) -> Policy:
    """The policy of ``spec`` with ``weights`` (network and normaliser), in eval mode."""
    network, normalizer = split_weights(weights)
    policy = Policy(spec, normalizer)
    policy.load_state_dict(network)
    return policy.eval()


def optimizer_to_safetensors(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Split an optimiser state into flat tensors and JSON-able param-group settings."""
    state = optimizer.state_dict()
    tensors = {
        f"{idx}.{name}": value.detach().contiguous()
        for idx, entry in state["state"].items()
        for name, value in entry.items()
    }
    return tensors, {"param_groups": state["param_groups"]}


def optimizer_from_safetensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def file_sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def synced_records(paths: list[Path]) -> dict[str, dict[str, Any]]:
    """Flush just-written files to disk and return their manifest entries (SHA-256 and size).
    Each file is read back once, from the page cache, while another thread waits for the disk:
    the hashing hides behind the fsyncs (cheaper than hashing while serialising)."""

    def flush() -> None:
        for path in paths:
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())

    flushing = threading.Thread(target=flush)
    flushing.start()
    try:
        return {p.name: {"sha256": file_sha256(p), "bytes": p.stat().st_size} for p in paths}
    finally:
        flushing.join()


def sync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename into it) to disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def leftovers(root: Path) -> list[Path]:
    """What stopped saves left in the checkpoints folder ``root``: temporary checkpoints,
    checkpoints half removed and ``latest`` files of processes that are no longer running."""
    found = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        match = LEFTOVER.match(path.name)
        if match and (int(match[1]) == os.getpid() or not process_alive(int(match[1]))):
            found.append(path)
    return found


def set_aside(folder: Path) -> Path:
    """Rename a checkpoint folder out of the way (to remove it): a stop while it is removed
    leaves a hidden leftover (removed by the next save), never a half-deleted ``step_*``."""
    trash = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if trash.exists():
        shutil.rmtree(trash)
    os.rename(folder, trash)
    return trash


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    config_yaml: str,
    policy: Policy,
    ema_policy: Policy,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    keep_last: int = 2,
    keep_steps: Iterable[int] = (),
) -> Path:
    """Write checkpoint ``step`` under ``run_dir/checkpoints`` and point ``latest`` at it.

    Of the older checkpoints the last ``keep_last`` stay (0: all), and so does every one whose
    step is in ``keep_steps`` (e.g. a campaign's evaluation marks)."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for stale in leftovers(root):
        if stale.is_dir():
            shutil.rmtree(stale)
        else:
            stale.unlink()
    final = root / f"step_{step:07d}"
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    (tmp / "policy.json").write_text(json.dumps(policy.spec, indent=2))
    (tmp / "config.yaml").write_text(config_yaml)
    save_file(policy_weights(policy), tmp / "model.safetensors")
    save_file(policy_weights(ema_policy), tmp / "ema.safetensors")
    opt_tensors, opt_meta = optimizer_to_safetensors(optimizer)
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    save_file({"torch": torch.get_rng_state()}, tmp / "rng.safetensors")
    (tmp / "trainer_state.json").write_text(
        json.dumps({**trainer_state, "step": step, "optimizer": opt_meta}, indent=2)
    )
    files = synced_records(sorted(tmp.iterdir()))
    # Last: a folder with a manifest holds every file the manifest names.
    manifest = {"version": MANIFEST_VERSION, "step": step, "written": utc_now(), "files": files}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    synced_records([tmp / MANIFEST])
    # A step written again (a run restarted in its own folder): the old folder is set aside
    # and the new one renamed in right after, removing the old one only then.
    replaced = set_aside(final) if final.exists() else None
    os.rename(tmp, final)
    sync_folder(root)
    if replaced is not None:
        shutil.rmtree(replaced)
    write_text_atomic(root / "latest", final.name + "\n")
    pinned = {f"step_{s:07d}" for s in keep_steps}
    kept = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in kept[:-keep_last] if keep_last > 0 else []:
        if old.name not in pinned:
            shutil.rmtree(set_aside(old))
    return final


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def save_policy(policy: Policy, run_dir: str | Path, step: int = 0) -> Path:
    """A checkpoint of ``policy`` alone (as both raw and EMA weights, with a fresh optimiser),
    e.g. to serve or evaluate a policy that was built or trained outside :func:`train`."""
    return save_checkpoint(
        Path(run_dir),
        step,
        config_yaml="{}",
        policy=policy,
        ema_policy=policy,
        optimizer=torch.optim.AdamW(policy.parameters()),
        trainer_state={},
    )


# --- verification against the manifest ---------------------------------------------------------
def run_of(folder: Path) -> Path:
    """The run folder of a checkpoint folder (``RUN/checkpoints/step_*``), else its parent."""
    return folder.parent.parent if folder.parent.name == "checkpoints" else folder.parent


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of a checkpoint folder, or None for a checkpoint written before manifests
    existed (warned about once per folder)."""
    path = folder / MANIFEST
    if not path.is_file():
        warn_unverified(str(folder))
        return None
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        for name, record in files.items():
            if not isinstance(name, str) or not isinstance(record["sha256"], str):
                raise TypeError(name)
            int(record["bytes"])
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError) as exc:
        raise DamagedCheckpointError(
            f"{path} is damaged: expected JSON with a 'files' mapping of each file's sha256 and "
            f"bytes, found unreadable content ({type(exc).__name__}: {exc}); "
            f"{other_checkpoints(folder)}"
        ) from None
    return manifest


@functools.cache
def warn_unverified(folder: str) -> None:
    log.warning(
        "%s has no %s (written before checkpoints recorded their files' SHA-256): loaded "
        "without verification",
        folder,
        MANIFEST,
    )


def file_problem(folder: Path, name: str, manifest: dict[str, Any], hashed: bool) -> str:
    """What is wrong with file ``name`` of ``folder`` against ``manifest`` ("" if nothing): its
    presence and size, and (``hashed``) its SHA-256."""
    record = manifest["files"].get(name)
    path = folder / name
    if record is None:
        recorded = list(manifest["files"])
        return f"{path} is damaged: the manifest does not record it (it records {recorded})"
    want_hash, want_bytes = record["sha256"], int(record["bytes"])
    if not path.is_file():
        return (
            f"{path} is missing: the manifest records {want_bytes} bytes with SHA-256 {want_hash}"
        )
    found = path.stat().st_size
    if found != want_bytes:
        return f"{path} is damaged: it has {found} bytes, the manifest records {want_bytes}"
    if hashed:
        found_hash = file_sha256(path)
        if found_hash != want_hash:
            return (
                f"{path} is damaged: its SHA-256 is {found_hash}, the manifest records "
                f"{want_hash} (both {want_bytes} bytes)"
            )
    return ""


def check_files(
    folder: Path, names: Iterable[str], manifest: dict[str, Any] | None, hashed: bool = True
) -> None:
    """Every file of ``names`` is there as the manifest records it (``hashed``: its SHA-256
    too, else its size alone); no manifest (an older checkpoint): no check."""
    if manifest is None:
        return
    for name in names:
        problem = file_problem(folder, name, manifest, hashed)
        if problem:
            raise DamagedCheckpointError(f"{problem}; {other_checkpoints(folder)}")


def checkpoint_problem(folder: Path) -> str:
    """Why checkpoint ``folder`` is damaged, as ``FILE (what)`` for the first bad file of its
    manifest (each read in full), or "" when every file verifies; raises nothing."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        records = dict(manifest["files"])
    except (OSError, ValueError, TypeError, KeyError, UnicodeDecodeError):
        return f"{MANIFEST} (unreadable)"
    for name, record in records.items():
        path = folder / name
        if not path.is_file():
            return f"{name} (missing)"
        try:
            want_bytes, want_hash = int(record["bytes"]), record["sha256"]
            found = path.stat().st_size
            same = found == want_bytes and file_sha256(path) == want_hash
        except (OSError, ValueError, TypeError, KeyError):
            return f"{name} (unreadable)"
        if found != want_bytes:
            return f"{name} ({found} bytes, the manifest records {want_bytes})"
        if not same:
            return f"{name} (its SHA-256 differs from the manifest's)"
    return ""


def other_checkpoints(folder: Path) -> str:
    """The end of a damaged checkpoint's error: the run's other checkpoints that verify."""
    if folder.parent.name != "checkpoints":
        return "no other checkpoint of its run beside it to fall back on"
    run = run_of(folder)
    siblings = [p for p in sorted(folder.parent.glob("step_*")) if p.is_dir() and p != folder]
    older = [p for p in siblings if not (p / MANIFEST).is_file()]
    usable = [p for p in siblings if p in older or not checkpoint_problem(p)]
    listing = f"cm-policy checkpoints {run} lists them"
    if not usable:
        return f"the run has no other checkpoint that verifies ({listing})"
    names = ", ".join(p.name + (" (no manifest, older)" if p in older else "") for p in usable)
    return (
        f"other checkpoints of the run that verify: {names} (give one's folder, e.g. "
        f"{usable[-1]}, as checkpoint= or resume=; {listing})"
    )


def resolve_checkpoint(path: str | Path, weights: str | None = None) -> Path:
    """Accept a checkpoint folder, a ``checkpoints`` folder or a run folder (uses ``latest``).

    ``weights`` ("ema" or "model"): only that weights file is required beside policy.json (a
    deployment copy may carry the EMA weights alone); None requires both. The required files
    must have the sizes the manifest records (their SHA-256 is checked when they are loaded).
    """
    if weights not in (None, "ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    path = Path(path)
    for candidate in (path, path / "checkpoints"):
        latest = candidate / "latest"
        if latest.is_file():
            path = candidate / latest.read_text().strip()
            break
    if not path.is_dir():
        where = f"; {other_checkpoints(path)}" if path.parent.name == "checkpoints" else ""
        raise FileNotFoundError(f"checkpoint folder {path} does not exist{where}")
    required = REQUIRED_FILES if weights is None else ("policy.json", f"{weights}.safetensors")
    missing = [f for f in required if not (path / f).is_file()]
    if missing:
        raise ValueError(
            f"{path} is not a cm-policy checkpoint: expected files {list(required)}, "
            f"missing {missing}"
        )
    check_files(path, required, read_manifest(path), hashed=False)
    return path


def load_policy(path: str | Path, weights: str = "ema", device: str = "cpu") -> Policy:
    """Rebuild the policy of a checkpoint with its EMA (default) or raw weights, on ``device``.

    ``device``: cpu, cuda[:index] or auto (cuda when this torch sees a GPU, else cpu).
    """
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    where = resolve_device(device, key="device")
    folder = resolve_checkpoint(path, weights)
    check_files(folder, ("policy.json", f"{weights}.safetensors"), read_manifest(folder))
    spec = json.loads((folder / "policy.json").read_text())
    return policy_from_weights(spec, load_file(folder / f"{weights}.safetensors")).to(where)


def load_training_state(folder: Path) -> dict[str, Any]:
    """Everything needed to resume: raw and EMA weights, optimiser, trainer state, RNG."""
    names = [f"{n}.safetensors" for n in ("model", "ema", "optimizer", "rng")]
    check_files(folder, ["trainer_state.json", *names], read_manifest(folder))
    state = json.loads((folder / "trainer_state.json").read_text())
    return {
        "model": load_file(folder / "model.safetensors"),
        "ema": load_file(folder / "ema.safetensors"),
        "optimizer": optimizer_from_safetensors(
            load_file(folder / "optimizer.safetensors"), state.pop("optimizer")
        ),
        "torch_rng": load_file(folder / "rng.safetensors")["torch"],
        "trainer_state": state,
    }


# --- listing a run's checkpoints (cm-policy checkpoints RUN) -----------------------------------
@dataclass
class CheckpointEntry:
    """One checkpoint of a run as ``cm-policy checkpoints`` lists it."""

    folder: Path
    step: int
    written: str  # UTC, from the manifest (else the folder's modification time)
    bytes: int
    status: str  # "ok", "damaged: FILE (why)" or "no manifest (older)"
    latest: bool


def checkpoints_folder(path: str | Path) -> Path:
    """The ``checkpoints`` folder of a run folder (or that folder itself)."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        return path / "checkpoints"
    if path.is_dir() and (path.name == "checkpoints" or any(path.glob("step_*"))):
        return path
    if not path.exists():
        raise FileNotFoundError(f"no run folder at {path}")
    raise FileNotFoundError(
        f"{path} holds no checkpoints: expected a run folder (with checkpoints/step_*) or its "
        "checkpoints folder"
    )


def list_checkpoints(path: str | Path) -> list[CheckpointEntry]:
    """Every checkpoint of a run (run folder or its checkpoints folder), each read in full
    against its manifest, oldest first."""
    root = checkpoints_folder(path)
    latest_file = root / "latest"
    latest = latest_file.read_text().strip() if latest_file.is_file() else ""
    entries = []
    for folder in sorted(p for p in root.glob("step_*") if p.is_dir()):
        manifest = None
        if (folder / MANIFEST).is_file():
            try:
                manifest = json.loads((folder / MANIFEST).read_text())
            except (ValueError, UnicodeDecodeError):
                manifest = {}
            manifest = manifest if isinstance(manifest, dict) else {}
        if manifest is None:
            written = datetime.fromtimestamp(folder.stat().st_mtime, UTC)
            status, when = "no manifest (older)", written.strftime("%Y-%m-%dT%H:%M:%SZ")
        else:
            problem = checkpoint_problem(folder)
            status, when = (
                (f"damaged: {problem}" if problem else "ok"),
                manifest.get("written", "?"),
            )
        size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
        step = int(folder.name.split("_")[1])
        entries.append(CheckpointEntry(folder, step, when, size, status, folder.name == latest))
    return entries


def describe_checkpoints(path: str | Path) -> str:
    """What ``cm-policy checkpoints RUN`` prints: a line per checkpoint (step, time written,
    size, status), which one ``latest`` names, and what stopped saves left behind."""
    root = checkpoints_folder(path)
    entries = list_checkpoints(root)
    latest_file = root / "latest"
    latest = latest_file.read_text().strip() if latest_file.is_file() else None
    run = root.parent if root.name == "checkpoints" else root
    lines = [f"checkpoints of {run} ({root}):"]
    lines.append(f"  {'step':>9}  {'written (UTC)':<20}  {'size':>9}  status")
    for e in entries:
        mark = "  <- latest" if e.latest else ""
        lines.append(f"  {e.step:>9}  {e.written:<20}  {e.bytes / 1e6:>6.1f} MB  {e.status}{mark}")
    if latest is None:
        lines.append("latest: none (no checkpoint completed)")
    elif not any(e.latest for e in entries):
        lines.append(f"latest: {latest}, which does not exist")
    else:
        lines.append(f"latest: {latest}")
    stale = [p.name for p in leftovers(root)]
    if stale:
        lines.append(f"left by a stopped save (the next save removes them): {', '.join(stale)}")
    return "\n".join(lines)


def numpy_rng_state(rng: np.random.Generator) -> dict:
    return rng.bit_generator.state


def numpy_rng_from_state(state: dict) -> np.random.Generator:
    rng = np.random.default_rng()
    rng.bit_generator.state = state
    return rng
