"""Soak benchmark of the action server: many sessions for a long time (a benchmark, not a test).

``--clients`` sessions (32) each query a ``cm-policy serve`` subprocess on 127.0.0.1 for
``--minutes`` (30), every one at a robot's pace: a window-mode ``infer`` (batch 1, one network
step) every ``--interval`` seconds (0.8: a chunk of 8 actions at 10 Hz), through
:class:`~cm_policy.serve.PolicyClient` over TLS with a token (``--plain``: neither), as a robot
off the loopback would. Recorded: every request's round-trip time and every error, and the
server's resident memory (``/proc/PID/status`` VmRSS) every 10 s.

Report (``--out``, markdown + PNG): requests served, errors by kind, p50 / p99 latency over the
first ``--window`` minutes after the warm-up minute and over the last ``--window`` minutes, the
server's memory then and at the end. Targets (issue 40): zero errors, memory growth under 5%,
p99 at the end within 1.5x of the start.

Without ``--checkpoint`` the policy is a random-weight ``unet_cpu`` one on the keypoints task (the
server's behaviour does not depend on the weights).

Usage: python eval/bench_soak.py [--minutes 30] [--clients 32] [--interval 0.8] [--threads 1]
       [--checkpoint PATH] [--plain] [--out eval/results/soak.md]
"""

from __future__ import annotations

import argparse
import secrets
import shlex
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cm_policy.evaluation.machine import describe_machine
from cm_policy.serve import PolicyClient
from cm_policy.serve.launch import local_certificate, spawn_server, stop_server

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "eval"))
from bench_server import random_checkpoint  # noqa: E402

MEMORY_EVERY_S = 10.0
WARMUP_S = 60.0
TARGET_GROWTH, TARGET_P99_RATIO = 0.05, 1.5


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class Session(threading.Thread):
    """One client at a fixed pace; records (time sent, round trip s) and errors."""

    def __init__(self, uri: str, token: str | None, ca: str | None, args, stop_at: float, k: int):
        super().__init__(daemon=True)
        self.uri, self.token, self.ca, self.args, self.stop_at, self.k = (
            uri,
            token,
            ca,
            args,
            stop_at,
            k,
        )
        self.times: list[tuple[float, float]] = []
        self.errors: Counter[str] = Counter()

    def run(self) -> None:
        rng = np.random.default_rng(self.k)
        try:
            client = PolicyClient(self.uri, token=self.token, ca=self.ca, timeout=30)
        except Exception as exc:  # counted, not raised: the report says what failed
            self.errors[f"connect: {type(exc).__name__}: {exc}"] += 1
            return
        with client:
            shapes = client.metadata["observations"]
            window = {
                k: rng.uniform(0, 512, (1, client.n_obs_steps, *v["shape"])).astype(v["dtype"])
                for k, v in shapes.items()
            }
            # Spread the sessions' requests over the interval, as independent robots would be.
            next_at = time.monotonic() + rng.uniform(0, self.args.interval)
            while True:
                time.sleep(max(0.0, next_at - time.monotonic()))
                sent = time.monotonic()
                if sent >= self.stop_at:
                    return
                try:
                    client.predict_action(window)
                    self.times.append((sent, time.monotonic() - sent))
                except Exception as exc:
                    self.errors[f"{type(exc).__name__}: {str(exc)[:120]}"] += 1
                next_at += self.args.interval
                if next_at < time.monotonic():  # late (server slow): no burst to catch up
                    next_at = time.monotonic()


def percentiles(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    p50, p99 = np.percentile(np.asarray(values) * 1e3, [50, 99])
    return float(p50), float(p99)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--interval", type=float, default=0.8, help="seconds between requests")
    parser.add_argument("--window", type=float, default=3.0, help="minutes compared, start/end")
    parser.add_argument("--threads", type=int, default=1, help="the server's inference threads")
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--plain", action="store_true", help="no TLS and no token")
    parser.add_argument("--out", type=Path, default=REPO / "eval/results/soak.md")
    args = parser.parse_args()
    if args.minutes * 60 < WARMUP_S + 2 * args.window * 60:
        parser.error("--minutes must cover the warm-up minute and two --window spans")
    folder = Path(tempfile.mkdtemp(prefix="soak_"))
    checkpoint = args.checkpoint or random_checkpoint(folder / "ckpt", "unet_cpu")
    options, token, ca, scheme = [f"threads={args.threads}"], None, None, "ws"
    env = {}
    if not args.plain:
        cert, key = local_certificate(folder)
        token, ca, scheme = secrets.token_urlsafe(32), str(cert), "wss"
        env["CM_POLICY_SERVE_TOKEN"] = token
        options += [f"tls_cert={cert}", f"tls_key={key}"]
    options.append(f"max_sessions={max(64, args.clients)}")
    log = folder / "server.log"
    proc, port = spawn_server(checkpoint, log, *options, env=env)
    uri = f"{scheme}://127.0.0.1:{port}"
    started = time.monotonic()
    stop_at = started + args.minutes * 60
    sessions = [Session(uri, token, ca, args, stop_at, k) for k in range(args.clients)]
    memory: list[tuple[float, float]] = []
    try:
        for s in sessions:
            s.start()
        with tqdm(total=int(args.minutes * 60), unit="s", desc="soak") as bar:
            while time.monotonic() < stop_at:
                memory.append((time.monotonic() - started, rss_mb(proc.pid)))
                time.sleep(MEMORY_EVERY_S)
                bar.n = min(bar.total, int(time.monotonic() - started))
                bar.set_postfix(rss_mb=f"{memory[-1][1]:.0f}")
        for s in sessions:
            s.join(timeout=60)
        memory.append((time.monotonic() - started, rss_mb(proc.pid)))
    finally:
        code = stop_server(proc)
    times = sorted((t - started, rtt) for s in sessions for t, rtt in s.times)
    errors: Counter[str] = sum((s.errors for s in sessions), Counter())
    span = args.window * 60
    first = [r for t, r in times if WARMUP_S <= t < WARMUP_S + span]
    last = [r for t, r in times if t >= args.minutes * 60 - span]
    (p50_a, p99_a), (p50_b, p99_b) = percentiles(first), percentiles(last)
    rss_start = next(m for t, m in memory if t >= WARMUP_S)
    rss_end = memory[-1][1]
    growth = rss_end / rss_start - 1
    write_report(
        args,
        times,
        errors,
        memory,
        (p50_a, p99_a, p50_b, p99_b),
        (rss_start, rss_end),
        growth,
        code,
        token is not None,
    )
    print(args.out.read_text())


def write_report(args, times, errors, memory, lat, rss, growth, code, secured) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p50_a, p99_a, p50_b, p99_b = lat
    ratio = p99_b / p99_a
    verdict = {
        "zero errors": (not errors, f"{sum(errors.values())} errors"),
        f"memory growth < {TARGET_GROWTH:.0%}": (growth < TARGET_GROWTH, f"{growth:+.1%}"),
        f"p99 at the end <= {TARGET_P99_RATIO}x the start": (
            ratio <= TARGET_P99_RATIO,
            f"{ratio:.2f}x",
        ),
    }
    command = "python eval/bench_soak.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [
        "# Action server soak",
        "",
        f"Command: `{command.strip()}`. Machine: {describe_machine()}. "
        f"{args.clients} sessions for {args.minutes:g} minutes, each a window-mode `infer` "
        f"(batch 1, one step) every {args.interval:g} s, "
        + ("over TLS with a token" if secured else "plain WebSocket, no token")
        + f"; server threads {args.threads}; the server exited with {code}.",
        "",
        f"Requests served: {len(times)}; errors: {sum(errors.values())}.",
        "",
        "| | start (after the warm-up minute) | end |",
        "|---|---|---|",
        f"| minutes | {WARMUP_S / 60:g}-{WARMUP_S / 60 + args.window:g} | "
        f"{args.minutes - args.window:g}-{args.minutes:g} |",
        f"| round trip p50 / p99 (ms) | {p50_a:.1f} / {p99_a:.1f} | {p50_b:.1f} / {p99_b:.1f} |",
        f"| server memory (MB, VmRSS) | {rss[0]:.1f} | {rss[1]:.1f} |",
        "",
        "| target | met | measured |",
        "|---|---|---|",
        *(f"| {k} | {'yes' if ok else '**no**'} | {v} |" for k, (ok, v) in verdict.items()),
    ]
    if errors:
        lines += ["", "Errors:", "", *(f"- {n} x {kind}" for kind, n in errors.most_common())]
    stem = args.out.with_suffix("")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    minutes = np.arange(int(args.minutes) + 1)
    per_minute = [[r for t, r in times if m * 60 <= t < (m + 1) * 60] for m in minutes]
    for q, style in ((50, "-"), (99, "--")):
        ax1.plot(
            minutes,
            [np.percentile(v, q) * 1e3 if v else np.nan for v in per_minute],
            style,
            label=f"p{q}",
        )
    ax1.set(xlabel="minute", ylabel="round trip (ms)", title="latency per minute")
    ax1.legend()
    ax2.plot([t / 60 for t, _ in memory], [m for _, m in memory])
    ax2.set(xlabel="minute", ylabel="VmRSS (MB)", title="server memory")
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=100)
    lines += ["", f"![latency and memory over the soak]({stem.name}.png)"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
