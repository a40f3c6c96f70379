"""Speed of the policy on this machine, measured side by side in one run.

- Action latency of ``Policy.predict_action`` at batch 1: one network step (iSD's default) versus
  100 steps of the same network (the cost of DDPM-style sampling with 100 denoising steps).
- One iSD training step with its network passes batched together versus run one by one.

Usage: python eval/bench_policy.py [--model unet_cpu] [--out eval/results/bench_policy.md]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from cm_policy.cli import compose
from cm_policy.data import LinearNormalizer
from cm_policy.evaluation.machine import describe_machine
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="unet_cpu")
    parser.add_argument("--task", default="pusht_keypoints")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--out", default="eval/results/bench_policy.md")
    args = parser.parse_args()
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
    lat1 = timed(lambda: policy.predict_action(obs, steps=1), 200)
    lat100 = timed(lambda: policy.predict_action(obs, steps=100), 10, warmup=1)
    cond = torch.randn(1, policy.obs_encoder.out_dim)
    x = torch.randn(1, cfg.horizon, 2)
    with torch.no_grad():
        bare = timed(lambda: policy.net(x, torch.ones(1), torch.zeros(1), cond), 200)

    batch = args.batch
    actions = torch.rand(batch, cfg.horizon, 2) * 2 - 1
    cond_b = torch.randn(batch, policy.obs_encoder.out_dim)
    opt = torch.optim.AdamW(policy.net.parameters(), lr=1e-5)
    step_times = {}
    for batched in (True, False):
        method = ISD(batch_passes=batched)

        def train_step(method: ISD = method) -> None:
            loss, _ = method.loss(policy.net, actions, cond_b)
            opt.zero_grad()
            loss.backward()
            opt.step()

        step_times[batched] = timed(train_step, 8, warmup=2)

    med = statistics.median
    ms = 1e3
    rows = [
        ("predict_action, batch 1, 1 step (iSD)", med(lat1) * ms),
        ("predict_action, batch 1, 100 steps (DDPM-style cost)", med(lat100) * ms),
        ("bare network forward, batch 1", med(bare) * ms),
        (f"iSD training step, batch {batch}, passes batched", med(step_times[True]) * ms),
        (f"iSD training step, batch {batch}, passes one by one", med(step_times[False]) * ms),
    ]
    lines = [
        "# Policy speed (CPU)",
        "",
        f"Command: `python eval/bench_policy.py --model {args.model} --task {args.task} "
        f"--threads {args.threads} --batch {batch}`",
        "",
        f"Machine: {describe_machine()}, {args.threads} torch threads, no GPU; "
        f"torch {torch.__version__}. "
        f"Network: model `{args.model}` ({n_params / 1e6:.2f}M parameters), task `{args.task}`, "
        f"horizon {cfg.horizon}. Medians of 200 (1 step, bare forward), 10 (100 steps) and 8 "
        "(training steps) timed repeats after warm-up.",
        "",
        "| measurement | median ms |",
        "|---|---|",
        *[f"| {name} | {value:.2f} |" for name, value in rows],
        "",
        f"- 100-step sampling is {med(lat100) / med(lat1):.1f}x slower than one step.",
        f"- One-step `predict_action` costs {med(lat1) / med(bare):.2f}x a bare network forward "
        "(normalisation, observation encoding, noise and un-normalisation around it).",
        f"- Batching the iSD passes: {med(step_times[False]) / med(step_times[True]):.2f}x "
        "faster training step than running them one by one.",
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
