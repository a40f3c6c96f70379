"""Action server speed beside the in-process policy, measured in one run (a benchmark, not a test).

- Latency at batch 1, one network step: ``Policy.predict_action`` in this process versus the round
  trip of ``PolicyClient.predict_action`` to a ``cm-policy serve`` subprocess on 127.0.0.1, in
  alternating blocks so that both see the same machine load.
- Throughput for 1, 4, 16 and 64 concurrent clients, each on its own connection sending window-mode
  ``infer`` requests (batch 1, its own (1, n_obs_steps, ...) window, no seed) in a closed loop, so
  the server's micro-batcher can merge them; beside it, in-process ``predict_action`` on one batch
  of as many rows (the ceiling that batching can reach).

Without ``--checkpoint`` the policy is a random-weight ``unet_cpu`` one on the keypoints task (the
speed does not depend on the weights). Targets (issue): round-trip p50 at most 1 ms above
in-process on loopback; 16 clients at least 4x the throughput of 1 client.

Usage: python eval/bench_server.py [--checkpoint PATH] [--clients 1,4,16,64] [--duration 5]
       [--requests 500] [--threads 1] [--device cpu|cuda|auto] [--out eval/results/server.md]
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from websockets.asyncio.client import connect

from cm_policy.checkpoint import load_policy, save_policy
from cm_policy.cli import compose
from cm_policy.data import LinearNormalizer
from cm_policy.evaluation.machine import describe_machine
from cm_policy.policy import Policy
from cm_policy.serve import PolicyClient
from cm_policy.serve.launch import spawn_server, stop_server
from cm_policy.serve.protocol import decode_response, pack
from cm_policy.training.trainer import policy_spec

LATENCY_BLOCK = 50
WARMUP_REQUESTS = 20
THROUGHPUT_WARMUP_S = 0.5
OVERHEAD_TARGET_MS = 1.0
SCALING_CLIENTS, SCALING_TARGET = 16, 4.0
MS = 1e3


def random_checkpoint(folder: Path, model: str) -> Path:
    """A random-weight policy of the keypoints task saved as a checkpoint."""
    torch.manual_seed(0)
    cfg = compose("config", [f"model={model}", "task=pusht_keypoints"])
    rng = np.random.default_rng(0)
    key, dim = next(iter(cfg.task.low_dim.items()))
    norm = LinearNormalizer().fit(
        {"action": rng.uniform(0, 512, (512, 2)), key: rng.uniform(0, 512, (512, dim))}
    )
    policy = Policy(policy_spec(cfg), norm)
    save_policy(policy, folder, step=0)
    return folder


def latencies(
    in_process: Callable[[], object], remote: Callable[[], object], n: int, pace_s: float = 0.0
) -> tuple[list[float], list[float]]:
    """Seconds per call of both, timed in alternating blocks.

    With ``pace_s`` > 0 each call starts on a fixed period, as a controller's loop calls its
    policy, instead of back to back: the process then idles between calls on both sides alike.
    """
    local_s, remote_s = [], []
    for _ in range(WARMUP_REQUESTS):
        in_process()
        remote()
    while len(local_s) < n:
        for fn, out in ((in_process, local_s), (remote, remote_s)):
            tick = time.perf_counter()
            for _ in range(min(LATENCY_BLOCK, n - len(out))):
                if pace_s:
                    tick += pace_s
                    time.sleep(max(0.0, tick - time.perf_counter()))
                start = time.perf_counter()
                fn()
                out.append(time.perf_counter() - start)
    return local_s, remote_s


async def throughput(
    uri: str, request: bytes, n_clients: int, duration: float
) -> tuple[float, float]:
    """Requests per second of ``n_clients`` closed-loop clients, and mean requests per pass."""
    go = asyncio.Event()
    ready: list[bool] = []
    counted: list[int] = []
    merged: list[int] = []
    window: dict[str, float] = {}

    async def client() -> None:
        async with connect(uri, compression=None) as ws:
            await ws.send(pack({"type": "hello"}))
            await ws.recv()
            ready.append(True)
            await go.wait()
            n = 0
            while time.perf_counter() < window["end"]:
                await ws.send(request)
                reply = decode_response(await ws.recv())
                if reply["type"] != "infer":
                    raise RuntimeError(f"server replied {reply}")
                if time.perf_counter() > window["start"]:
                    n += 1
                    merged.append(reply["timing"]["batch_requests"])
            counted.append(n)

    tasks = [asyncio.create_task(client()) for _ in range(n_clients)]
    while len(ready) < n_clients:
        await asyncio.sleep(0.01)
    now = time.perf_counter()
    window.update(start=now + THROUGHPUT_WARMUP_S, end=now + THROUGHPUT_WARMUP_S + duration)
    go.set()
    await asyncio.gather(*tasks)
    return sum(counted) / duration, float(np.mean(merged))


def in_process_rows_per_s(policy: Policy, obs: dict[str, np.ndarray], rows: int) -> float:
    batch = {k: np.repeat(v, rows, axis=0) for k, v in obs.items()}
    policy.predict_action(batch)
    repeats = max(3, 200 // rows)
    start = time.perf_counter()
    for _ in range(repeats):
        policy.predict_action(batch)
    return rows * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", help="default: a random-weight unet_cpu keypoints policy")
    parser.add_argument("--model", default="unet_cpu")
    parser.add_argument("--clients", default="1,4,16,64")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per client count")
    parser.add_argument("--requests", type=int, default=500, help="latency samples per side")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    parser.add_argument(
        "--pace-ms", type=float, default=20.0, help="period of the paced latency run (0: skip)"
    )
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--batch-wait-ms", type=float, default=2.0)
    parser.add_argument(
        "--device", default="cpu", help="where both sides run the policy: cpu | cuda | auto"
    )
    parser.add_argument("--out", default="eval/results/server.md")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(args.checkpoint or random_checkpoint(Path(tmp) / "run", args.model))
        policy = load_policy(checkpoint, device=args.device)
        if policy.image_keys:
            raise SystemExit("this benchmark covers low-dim policies")
        options = [
            f"threads={args.threads}",
            f"max_batch={args.max_batch}",
            f"batch_wait_ms={args.batch_wait_ms}",
            f"device={args.device}",
        ]
        server, port = spawn_server(checkpoint, Path(tmp) / "server.log", *options)
        uri = f"ws://127.0.0.1:{port}"
        try:
            obs = {
                k: np.random.default_rng(0)
                .uniform(0, 512, (1, policy.n_obs_steps, d))
                .astype(np.float32)
                for k, d in policy.low_dim.items()
            }
            with PolicyClient(uri) as client:
                server_ms: list[float] = []

                def remote() -> None:
                    client.predict_action(obs)
                    server_ms.append(client.last_timing["server_ms"])

                local_s, remote_s = latencies(
                    lambda: policy.predict_action(obs), remote, args.requests
                )
                tight_server_ms, server_ms[:] = list(server_ms), []
                paced = None
                if args.pace_ms:
                    paced = latencies(
                        lambda: policy.predict_action(obs),
                        remote,
                        args.requests,
                        pace_s=args.pace_ms / MS,
                    )
                paced_server_ms = list(server_ms)
            request = pack({"type": "infer", "mode": "window", "obs": obs})
            rates = {n: asyncio.run(throughput(uri, request, n, args.duration)) for n in clients}
            ceilings = {n: in_process_rows_per_s(policy, obs, n) for n in clients}
        finally:
            exit_code = stop_server(server)

    p = {q: (np.percentile(local_s, q) * MS, np.percentile(remote_s, q) * MS) for q in (50, 99)}
    overhead = p[50][1] - p[50][0]
    n_params = sum(t.numel() for t in policy.parameters())
    device = next(policy.parameters()).device
    gpu = device.type == "cuda"
    base = rates[clients[0]][0]
    described = f"`{args.checkpoint}`" if args.checkpoint else f"random-weight `{args.model}`"
    lines = [
        "# Action server: latency and throughput",
        "",
        f"Command: `python {shlex.join(sys.argv)}`",
        "",
        f"Machine: {describe_machine()}"
        + (f", GPU {torch.cuda.get_device_name(0)}" if gpu else "")
        + f"; torch {torch.__version__}, policy on {device}, {args.threads} torch "
        f"thread(s) in the server and in-process. Policy: {described} "
        f"({n_params / 1e6:.2f}M parameters), task `{policy.spec['task'].get('name')}`, "
        f"{policy.method.name}, {policy.method.default_steps} step(s). Server: `cm-policy serve "
        f"{' '.join(options)}` on 127.0.0.1 (subprocess), exit code {exit_code} on SIGTERM.",
        "",
        f"## Latency, batch 1 ({args.requests} requests per side, alternating blocks)",
        "",
        "| | p50 ms | p99 ms |",
        "|---|---|---|",
        f"| in-process `predict_action` | {p[50][0]:.3f} | {p[99][0]:.3f} |",
        f"| `PolicyClient.predict_action` round trip | {p[50][1]:.3f} | {p[99][1]:.3f} |",
        f"| of which server-side (receipt to reply) | {np.percentile(tight_server_ms, 50):.3f} | "
        f"{np.percentile(tight_server_ms, 99):.3f} |",
        "",
        f"p50 overhead of the server, calls back to back: {overhead:.3f} ms (target <= "
        f"{OVERHEAD_TARGET_MS} ms: {'met' if overhead <= OVERHEAD_TARGET_MS else 'NOT met'}).",
        "",
    ]
    if paced is not None:
        pp = {
            q: (np.percentile(paced[0], q) * MS, np.percentile(paced[1], q) * MS) for q in (50, 99)
        }
        paced_overhead = pp[50][1] - pp[50][0]
        lines += [
            f"### Paced: one call every {args.pace_ms:g} ms on both sides (a controller's loop)",
            "",
            "| | p50 ms | p99 ms |",
            "|---|---|---|",
            f"| in-process `predict_action` | {pp[50][0]:.3f} | {pp[99][0]:.3f} |",
            f"| `PolicyClient.predict_action` round trip | {pp[50][1]:.3f} | {pp[99][1]:.3f} |",
            f"| of which server-side (receipt to reply) | "
            f"{np.percentile(paced_server_ms, 50):.3f} | "
            f"{np.percentile(paced_server_ms, 99):.3f} |",
            "",
            f"p50 overhead of the server, paced: {paced_overhead:.3f} ms (target <= "
            f"{OVERHEAD_TARGET_MS} ms: "
            f"{'met' if paced_overhead <= OVERHEAD_TARGET_MS else 'NOT met'}).",
            "",
        ]
    lines += [
        f"## Throughput ({args.duration:g} s per row after {THROUGHPUT_WARMUP_S} s warm-up)",
        "",
        "Each client has its own connection and sends window-mode requests (batch 1, no seed) in a "
        "closed loop. The last column is in-process `predict_action` on one batch of that many "
        "rows: what perfect batching could reach.",
        "",
        "| clients | requests/s | vs 1 client | requests per pass | in-process batch rows/s |",
        "|---|---|---|---|---|",
        *[
            f"| {n} | {rate:.0f} | {rate / base:.2f}x | {merged:.1f} | {ceilings[n]:.0f} |"
            for n, (rate, merged) in rates.items()
        ],
        "",
    ]
    if SCALING_CLIENTS in rates and clients[0] == 1:
        ratio = rates[SCALING_CLIENTS][0] / base
        lines += [
            f"Throughput with {SCALING_CLIENTS} clients: {ratio:.2f}x that of 1 client (target >= "
            f"{SCALING_TARGET:g}x: {'met' if ratio >= SCALING_TARGET else 'NOT met'}).",
            "",
        ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
