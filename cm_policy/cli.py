"""The ``cm-policy`` command: data, train, eval, serve and the end-to-end ``run`` job.

``train``, ``run``, ``eval`` and ``serve`` compose the same Hydra configs (``config/``):
``cm-policy eval key=value`` overrides ``config/eval/default.yaml`` and ``cm-policy serve
key=value`` overrides ``config/serve/default.yaml``, the groups that ``config.yaml`` includes as
``eval`` and ``serve``. ``data generate TASK key=value`` and ``data convert SOURCE IN ... OUT
key=value`` override ``config/generate/TASK.yaml`` and ``config/convert/SOURCE.yaml`` (composed
alone: only the data commands use them) and call the task module's generator or the format's (or
task's) converter with the result.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cm_policy.configs import compose, config_dir

# The help of ``cm-policy``: usage() fills in {generate} and {convert} (every generator and
# converter with its keys and their defaults) and {GROUP.KEY} (that key's default in
# config/GROUP/default.yaml) from the configs, so that no default is written here.
USAGE = """cm-policy [--debug] <command> [key=value ...]

Every key=value is a Hydra override of the command's config (config/ in a checkout, the wheel's
cm_policy/_config when installed); the defaults shown are read from those files.

commands:
  data info PATH                      keys, shapes, episodes and length statistics of a dataset,
                                      and its task config (PATH/task.yaml, which data convert
                                      writes: cm-policy train task=PATH/task.yaml trains on it)
  data verify PATH                    decode every chunk of a dataset and check every chunk file
                                      against its manifest (CRC32C, size, SHA-256): one line per
                                      damaged chunk, exit status 2 if any
  data generate TASK [key=value ...]  demonstrations from a task's generator, with the keys of
                                      config/generate/TASK.yaml (their defaults below;
                                      cm-policy data generate TASK -h explains them):
{generate}
  data convert SOURCE IN [IN2 ...] OUT [key=value ...]
                                      recorded datasets as one zarr buffer, with the keys of
                                      config/convert/SOURCE.yaml (their defaults below;
                                      cm-policy data convert SOURCE -h explains them):
{convert}
  train [task=... method=... model=... key=value ...]
                                      train a policy (Hydra overrides of config/config.yaml);
                                      task=NAME (config/task) or task=PATH/task.yaml (a file);
                                      data-parallel under torchrun --nproc_per_node=N
  eval checkpoint=PATH [steps=N sampler=KIND noise=random|zero|mean:K n_episodes={eval.n_episodes}
       start_seed={eval.start_seed} n_envs=N n_videos={eval.n_videos} max_steps=N
       n_action_steps=N device={eval.device} output_dir=DIR]
                                      closed-loop evaluation of a checkpoint (config/eval);
                                      unset, steps and sampler are the method's default, n_envs
                                      and max_steps the task's, n_action_steps the policy's
  run [key=value ...]                 the end-to-end job: demos -> train -> eval -> report
  serve checkpoint=PATH | model=FILE.onnx [backend={serve.backend} host={serve.host}
       port={serve.port} max_batch={serve.max_batch} batch_wait_ms={serve.batch_wait_ms}
       threads={serve.threads} max_infer_steps={serve.max_infer_steps} token_file=PATH
       tls_cert=PEM tls_key=PEM insecure={serve.insecure} max_sessions={serve.max_sessions}
       max_rate=R]
                                      serve a checkpoint (torch) or an exported model (ONNX
                                      Runtime, no torch) as a WebSocket action server
                                      (config/serve); beyond 127.0.0.1 only with a token
                                      (token_file or CM_POLICY_SERVE_TOKEN) and TLS
  campaign PLAN [--jobs N --threads N --runs A,B --seeds 0,1 --report-only --costs-only ...]
                                      a comparison plan (eval/plans/*.yaml) at equal training
                                      compute: trains every run to each mark, resumable,
                                      evaluates, writes the report (cm-policy campaign -h)
  export checkpoint=PATH out=FILE.onnx [weights={export.weights} steps=N sampler=KIND
       opset={export.opset} exporter={export.exporter}]
                                      the whole predict_action (headline sampler) as one ONNX
                                      graph with its spec in the metadata (config/export)
  checkpoints RUN                     a run's checkpoints (RUN: a run folder or its checkpoints
                                      folder): step, time written, size, whether every file
                                      matches its manifest's SHA-256, which one latest names
"""


class UsageError(ValueError):
    """A command line that cannot be run as given (reported in one line, exit status 2)."""


# --- cm-policy data: config/generate/<task>.yaml and config/convert/<source>.yaml ---------------
DATA_COMMANDS = {"generate": "TASK", "convert": "SOURCE"}
HELP_FLAGS = ("-h", "--help")


def data_names(command: str) -> list[str]:
    """The tasks (``generate``) or sources (``convert``) that have a config in that group."""
    return sorted(path.stem for path in (config_dir() / command).glob("*.yaml"))


def check_name(command: str, name: str) -> None:
    names = data_names(command)
    if name not in names:
        raise UsageError(
            f"no data {command} for {name!r}: {DATA_COMMANDS[command]} in {names} "
            f"(config/{command}/*.yaml)"
        )


def compose_data(command: str, name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """``config/<command>/<name>.yaml`` with Hydra overrides of its keys, not resolved (a
    required key, ``???``, may still be missing)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        # A config in the group's folder is composed under the group's name (its package).
        cfg = hydra_compose(
            config_name=f"{command}/{name}", overrides=[f"{command}.{o}" for o in overrides]
        )
    return cfg[command]


def hydra_override(key: str, value: str) -> str:
    """``key=value`` as a Hydra override; a bare comma list (``keys=a,b``, ``resize=96,96``),
    which Hydra would read as a sweep, is one string, as the data commands always took it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType

    line = f"{key}={value}"
    if OverridesParser.create().parse_override(line).value_type != ValueType.SIMPLE_CHOICE_SWEEP:
        return line
    quote = next((q for q in ("'", '"') if q not in value), None)
    if quote is None:
        raise UsageError(f"{line}: quote the value (Hydra's syntax: key='a,b')")
    return f"{key}={quote}{value}{quote}"


def shown(value: Any) -> str:
    """A config value as a command line writes it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def typed(key: str, default: Any, value: Any, where: str) -> Any:
    """``value`` of the type of its ``default`` (the YAML's own value, unresolved: a null, a
    required ``???`` or an interpolation is a string; only a null default takes null)."""
    kind = str if default is None else type(default)
    if value is None and default is None:
        return None
    if kind is bool and value in (0, 1) and not isinstance(value, float):
        value = bool(value)  # images=1 as images=true
    elif kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif kind is str and isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)  # out=2024, which Hydra reads as a number
    if type(value) is not kind:
        expected = KINDS.get(kind, kind.__name__)
        default_is = f"as its default {shown(default)}" if default is not None else "or null"
        raise UsageError(f"{key}={shown(value)}: expected {expected}, {default_is} in {where}")
    return value


def data_options(
    command: str, name: str, args: Sequence[str] = (), values: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The options of ``cm-policy data <command> <name>``: ``config/<command>/<name>.yaml`` with
    the ``key=value`` ``args`` as Hydra overrides, then ``values`` set, resolved; each key one of
    the YAML's and each value of its default's type."""
    check_name(command, name)
    where = f"config/{command}/{name}.yaml"
    defaults = OmegaConf.to_container(compose_data(command, name), resolve=False)
    assert isinstance(defaults, dict)

    def known(key: str) -> str:
        if key not in defaults:
            raise UsageError(
                f"unknown key {key!r} for cm-policy data {command} {name}; its keys: "
                f"{', '.join(defaults)} ({where}; cm-policy data {command} {name} -h)"
            )
        return key

    overrides = []
    for arg in args:
        key, _, value = arg.partition("=")
        overrides.append(hydra_override(known(key), value))
    cfg = compose_data(command, name, overrides)
    for key, value in (values or {}).items():
        cfg[known(key)] = value
    missing = [key for key in defaults if OmegaConf.is_missing(cfg, key)]
    if missing:
        raise UsageError(
            f"cm-policy data {command} {name} needs {' '.join(f'{k}=...' for k in missing)} "
            f"(no default in {where}; cm-policy data {command} {name} -h)"
        )
    opts = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(opts, dict)
    return {key: typed(key, defaults[key], opts[key], where) for key in defaults}


def yaml_notes(path: Path) -> tuple[list[str], dict[str, str]]:
    """A config's leading comment lines and the comment of each top-level key (with its
    continuation lines), those of the configs its defaults list names first."""
    notes: dict[str, str] = {}
    for parent in OmegaConf.load(path).get("defaults") or []:
        parent_path = path.parent / f"{parent}.yaml"
        if isinstance(parent, str) and parent_path.is_file():
            notes.update(yaml_notes(parent_path)[1])
    lines = path.read_text().splitlines()
    header = []
    while lines and lines[0].startswith("#"):
        header.append(lines.pop(0).lstrip("#").strip())
    key = None
    for line in lines:
        entry = re.match(r"(\w+):[^#]*(?:#\s?(.*))?$", line)
        continued = re.match(r"\s+#\s?(.*)$", line)
        if entry:
            key = entry[1]
            if entry[2]:
                notes[key] = entry[2].strip()
        elif continued and key in notes:
            notes[key] += " " + continued[1].strip()
        else:
            key = None
    return header, notes


def data_help(command: str, names: Sequence[str]) -> str:
    """What ``cm-policy data <command> [NAME] -h`` prints: each config's comment, its keys, their
    defaults (read from the config) and their comments."""
    parts = []
    for name in names:
        path = config_dir() / command / f"{name}.yaml"
        defaults = OmegaConf.to_container(compose_data(command, name), resolve=False)
        assert isinstance(defaults, dict)
        header, notes = yaml_notes(path)
        lines = [f"cm-policy data {command} {name}: {path}", *(f"  {h}" for h in header)]
        lines += [
            "  keys and their defaults (key=value sets one, in Hydra's syntax; a key whose default",
            "  is null takes a string; ??? is no default):",
        ]
        for key, value in defaults.items():
            pair = f"{key}={shown(value)}"
            note = textwrap.wrap(notes.get(key, ""), 100 - 36) or [""]
            if len(pair) >= 32:
                lines.append(f"    {pair}")
                pair = ""
            for text in note:
                lines.append(f"    {pair:<32}{text}".rstrip())
                pair = ""
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def data_usage(command: str) -> str:
    """Each of the group's configs as ``NAME [key=default ...]`` for :data:`USAGE`."""
    lines = []
    for name in data_names(command):
        defaults = OmegaConf.to_container(compose_data(command, name), resolve=False)
        assert isinstance(defaults, dict)
        pairs = " ".join(f"{key}={shown(value)}" for key, value in defaults.items())
        lines += textwrap.wrap(
            f"{name} [{pairs}]", 100, initial_indent=" " * 7, subsequent_indent=" " * 9
        )
    return "\n".join(lines)


def usage() -> str:
    """:data:`USAGE` with the defaults read from the configs."""
    groups: dict[str, Any] = {}

    def fill(match: re.Match) -> str:
        group, key = match[1], match[2]
        if key is None:
            return data_usage(group)
        if group not in groups:
            groups[group] = OmegaConf.load(config_dir() / group / "default.yaml")
        return shown(groups[group][key])

    return re.sub(r"\{(generate|convert|eval|serve|export)(?:\.(\w+))?\}", fill, USAGE)


class LazyUsage:
    """argparse's ``usage``: :func:`usage` (which composes the data configs, a fraction of a
    second) made only when argparse shows it, which formats it as ``usage % {"prog": ...}``."""

    def __mod__(self, _: Mapping[str, str]) -> str:
        return usage()


def cmd_data(args: list[str]) -> None:
    if args[:1] == ["info"] and len(args) == 2:
        from cm_policy.data.replay_buffer import describe
        from cm_policy.data.task_file import describe_task

        print(describe(args[1]))
        print(describe_task(args[1]))
        return
    if args[:1] == ["verify"] and len(args) == 2:
        from cm_policy.data.verify import verify_buffer

        report = verify_buffer(args[1])
        print("\n".join(report.lines()))
        report.raise_if_damaged()
        return
    synopsis = (
        "usage: cm-policy data info PATH | cm-policy data verify PATH | "
        "cm-policy data generate TASK [k=v ...] | "
        "cm-policy data convert SOURCE IN [IN2 ...] OUT [k=v ...]; "
        f"TASK in {data_names('generate')}, SOURCE in {data_names('convert')}; "
        "cm-policy data generate [TASK] -h or data convert [SOURCE] -h: the keys and defaults"
    )
    if args[:1] and args[0] in HELP_FLAGS:
        print(synopsis.removeprefix("usage: ").replace("; ", "\n"))
        return
    if len(args) < 1 or args[0] not in DATA_COMMANDS:
        raise UsageError(synopsis)
    command, rest = args[0], args[1:]
    if any(a in HELP_FLAGS for a in rest):
        named = [a for a in rest if a not in HELP_FLAGS]
        if named:
            check_name(command, named[0])
        print(data_help(command, named[:1] or data_names(command)))
        return
    if not rest:
        raise UsageError(synopsis)
    name = rest[0]
    pairs = [a for a in rest[1:] if "=" in a]
    paths = [a for a in rest[1:] if "=" not in a]
    if command == "generate" and not paths:
        from cm_policy.tasks import task_type

        opts = data_options(command, name, pairs)
        task_type(name).generate(opts)
        return
    if command == "convert" and len(paths) >= 2:
        from cm_policy.data.formats import data_formats
        from cm_policy.tasks import task_type

        opts = data_options(command, name, pairs)
        source = data_formats().get(name) or task_type(name)
        print(json.dumps(source.convert(paths[:-1], paths[-1], opts), indent=2))
        return
    raise UsageError(synopsis)


def cmd_train(args: list[str]) -> Path:
    from cm_policy.training.trainer import train

    return train(compose("config", args))


def group_config(group: str, args: Sequence[str]) -> DictConfig:
    """The ``group`` block of the composed config, with ``key=value`` args as its overrides."""
    for arg in args:
        if "=" not in arg:
            raise UsageError(f"expected key=value arguments, got {arg!r}")
    return compose("config", [f"{group}.{arg}" for arg in args])[group]


def load_checkpoint_policy(cfg: DictConfig) -> tuple[Any, Path]:
    """The policy of ``cfg.checkpoint`` (with ``cfg.weights``, on ``cfg.device``) and its folder."""
    from cm_policy.checkpoint import load_policy, resolve_checkpoint

    if not cfg.checkpoint:
        raise UsageError("needs checkpoint=PATH (a run, checkpoints or checkpoint folder)")
    folder = resolve_checkpoint(cfg.checkpoint, cfg.weights)
    return load_policy(folder, weights=cfg.weights, device=cfg.device), folder


def cmd_eval(args: list[str]) -> dict:
    from cm_policy.evaluation.runner import evaluate_config

    ec = group_config("eval", args)
    policy, folder = load_checkpoint_policy(ec)
    if ec.n_action_steps is not None:
        policy.set_n_action_steps(ec.n_action_steps)
    tag = policy.method.label(ec.sampler, ec.steps)
    tag = ("" if ":" in tag else "steps") + tag.replace(":", "")
    if ec.noise != "random":
        tag += f"_noise{ec.noise.replace(':', '')}"
    if ec.n_action_steps is not None:
        tag += f"_exec{policy.n_action_steps}"
    out = Path(ec.output_dir or folder.parent.parent / "eval" / f"{folder.name}_{tag}")
    extra = {
        "checkpoint": str(folder),
        "weights": ec.weights,
        "n_action_steps": policy.n_action_steps,
    }
    metrics = evaluate_config(policy, OmegaConf.to_container(ec), out, extra=extra)
    print(json.dumps(metrics, indent=2))
    print(f"wrote {out}/metrics.json, episodes.json, summary.png and videos/")
    return metrics


def cmd_run(args: list[str]) -> Path:
    from cm_policy.checkpoint import load_policy
    from cm_policy.tasks import load_task
    from cm_policy.training.distributed import world_size
    from cm_policy.training.plots import plot_learning_curves
    from cm_policy.training.report import write_report
    from cm_policy.training.trainer import run_eval, train

    if world_size() > 1:
        raise UsageError("cm-policy run is one process; under torchrun, use cm-policy train")
    cfg = compose("quickstart", args)
    dataset = Path(cfg.task.dataset_path)
    if not dataset.exists():
        task = load_task(cfg.task)
        print(f"no dataset at {dataset}: generating {cfg.demos.n} {task.name} demos")
        # config/generate/<task>.yaml, with the job's demos settings and its dataset path.
        opts = data_options("generate", task.name, values={**cfg.demos, "out": str(dataset)})
        opts["images"] = opts["images"] or bool(cfg.task.image_keys)
        task.generate(opts)
    # The job evaluates the final policy itself (eval_final, with videos, for the report): the
    # trainer keeps only its periodic evaluations (training.eval_every > 0), never a second one.
    run_dir = train(cfg, final_eval=False)
    policy = load_policy(run_dir, weights="ema")
    metrics = run_eval(cfg, policy, run_dir / "eval_final")
    plot_learning_curves(run_dir)
    report = write_report(run_dir, cfg, metrics)
    print(json.dumps(metrics, indent=2))
    print(f"report: {report}")
    return run_dir


def cmd_serve(args: list[str]) -> None:
    """Serve a checkpoint with torch, or an exported model with ONNX Runtime (imports no
    torch: neither does anything this function imports on that path)."""
    from cm_policy.serve import security, server
    from cm_policy.serve.backend import load_backend

    sc = group_config("serve", args)
    if not sc.checkpoint and not sc.model:
        raise UsageError(
            "needs checkpoint=PATH (a run, checkpoints or checkpoint folder) or model=FILE.onnx "
            "(an exported policy: cm-policy export)"
        )
    # Checked before the policy loads: a refusal costs nothing. The token is never printed.
    token = security.resolve_token(sc.token, sc.token_file)
    security.check_exposure(sc.host, token, bool(sc.insecure))
    tls = security.server_ssl_context(sc.tls_cert, sc.tls_key)
    backend = load_backend(
        sc.backend,
        checkpoint=sc.checkpoint,
        model=sc.model,
        weights=sc.weights,
        device=sc.device,
        threads=sc.threads,
    )

    def announce(host: str, port: int) -> None:
        ws, http = ("wss", "https") if tls else ("ws", "http")
        guard = "token required" if token else "no token"
        print(
            f"serving {backend.source} ({backend.describe()}) on "
            f"{ws}://{host}:{port} ({guard}), health at {http}://{host}:{port}"
            f"{server.HEALTH_PATH}",
            flush=True,
        )
        if token and not tls and not security.is_loopback(host):
            print(
                "warning: the token travels unencrypted: add tls_cert=... tls_key=... (or a TLS "
                "proxy in front)",
                flush=True,
            )

    server.run_server(
        backend,
        host=sc.host,
        port=sc.port,
        threads=sc.threads,
        on_ready=announce,
        max_batch=sc.max_batch,
        batch_wait_ms=sc.batch_wait_ms,
        max_infer_steps=sc.max_infer_steps,
        max_message_bytes=int(sc.max_message_mb * 2**20),
        obs_limit=sc.obs_limit,
        token=token,
        max_sessions=sc.max_sessions,
        max_rate=sc.max_rate,
        ssl_context=tls,
    )


def cmd_campaign(args: list[str]) -> None:
    """Run (or report) a campaign plan: :mod:`cm_policy.experiments.campaign`."""
    from cm_policy.experiments.campaign import main as campaign

    campaign(args)


def cmd_export(args: list[str]) -> dict:
    """Export a checkpoint's ``predict_action`` as an ONNX model (config/export)."""
    from cm_policy.export import export_checkpoint

    xc = group_config("export", args)
    if not xc.checkpoint:
        raise UsageError("needs checkpoint=PATH (a run, checkpoints or checkpoint folder)")
    if not xc.out:
        raise UsageError("needs out=FILE.onnx (where to write the model)")
    meta = export_checkpoint(
        xc.checkpoint,
        xc.out,
        weights=xc.weights,
        steps=xc.steps,
        sampler=xc.sampler,
        opset=xc.opset,
        exporter=xc.exporter,
    )
    shown = {k: v for k, v in meta.items() if k not in ("spec", "normalizer")}
    print(json.dumps(shown, indent=2))
    print(
        f"wrote {xc.out}: {meta['method']} ({meta['sampler_label']}), inputs "
        f"{meta['inputs']} -> {meta['output']}; serve it with cm-policy serve model={xc.out}"
    )
    return meta


CHECKPOINTS_USAGE = "usage: cm-policy checkpoints RUN (a run folder or its checkpoints folder)"


def cmd_checkpoints(args: list[str]) -> str:
    """List a run's checkpoints, each checked against its manifest (:mod:`cm_policy.checkpoint`);
    returns what it prints."""
    from cm_policy.checkpoint import describe_checkpoints

    if args[:1] and args[0] in HELP_FLAGS:
        print(CHECKPOINTS_USAGE.removeprefix("usage: "))
        return ""
    if len(args) != 1:
        raise UsageError(f"{CHECKPOINTS_USAGE}, got {args}")
    text = describe_checkpoints(args[0])
    print(text)
    return text


DEBUG_ENV = "CM_POLICY_DEBUG"


def user_error(exc: BaseException) -> str | None:
    """The message of an error a user's input or setup caused (a missing file, a bad value, an
    unknown config choice, a damaged dataset: DatasetError is a ValueError, a module of an
    optional extra not installed), or None for anything else (a bug, whose traceback is worth
    seeing)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(exc, HydraException | OmegaConfBaseException):
        return str(exc).strip()
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        return exc.args[0].strip()  # str(KeyError) is the repr of its key: quotes added
    if isinstance(exc, FileNotFoundError | NotADirectoryError | ValueError | KeyError):
        return str(exc).strip()
    if isinstance(exc, ModuleNotFoundError):
        # Only the modules of pyproject.toml's optional "onnx" extra (export, and serving an
        # exported model): any other missing module is a broken install, worth its traceback.
        if (exc.name or "").partition(".")[0] not in ("onnx", "onnxscript", "onnxruntime"):
            return None
        message = str(exc)
        if "pip install" not in message:  # a bare import error: add what require_onnx_extra says
            message += (
                "; it comes with the optional 'onnx' extra: pip install 'cm-policy[onnx]' "
                "(from a checkout: pip install -e '.[onnx]')"
            )
        return message
    return None


def main(argv: Sequence[str] | None = None) -> None:
    """Run a command; an error caused by the user's input is one short message on stderr and
    exit status 2 (``--debug`` first, or ``CM_POLICY_DEBUG=1``, shows the traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    if argv[:1] == ["--debug"]:
        debug, argv = True, argv[1:]
    try:
        run_command(argv)
    except Exception as exc:
        # A bar the failed command left open would have the message glued to its line and be
        # redrawn after it: close each (the innermost first), which ends its line.
        std = sys.modules.get("tqdm.std")  # not imported: no bar was made
        bars = list(getattr(std.tqdm, "_instances", ())) if std is not None else []
        for bar in sorted(bars, key=lambda b: abs(getattr(b, "pos", 0) or 0), reverse=True):
            try:
                bar.close()
            except Exception:  # a bar whose stream is gone: the error line matters more
                pass
        message = None if debug else user_error(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        print(f"(cm-policy --debug ... or {DEBUG_ENV}=1 shows the traceback)", file=sys.stderr)
        raise SystemExit(2) from None


def check_command(argv: Sequence[str]) -> None:
    """Read a command line (without the program name) as :func:`run_command` would, without
    running it: an unknown command, config group, key, option or data source raises as it would
    there (a UsageError, a Hydra error, SystemExit from an option parser). Paths are not opened,
    except a task file given by its path and a campaign's plan, which the command reads first."""
    argv = list(argv)
    if argv[:1] == ["--debug"]:
        argv = argv[1:]
    if not argv or argv[0] in HELP_FLAGS:
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        raise UsageError(f"unknown command {command!r}; expected one of {list(COMMANDS)}")
    if command == "campaign":
        from cm_policy.experiments.campaign import parse

        parse(rest)
    elif any(a in HELP_FLAGS for a in rest):
        return
    elif command == "checkpoints":
        if len(rest) != 1:
            raise UsageError(f"{CHECKPOINTS_USAGE}, got {rest}")
    elif command == "train":
        compose("config", rest)
    elif command == "run":
        compose("quickstart", rest)
    elif command in ("eval", "serve", "export"):
        group_config(command, rest)
    elif rest[:1] in (["info"], ["verify"]):
        if len(rest) != 2:
            raise UsageError(f"usage: cm-policy data {rest[0]} PATH, got {' '.join(rest)!r}")
    else:
        if not rest or rest[0] not in DATA_COMMANDS or len(rest) < 2:
            raise UsageError(f"not a cm-policy data command: {' '.join(rest)!r}")
        kind, name, more = rest[0], rest[1], rest[2:]
        paths = [a for a in more if "=" not in a]
        if (kind == "generate" and paths) or (kind == "convert" and len(paths) < 2):
            want = "no paths" if kind == "generate" else "IN [IN2 ...] OUT"
            raise UsageError(f"cm-policy data {kind} {name} takes {want}, got {paths}")
        data_options(kind, name, [a for a in more if "=" in a])


COMMANDS = ("data", "train", "eval", "run", "serve", "export", "campaign", "checkpoints")


def run_command(argv: list[str]) -> Any:
    """Run a command line (without the program name); returns what the command returns (a run
    folder, metrics), errors raised as they are."""
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    parser = argparse.ArgumentParser(prog="cm-policy", usage=LazyUsage(), add_help=True)
    parser.add_argument("command", choices=COMMANDS)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return
    command, rest = argv[0], argv[1:]
    parser.parse_args([command])
    commands = {
        "data": cmd_data,
        "train": cmd_train,
        "eval": cmd_eval,
        "run": cmd_run,
        "serve": cmd_serve,
        "export": cmd_export,
        "campaign": cmd_campaign,
        "checkpoints": cmd_checkpoints,
    }
    return commands[command](rest)


if __name__ == "__main__":
    main()
