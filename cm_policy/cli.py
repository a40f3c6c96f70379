"""The ``cm-policy`` command: data, train, eval, serve and the end-to-end ``run`` job.

``train``, ``run``, ``eval`` and ``serve`` compose the same Hydra configs (``config/``):
``cm-policy eval key=value`` overrides ``config/eval/default.yaml`` and ``cm-policy serve
key=value`` overrides ``config/serve/default.yaml``, the groups that ``config.yaml`` includes as
``eval`` and ``serve``. ``data`` dispatches to the task modules' generators and converters.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cm_policy.configs import compose

USAGE = """cm-policy [--debug] <command> [key=value ...]

commands:
  data info PATH                      keys, shapes, episodes and length statistics of a dataset
  data generate TASK [key=value ...]  demonstrations from a task's generator, e.g.
       pusht [n=100 out=data/pusht_generated.zarr seed=0 workers=2 images=true]
                                      plan PushT demonstrations offline (keeps successful ones)
       robomimic task=lift|can|square [n=200 out=data/robomimic_<task>.hdf5 seed=0
       images=false recovery=0 recovery_kind=push]
                                      scripted-expert demos in robomimic's HDF5 layout (+ .zarr);
                                      recovery=F: that fraction starts from a disturbed state
                                      (push: gripper pushed off course; regrasp: a missed grasp)
  data convert TASK IN [IN2 ...] OUT [key=value ...]
       robomimic IN.hdf5 ... OUT.zarr [abs_action=false image=false filter_key=NAME]
                                      robomimic HDF5 datasets (one task) as one zarr buffer
       lerobot SRC [SRC2 ...] OUT.zarr [keys=a,b resize=H,W overwrite=false]
                                      local LeRobotDatasets (v3.0, v2.1) as one zarr buffer
  train [task=... method=... model=... key=value ...]
                                      train a policy (Hydra overrides of config/config.yaml);
                                      data-parallel under torchrun --nproc_per_node=N
  eval checkpoint=PATH [steps=N sampler=KIND noise=random|zero|mean:K n_episodes=50
       start_seed=100000 n_envs=2 n_videos=4 max_steps=N n_action_steps=N device=auto
       output_dir=DIR]                closed-loop evaluation of a checkpoint (config/eval)
  run [key=value ...]                 the end-to-end job: demos -> train -> eval -> report
  serve checkpoint=PATH | model=FILE.onnx [backend=auto host=127.0.0.1 port=8765 max_batch=64
       batch_wait_ms=2 threads=1 max_infer_steps=100]
                                      serve a checkpoint (torch) or an exported model (ONNX
                                      Runtime, no torch) as a WebSocket action server
                                      (config/serve)
  campaign PLAN [--jobs N --threads N --runs A,B --seeds 0,1 --report-only --costs-only ...]
                                      a comparison plan (eval/plans/*.yaml) at equal training
                                      compute: trains every run to each mark, resumable,
                                      evaluates, writes the report (cm-policy campaign -h)
  export checkpoint=PATH out=FILE.onnx [weights=ema steps=N sampler=KIND opset=18
       exporter=auto]                 the whole predict_action (headline sampler) as one ONNX
                                      graph with its spec in the metadata (config/export)
"""


class UsageError(ValueError):
    """A command line that cannot be run as given (reported in one line, exit status 2)."""


def parse_pairs(args: Sequence[str], options: Mapping[str, tuple[type, Any]]) -> dict[str, Any]:
    """``key=value`` arguments of a task's generator or converter, typed, defaults filled in."""
    out = {key: default for key, (_, default) in options.items()}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or key not in options:
            raise UsageError(f"expected key=value with key in {sorted(options)}, got {arg!r}")
        kind = options[key][0]
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise UsageError(f"{key} must be true or false, got {value!r}")
            out[key] = value.lower() in ("true", "1")
        else:
            try:
                out[key] = kind(value)
            except ValueError:
                raise UsageError(f"{key} must be {kind.__name__}, got {value!r}") from None
    return out


def cmd_data(args: list[str]) -> None:
    from cm_policy.data.formats import data_formats
    from cm_policy.tasks import task_type, task_types

    if args[:1] == ["info"] and len(args) == 2:
        from cm_policy.data.replay_buffer import describe

        print(describe(args[1]))
        return
    sources = sorted({*data_formats(), *(n for n, t in task_types().items() if t.convert_options)})
    usage = (
        "usage: cm-policy data info PATH | cm-policy data generate TASK [k=v ...] | "
        "cm-policy data convert SOURCE IN [IN2 ...] OUT [k=v ...]; "
        f"TASK in {sorted(task_types())}, SOURCE in {sources}"
    )
    if len(args) < 2 or args[0] not in ("generate", "convert"):
        raise UsageError(usage)
    pairs = [a for a in args[2:] if "=" in a]
    paths = [a for a in args[2:] if "=" not in a]
    if args[0] == "generate" and not paths:
        task = task_type(args[1])
        task.generate(parse_pairs(pairs, task.generate_options))
        return
    if args[0] == "convert" and len(paths) >= 2:
        source = data_formats().get(args[1]) or task_type(args[1])
        stats = source.convert(paths[:-1], paths[-1], parse_pairs(pairs, source.convert_options))
        print(json.dumps(stats, indent=2))
        return
    raise UsageError(usage)


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
        defaults = {key: default for key, (_, default) in task.generate_options.items()}
        opts = {**defaults, **cfg.demos, "out": str(dataset)}
        opts["images"] = bool(cfg.demos.images) or bool(cfg.task.image_keys)
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
    from cm_policy.serve import server
    from cm_policy.serve.backend import load_backend

    sc = group_config("serve", args)
    if not sc.checkpoint and not sc.model:
        raise UsageError(
            "needs checkpoint=PATH (a run, checkpoints or checkpoint folder) or model=FILE.onnx "
            "(an exported policy: cm-policy export)"
        )
    backend = load_backend(
        sc.backend,
        checkpoint=sc.checkpoint,
        model=sc.model,
        weights=sc.weights,
        device=sc.device,
        threads=sc.threads,
    )

    def announce(host: str, port: int) -> None:
        print(
            f"serving {backend.source} ({backend.describe()}) on "
            f"ws://{host}:{port}, health at http://{host}:{port}{server.HEALTH_PATH}",
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
    if isinstance(exc, FileNotFoundError | NotADirectoryError | ValueError | KeyError):
        return str(exc).strip("'\"")
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
        message = None if debug else user_error(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        print(f"(cm-policy --debug ... or {DEBUG_ENV}=1 shows the traceback)", file=sys.stderr)
        raise SystemExit(2) from None


def run_command(argv: list[str]) -> Any:
    """Run a command line (without the program name); returns what the command returns (a run
    folder, metrics), errors raised as they are."""
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    parser = argparse.ArgumentParser(prog="cm-policy", usage=USAGE, add_help=True)
    parser.add_argument(
        "command", choices=["data", "train", "eval", "run", "serve", "export", "campaign"]
    )
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
    }
    return commands[command](rest)


if __name__ == "__main__":
    main()
