"""Where the Hydra configs live, and composing them.

The configs are ``config/`` at the top of the repository (the layout users and the README know).
A built wheel carries the same files as the package data ``cm_policy/_config``, so an installed
package composes the same configs without the repository.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

PACKAGE_DIR = Path(__file__).resolve().parent
TASK_GROUP = "task"
TASK_FILE_SUFFIXES = (".yaml", ".yml")


def config_dir() -> Path:
    """The repository's ``config/`` in a checkout (editable install), else the wheel's copy."""
    for candidate in (PACKAGE_DIR.parent / "config", PACKAGE_DIR / "_config"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"cm-policy's configs are missing: expected config.yaml in {PACKAGE_DIR.parent / 'config'}"
        f" (a repository checkout) or {PACKAGE_DIR / '_config'} (an installed wheel)"
    )


def compose(config_name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The resolved config ``config_name`` with Hydra ``key=value`` overrides.

    ``key={...}`` on a field that holds a mapping (e.g. a task's ``low_dim``) REPLACES that
    mapping, as it reads: Hydra itself would merge the two, keeping keys the user left out and
    refusing new ones. Such an override becomes ``~key +key={...}`` when the field exists.

    ``task=PATH`` (ending in ``.yaml``/``.yml``, or holding a path separator) is a task config
    given by its path, such as the ``task.yaml`` a converter writes into its buffer: see
    :func:`task_file_choice`. Every other override applies on top of it as on a named task.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    overrides = [_task_file_override(o) for o in overrides]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        mappings = [o for o in overrides if _mapping_assignment(o)]
        if mappings:
            rest = [o for o in overrides if o not in mappings]
            base = hydra_compose(config_name=config_name, overrides=rest)
            overrides = rest + [
                part
                for o in mappings
                for part in (
                    [f"~{_key(o)}", f"+{o}"]
                    if isinstance(OmegaConf.select(base, _key(o)), DictConfig)
                    else [o]
                )
            ]
        cfg = hydra_compose(config_name=config_name, overrides=overrides)
    OmegaConf.resolve(cfg)
    return cfg


def _key(override: str) -> str:
    return override.split("=", 1)[0]


def _mapping_assignment(override: str) -> bool:
    """``key={...}``: a plain assignment (no +, ~ or @ package) of a mapping literal."""
    key, sep, value = override.partition("=")
    return (
        bool(sep)
        and value.lstrip().startswith("{")
        and not key.startswith(("+", "~"))
        and "@" not in key
    )


def _task_file_override(override: str) -> str:
    """``task=PATH`` as ``task=<its registered name>``; any other override as it is."""
    key, sep, value = override.partition("=")
    if key != TASK_GROUP or not sep or not is_task_path(value):
        return override
    return f"{TASK_GROUP}={task_file_choice(value)}"


def is_task_path(value: str) -> bool:
    """Whether ``task=value`` names a file rather than a config of ``config/task/``."""
    return value.endswith(TASK_FILE_SUFFIXES) or "/" in value or os.sep in value


def load_task_file(path: str | Path) -> dict[str, Any]:
    """A task config file as a mapping: a relative ``dataset_path`` (a plain path, not an
    interpolation) made absolute against the file's folder, ``name`` defaulting to that folder's
    stem (a buffer's own ``task.yaml``: the buffer's name). A relative ``path`` is relative to
    the current directory. Raises FileNotFoundError or ValueError naming the file."""
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(
            f"task={path}: no such task file (expected a YAML task config, e.g. the task.yaml "
            "that cm-policy data convert writes into its buffer)"
        )
    text = path.read_text(errors="replace")
    try:
        # PyYAML for the document's type (OmegaConf reads a bare word as a key), OmegaConf for
        # its values, read as Hydra reads a config file (1e-3 is a number).
        found = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(
            f"task={path}: not readable as YAML ({' '.join(str(exc).split())}); expected a task "
            "config mapping (name, env, dataset_path, ...)"
        ) from None
    if not isinstance(found, dict):
        kind = "nothing" if found is None else f"a {type(found).__name__}"
        raise ValueError(
            f"task={path}: expected a YAML mapping (a task config: name, env, dataset_path, ...), "
            f"found {kind}"
        )
    cfg = OmegaConf.to_container(OmegaConf.create(text), resolve=False)
    assert isinstance(cfg, dict)
    folder = path.parent
    dataset = cfg.get("dataset_path")
    if isinstance(dataset, str) and "${" not in dataset:
        cfg["dataset_path"] = str((folder / dataset).resolve())
    cfg.setdefault("name", folder.stem)
    return cfg


def task_file_choice(path: str | Path) -> str:
    """Register the task file at ``path`` (:func:`load_task_file`) with Hydra's ConfigStore in
    the ``task`` group and return its name there, which ``task=NAME`` then chooses. The name is
    one per resolved path (a file read again replaces its entry)."""
    from hydra.core.config_store import ConfigStore

    cfg = load_task_file(path)
    digest = hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:12]
    name = f"task_file_{digest}"
    ConfigStore.instance().store(group=TASK_GROUP, name=name, node=cfg)
    return name
