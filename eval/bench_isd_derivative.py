"""iSD's derivative options measured, not assumed (issue 36, item 5): step cost and target error.

(a) Seconds per training step of each ``method.derivative`` option on the human PushT data,
    side by side in one process, taking turns (``cm_policy.experiments.measure.step_costs``), and
    their ratios to the central difference (the default).
(b) The error of each option's target ``T = v_hat - (t - s) D`` against a float64 JVP target (the
    checkpoint's network converted to float64), on a trained checkpoint and batches of real data
    windows at Beta-drawn (t, s), each option computed in float32 as training computes it (its
    own float32 v_hat; the one-sided difference centred on the float32 jump): per sample
    ``||T_option - T_ref|| / ||T_ref||``, median and 99th percentile.

Decision rule: a cheaper option replaces the central difference in the long plan only if it is at
least 10% faster per step AND its target error (99th percentile) is below 1e-3 relative.

Train the checkpoint first (about 10 minutes at one thread), e.g.
    cm-policy train task=pusht_keypoints method=isd task.dataset_path=DATA training.steps=300 \\
        training.num_threads=1 output_dir=/work/tmp_isd_ckpt training.eval_every=null

Usage: python eval/bench_isd_derivative.py --checkpoint /work/tmp_isd_ckpt
       [--dataset ../shared/data/pusht/pusht_cchi_v7_replay.zarr] [--batch 256] [--threads 1]
       [--rounds 5] [--steps 3] [--error-batches 4] [--out eval/results/isd_derivative.md]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cm_policy.checkpoint import load_policy, resolve_checkpoint
from cm_policy.configs import compose
from cm_policy.evaluation.machine import describe_machine
from cm_policy.experiments.measure import step_costs
from cm_policy.methods import make_method
from cm_policy.methods.isd import DERIVATIVES
from cm_policy.training.data import TrainingData

ROOT = Path(__file__).resolve().parents[1]
DATASET = "../shared/data/pusht/pusht_cchi_v7_replay.zarr"  # from the repository root
# Forward-equivalents per step (a backward counts two forwards, a JVP two), as the method counts.
FORWARDS = {
    "finite_difference": 8,
    "finite_difference_one_sided": 7,
    "jvp": 8,
    "jvp_primal": 7,
}
BASE = "finite_difference"
MIN_SPEEDUP, MAX_ERROR = 0.10, 1e-3


def configs(args) -> dict:
    common = [
        "task=pusht_keypoints",
        "method=isd",
        f"model={args.model}",
        f"task.dataset_path={args.dataset}",
        f"training.batch_size={args.batch}",
        f"training.num_threads={args.threads}",
        "training.device=cpu",
    ]
    return {d: compose("config", [*common, f"method.derivative={d}"]) for d in DERIVATIVES}


def target(method, net, x, t, s, cond, bf16: bool = False) -> torch.Tensor:
    """``method``'s target T at (x, t, s), computed as its loss computes it (without gradient);
    ``bf16``: under bf16 autocast, as ``training.amp=true`` runs it."""
    with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        v_hat = net(x, t, t, cond)
        if method.derivative == "jvp_primal":
            _, d = method.jump_and_derivative(net, x, t, s, cond, v_hat)
        else:
            d = method.time_derivative(net, x, t, s, cond, v_hat, centre=net(x, t, s, cond))
        return (v_hat - (t - s).view(-1, 1, 1) * d).float()


def target_errors(args, cfg) -> tuple[dict[str, np.ndarray], dict]:
    """Per-sample relative errors of each option's float32 target against the float64 JVP's."""
    policy = load_policy(args.checkpoint, weights=args.weights)
    folder = resolve_checkpoint(args.checkpoint, args.weights)
    state = json.loads((folder / "trainer_state.json").read_text())
    net32 = policy.net.float().eval()
    net64 = load_policy(args.checkpoint, weights=args.weights).net.double().eval()
    data = TrainingData(cfg)
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    settings = {k: v for k, v in policy.spec["method"].items() if k != "name"}
    methods = {d: make_method("isd", **{**settings, "derivative": d}) for d in DERIVATIVES}
    reference = make_method("isd", **{**settings, "derivative": "jvp"})
    errors: dict[str, list[np.ndarray]] = {d: [] for d in DERIVATIVES}
    errors_bf16: dict[str, list[np.ndarray]] = {d: [] for d in DERIVATIVES}
    gaps = []
    for _ in range(args.error_batches):
        obs, action = data.windows(data.draw(rng, args.batch), policy.n_obs_steps)
        with torch.no_grad():
            cond = policy.obs_encoder(policy.normalize_obs(obs)).float()
            actions = policy.normalizer.normalize("action", action).float()
        t, s = reference.sample_times(args.batch, actions.device)
        z = torch.randn_like(actions)
        tb = t.view(-1, 1, 1)
        x_t = (1 - tb) * actions + tb * z
        ref = target(reference, net64, x_t.double(), t.double(), s.double(), cond.double())
        norm = ref.flatten(1).norm(dim=1)
        for d, method in methods.items():
            for bf16, into in ((False, errors), (True, errors_bf16)):
                out = target(method, net32, x_t, t, s, cond, bf16).double()
                into[d].append(((out - ref).flatten(1).norm(dim=1) / norm).numpy())
        gaps.append((t - s).numpy())
    info = {
        "steps": int(state["step"]),
        "folder": str(folder),
        "samples": args.error_batches * args.batch,
        "gap_median": float(np.median(np.concatenate(gaps))),
    }
    info["bf16_p99"] = {
        d: float(np.percentile(np.concatenate(e), 99)) for d, e in errors_bf16.items()
    }
    return {d: np.concatenate(e) for d, e in errors.items()}, info


def report(args, costs: dict[str, float], errors: dict[str, np.ndarray], info: dict) -> str:
    base = costs[BASE]
    rows, winners, at_median = [], [], []
    for d in DERIVATIVES:
        ratio = costs[d] / base
        med, p99 = float(np.median(errors[d])), float(np.percentile(errors[d], 99))
        faster = 1 - ratio >= MIN_SPEEDUP
        verdict = "baseline" if d == BASE else ("yes" if faster and p99 < MAX_ERROR else "no")
        if d != BASE and faster and p99 < MAX_ERROR:
            winners.append(d)
        if d != BASE and faster and med < MAX_ERROR:
            at_median.append(d)
        rows.append(
            f"| {d} | {FORWARDS[d]} | {costs[d]:.3f} | {ratio:.3f} | {med:.2e} | {p99:.2e} "
            f"| {info['bf16_p99'][d]:.2e} | {verdict} |"
        )
    command = "nice -n 5 env OMP_NUM_THREADS=1 .venv/bin/python " + " ".join(
        shlex.quote(a) for a in [str(Path(sys.argv[0]).resolve().relative_to(ROOT)), *sys.argv[1:]]
    )
    if winners:
        decision = (
            f"**{', '.join(winners)}** meet{'s' if len(winners) == 1 else ''} both conditions "
            "and may replace the central difference in the long plan (the cheapest of them, if "
            "several)."
        )
    else:
        decision = "**No option** meets both conditions: the central difference stays the default."
    decision += (
        " Read at the median error instead of the 99th percentile, the options meeting both: "
        f"{', '.join(at_median) or 'none'}."
    )
    lines = [
        "# iSD: the cost and the accuracy of the time derivative's options",
        "",
        f"Produced by `{command}` (eval/bench_isd_derivative.py), {time.strftime('%Y-%m-%d')}.",
        "",
        f"- Machine: {describe_machine()}; torch {torch.__version__}, "
        f"{args.threads} thread(s), shared with other jobs (costs taken in turns, medians).",
        f"- Data: human PushT (`{args.dataset}`), task pusht_keypoints, model {args.model}.",
        f"- Step costs: `step_costs` at batch {args.batch}, {args.rounds} rounds of "
        f"{args.steps} timed steps per option after a warm-up round, options taking turns; the "
        "median seconds per step (forward, backward, AdamW step).",
        f"- Target errors: checkpoint `{info['folder']}` ({args.weights} weights) after "
        f"{info['steps']} training steps of iSD (central difference); {args.error_batches} "
        f"batches of {args.batch} training windows ({info['samples']} samples) at Beta(0.8, 1) "
        f"(t, s) (median t - s {info['gap_median']:.3f}), fd_eps {args.fd_eps}. Each option in "
        "float32 as training computes it; reference: the float64 network's `torch.func.jvp` "
        "target. Error per sample: ||T_option - T_ref|| / ||T_ref|| over the chunk. The bf16 "
        "column: the same under CPU bf16 autocast (what training.amp=true runs; jvp_primal runs "
        "as jvp there), for the amp warnings, not for the decision (training runs in float32).",
        "",
        "| derivative | forward-equivalents | s/step | ratio to central | target error median "
        "| target error p99 | p99 under bf16 autocast | replaces central? |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        f"Decision rule: a cheaper option replaces the central difference in the long plan only "
        f"if it is at least {MIN_SPEEDUP:.0%} faster per step (ratio <= {1 - MIN_SPEEDUP:.2f}) "
        f"AND its target error is below {MAX_ERROR:g} relative (taken at the 99th percentile). "
        + decision,
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="/work/tmp_isd_ckpt")
    parser.add_argument("--weights", default="model", choices=["model", "ema"])
    parser.add_argument("--dataset", default=DATASET)
    parser.add_argument("--model", default="unet_cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--error-batches", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="eval/results/isd_derivative.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfgs = configs(args)
    args.fd_eps = float(cfgs[BASE].method.fd_eps)
    errors, info = target_errors(args, cfgs[BASE])
    print({d: float(np.percentile(e, 99)) for d, e in errors.items()}, flush=True)
    costs = step_costs(cfgs, rounds=args.rounds, steps=args.steps)
    text = report(args, costs, errors, info)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
