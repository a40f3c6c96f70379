"""Performance benchmarks, measured side by side in one run -> eval/results/bench.md (+ PNG).

1. Action latency (``Policy.predict_action``) at batch 1 and 64: every sampler setting a
   comparison evaluates (each registered method's ``eval_samplers``: iSD 1, 2 and 4 steps,
   DDPM-100, DDIM-10, flow-16, ...) on the same network, beside a bare network forward pass.
2. Training throughput (samples/s) of one step of each method on the same network and batch.
3. Data pipeline: samples/s of sampler + normaliser + collation at batch 256, and its share of a
   training step (is training input-bound?).
4. Memory: peak RSS of a short training run per configuration and of the action server.

All timings alternate between the variants in rounds, so a slow spell of a shared machine hits
them alike. On a GPU every timing synchronises the device.

Usage:
  python eval/bench.py [--device cpu|cuda] [--model unet_cpu] [--threads 2] [--amp] [--compile]
      [--dataset PATH.zarr] [--out eval/results/bench.md] [--skip-memory] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from cm_policy.cli import compose
from cm_policy.evaluation.machine import describe_machine
from cm_policy.methods import METHODS, make_method
from cm_policy.policy import Policy
from cm_policy.training.data import TrainingData, fit_normalizer
from cm_policy.training.trainer import policy_spec

REAL_PUSHT = Path(__file__).resolve().parents[2] / "shared/data/pusht/pusht_cchi_v7_replay.zarr"


def registered_samplers() -> dict[str, tuple[str, str, int]]:
    """Bench label -> (method name, sampler kind, steps) for every registered method's evaluated
    samplers (its ``eval_samplers``, parsed with its ``parse_label``). A label is
    ``<method>-<steps>`` (``isd-1``), or ``<kind>-<steps>`` for a method with several sampler
    kinds (``ddim-10``); ``<method>:<kind>-<steps>`` where that name is taken already."""
    samplers: dict[str, tuple[str, str, int]] = {}
    for name, cls in sorted(METHODS.items()):
        method = make_method(name)
        for label in cls.eval_samplers:
            kind, steps = method.parse_label(label)
            bench = f"{kind if len(cls.samplers) > 1 else name}-{steps}"
            if bench in samplers:
                bench = f"{name}:{kind}-{steps}"
            samplers[bench] = (name, kind, steps)
    return samplers


SAMPLERS = registered_samplers()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, budget_s: float, rounds: int
) -> dict[str, list[float]]:
    """Per-call seconds of each function, ``rounds`` alternating rounds of ~``budget_s`` each."""
    calls = {}
    for name, fn in fns.items():  # warm up, and size each round to the time budget
        fn()
        synchronize(device)
        started = time.perf_counter()
        fn()
        synchronize(device)
        calls[name] = max(1, int(budget_s / max(time.perf_counter() - started, 1e-6)))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(calls[name]):
                started = time.perf_counter()
                fn()
                synchronize(device)
                times[name].append(time.perf_counter() - started)
    return times


def median_ms(values: list[float]) -> float:
    return 1000 * statistics.median(values)


def build(cfg, device: torch.device, data: TrainingData) -> Policy:
    torch.manual_seed(0)
    return Policy(policy_spec(cfg, data), fit_normalizer(cfg, data).to(device)).to(device).eval()


def latency(policy: Policy, device: torch.device, batch: int, args) -> dict[str, float]:
    rng = np.random.default_rng(0)
    key, dim = next(iter(policy.low_dim.items()))
    obs = {key: rng.uniform(0, 512, (batch, policy.n_obs_steps, dim)).astype(np.float32)}
    methods = {label: (make_method(m), kind, n) for label, (m, kind, n) in SAMPLERS.items()}
    x = torch.randn(batch, policy.horizon, policy.action_dim, device=device)
    cond = torch.randn(batch, policy.obs_encoder.out_dim, device=device)
    t, s = torch.ones(batch, device=device), torch.zeros(batch, device=device)

    @torch.no_grad()
    def bare() -> None:
        policy.net(x, t, s, cond)

    def sampler(label: str) -> Callable[[], object]:
        method, kind, steps = methods[label]

        def run() -> None:
            policy.method = method
            policy.predict_action(obs, steps=steps, sampler=kind)

        return run

    fns = {"bare forward": bare, **{label: sampler(label) for label in SAMPLERS}}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
        times = interleaved(fns, device, budget_s=0.05 if args.quick else 0.3, rounds=5)
    return {name: median_ms(v) for name, v in times.items()}


def training(cfg, device: torch.device, data: TrainingData, args) -> dict[str, float]:
    rng = np.random.default_rng(0)
    batch = args.batch
    idx = data.draw(rng, batch)
    obs, action = data.windows(idx, cfg.n_obs_steps, device)
    fns = {}
    for name in METHODS:
        method_cfg = compose(
            "config", [f"method={name}", f"model={args.model}", f"task={args.task}"]
        )
        torch.manual_seed(0)
        policy = Policy(policy_spec(method_cfg, data), fit_normalizer(cfg, data).to(device)).to(
            device
        )
        policy.method.set_progress(0, 1000)
        if args.compile:
            policy.net.compile()
        optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)

        def step(policy: Policy = policy, optimizer: torch.optim.Optimizer = optimizer) -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
                loss, _ = policy.compute_loss(obs, action)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        fns[name] = step
    times = interleaved(fns, device, budget_s=0.5 if args.quick else 2.0, rounds=3)
    return {name: median_ms(v) for name, v in times.items()}


def pipeline(cfg, device: torch.device, data: TrainingData, step_ms: float) -> dict[str, float]:
    rng = np.random.default_rng(0)
    normalizer = fit_normalizer(cfg, data).to(device)
    keys = list(cfg.task.low_dim)

    def load() -> None:
        obs, action = data.windows(data.draw(rng, 256), cfg.n_obs_steps, device)
        normalizer.normalize("action", action)
        for k in keys:
            normalizer.normalize(k, obs[k])

    times = interleaved({"pipeline": load}, device, budget_s=1.0, rounds=3)["pipeline"]
    ms = median_ms(times)
    return {"batch_ms": ms, "samples_per_s": 256 / (ms / 1000), "share_of_step": ms / step_ms}


MEMORY_SCRIPT = """
import resource, sys, json
from cm_policy.cli import main
main(sys.argv[1:])
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss_training(overrides: list[str], workdir: Path) -> float:
    """Peak resident memory (MiB) of a 5-step `cm-policy train` run in a fresh process (the
    peak comes with the first steps and the checkpoint)."""
    command = [
        sys.executable,
        "-c",
        MEMORY_SCRIPT,
        "train",
        *overrides,
        "training.steps=5",
        "training.checkpoint_every=5",
        "training.log_every=5",
        "training.eval_every=null",
        f"output_dir={workdir}",
    ]
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{' '.join(overrides)} failed:\n{out.stderr[-2000:]}")
    line = next(x for x in out.stdout.splitlines() if x.startswith("PEAK_RSS_KB"))
    return int(line.split()[1]) / 1024


def peak_rss_server(policy: Policy, workdir: Path, n_requests: int = 200) -> float:
    """Peak resident memory (MiB) of `cm-policy serve` after warm-up and n requests."""
    from cm_policy.checkpoint import save_policy
    from cm_policy.serve import PolicyClient
    from cm_policy.serve.launch import spawn_server, stop_server

    save_policy(policy.cpu(), workdir / "ckpt")
    proc, port = spawn_server(workdir / "ckpt", workdir / "server.log")
    try:
        rng = np.random.default_rng(0)
        key, dim = next(iter(policy.low_dim.items()))
        with PolicyClient(f"ws://127.0.0.1:{port}") as client:
            for _ in range(n_requests):
                client.predict_action({key: rng.uniform(0, 512, (1, 2, dim)).astype(np.float32)})
        status = Path(f"/proc/{proc.pid}/status").read_text()
        peak_kb = next(int(x.split()[1]) for x in status.splitlines() if x.startswith("VmHWM"))
    finally:
        stop_server(proc)
    return peak_kb / 1024


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="unet_cpu")
    parser.add_argument("--task", default="pusht_keypoints")
    parser.add_argument("--dataset", default=str(REAL_PUSHT))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256, help="training batch")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--quick", action="store_true", help="short rounds (smoke test)")
    parser.add_argument("--out", default="eval/results/bench.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    overrides = [f"model={args.model}", f"task={args.task}", f"task.dataset_path={args.dataset}"]
    cfg = compose("config", overrides)
    data = TrainingData(cfg)
    policy = build(cfg, device, data)
    n_params = sum(p.numel() for p in policy.net.parameters())

    lat = {b: latency(policy, device, b, args) for b in (1, 64)}
    train_ms = training(cfg, device, data, args)
    pipe = pipeline(cfg, device, data, train_ms["isd"])
    memory: dict[str, float] = {}
    if not args.skip_memory:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            for label, extra in {
                f"train {args.task} unet_cpu batch 256": [
                    f"task={args.task}",
                    "model=unet_cpu",
                    "training.batch_size=256",
                ],
                f"train {args.task} unet_dp batch 256": [
                    f"task={args.task}",
                    "model=unet_dp",
                    "training.batch_size=256",
                ],
                "train pusht_image unet_cpu batch 64": [
                    "task=pusht_image",
                    "model=unet_cpu",
                    "training.batch_size=64",
                ],
            }.items():
                memory[label] = peak_rss_training(
                    [
                        *extra,
                        f"task.dataset_path={args.dataset}",
                        f"training.num_threads={args.threads}",
                    ],
                    root / label.replace(" ", "_"),
                )
            memory["serve (unet_cpu keypoints, after 200 requests)"] = peak_rss_server(
                build(cfg, torch.device("cpu"), data), root
            )

    record = {
        "machine": describe_machine(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": args.threads,
        "model": args.model,
        "batch": args.batch,
        "n_params": n_params,
        "amp": args.amp,
        "compile": args.compile,
        "latency_ms": lat,
        "train_step_ms": train_ms,
        "pipeline": pipe,
        "peak_rss_mib": memory,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2))
    write_markdown(record, out, " ".join(sys.argv[1:]))
    print(out.read_text())


def write_markdown(r: dict, out: Path, argv: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lat, train = r["latency_ms"], r["train_step_ms"]
    lines = [
        "# Benchmarks: latency, training throughput, data pipeline, memory",
        "",
        f"Command: `python eval/bench.py {argv}`",
        "",
        f"Machine: {r['machine']}; device **{r['device']}**; torch {r['torch']}, "
        f"{r['threads']} CPU threads; network `{r['model']}` ({r['n_params'] / 1e6:.2f}M "
        f"parameters), PushT keypoints, horizon 16; bf16 autocast {r['amp']}, torch.compile "
        f"{r['compile']}. Medians over alternating rounds (see the script).",
        "",
        "## Action latency (`predict_action`, one action chunk)",
        "",
        "| sampler | batch 1 (ms) | x bare forward | batch 64 (ms) | x bare forward |",
        "|---|---|---|---|---|",
    ]
    for name in lat[1]:
        lines.append(
            f"| {name} | {lat[1][name]:.2f} | {lat[1][name] / lat[1]['bare forward']:.2f} | "
            f"{lat[64][name]:.2f} | {lat[64][name] / lat[64]['bare forward']:.2f} |"
        )
    speedup = {b: lat[b]["ddpm-100"] / lat[b]["isd-1"] for b in (1, 64)}
    lines += [
        "",
        f"- iSD 1 step is **{speedup[1]:.0f}x** (batch 1) and **{speedup[64]:.0f}x** (batch 64) "
        f"faster than DDPM-100 (target >= 50x), and costs "
        f"**{lat[1]['isd-1'] / lat[1]['bare forward']:.2f}x** / "
        f"**{lat[64]['isd-1'] / lat[64]['bare forward']:.2f}x** a bare forward pass (target "
        "<= 1.2x).",
        "",
        "## Training step (same network and batch, AdamW step included)",
        "",
        "| method | ms / step | samples / s | x ddpm step |",
        "|---|---|---|---|",
    ]
    bsz = r["batch"]
    for name, ms in train.items():
        lines.append(f"| {name} | {ms:.1f} | {bsz / (ms / 1000):.0f} | {ms / train['ddpm']:.2f} |")
    p = r["pipeline"]
    lines += [
        "",
        f"- An iSD step costs **{train['isd'] / train['ddpm']:.2f}x** a DDPM step (target "
        "<= 2.5x; its math needs about 4 network passes against DDPM's 1 forward + 1 backward).",
        "",
        "## Data pipeline (sampler + normaliser + collation, batch 256)",
        "",
        f"{p['samples_per_s']:.0f} samples/s ({p['batch_ms']:.2f} ms per batch of 256): "
        f"{100 * p['share_of_step']:.1f}% of the time of one iSD training step, drawn in the "
        "training process between steps. Training is therefore compute-bound, not input-bound, "
        "on this device.",
        "",
    ]
    if r["peak_rss_mib"]:
        lines += ["## Peak memory (RSS)", "", "| configuration | peak RSS (MiB) |", "|---|---|"]
        lines += [f"| {k} | {v:.0f} |" for k, v in r["peak_rss_mib"].items()]
        lines.append("")
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    names = list(lat[1])
    for i, b in enumerate((1, 64)):
        axes[0].bar(
            np.arange(len(names)) + 0.4 * i, [lat[b][n] for n in names], 0.4, label=f"batch {b}"
        )
    axes[0].set_xticks(np.arange(len(names)) + 0.2, names, rotation=20, fontsize=8)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("ms per action chunk")
    axes[0].legend()
    axes[1].bar(list(train), [bsz / (v / 1000) for v in train.values()], color="tab:green")
    axes[1].set_ylabel("training samples / s")
    fig.suptitle(f"{r['device']}, {r['model']}")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    plt.close(fig)
    lines += [f"![latency and throughput]({out.with_suffix('.png').name})", ""]
    out.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
