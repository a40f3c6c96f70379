"""Dataset formats that ``cm-policy data convert NAME SRC ... OUT.zarr`` reads, one module each.

A format module defines a :class:`DataFormat` subclass with a ``name`` and ``convert``; it is
found by discovery. Its command-line options and their defaults are the config
``config/convert/<name>.yaml``, so a new format is its module and that file. (A task's own
recordings, such as robomimic's HDF5 files, are converted by the task module instead.)
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, ClassVar


class DataFormat:
    name: ClassVar[str] = ""

    @classmethod
    def convert(cls, sources: list[str], out: str, opts: Mapping[str, Any]) -> Any:
        """Write ``sources`` as one replay buffer at ``out`` with ``opts`` (the options of
        ``config/convert/<name>.yaml`` with the command's overrides); returns what it wrote."""
        raise NotImplementedError


_FORMATS: dict[str, type[DataFormat]] | None = None


def data_formats() -> dict[str, type[DataFormat]]:
    """Every format module's :class:`DataFormat`, by name."""
    global _FORMATS
    if _FORMATS is None:
        from cm_policy.registry import discover

        _FORMATS = discover(sys.modules[__name__], DataFormat)
    return _FORMATS
