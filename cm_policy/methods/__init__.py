"""Training methods: one module each (a :class:`Method` subclass) + ``config/method/<name>.yaml``.

The registry is filled from the modules of this package, so a new method is its module and its
YAML, nothing else. The YAML holds the method's hyper-parameters, the only place they are written.
"""

from __future__ import annotations

import sys
from typing import Any

from omegaconf import OmegaConf

from cm_policy.configs import config_dir
from cm_policy.methods.base import Method
from cm_policy.registry import discover

METHODS: dict[str, type[Method]] = discover(sys.modules[__name__], Method)


def method_type(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {sorted(METHODS)}")
    return METHODS[name]


def method_defaults(name: str) -> dict[str, Any]:
    """The hyper-parameters of ``config/method/<name>.yaml`` (without its ``name``)."""
    method_type(name)
    path = config_dir() / "method" / f"{name}.yaml"
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    assert isinstance(cfg, dict)
    cfg.pop("name", None)
    return cfg


def make_method(name: str, **overrides: Any) -> Method:
    """Method ``name`` with its YAML's hyper-parameters, updated by ``overrides``.

    A checkpoint passes every setting it was trained with; a setting added to the YAML since
    takes the YAML's value, which is the behaviour of the method before the setting existed.
    """
    kwargs = {**method_defaults(name), **overrides}
    return method_type(name)(**kwargs)


__all__ = ["METHODS", "Method", "make_method", "method_defaults", "method_type"]
