"""The ``cm-policy`` command: data, train, eval and the end-to-end ``run`` job."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"

USAGE = """cm-policy <command> [key=value ...]

commands:
  data info PATH                      keys, shapes, episodes and length statistics of a dataset
  data generate pusht [n=100 out=data/pusht_generated.zarr seed=0 workers=2 images=true]
                                      plan PushT demonstrations offline (keeps successful ones)
  data generate robomimic task=lift|can|square [n=200 out=data/robomimic_<task>.hdf5 seed=0
       images=false recovery=0 recovery_kind=push]
                                      scripted-expert demos in robomimic's HDF5 layout (+ .zarr);
                                      recovery=F: that fraction starts from a disturbed state
                                      (push: gripper pushed off course; regrasp: a missed grasp)
  data convert robomimic IN.hdf5 [IN2.hdf5 ...] OUT.zarr [abs_action=false image=false
       filter_key=NAME]               robomimic HDF5 datasets (one task) as one zarr buffer
  train [task=... method=... model=... key=value ...]
                                      train a policy (Hydra overrides of config/config.yaml);
                                      data-parallel under torchrun --nproc_per_node=N
  eval checkpoint=PATH [steps=1 n_episodes=50 start_seed=100000 n_envs=2 n_videos=4 out=DIR
       sampler=ddpm|ddim device=auto n_action_steps=N]
                                      closed-loop evaluation of a checkpoint on the test seeds
  run [key=value ...]                 the end-to-end job: demos -> train -> eval -> report
  serve checkpoint=PATH [host=127.0.0.1 port=8765 max_batch=64 batch_wait_ms=2 threads=1]
                                      serve a checkpoint as a WebSocket action server
"""


def compose(config_name: str, overrides: Sequence[str]) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    OmegaConf.resolve(cfg)
    return cfg


def parse_pairs(args: Sequence[str], allowed: dict[str, type]) -> dict:
    """``key=value`` arguments, converted to the allowed keys' types."""
    out = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or key not in allowed:
            raise SystemExit(
                f"error: expected key=value with key in {sorted(allowed)}, got {arg!r}"
            )
        kind = allowed[key]
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise SystemExit(f"error: {key} must be true or false, got {value!r}")
            out[key] = value.lower() in ("true", "1")
        else:
            try:
                out[key] = kind(value)
            except ValueError:
                raise SystemExit(f"error: {key} must be {kind.__name__}, got {value!r}") from None
    return out


def cmd_data(args: list[str]) -> None:
    if args[:1] == ["info"] and len(args) == 2:
        from cm_policy.data.replay_buffer import describe

        print(describe(args[1]))
        return
    if args[:2] == ["generate", "pusht"]:
        opts = parse_pairs(
            args[2:], {"n": int, "out": str, "seed": int, "workers": int, "images": bool}
        )
        from cm_policy.data.pusht_demos import generate_pusht_dataset

        generate_pusht_dataset(
            opts.get("out", "data/pusht_generated.zarr"),
            n_episodes=opts.get("n", 100),
            seed=opts.get("seed", 0),
            workers=opts.get("workers", 2),
            images=opts.get("images", True),
        )
        return
    if args[:2] == ["generate", "robomimic"]:
        generate_robomimic(args[2:])
        return
    paths = [a for a in args[2:] if "=" not in a]
    if args[:2] == ["convert", "robomimic"] and len(paths) >= 2:
        convert_robomimic(paths[:-1], paths[-1], [a for a in args[2:] if "=" in a])
        return
    raise SystemExit(
        "usage: cm-policy data info PATH | cm-policy data generate pusht|robomimic [k=v ...] | "
        "cm-policy data convert robomimic IN.hdf5 OUT.zarr [k=v ...]"
    )


def generate_robomimic(args: list[str]) -> None:
    opts = parse_pairs(
        args,
        {
            "task": str,
            "n": int,
            "out": str,
            "seed": int,
            "images": bool,
            "overwrite": bool,
            "recovery": float,
            "recovery_kind": str,
        },
    )
    if "task" not in opts:
        raise SystemExit("error: cm-policy data generate robomimic needs task=lift|can|square")
    from cm_policy.envs.robomimic_experts import generate_robomimic_dataset

    task = opts["task"]
    generate_robomimic_dataset(
        task,
        opts.get("out", f"data/robomimic_{task}.hdf5"),
        n_episodes=opts.get("n", 200),
        seed=opts.get("seed", 0),
        images=opts.get("images", False),
        overwrite=opts.get("overwrite", False),
        recovery=opts.get("recovery", 0.0),
        recovery_kind=opts.get("recovery_kind", "push"),
    )


def convert_robomimic(sources: list[str], out: str, args: list[str]) -> None:
    opts = parse_pairs(
        args, {"abs_action": bool, "image": bool, "filter_key": str, "overwrite": bool}
    )
    from cm_policy.data.robomimic_hdf5 import convert_to_zarr

    stats = convert_to_zarr(sources, out, **opts)
    print(json.dumps(stats, indent=2))


def cmd_train(args: list[str]) -> Path:
    from cm_policy.training.trainer import train

    return train(compose("config", args))


def cmd_eval(args: list[str]) -> dict:
    opts = parse_pairs(
        args,
        {
            "checkpoint": str,
            "steps": int,
            "n_episodes": int,
            "start_seed": int,
            "n_envs": int,
            "n_videos": int,
            "max_steps": int,
            "out": str,
            "weights": str,
            "sampler": str,
            "device": str,
            "n_action_steps": int,
        },
    )
    if "checkpoint" not in opts:
        raise SystemExit("error: cm-policy eval needs checkpoint=PATH")
    from cm_policy.evaluation.runner import evaluate_policy
    from cm_policy.training.checkpoint import load_policy, resolve_checkpoint

    weights = opts.get("weights", "ema")
    folder = resolve_checkpoint(opts["checkpoint"], weights)
    policy = load_policy(folder, weights=weights, device=opts.get("device", "auto"))
    if "sampler" in opts:  # the diffusion baseline's ddpm | ddim
        if not hasattr(policy.method, "sampler"):
            raise SystemExit(f"error: method {policy.method.name} has no sampler= choice")
        policy.method.sampler = opts["sampler"]
    if "n_action_steps" in opts:
        try:
            policy.set_n_action_steps(opts["n_action_steps"])
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None
    steps = opts.get("steps", policy.method.default_steps)
    start, n = opts.get("start_seed", 100000), opts.get("n_episodes", 50)
    tag = f"{opts['sampler']}{steps}" if "sampler" in opts else f"steps{steps}"
    if "n_action_steps" in opts:
        tag += f"_exec{policy.n_action_steps}"
    out = Path(opts.get("out", folder.parent.parent / "eval" / f"{folder.name}_{tag}"))
    metrics = evaluate_policy(
        policy,
        list(range(start, start + n)),
        out,
        steps=steps,
        max_steps=opts.get("max_steps", policy.spec["task"].get("max_steps", 300)),
        n_envs=opts.get("n_envs", 2),
        n_videos=opts.get("n_videos", 4),
        extra={
            "checkpoint": str(folder),
            "weights": weights,
            "n_action_steps": policy.n_action_steps,
        },
    )
    print(json.dumps(metrics, indent=2))
    print(f"wrote {out}/metrics.json, episodes.json, summary.png and videos/")
    return metrics


def cmd_run(args: list[str]) -> Path:
    from cm_policy.data.pusht_demos import generate_pusht_dataset
    from cm_policy.training.checkpoint import load_policy
    from cm_policy.training.distributed import world_size
    from cm_policy.training.plots import plot_learning_curves
    from cm_policy.training.report import write_report
    from cm_policy.training.trainer import run_eval, train

    if world_size() > 1:
        raise SystemExit(
            "error: cm-policy run is a single-process job; under torchrun, use cm-policy train"
        )
    cfg = compose("quickstart", args)
    dataset = Path(cfg.task.dataset_path)
    if not dataset.exists():
        print(f"no dataset at {dataset}: generating {cfg.demos.n_episodes} PushT demos")
        generate_pusht_dataset(
            dataset,
            n_episodes=cfg.demos.n_episodes,
            seed=cfg.demos.seed,
            workers=cfg.demos.workers,
            images=bool(cfg.demos.images) or cfg.task.obs_type == "image",
        )
    run_dir = train(cfg)
    policy = load_policy(run_dir, weights="ema")
    metrics = run_eval(cfg, policy, run_dir / "eval_final")
    plot_learning_curves(run_dir)
    report = write_report(run_dir, cfg, metrics)
    print(json.dumps(metrics, indent=2))
    print(f"report: {report}")
    return run_dir


def cmd_serve(args: list[str]) -> None:
    opts = parse_pairs(
        args,
        {
            "checkpoint": str,
            "host": str,
            "port": int,
            "max_batch": int,
            "batch_wait_ms": float,
            "threads": int,
            "max_steps": int,
            "max_message_mb": float,
            "weights": str,
            "device": str,
        },
    )
    if "checkpoint" not in opts:
        raise SystemExit("error: cm-policy serve needs checkpoint=PATH")
    from cm_policy.serve import server
    from cm_policy.training.checkpoint import load_policy, resolve_checkpoint

    weights = opts.get("weights", "ema")
    folder = resolve_checkpoint(opts["checkpoint"], weights)
    policy = load_policy(folder, weights=weights, device=opts.get("device", "auto"))

    def announce(host: str, port: int) -> None:
        print(
            f"serving {folder} ({policy.method.name}, {policy.method.default_steps} step(s), "
            f"{next(policy.parameters()).device}) on "
            f"ws://{host}:{port}, health at http://{host}:{port}{server.HEALTH_PATH}",
            flush=True,
        )

    server.run_server(
        policy,
        host=opts.get("host", server.DEFAULT_HOST),
        port=opts.get("port", server.DEFAULT_PORT),
        threads=opts.get("threads", 1),
        on_ready=announce,
        max_batch=opts.get("max_batch", server.DEFAULT_MAX_BATCH),
        batch_wait_ms=opts.get("batch_wait_ms", server.DEFAULT_BATCH_WAIT_MS),
        max_steps=opts.get("max_steps", server.DEFAULT_MAX_STEPS),
        max_message_bytes=int(
            opts.get("max_message_mb", server.DEFAULT_MAX_MESSAGE_BYTES / 2**20) * 2**20
        ),
    )


def main(argv: Sequence[str] | None = None) -> None:
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="cm-policy", usage=USAGE, add_help=True)
    parser.add_argument("command", choices=["data", "train", "eval", "run", "serve"])
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
    }
    commands[command](rest)


if __name__ == "__main__":
    main()
