"""A replay buffer's own task config (``task.yaml`` in its folder), derived from its arrays.

The converters (``cm-policy data convert lerobot`` / ``robomimic``) write one into every buffer
they create, so that ``cm-policy train task=BUFFER/task.yaml`` trains on the data as it is: an
``env: dataset`` task (:mod:`cm_policy.tasks.dataset`) naming every feature the buffer holds.
The user deletes the features the policy should not see; nothing else needs writing.

What the arrays make (the buffer's key order):

- ``action`` ``(N, d)``: ``action_dim: d``;
- a numeric (int or float) array ``(N, d)``: a low-dim feature of size ``d``;
- an ``(N, H, W, 3)`` uint8 or float array: a camera, with its ``[H, W, 3]`` in ``image_shape``;
- anything else (booleans, several dimensions per step) is no feature: a comment in the file
  names it and says why, so that the user sees what was left out.

``control_hz`` is the converter's rate, else the rate the buffer records (a LeRobotDataset's fps),
else :data:`DEFAULT_CONTROL_HZ` with a comment saying it was not recorded. ``cm-policy data info``
shows the same summary (:func:`describe_task`).
"""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cm_policy.atomic import write_text_atomic
from cm_policy.data.replay_buffer import DatasetError, ReplayBuffer

TASK_FILE = "task.yaml"
DEFAULT_CONTROL_HZ = 10  # the dataset task's rate when its config has none (tasks/dataset.py)
ACTION_KEY = "action"
_RECORDED_FPS = "the LeRobotDataset's fps (meta/info.json)"
_NOT_RECORDED = "not recorded with the data: a default, set the robot's rate"
_FLOAT_OR_INT = "iuf"
_COMMENT_COLUMN = 25  # where the comment beside a value starts
_WIDTH = 100  # of a comment line
# YAML 1.1 reads these bare words as booleans or null, not as the key they spell.
_YAML_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null", "~"}
_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")


@dataclass
class DerivedTask:
    """A task config derived from a buffer: ``config`` is what ``task.yaml`` holds,
    ``left_out`` the arrays that are no feature (key -> why), ``control_hz_source`` where the
    rate came from (the comment beside it), ``shapes`` every array's shape ``(N, ...)``."""

    config: dict[str, Any]
    left_out: dict[str, str]
    control_hz_source: str
    shapes: dict[str, tuple[int, ...]]


def _is_camera(shape: tuple[int, ...], dtype: np.dtype) -> bool:
    return len(shape) == 3 and shape[2] == 3 and (dtype == np.uint8 or dtype.kind == "f")


def _not_a_feature(shape: tuple[int, ...], dtype: np.dtype) -> str | None:
    """Why an array of per-step ``shape`` and ``dtype`` is neither a low-dim feature nor a
    camera, or None."""
    if _is_camera(shape, dtype):
        return None
    if len(shape) == 3 and shape[2] == 3:
        return f"dtype {dtype} for {tuple(shape)} frames (a camera holds uint8 or floats)"
    if dtype.kind == "b":
        return f"dtype {dtype} (a low-dim feature holds ints or floats)"
    if not shape:
        return "shape (N,), one value per step (stored as (N, 1) it would be a feature)"
    if len(shape) != 1:
        return f"{tuple(shape)} per step (a low-dim feature is a vector)"
    return None


def recorded_control_hz(buffer_path: str | Path) -> float | int | None:
    """The control rate the buffer's attributes record (a converted LeRobotDataset's fps, as
    its info.json wrote it), or None."""
    # Imported here: the LeRobot converter imports this module to write its task file.
    from cm_policy.data.formats.lerobot import source_attrs

    sources = (source_attrs(buffer_path) or {}).get("sources") or []
    return sources[0].get("fps") if sources else None


def derive_task(
    buffer_path: str | Path,
    *,
    name: str | None = None,
    control_hz: float | None = None,
    control_hz_source: str = "the converter's rate",
) -> DerivedTask:
    """The ``env: dataset`` task config of the buffer at ``buffer_path`` (the module's doc).

    ``name`` defaults to the buffer folder's stem; ``control_hz`` (with ``control_hz_source``,
    its comment) to the rate the buffer records, else :data:`DEFAULT_CONTROL_HZ`. Raises
    DatasetError when the buffer has no ``action`` array of shape ``(N, d)``.
    """
    path = Path(buffer_path)
    buffer = ReplayBuffer.open(path)
    if ACTION_KEY not in buffer:
        raise DatasetError(
            f"{path}: no {ACTION_KEY!r} array, so no task config (a dataset task trains on "
            f"{ACTION_KEY} (N, d)); found {buffer.keys}"
        )
    action = buffer[ACTION_KEY]
    if len(action.shape) != 2 or np.dtype(action.dtype).kind not in _FLOAT_OR_INT:
        raise DatasetError(
            f"{path}: {ACTION_KEY} has shape {tuple(action.shape)} and dtype {action.dtype}, "
            "expected (N, d) ints or floats for a task config"
        )
    low_dim: dict[str, int] = {}
    cameras: dict[str, list[int]] = {}
    left_out: dict[str, str] = {}
    for key in buffer.keys:
        if key == ACTION_KEY:
            continue
        shape, dtype = tuple(int(s) for s in buffer[key].shape[1:]), np.dtype(buffer[key].dtype)
        reason = _not_a_feature(shape, dtype)
        if reason is not None:
            left_out[key] = reason
        elif _is_camera(shape, dtype):
            cameras[key] = list(shape)
        else:
            low_dim[key] = shape[0]
    if control_hz is None:
        control_hz = recorded_control_hz(path)
        control_hz_source = _RECORDED_FPS
        if control_hz is None:
            control_hz, control_hz_source = DEFAULT_CONTROL_HZ, _NOT_RECORDED
    config: dict[str, Any] = {
        "name": name or path.resolve().stem,
        "env": "dataset",
        "dataset_path": ".",
        "control_hz": control_hz,
        "action_dim": int(action.shape[1]),
        "low_dim": low_dim,
        "image_keys": list(cameras),
    }
    if cameras:
        config["image_shape"] = cameras
    shapes = {key: tuple(int(s) for s in buffer[key].shape) for key in buffer.keys}
    return DerivedTask(config, left_out, control_hz_source, shapes)


def _scalar(text: str) -> str:
    """``text`` as a YAML scalar that reads back as this string (quoted where needed)."""
    plain = _PLAIN.fullmatch(text) and text.lower() not in _YAML_WORDS
    return text if plain else json.dumps(text)


def _line(text: str, comment: str) -> str:
    return f"{text.ljust(_COMMENT_COLUMN - 1)} # {comment}"


def _comments(text: str, indent: str = "") -> list[str]:
    return textwrap.wrap(
        text, _WIDTH, initial_indent=f"{indent}# ", subsequent_indent=f"{indent}#   "
    )


def task_yaml(task: DerivedTask, *, made_by: str, location: str | Path) -> str:
    """``task.yaml``'s text: the config with comments saying where it came from, how to train
    on it (``location``: the buffer's folder as the user names it), where each value came from
    and which arrays were left out. Plain YAML that ``yaml.safe_load`` and ``OmegaConf.load``
    read back as ``task.config``."""
    cfg = task.config
    lines = [
        "# The task config of the replay buffer in this folder, derived from its arrays",
        f"# by {made_by} (cm_policy/data/task_file.py). Train on it with",
        f"#   cm-policy train task={Path(location) / TASK_FILE} [key=value ...]",
        "# Delete the features the policy should not see: entries of low_dim, and cameras from",
        "# both image_keys and image_shape. The rest follows from the data.",
        f"name: {_scalar(cfg['name'])}",
        _line("env: dataset", "cm_policy/tasks/dataset.py: train and serve, no simulator"),
        _line(
            f"dataset_path: {cfg['dataset_path']}",
            "the buffer: this file's folder (a relative path is relative to it)",
        ),
        _line(f"control_hz: {json.dumps(cfg['control_hz'])}", task.control_hz_source),
        _line(f"action_dim: {cfg['action_dim']}", f"{ACTION_KEY}: (N, {cfg['action_dim']})"),
    ]
    low_dim = cfg["low_dim"]
    lines.append(
        _line("low_dim:" if low_dim else "low_dim: {}", "every low-dim feature, key: size")
    )
    lines += [f"  {_scalar(key)}: {size}" for key, size in low_dim.items()]
    for key, reason in task.left_out.items():
        lines += _comments(f"{key} is left out: {reason}", indent="  ")
    lines.append(f"image_keys: [{', '.join(_scalar(k) for k in cfg['image_keys'])}]")
    if "image_shape" in cfg:
        lines.append(_line("image_shape:", "per camera: [height, width, channels]"))
        lines += [
            f"  {_scalar(key)}: [{', '.join(str(d) for d in shape)}]"
            for key, shape in cfg["image_shape"].items()
        ]
    return "\n".join(lines) + "\n"


def write_task_file(
    buffer_dir: str | Path,
    *,
    made_by: str,
    location: str | Path | None = None,
    control_hz: float | None = None,
    control_hz_source: str = "the converter's rate",
) -> Path:
    """Write ``buffer_dir/task.yaml`` (:func:`derive_task`, :func:`task_yaml`) and return its
    path. A converter writes it into its temporary output before the rename, with ``location``
    the buffer's final path (the usage line's, and its stem the task's name)."""
    buffer_dir = Path(buffer_dir)
    location = buffer_dir if location is None else Path(location)
    task = derive_task(
        buffer_dir,
        name=location.resolve().stem,
        control_hz=control_hz,
        control_hz_source=control_hz_source,
    )
    path = buffer_dir / TASK_FILE
    write_text_atomic(path, task_yaml(task, made_by=made_by, location=location))
    return path


def mismatches(
    task: Mapping[str, Any],
    shapes: Mapping[str, tuple[int, ...]],
    left_out: Mapping[str, str] | None = None,
) -> list[str]:
    """How a task config differs from the arrays it trains on, given their ``shapes``
    ``(N, ...)``: every low-dim key ``(N, size)``, every camera ``(N, H, W, 3)`` at its declared
    shape (if one is declared), the action ``(N, action_dim)``; ``left_out`` (key -> why) names
    arrays that are no feature whatever their shape. Empty when they agree; deleting features
    is no difference. The one check behind training's refusal and ``cm-policy data info``."""
    problems = []
    left_out = left_out or {}

    def has(key: str) -> str:
        if key in left_out:
            return f"the data's {key} is no feature: {left_out[key]}"
        if key not in shapes:
            return "the data has no such array"
        return f"the data has {_per_step(shapes[key])}"

    low_dim = task.get("low_dim") or {}
    for key, size in low_dim.items() if isinstance(low_dim, Mapping) else ():
        shape = shapes.get(key)
        if key in left_out or shape is None or len(shape) != 2 or shape[1] != _int(size):
            problems.append(f"low_dim {key}: declared size {size}, {has(key)}")
    declared = task.get("image_shape")
    for key in task.get("image_keys") or []:
        want = declared.get(key) if isinstance(declared, Mapping) else declared
        if key in left_out or key not in shapes:
            problems.append(f"camera {key}: {has(key)}")
            continue
        frame = tuple(shapes[key][1:])
        if len(frame) != 3 or frame[2] != 3:
            problems.append(f"camera {key}: expected frames (height, width, 3), {has(key)}")
        elif want is not None and tuple(want) != frame:
            problems.append(
                f"camera {key}: declared image_shape {list(want)}, the data has {list(frame)}"
            )
    if isinstance(declared, Mapping):
        cameras = set(task.get("image_keys") or [])
        problems += [
            f"image_shape {k}: not one of image_keys" for k in declared if k not in cameras
        ]
    action, action_dim = shapes.get(ACTION_KEY), task.get("action_dim")
    if action is None or len(action) != 2 or action[1] != _int(action_dim):
        problems.append(f"{ACTION_KEY}: declared action_dim {action_dim}, {has(ACTION_KEY)}")
    return problems


def _int(value: Any) -> int | None:
    """A declared size as an int (a YAML "3" counts as 3), None when it is no number."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _per_step(shape: tuple[int, ...]) -> str:
    return f"size {shape[1]}" if len(shape) == 2 else f"shape {tuple(shape[1:])} per step"


def describe_task(buffer_path: str | Path) -> str:
    """``cm-policy data info``'s task summary: the buffer's own ``task.yaml`` and whether it
    still matches the arrays, or (without one) the config a converter would write (lines, no
    final newline)."""
    path = Path(buffer_path)
    own = path / TASK_FILE
    try:
        task = derive_task(path)
    except DatasetError as exc:
        return f"task config: none ({exc})"
    usage = f"cm-policy train task={own}"
    if not own.is_file():
        text = task_yaml(task, made_by="cm-policy data info", location=path)
        lead = f"task config (derived; no {TASK_FILE} here: save it as {own} for {usage}):"
        return f"{lead}\n{text.rstrip()}"
    text = own.read_text()
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problems = [f"not valid YAML: {' '.join(str(exc).split())}"]
    else:
        problems = (
            mismatches(config, task.shapes, task.left_out)
            if isinstance(config, Mapping)
            else ["not a YAML mapping"]
        )
    verdict = (
        "it matches the buffer's arrays"
        if not problems
        else "it differs from the buffer's arrays: " + "; ".join(problems)
    )
    lead = f"task config ({own}, the buffer's own file, which {usage} uses; {verdict}):"
    return f"{lead}\n{text.rstrip()}"
