"""Registries filled by discovery: every module of a package that defines a subclass of a base
class with a ``name`` registers it, so adding a method or a task is adding its module (and its
config), with no list to edit."""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType
from typing import TypeVar

T = TypeVar("T")


def discover(package: ModuleType, base: type[T]) -> dict[str, type[T]]:
    """``{cls.name: cls}`` for the named subclasses of ``base`` defined in ``package``'s modules."""
    found: dict[str, type[T]] = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, base)
                and value.__module__ == module.__name__
                and getattr(value, "name", "")
            ):
                if value.name in found:
                    raise RuntimeError(
                        f"two {base.__name__}s are named {value.name!r}: "
                        f"{found[value.name].__module__} and {module.__name__}"
                    )
                found[value.name] = value
    return found
