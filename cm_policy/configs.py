"""Where the Hydra configs live, and composing them.

The configs are ``config/`` at the top of the repository (the layout users and the README know).
A built wheel carries the same files as the package data ``cm_policy/_config``, so an installed
package composes the same configs without the repository.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

PACKAGE_DIR = Path(__file__).resolve().parent


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
    """The resolved config ``config_name`` with Hydra ``key=value`` overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    OmegaConf.resolve(cfg)
    return cfg
