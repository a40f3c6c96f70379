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
    """The resolved config ``config_name`` with Hydra ``key=value`` overrides.

    ``key={...}`` on a field that holds a mapping (e.g. a task's ``low_dim``) REPLACES that
    mapping, as it reads: Hydra itself would merge the two, keeping keys the user left out and
    refusing new ones. Such an override becomes ``~key +key={...}`` when the field exists.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    overrides = list(overrides)
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
