"""Training methods: each one module with ``loss(model, actions, cond)`` and ``sample(...)``."""

from __future__ import annotations

from typing import Any

from cm_policy.methods.base import Method
from cm_policy.methods.isd import ISD

METHODS: dict[str, type[Method]] = {"isd": ISD}


def make_method(name: str, **kwargs: Any) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {sorted(METHODS)}")
    return METHODS[name](**kwargs)


__all__ = ["ISD", "METHODS", "Method", "make_method"]
