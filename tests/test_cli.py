"""The command line: errors a user makes get a short message and exit status 2, not a
traceback; --debug (or CM_POLICY_DEBUG=1) shows the traceback."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from cm_policy.cli import UsageError, run_command
from cm_policy.configs import config_dir

CLI = [sys.executable, "-m", "cm_policy.cli"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "CM_POLICY_DEBUG": "0", **(env or {})},
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["data", "info", "/nonexistent/missing.zarr"], "no dataset at /nonexistent/missing.zarr"),
        (["eval", "checkpoint=/nonexistent/run"], "checkpoint folder /nonexistent/run does not"),
        (["train", "task=nosuch"], "Could not find 'task/nosuch'"),
        (["eval", "checkpoint=/tmp", "nosuchkey=1"], "Could not override 'eval.nosuchkey'"),
        (["data", "generate", "nosuch"], "no data generate for 'nosuch'"),
        (["data", "generate", "pusht", "nn=3"], "unknown key 'nn' for cm-policy data generate"),
        (["data", "generate", "pusht", "n=many"], "n=many: expected an integer"),
        (["data", "generate", "robomimic", "n=2"], "data generate robomimic needs task=..."),
    ],
)
def test_user_errors_are_one_message_not_a_traceback(args: list[str], message: str):
    done = run(*args)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.startswith("error: ")
    assert message in done.stderr
    assert len(done.stderr.splitlines()) <= 20  # Hydra's unknown choice lists the available ones


def test_unknown_choice_lists_the_available_ones():
    stderr = run("train", "task=nosuch").stderr
    assert "Available options in 'task'" in stderr and "pusht_keypoints" in stderr


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(how: str, tmp_path: Path):
    missing = str(tmp_path / "missing.zarr")
    if how == "flag":
        done = run("--debug", "data", "info", missing)
    else:
        done = run("data", "info", missing, env={"CM_POLICY_DEBUG": "1"})
    assert done.returncode == 1 and "Traceback" in done.stderr and missing in done.stderr


# --- data generate / data convert: config/generate/<task>.yaml, config/convert/<source>.yaml ----
# Read here with Hydra itself (not through the CLI's helpers), so that a default the CLI wrote
# anywhere but in these files shows as a difference.
DATA_CONFIGS = [
    (command, path.stem)
    for command in ("generate", "convert")
    for path in sorted((config_dir() / command).glob("*.yaml"))
]
REQUIRED = {"task": "lift"}  # values for the keys without a default (???)


def yaml_options(command: str, name: str, overrides: Sequence[str] = (), resolve: bool = True):
    """config/<command>/<name>.yaml composed by Hydra: {key: value}."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(f"{command}/{name}", overrides=[f"{command}.{o}" for o in overrides])
    return OmegaConf.to_container(cfg[command], resolve=resolve)


def shown(value) -> str:
    """A value as a command line writes it."""
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


def required_args(command: str, name: str) -> list[str]:
    raw = yaml_options(command, name, resolve=False)
    return [f"{key}={REQUIRED[key]}" for key, value in raw.items() if value == "???"]


def capture_options(monkeypatch: pytest.MonkeyPatch, command: str, name: str) -> dict:
    """Replace the generator or converter of ``name`` by one that records its options."""
    from cm_policy.data.formats import data_formats
    from cm_policy.tasks import task_type

    seen: dict = {}
    owner = data_formats().get(name) if command == "convert" else None
    owner = owner or task_type(name)
    if command == "generate":
        monkeypatch.setattr(owner, "generate", classmethod(lambda cls, opts: seen.update(opts)))
    else:
        record = classmethod(lambda cls, sources, out, opts: seen.update(opts) or {"out": out})
        monkeypatch.setattr(owner, "convert", record)
    return seen


def data_command(command: str, name: str, args: Sequence[str], tmp_path: Path) -> list[str]:
    paths = [str(tmp_path / "in"), str(tmp_path / "out.zarr")] if command == "convert" else []
    return ["data", command, name, *paths, *args]


def test_every_generator_and_converter_has_a_config():
    assert {name for command, name in DATA_CONFIGS if command == "generate"} >= {
        "pusht",
        "pusht_twogoal",
        "robomimic",
    }
    assert {name for command, name in DATA_CONFIGS if command == "convert"} >= {
        "lerobot",
        "robomimic",
    }


@pytest.mark.parametrize(("command", "name"), DATA_CONFIGS)
def test_the_defaults_come_from_the_config(command, name, monkeypatch, tmp_path):
    """What the generator or converter gets with no options but the required ones is the
    config's content, resolved (robomimic's out names the task)."""
    seen = capture_options(monkeypatch, command, name)
    required = required_args(command, name)
    run_command(data_command(command, name, required, tmp_path))
    assert seen == yaml_options(command, name, required)


def test_overrides_are_typed_and_keep_comma_values(monkeypatch, tmp_path):
    seen = capture_options(monkeypatch, "convert", "lerobot")
    args = ["keys=observation.state,observation.images.top", "resize=96,96", "overwrite=true"]
    run_command(data_command("convert", "lerobot", args, tmp_path))
    assert seen == {
        "keys": "observation.state,observation.images.top",
        "resize": "96,96",
        "overwrite": True,
    }
    seen = capture_options(monkeypatch, "generate", "robomimic")
    run_command(["data", "generate", "robomimic", "task=can", "recovery=1", "images=true"])
    assert seen["recovery"] == 1.0 and isinstance(seen["recovery"], float)
    assert seen["out"] == "data/robomimic_can.hdf5" and seen["images"] is True
    for bad in ("images=maybe", "n=1.5", "out=null", "seed=[1,2]"):
        with pytest.raises(UsageError, match=f"{re.escape(bad.split('=')[0])}=.*expected"):
            run_command(["data", "generate", "pusht", bad])


@pytest.mark.parametrize(("command", "name"), DATA_CONFIGS)
def test_an_unknown_key_is_refused_with_the_known_keys(command, name, tmp_path):
    keys = list(yaml_options(command, name, resolve=False))
    for arg in ("nosuchkey=1", "+nosuchkey=1"):
        with pytest.raises(UsageError, match=r"unknown key '\+?nosuchkey'") as refused:
            run_command(data_command(command, name, [arg], tmp_path))
        assert f"its keys: {', '.join(keys)} " in str(refused.value)
        assert f"config/{command}/{name}.yaml" in str(refused.value)


def test_run_takes_the_generator_defaults_from_the_config():
    """cm-policy run fills in its demos settings over config/generate/<task>.yaml."""
    from cm_policy.cli import data_options

    demos = {"n": 3, "images": False, "out": "x.zarr"}
    assert data_options("generate", "pusht", values=demos) == {
        **yaml_options("generate", "pusht"),
        **demos,
    }
    with pytest.raises(UsageError, match="unknown key 'nosuch'"):
        data_options("generate", "pusht", values={"nosuch": 1})


@pytest.mark.parametrize(("command", "name"), DATA_CONFIGS)
def test_help_shows_the_config_defaults(command, name, capsys):
    """``data generate TASK -h``, ``data convert SOURCE -h``, ``data generate -h`` and the
    top-level help show every key with the config's own (unresolved) default."""
    pairs = [f"{k}={shown(v)}" for k, v in yaml_options(command, name, resolve=False).items()]
    run_command(["data", command, name, "-h"])
    one = capsys.readouterr().out
    run_command(["data", command, "-h"])
    every = capsys.readouterr().out
    run_command(["-h"])
    top = " ".join(capsys.readouterr().out.split())  # the usage wraps long lists
    for pair in pairs:
        assert re.search(rf"^    {re.escape(pair)}(\s|$)", one, re.M), (pair, one)
        assert f"    {pair}" in every
        assert f" {pair} " in f" {top.replace('[', ' ').replace(']', ' ')} "
    titles = {f"cm-policy data {c} {n}: " for c, n in DATA_CONFIGS if c == command}
    assert {t for t in titles if t in one} == {f"cm-policy data {command} {name}: "}
    assert {t for t in titles if t in every} == titles


def test_the_help_follows_an_edited_config(monkeypatch, tmp_path, capsys):
    """A default changed in the YAML changes what the command gets and what its help says."""
    import shutil

    import cm_policy.cli

    copy = tmp_path / "config"
    shutil.copytree(config_dir(), copy)
    yaml = copy / "generate/pusht.yaml"
    text = yaml.read_text()
    assert "\nworkers: 2 " in text
    yaml.write_text(text.replace("\nworkers: 2 ", "\nworkers: 7 "))
    monkeypatch.setattr(cm_policy.cli, "config_dir", lambda: copy)
    seen = capture_options(monkeypatch, "generate", "pusht")
    run_command(["data", "generate", "pusht"])
    assert seen["workers"] == 7
    run_command(["data", "generate", "pusht", "-h"])
    assert "    workers=7 " in capsys.readouterr().out
    run_command(["-h"])
    assert " workers=7 " in capsys.readouterr().out


def test_usage_reads_the_command_defaults_from_the_configs(capsys):
    """The top-level help states no default of its own: each key=value it shows for eval, serve
    and export is that config's default, and eval's n_envs (the task's) is not given a number."""
    from cm_policy.cli import USAGE

    run_command(["-h"])
    text = capsys.readouterr().out
    placeholders = re.findall(r"\{(eval|serve|export)\.(\w+)\}", USAGE)
    assert len(placeholders) >= 10
    for group, key in placeholders:
        value = OmegaConf.load(config_dir() / group / "default.yaml")[key]
        assert f"{key}={shown(value)}" in text
    assert not re.search(r"\{(generate|convert|eval|serve|export)[.}]", text), "not filled in"
    assert "n_envs=N" in text
    assert not re.search(r"\b\w+=\d", USAGE), "a number written into USAGE"
