"""Training methods: each one module with ``loss(model, actions, cond)`` and ``sample(...)``."""

from __future__ import annotations

from typing import Any

from cm_policy.methods.base import Method
from cm_policy.methods.ddpm import DDPM
from cm_policy.methods.flow import Flow
from cm_policy.methods.ict import ICT
from cm_policy.methods.isd import ISD
from cm_policy.methods.meanflow import MeanFlow

METHODS: dict[str, type[Method]] = {
    "isd": ISD,
    "ddpm": DDPM,
    "flow": Flow,
    "meanflow": MeanFlow,
    "ict": ICT,
}


def make_method(name: str, **kwargs: Any) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {sorted(METHODS)}")
    return METHODS[name](**kwargs)


__all__ = ["DDPM", "ICT", "ISD", "METHODS", "Flow", "MeanFlow", "Method", "make_method"]
