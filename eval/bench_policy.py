"""Speed of the policy on this machine, measured side by side in one run.

- Action latency of ``Policy.predict_action`` at batch 1: one network step (iSD's default) versus
  100 steps of the same network (the cost of DDPM-style sampling with 100 denoising steps).
- One iSD training step with its network passes batched together versus run one by one.
- The serving backends side by side: ``predict_action`` of the torch policy and of its ONNX
  export run by ONNX Runtime (``cm_policy.serve.onnx_policy.OnnxPolicy``, what
  ``cm-policy serve model=FILE.onnx`` runs), at batch 1 and 16, same threads.

Usage: python eval/bench_policy.py [--model unet_cpu] [--parts latency,training,backends]
       [--out eval/results/bench_policy.md]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cm_policy.cli import compose
from cm_policy.data import LinearNormalizer
from cm_policy.evaluation.machine import describe_machine
from cm_policy.methods import make_method
from cm_policy.methods.isd import ISD
from cm_policy.policy import Policy
from cm_policy.training.trainer import policy_spec


def timed(fn, repeats: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def interleaved(fns: dict, rounds: int) -> dict[str, list[float]]:
    """Per-call times of each ``name: (fn, calls_per_round)``, measured in alternating rounds so
    that drifts in the machine's speed (other jobs, clock changes) fall on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, (fn, calls) in fns.items():
            times[name] += timed(fn, calls, warmup=1)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="unet_cpu")
    parser.add_argument("--task", default="pusht_keypoints")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--out", default="eval/results/bench_policy.md")
    parser.add_argument(
        "--parts",
        default="latency,training,backends",
        help="comma-separated: latency (1 vs 100 steps), training (iSD step), backends (torch "
        "vs ONNX Runtime at batch 1 and 16)",
    )
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    unknown = parts - {"latency", "training", "backends"}
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = compose("config", [f"model={args.model}", f"task={args.task}"])
    spec = policy_spec(cfg)
    rng = np.random.default_rng(0)
    dim = next(iter(cfg.task.low_dim.values()))
    key = next(iter(cfg.task.low_dim))
    norm = LinearNormalizer().fit(
        {"action": rng.uniform(0, 512, (512, 2)), key: rng.uniform(0, 512, (512, dim))}
    )
    policy = Policy(spec, norm).eval()
    n_params = sum(p.numel() for p in policy.parameters())
    obs = {key: rng.uniform(0, 512, (1, cfg.n_obs_steps, dim)).astype(np.float32)}
    cond = torch.randn(1, policy.obs_encoder.out_dim)
    x = torch.randn(1, cfg.horizon, 2)

    @torch.no_grad()
    def bare_forward() -> None:
        policy.net(x, torch.ones(1), torch.zeros(1), cond)

    med = statistics.median
    ms = 1e3
    rows: list[tuple[str, float]] = []
    notes: list[str] = []
    how: list[str] = []
    if "latency" in parts:
        latency = interleaved(
            {
                "one": (lambda: policy.predict_action(obs, steps=1), 20),
                "bare": (bare_forward, 20),
                "hundred": (lambda: policy.predict_action(obs, steps=100), 1),
            },
            rounds=10,
        )
        lat1, bare, lat100 = latency["one"], latency["bare"], latency["hundred"]
        rows += [
            ("predict_action, batch 1, 1 step (iSD)", med(lat1) * ms),
            ("predict_action, batch 1, 100 steps (DDPM-style cost)", med(lat100) * ms),
            ("bare network forward, batch 1", med(bare) * ms),
        ]
        how.append(
            "latency: medians of 200 calls (1 step, bare forward; 10 alternating rounds of 20, "
            "20 and 1 call) and 10 (100 steps)"
        )
        notes += [
            f"- 100-step sampling is {med(lat100) / med(lat1):.1f}x slower than one step.",
            f"- One-step `predict_action` costs {med(lat1) / med(bare):.2f}x a bare network "
            "forward (normalisation, observation encoding, noise and un-normalisation around it).",
        ]

    batch = args.batch
    if "training" in parts:
        actions = torch.rand(batch, cfg.horizon, 2) * 2 - 1
        cond_b = torch.randn(batch, policy.obs_encoder.out_dim)
        opt = torch.optim.AdamW(policy.net.parameters(), lr=1e-5)

        def train_step(method: ISD) -> None:
            loss, _ = method.loss(policy.net, actions, cond_b)
            opt.zero_grad()
            loss.backward()
            opt.step()

        batched = make_method("isd", batch_passes=True)
        one_by_one = make_method("isd", batch_passes=False)
        step_times = interleaved(
            {True: (lambda: train_step(batched), 2), False: (lambda: train_step(one_by_one), 2)},
            rounds=5,
        )
        rows += [
            (f"iSD training step, batch {batch}, passes batched", med(step_times[True]) * ms),
            (f"iSD training step, batch {batch}, passes one by one", med(step_times[False]) * ms),
        ]
        how.append("training steps: medians of 10 (5 alternating rounds of 2)")
        ratio = med(step_times[True]) / med(step_times[False])
        notes.append(
            f"- Batching the iSD passes: the batched training step takes {ratio:.2f}x the time of "
            f"the one-by-one step ({'faster' if ratio < 1 else 'slower'} on this machine; the "
            "gain from fewer, larger kernels is expected on a GPU)."
        )

    if "backends" in parts:
        rows_b, notes_b = backend_latency(policy, key, dim, cfg.n_obs_steps, args.threads, rng)
        rows += rows_b
        notes += notes_b
        how.append(
            "backends: medians of 200 calls per row (10 alternating rounds of 20 calls of each "
            "backend and batch size)"
        )

    lines = [
        "# Policy speed (CPU)",
        "",
        f"Command: `python eval/bench_policy.py --model {args.model} --task {args.task} "
        f"--threads {args.threads} --batch {batch} --parts {args.parts}`",
        "",
        f"Machine: {describe_machine()}, {args.threads} torch threads; "
        f"torch {torch.__version__}. "
        f"Network: model `{args.model}` ({n_params / 1e6:.2f}M parameters), task `{args.task}`, "
        f"horizon {cfg.horizon}. After warm-up; {'; '.join(how)}.",
        "",
        "| measurement | median ms |",
        "|---|---|",
        *[f"| {name} | {value:.2f} |" for name, value in rows],
        "",
        *notes,
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


BACKEND_BATCHES = (1, 16)


def backend_latency(
    policy: Policy, key: str, dim: int, n_obs_steps: int, threads: int, rng: np.random.Generator
) -> tuple[list[tuple[str, float]], list[str]]:
    """``predict_action`` of the torch policy and of its ONNX export in ONNX Runtime (one step,
    the export's headline sampler), at batch 1 and 16, interleaved."""
    import onnxruntime

    from cm_policy.export import export_policy
    from cm_policy.serve.onnx_policy import OnnxPolicy

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "policy.onnx"
        meta = export_policy(policy, path)
        onnx_policy = OnnxPolicy(path, threads=threads)
    windows = {
        b: {key: rng.uniform(0, 512, (b, n_obs_steps, dim)).astype(np.float32)}
        for b in BACKEND_BATCHES
    }
    calls = {}
    for b in BACKEND_BATCHES:
        calls[("torch", b)] = (lambda w=windows[b]: policy.predict_action(w), 20)
        calls[("onnx", b)] = (lambda w=windows[b]: onnx_policy.predict_action(w), 20)
    times = interleaved(calls, rounds=10)
    med = statistics.median
    rows = [
        (f"{name} backend predict_action, batch {b}, 1 step", med(times[(name, b)]) * 1e3)
        for b in BACKEND_BATCHES
        for name in ("torch", "onnx")
    ]
    notes = [
        f"- Backends (same policy, {threads} thread(s); ONNX Runtime {onnxruntime.__version__}, "
        f"export by the {meta['exporter']} exporter): ONNX Runtime takes "
        + ", ".join(
            f"{med(times[('onnx', b)]) / med(times[('torch', b)]):.2f}x torch's time at batch {b}"
            for b in BACKEND_BATCHES
        )
        + "."
    ]
    return rows, notes


if __name__ == "__main__":
    main()
