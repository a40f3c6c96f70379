"""robomimic's HDF5 dataset layout: read, write, validate, and convert to our zarr ReplayBuffer.

The layout (robomimic v0.3 datasets and what its tools write)::

    data/                      attrs: env_args (JSON string: env_name, type, env_kwargs), total
      demo_0/                  attrs: num_samples, model_file (the episode's MJCF string)
        states   (T, S)        flattened MuJoCo states (time, qpos, qvel) before each action
        actions  (T, A)        7-D delta OSC_POSE actions for robosuite
        rewards  (T,)  dones (T,)
        obs/<key>  (T, ...)    observations before each action
        next_obs/<key> (T, ...) observations after it
      demo_1/ ...
    mask/<filter>              optional: arrays of demo names (bytes), e.g. train / valid

Files are written under a temporary name and renamed when complete, so an interrupted write never
leaves a file that looks whole.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from cm_policy.atomic import temporary_name
from cm_policy.data.outputs import MARKER_KEY, hdf5_marker, prepare_output
from cm_policy.data.replay_buffer import DatasetError, ReplayBuffer, atomic_directory
from cm_policy.data.task_file import TASK_FILE, write_task_file

DATA_GROUP = "data"
MASK_GROUP = "mask"
ENV_ARGS_ATTR = "env_args"
DEMO_DATASETS = ("states", "actions")
IMAGE_COMPRESSION = {"compression": "gzip", "compression_opts": 1}  # readable by any HDF5
ENV_ARGS_FILE = "env_args.json"  # beside the arrays of a converted zarr buffer
_DEMO_NAME = re.compile(r"^demo_(\d+)$")


def _demo_index(name: str) -> int:
    match = _DEMO_NAME.match(name)
    return int(match.group(1)) if match else -1


class RobomimicWriter:
    """Write demos one at a time into a robomimic HDF5 file (a context manager).

    >>> with RobomimicWriter("lift.hdf5", env_meta) as writer:
    ...     writer.add_demo(states, actions, obs, next_obs)

    ``overwrite`` replaces only an HDF5 file this package wrote (its root attribute
    ``written_by``, :func:`~cm_policy.data.outputs.prepare_output`).
    """

    def __init__(self, path: str | Path, env_meta: Mapping[str, Any], overwrite: bool = False):
        self.path = Path(path)
        prepare_output(self.path, overwrite, kind="hdf5")
        for key in ("env_name", "env_kwargs"):
            if key not in env_meta:
                raise ValueError(
                    f"env_meta needs '{key}' (robomimic env_args), got {sorted(env_meta)}"
                )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = temporary_name(self.path)
        self._file = h5py.File(self._tmp, "w")
        self._file.attrs[MARKER_KEY] = hdf5_marker()
        self._data = self._file.create_group(DATA_GROUP)
        self._data.attrs[ENV_ARGS_ATTR] = json.dumps(dict(env_meta))
        self._total = 0
        self.demo_names: list[str] = []

    def add_demo(
        self,
        states: np.ndarray,
        actions: np.ndarray,
        obs: Mapping[str, np.ndarray],
        next_obs: Mapping[str, np.ndarray] | None = None,
        rewards: np.ndarray | None = None,
        dones: np.ndarray | None = None,
        model_xml: str | None = None,
        attrs: Mapping[str, Any] | None = None,
    ) -> str:
        """Append one demo of T steps; returns its name (``demo_<i>``). ``attrs`` are extra
        attributes of the demo's group."""
        actions = np.asarray(actions, dtype=np.float64)
        n = len(actions)
        if n == 0:
            raise ValueError("a demo needs at least one step")
        arrays = {"states": np.asarray(states, dtype=np.float64), "actions": actions}
        arrays["rewards"] = np.zeros(n) if rewards is None else np.asarray(rewards, np.float64)
        if dones is None:
            dones = np.zeros(n, dtype=np.int64)
            dones[-1] = 1
        arrays["dones"] = np.asarray(dones, dtype=np.int64)
        groups = {"obs": obs, **({"next_obs": next_obs} if next_obs is not None else {})}
        lengths = {k: len(v) for k, v in arrays.items()}
        lengths.update({f"{g}/{k}": len(v) for g, d in groups.items() for k, v in d.items()})
        if set(lengths.values()) != {n}:
            raise ValueError(f"every array of a demo needs {n} steps (len(actions)), got {lengths}")
        name = f"demo_{len(self.demo_names)}"
        demo = self._data.create_group(name)
        for key, value in arrays.items():
            demo.create_dataset(key, data=value)
        for group_name, values in groups.items():
            group = demo.create_group(group_name)
            for key, value in values.items():
                value = np.asarray(value)
                extra = IMAGE_COMPRESSION if value.dtype == np.uint8 and value.ndim == 4 else {}
                group.create_dataset(key, data=value, **extra)
        demo.attrs["num_samples"] = n
        if model_xml is not None:
            demo.attrs["model_file"] = model_xml
        for key, value in (attrs or {}).items():
            demo.attrs[key] = value
        self._total += n
        self.demo_names.append(name)
        return name

    def add_mask(self, name: str, demo_names: Sequence[str]) -> None:
        """A filter key (e.g. ``train``, ``valid``) listing demo names."""
        unknown = sorted(set(demo_names) - set(self.demo_names))
        if unknown:
            raise ValueError(f"mask {name!r} names demos that were not written: {unknown}")
        group = self._file.require_group(MASK_GROUP)
        group.create_dataset(name, data=np.array([d.encode() for d in demo_names], dtype="S"))

    def close(self) -> None:
        """Finish the file and move it into place."""
        if self._file is None:
            return
        self._data.attrs["total"] = self._total
        self._file.close()
        self._file = None
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> RobomimicWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class RobomimicDataset:
    """A robomimic HDF5 file opened read-only and checked: its env metadata, demos and masks.

    Opening raises :class:`DatasetError` naming what is missing or inconsistent: no ``data``
    group, no or unreadable ``env_args``, a demo without ``states`` / ``actions`` / ``obs``, or
    arrays whose lengths disagree.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise DatasetError(f"no robomimic dataset at {self.path}: the path does not exist")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as exc:
            raise DatasetError(
                f"{self.path}: expected an HDF5 file, could not open it: {exc}"
            ) from exc
        try:
            self.env_meta = self._read_env_meta()
            self.demo_names = self._read_demo_names()
            for name in self.demo_names:
                self._check_demo(name)
        except Exception:
            self._file.close()
            raise

    # --- validation --------------------------------------------------------------------------
    def _where(self, name: str = "") -> str:
        return f"{self.path}:{DATA_GROUP}/{name}" if name else str(self.path)

    def _read_env_meta(self) -> dict[str, Any]:
        data = self._file.get(DATA_GROUP)
        if not isinstance(data, h5py.Group):
            raise DatasetError(
                f"{self.path}: expected a group '{DATA_GROUP}' holding the demos (robomimic "
                f"layout), found top-level keys {sorted(self._file)}"
            )
        if ENV_ARGS_ATTR not in data.attrs:
            raise DatasetError(
                f"{self.path}: '{DATA_GROUP}' has no '{ENV_ARGS_ATTR}' attribute (the JSON env "
                "metadata: env_name, env_kwargs); the env cannot be rebuilt without it. Found "
                f"attributes {sorted(data.attrs)}"
            )
        raw = data.attrs[ENV_ARGS_ATTR]
        try:
            meta = json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{self.path}: '{ENV_ARGS_ATTR}' is not valid JSON: {exc}") from exc
        missing = [k for k in ("env_name", "env_kwargs") if k not in meta]
        if not isinstance(meta, dict) or missing:
            found = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
            raise DatasetError(
                f"{self.path}: '{ENV_ARGS_ATTR}' must hold env_name and env_kwargs, missing "
                f"{missing}; found {found}"
            )
        return meta

    def _read_demo_names(self) -> list[str]:
        names = [k for k in self._file[DATA_GROUP] if _DEMO_NAME.match(k)]
        if not names:
            raise DatasetError(
                f"{self.path}: '{DATA_GROUP}' holds no demo groups (demo_0, demo_1, ...); found "
                f"{sorted(self._file[DATA_GROUP])}"
            )
        return sorted(names, key=_demo_index)

    def _check_demo(self, name: str) -> None:
        demo = self._file[DATA_GROUP][name]
        missing = [k for k in (*DEMO_DATASETS, "obs") if k not in demo]
        if missing:
            raise DatasetError(
                f"{self._where(name)}: missing {missing} (expected datasets states, actions and "
                f"a group obs/); found {sorted(demo)}"
            )
        n = demo["actions"].shape[0]
        lengths = {k: demo[k].shape[0] for k in (*DEMO_DATASETS, "rewards", "dones") if k in demo}
        for group in ("obs", "next_obs"):
            if group in demo:
                lengths.update({f"{group}/{k}": demo[group][k].shape[0] for k in demo[group]})
        bad = {k: v for k, v in lengths.items() if v != n}
        if bad:
            raise DatasetError(
                f"{self._where(name)}: every array must have {n} steps like actions; found {bad}"
            )
        declared = demo.attrs.get("num_samples")
        if declared is not None and int(declared) != n:
            raise DatasetError(
                f"{self._where(name)}: attribute num_samples is {int(declared)} but actions has "
                f"{n} steps"
            )

    def check_obs_keys(self, keys: Iterable[str]) -> None:
        """Raise DatasetError unless every demo records every observation key in ``keys``."""
        keys = list(keys)
        for name in self.demo_names:
            have = set(self._file[DATA_GROUP][name]["obs"])
            missing = [k for k in keys if k not in have]
            if missing:
                raise DatasetError(
                    f"{self._where(name)}/obs: missing observation key(s) {missing}; "
                    f"found {sorted(have)}"
                )

    # --- access ------------------------------------------------------------------------------
    @property
    def obs_keys(self) -> list[str]:
        return sorted(self._file[DATA_GROUP][self.demo_names[0]]["obs"])

    @property
    def n_steps(self) -> int:
        return sum(self.demo_length(name) for name in self.demo_names)

    def demo_length(self, name: str) -> int:
        return int(self._file[DATA_GROUP][name]["actions"].shape[0])

    def demo_attrs(self, name: str) -> dict[str, Any]:
        """A demo's attributes other than ``num_samples`` and ``model_file`` (e.g. the ``seed``
        and ``recorded_from`` of generated demos)."""
        if name not in self.demo_names:
            raise KeyError(f"no demo {name!r} in {self.path} ({len(self.demo_names)} demos)")
        attrs = self._file[DATA_GROUP][name].attrs
        return {k: attrs[k] for k in attrs if k not in ("num_samples", "model_file")}

    def mask(self, filter_key: str) -> list[str]:
        """The demo names of a filter key (``mask/<filter_key>``)."""
        masks = self._file.get(MASK_GROUP)
        if masks is None or filter_key not in masks:
            found = sorted(masks) if masks is not None else []
            raise DatasetError(f"{self.path}: no mask {filter_key!r}; found masks {found}")
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in masks[filter_key][:]]
        unknown = sorted(set(names) - set(self.demo_names))
        if unknown:
            raise DatasetError(f"{self.path}: mask {filter_key!r} names missing demos {unknown}")
        return sorted(names, key=_demo_index)

    def demo(
        self, name: str, obs_keys: Iterable[str] | None = None, next_obs: bool = False
    ) -> dict[str, Any]:
        """One demo as numpy arrays: states, actions, rewards, dones, obs {key: array},
        next_obs (when asked and recorded) and model_xml (None when not recorded)."""
        if name not in self.demo_names:
            raise KeyError(f"no demo {name!r} in {self.path} ({len(self.demo_names)} demos)")
        demo = self._file[DATA_GROUP][name]
        keys = list(demo["obs"]) if obs_keys is None else list(obs_keys)
        out: dict[str, Any] = {k: np.asarray(demo[k][:]) for k in DEMO_DATASETS}
        n = len(out["actions"])
        out["rewards"] = np.asarray(demo["rewards"][:]) if "rewards" in demo else np.zeros(n)
        out["dones"] = np.asarray(demo["dones"][:]) if "dones" in demo else np.zeros(n, int)
        out["obs"] = {k: np.asarray(demo["obs"][k][:]) for k in keys}
        if next_obs and "next_obs" in demo:
            out["next_obs"] = {k: np.asarray(demo["next_obs"][k][:]) for k in keys}
        xml = demo.attrs.get("model_file")
        out["model_xml"] = xml.decode() if isinstance(xml, bytes) else xml
        return out

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> RobomimicDataset:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


# --- delta -> absolute actions ----------------------------------------------------------------
def controller_is_absolute(env_meta: Mapping[str, Any]) -> bool:
    """Whether a dataset's controller took absolute targets (then its actions need no replay)."""
    config = env_meta.get("env_kwargs", {}).get("controller_configs", {})
    if "body_parts" in config:
        from cm_policy.envs.robosuite_env import ARM

        return config["body_parts"].get(ARM, {}).get("input_type", "delta") == "absolute"
    if "control_delta" in config:
        return not config["control_delta"]
    return config.get("input_type", "delta") == "absolute"


def delta_to_abs_actions(
    env: Any, states: np.ndarray, actions: np.ndarray, model_xml: str | None = None
) -> np.ndarray:
    """The 10-D absolute actions (world position, rotation 6D, gripper) that the controller
    targeted for recorded delta ``actions``: at each step the env (a delta-action
    :class:`~cm_policy.envs.robosuite_env.RobosuiteEnv`) is put at the recorded state, the
    recorded action goes through robosuite's OSC controller, and its goal is read back."""
    from cm_policy.envs.robosuite_env import matrix_to_rot6d

    out = np.zeros((len(actions), 10))
    controller = None
    for t, action in enumerate(actions):
        env.reset_to(states[t], model_xml if t == 0 else None, new_episode=t == 0)
        env.step(action)
        controller = env.arm_controller
        if controller.input_type != "delta":
            raise ValueError("delta_to_abs_actions needs an env built for delta actions")
        pos, ori = np.asarray(controller.goal_pos), np.asarray(controller.goal_ori)
        if controller.input_ref_frame == "base":
            pos = controller.origin_pos + controller.origin_ori @ pos
            ori = controller.origin_ori @ ori
        out[t, :3] = pos
        out[t, 3:9] = matrix_to_rot6d(ori)
        out[t, 9] = action[6]
    return out


# --- conversion to zarr -----------------------------------------------------------------------
def convert_to_zarr(
    hdf5_path: str | Path | Sequence[str | Path],
    out: str | Path,
    abs_action: bool = False,
    image: bool = False,
    filter_key: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write a robomimic HDF5 dataset as a zarr ReplayBuffer for training.

    Keys: the low-dim observations (``object``, ``robot0_eef_pos``, ``robot0_eef_quat``,
    ``robot0_gripper_qpos``), the two camera images with ``image``, and ``action``: the recorded
    7-D delta actions, or with ``abs_action`` 10-D absolute ones (replayed through the controller
    for delta datasets). The dataset's env metadata is kept in ``<out>/env_args.json``, and the
    buffer's task config (every key, at robomimic's control rate) in ``<out>/task.yaml``
    (:mod:`cm_policy.data.task_file`).
    Several files (e.g. clean and recovery demonstrations of one task) are written one after
    the other into one buffer; their env metadata must agree (``filter_key`` applies to each).
    ``overwrite`` replaces only a buffer this package wrote, never a source
    (:func:`~cm_policy.data.outputs.prepare_output`).
    """
    from tqdm import tqdm

    from cm_policy.envs.robosuite_env import (
        CONTROL_HZ,
        IMAGE_KEYS,
        LOW_DIM_KEYS,
        RobosuiteEnv,
        env_to_abs_action,
    )

    out = Path(out)
    keys = list(LOW_DIM_KEYS) + (list(IMAGE_KEYS) if image else [])
    sources = [hdf5_path] if isinstance(hdf5_path, (str, Path)) else list(hdf5_path)
    if not sources:
        raise ValueError("convert_to_zarr needs at least one HDF5 file")
    prepare_output(out, overwrite, sources=sources)
    started = time.perf_counter()
    datasets: list[RobomimicDataset] = []
    try:
        datasets += [RobomimicDataset(path) for path in sources]
        env_meta = datasets[0].env_meta
        selected = []
        for dataset in datasets:
            if dataset.env_meta != env_meta:
                raise DatasetError(
                    f"{dataset.path}: env_args differ from {datasets[0].path}'s (env "
                    f"{dataset.env_meta.get('env_name')!r} vs {env_meta.get('env_name')!r}); "
                    "one buffer holds one task with one controller"
                )
            try:
                dataset.check_obs_keys(keys)
            except DatasetError as exc:
                hint = " (image=true needs a dataset recorded with images)" if image else ""
                raise DatasetError(f"{exc}{hint}") from None
            names = dataset.mask(filter_key) if filter_key else dataset.demo_names
            selected += [(dataset, name) for name in names]
        replay_env = None
        already_absolute = controller_is_absolute(env_meta)
        if abs_action and not already_absolute:
            replay_env = RobosuiteEnv(env_meta=env_meta, obs_type="lowdim")
        with atomic_directory(out) as tmp:
            buffer = ReplayBuffer.create(tmp)
            try:
                for dataset, name in tqdm(
                    selected, desc="convert", unit="demo", disable=not progress
                ):
                    demo = dataset.demo(name, obs_keys=keys)
                    episode = {k: demo["obs"][k] for k in keys}
                    for k in LOW_DIM_KEYS:
                        episode[k] = episode[k].astype(np.float32)
                    action = demo["actions"]
                    if abs_action and already_absolute:
                        action = env_to_abs_action(action)
                    elif abs_action:
                        action = delta_to_abs_actions(
                            replay_env, demo["states"], action, demo["model_xml"]
                        )
                    episode["action"] = action.astype(np.float32)
                    buffer.add_episode(episode)
            finally:
                if replay_env is not None:
                    replay_env.close()
            (tmp / ENV_ARGS_FILE).write_text(json.dumps(env_meta, indent=2))
            write_task_file(
                tmp,
                made_by="the conversion from robomimic HDF5",
                location=out,
                control_hz=CONTROL_HZ,
                control_hz_source="robomimic's control rate",
            )
            buffer.close()  # its manifest, before the folder is renamed into place
    finally:
        for dataset in datasets:
            dataset.close()
    stats = {
        "sources": [str(path) for path in sources],
        "episodes": len(selected),
        "steps": buffer.n_steps,
        "keys": [*keys, "action"],
        "abs_action": abs_action,
        "task_file": str(out / TASK_FILE),
        "wall_s": time.perf_counter() - started,
    }
    return stats
