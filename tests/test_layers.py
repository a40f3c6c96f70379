"""The package's layers: every module imports only from its own layer or the layers below.

Imports are read with ``ast`` (module level and inside functions, ``import x`` and
``from x import y``, relative ones too), so a lazy import that runs back up is caught as surely as
one at the top of a file. Dynamic imports (``importlib``, as :mod:`cm_policy.registry` does to
discover tasks and methods) are not seen.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = "cm_policy"
PACKAGE_DIR = Path(__file__).resolve().parents[1] / PACKAGE

# Bottom to top. An entry is a file of the package, or a folder (ending in "/") holding every
# module under it. Why this order:
# - utilities import nothing of the package (atomic.py: the one atomic file write);
# - envs are the simulators (and their scripted experts and planners): they import only each other;
# - data builds datasets out of them (the PushT planner's demos, robomimic demos replayed through
#   robosuite for absolute actions), so it sits above envs;
# - policy is the network (models) and its method's sampling (methods) with the data's
#   normaliser; observations holds the window and request checks that every backend shares;
#   checkpoint saves and loads a Policy;
# - tasks tie an env family to its datasets;
# - deployment (serve, export) runs a saved policy: it needs tasks (a task's control rate) and
#   nothing of evaluation, training or experiments, which sit above it (nothing of theirs
#   imports it);
# - training evaluates its checkpoints; experiments train, evaluate and report; cli drives all.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "utilities",
        ("__init__.py", "atomic.py", "configs.py", "device.py", "registry.py", "stats.py"),
    ),
    ("envs", ("envs/",)),
    ("data", ("data/",)),
    ("models", ("models/",)),
    ("methods", ("methods/",)),
    ("policy", ("policy.py", "observations.py", "checkpoint.py")),
    ("tasks", ("tasks/",)),
    ("deployment", ("serve/", "export.py")),
    ("evaluation", ("evaluation/",)),
    ("training", ("training/",)),
    ("experiments", ("experiments/",)),
    ("cli", ("cli.py",)),
)
LAYER_RANK = {name: rank for rank, (name, _) in enumerate(LAYERS)}


class UnmappedModule(LookupError):
    """A package file that no entry of :data:`LAYERS` holds."""


def layer_of(relative_path: str) -> str:
    """The layer of a file given by its path inside the package (``data/sampler.py``)."""
    for layer, entries in LAYERS:
        for entry in entries:
            if relative_path == entry or (entry.endswith("/") and relative_path.startswith(entry)):
                return layer
    raise UnmappedModule(
        f"{PACKAGE}/{relative_path} belongs to no layer: add it (or its folder) to LAYERS in "
        f"tests/test_layers.py, at or above the layers of the modules it imports"
    )


def module_name(relative_path: str) -> str:
    """The dotted name of a package file: ``data/sampler.py`` -> ``cm_policy.data.sampler``,
    ``data/__init__.py`` -> ``cm_policy.data``."""
    parts = [PACKAGE, *Path(relative_path).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_files() -> dict[str, str]:
    """Every module of the package by dotted name: its path inside the package."""
    files = sorted(p.relative_to(PACKAGE_DIR).as_posix() for p in PACKAGE_DIR.rglob("*.py"))
    return {module_name(f): f for f in files}


def imported_modules(
    source: str, relative_path: str, modules: dict[str, str]
) -> list[tuple[int, str]]:
    """(line, module) for each package module that ``source``, the file at ``relative_path``,
    imports, sorted, once per line: ``from pkg import name`` imports the module ``pkg.name``
    where that is a module of ``modules``, else ``pkg``; relative imports are resolved first."""
    this = module_name(relative_path)
    package = this if relative_path.endswith("__init__.py") else this.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source, filename=relative_path)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # level 1 is the file's own package, each level more one up
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.append((node.lineno, submodule if submodule in modules else base))
    return sorted({(line, name) for line, name in found if name.split(".")[0] == PACKAGE})


def owning_file(module: str, modules: dict[str, str]) -> str:
    """The file of ``module``, or of the nearest package above it that exists (an import of a
    name that is no module still ties the importer to the package that holds it)."""
    name = module
    while name not in modules:
        name, dot, _ = name.rpartition(".")
        if not dot:
            raise UnmappedModule(f"{module} is no module of {PACKAGE}")
    return modules[name]


def upward_imports(source: str, relative_path: str, modules: dict[str, str]) -> list[str]:
    """One line per import in ``source`` of a module from a higher layer than the file's own."""
    own = layer_of(relative_path)
    problems = []
    for line, target in imported_modules(source, relative_path, modules):
        target_layer = layer_of(owning_file(target, modules))
        if LAYER_RANK[target_layer] > LAYER_RANK[own]:
            problems.append(
                f"{PACKAGE}/{relative_path}:{line} imports {target}: layer {own!r} "
                f"(#{LAYER_RANK[own]}) must not import layer {target_layer!r} "
                f"(#{LAYER_RANK[target_layer]}), which sits above it"
            )
    return problems


def test_every_module_belongs_to_a_layer():
    unmapped = []
    for relative_path in package_files().values():
        try:
            layer_of(relative_path)
        except UnmappedModule as exc:
            unmapped.append(str(exc))
    assert not unmapped, "\n".join(unmapped)


def test_every_layer_entry_names_a_file_or_folder_of_the_package():
    stale = [
        f"LAYERS entry {entry!r} of layer {layer!r}: {PACKAGE}/{entry} does not exist"
        for layer, entries in LAYERS
        for entry in entries
        if not (PACKAGE_DIR / entry).exists()
    ]
    assert not stale, "\n".join(stale)


def test_no_module_imports_from_a_higher_layer():
    modules = package_files()
    problems = []
    for relative_path in modules.values():
        source = (PACKAGE_DIR / relative_path).read_text()
        problems += upward_imports(source, relative_path, modules)
    assert not problems, "imports that run back up the layers:\n" + "\n".join(problems)


def test_the_checker_reports_upward_imports_of_every_form():
    source = """\
import numpy as np
from cm_policy.envs.pusht import PushTEnv
from cm_policy import stats

import cm_policy.training.trainer


def late():
    from cm_policy.evaluation.runner import run_episodes
    from ..serve import server
    from .. import cli
    return run_episodes, server, cli
"""
    problems = upward_imports(source, "data/fake.py", package_files())
    assert [p.split(" imports ")[0] for p in problems] == [
        "cm_policy/data/fake.py:5",
        "cm_policy/data/fake.py:9",
        "cm_policy/data/fake.py:10",
        "cm_policy/data/fake.py:11",
    ], problems
    expected = "cm_policy.serve.server: layer 'data' (#2) must not import layer 'deployment'"
    assert expected in problems[2], problems[2]
    assert "imports cm_policy.cli: layer 'data'" in problems[3], problems[3]


def test_the_checker_fails_on_an_unmapped_module():
    with pytest.raises(UnmappedModule, match=r"add it \(or its folder\) to LAYERS"):
        layer_of("newcomer.py")


def heavy_imports(module: str) -> list[str]:
    """Which of gymnasium, tqdm and torch a fresh interpreter has loaded after importing
    ``module``."""
    probe = (
        f"import sys, {module}; "
        "print(' '.join(m for m in ('gymnasium', 'tqdm', 'torch') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"importing {module} failed:\n{result.stderr}"
    return result.stdout.split()


def test_the_action_server_imports_no_gymnasium_tqdm_or_torch():
    # The runner does import them: the probe would see them if the server did.
    assert {"gymnasium", "tqdm"} <= set(heavy_imports("cm_policy.evaluation.runner"))
    assert heavy_imports("cm_policy.serve.server") == []
