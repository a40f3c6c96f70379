"""Checkpoints: safetensors weights + JSON/YAML state, written atomically, loaded without pickle.

Everything that reads or writes a checkpoint is here: saving (training state included), finding
a checkpoint from a run folder, rebuilding its policy, and the split of a weights file into
network and normaliser tensors. It depends on the policy, never on the training code, so loading
a policy for inference imports no training module.

A checkpoint is a folder ``<run>/checkpoints/step_XXXXXXX`` holding

- ``policy.json``: the policy spec (task shapes, horizon, model, method) that rebuilds the policy;
- ``config.yaml``: the resolved training config (for resuming and for people);
- ``ema.safetensors`` / ``model.safetensors``: EMA and raw policy weights with the normaliser;
- ``optimizer.safetensors`` + ``trainer_state.json``: optimiser moments, step, LR schedule and
  RNG states, so that resuming continues bit for bit.

The folder is written under a temporary name and renamed into place, and ``checkpoints/latest``
is replaced atomically afterwards, so a crash never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from cm_policy.data.normalizer import LinearNormalizer
from cm_policy.device import resolve_device
from cm_policy.policy import Policy

REQUIRED_FILES = ("policy.json", "ema.safetensors", "model.safetensors")
NORMALIZER = "normalizer."  # the prefix of the normaliser's tensors in a weights file


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


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a stop mid-write leaves
    the old file (or none), never half of the new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


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
    final = root / f"step_{step:07d}"
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    (tmp / "policy.json").write_text(json.dumps(policy.spec, indent=2))
    (tmp / "config.yaml").write_text(config_yaml)
    save_file(policy_weights(policy), tmp / "model.safetensors")
    save_file(policy_weights(ema_policy), tmp / "ema.safetensors")
    opt_tensors, opt_meta = optimizer_to_safetensors(optimizer)
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    rng = {"torch": torch.get_rng_state()}
    save_file(rng, tmp / "rng.safetensors")
    (tmp / "trainer_state.json").write_text(
        json.dumps({**trainer_state, "step": step, "optimizer": opt_meta}, indent=2)
    )
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    write_text_atomic(root / "latest", final.name + "\n")
    pinned = {f"step_{s:07d}" for s in keep_steps}
    kept = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in kept[:-keep_last] if keep_last > 0 else []:
        if old.name not in pinned:
            shutil.rmtree(old)
    return final


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


def resolve_checkpoint(path: str | Path, weights: str | None = None) -> Path:
    """Accept a checkpoint folder, a ``checkpoints`` folder or a run folder (uses ``latest``).

    ``weights`` ("ema" or "model"): only that weights file is required beside policy.json (a
    deployment copy may carry the EMA weights alone); None requires both.
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
        raise FileNotFoundError(f"checkpoint folder {path} does not exist")
    required = REQUIRED_FILES if weights is None else ("policy.json", f"{weights}.safetensors")
    missing = [f for f in required if not (path / f).is_file()]
    if missing:
        raise ValueError(
            f"{path} is not a cm-policy checkpoint: expected files {list(required)}, "
            f"missing {missing}"
        )
    return path


def load_policy(path: str | Path, weights: str = "ema", device: str = "cpu") -> Policy:
    """Rebuild the policy of a checkpoint with its EMA (default) or raw weights, on ``device``.

    ``device``: cpu, cuda[:index] or auto (cuda when this torch sees a GPU, else cpu).
    """
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    where = resolve_device(device, key="device")
    folder = resolve_checkpoint(path, weights)
    spec = json.loads((folder / "policy.json").read_text())
    return policy_from_weights(spec, load_file(folder / f"{weights}.safetensors")).to(where)


def load_training_state(folder: Path) -> dict[str, Any]:
    """Everything needed to resume: raw and EMA weights, optimiser, trainer state, RNG."""
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


def numpy_rng_state(rng: np.random.Generator) -> dict:
    return rng.bit_generator.state


def numpy_rng_from_state(state: dict) -> np.random.Generator:
    rng = np.random.default_rng()
    rng.bit_generator.state = state
    return rng
