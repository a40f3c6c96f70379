"""The ONNX export against torch on a trained PushT policy: same actions, same score.

Exports a checkpoint (``cm-policy export``), then evaluates it closed loop twice on the same
test seeds with the same per-episode seeded noise (the runner's ``seeded_noise``): once with the
torch ``Policy`` and once through ONNX Runtime (``OnnxPolicy``, which draws the noise of the
runner's torch generators). During the torch run, every chunk is also computed by ONNX Runtime
from the same observations and noise, which gives the largest action difference on identical
inputs; the ONNX run then shows what that difference does to the episodes.

Usage: python eval/onnx_eval.py --checkpoint RUN_OR_CHECKPOINT [--n-episodes 50]
       [--out eval/results/onnx.md]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import torch

from cm_policy.checkpoint import load_policy, resolve_checkpoint
from cm_policy.evaluation.machine import describe_machine
from cm_policy.evaluation.runner import run_episodes, summarize
from cm_policy.export import export_checkpoint
from cm_policy.serve.onnx_policy import OnnxPolicy
from cm_policy.tasks import load_task


def clone(generators: list[torch.Generator]) -> list[torch.Generator]:
    out = []
    for g in generators:
        copy = torch.Generator()
        copy.set_state(g.get_state())
        out.append(copy)
    return out


class TwinRecorder:
    """Runs the torch policy; computes ONNX Runtime's actions on the same inputs beside it."""

    def __init__(self, policy: Any, onnx_policy: OnnxPolicy, scale: np.ndarray):
        self.policy, self.onnx_policy, self.scale = policy, onnx_policy, scale
        self.worst_raw, self.worst_normalised, self.chunks = 0.0, 0.0, 0

    def predict_action(self, obs: Mapping[str, np.ndarray], **kwargs: Any) -> np.ndarray:
        twin_kwargs = dict(kwargs)
        if isinstance(kwargs.get("generator"), list):
            twin_kwargs["generator"] = clone(kwargs["generator"])
        actions = self.policy.predict_action(obs, **kwargs)
        twin = self.onnx_policy.predict_action(obs, **twin_kwargs)
        diff = np.abs(twin - actions)
        self.worst_raw = max(self.worst_raw, float(diff.max()))
        self.worst_normalised = max(self.worst_normalised, float((diff * self.scale).max()))
        self.chunks += 1
        return actions


def compare(reference: list[Any], other: list[Any]) -> dict[str, Any]:
    """How many episodes of ``other`` match ``reference``'s score and success."""
    pairs = list(zip(reference, other, strict=True))
    diffs = [abs(a.max_reward - b.max_reward) for a, b in pairs]
    return {
        "equal": sum(d == 0 for d in diffs),
        "close": sum(d <= 1e-3 for d in diffs),
        "worst": max(diffs),
        "success": sum(a.success == b.success for a, b in pairs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--n-episodes", type=int, default=50)
    parser.add_argument("--start-seed", type=int, default=100000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="eval/results/onnx.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = resolve_checkpoint(args.checkpoint, "ema")
    policy = load_policy(folder)
    task = load_task(policy.spec["task"])
    seeds = list(range(args.start_seed, args.start_seed + args.n_episodes))
    scale = policy.normalizer.state_dict()["action.scale"].numpy()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        meta = export_checkpoint(folder, Path(tmp) / "policy.onnx")
        export_s = time.perf_counter() - started
        onnx_policy = OnnxPolicy(Path(tmp) / "policy.onnx", threads=args.threads)
    run = {
        "env_fn": task.env_factory(),
        "seeds": seeds,
        "n_obs_steps": policy.n_obs_steps,
        "n_action_steps": policy.n_action_steps,
        "max_steps": task.horizon,
        "n_envs": task.eval_envs,
        "layout": task.eval_layout,
        "progress": False,
        "seeded_noise": True,
    }
    twin = TwinRecorder(policy, onnx_policy, scale)
    started = time.perf_counter()
    torch_results = run_episodes(twin, **run)
    torch_s = time.perf_counter() - started
    started = time.perf_counter()
    onnx_results = run_episodes(onnx_policy, **run)
    onnx_s = time.perf_counter() - started
    # The control: torch against itself with another float rounding (the envs in waves of half
    # the size: other batch sizes, so other kernel blockings and summation orders).
    control_n = max(1, run["n_envs"] // 2)
    started = time.perf_counter()
    control_results = run_episodes(policy, **{**run, "n_envs": control_n})
    control_s = time.perf_counter() - started
    torch_m, onnx_m = summarize(torch_results), summarize(onnx_results)
    control_m = summarize(control_results)
    onnx_cmp = compare(torch_results, onnx_results)
    control_cmp = compare(torch_results, control_results)
    lines = [
        "# ONNX export vs torch: actions and closed-loop score",
        "",
        f"Command: `python eval/onnx_eval.py --checkpoint {args.checkpoint} "
        f"--n-episodes {args.n_episodes} --start-seed {args.start_seed} --threads {args.threads}`",
        "",
        f"Policy: `{folder}` ({meta['method']}, sampler {meta['sampler_label']}, task "
        f"`{meta['task']}`), exported by the {meta['exporter']} exporter (opset {meta['opset']}) "
        f"in {export_s:.0f} s. Machine: {describe_machine()}, {args.threads} thread(s), shared "
        f"with other jobs; torch {torch.__version__}, ONNX Runtime {onnxruntime.__version__}. "
        f"Episodes: seeds {seeds[0]}..{seeds[-1]}, {task.horizon} steps, {run['n_envs']} envs "
        f"({run['layout']}), noise seeded per episode and chunk (the same generators for both).",
        "",
        f"| | torch `Policy` | ONNX Runtime `OnnxPolicy` | control: torch, {control_n} envs |",
        "|---|---|---|---|",
        f"| mean_score | {torch_m['mean_score']:.4f} | {onnx_m['mean_score']:.4f} | "
        f"{control_m['mean_score']:.4f} |",
        f"| success_rate | {torch_m['success_rate']:.2f} | {onnx_m['success_rate']:.2f} | "
        f"{control_m['success_rate']:.2f} |",
        f"| episodes with bitwise torch's score | - | {onnx_cmp['equal']} | "
        f"{control_cmp['equal']} |",
        f"| episodes within 1e-3 of torch's score | - | {onnx_cmp['close']} | "
        f"{control_cmp['close']} |",
        f"| largest score difference to torch | - | {onnx_cmp['worst']:.3g} | "
        f"{control_cmp['worst']:.3g} |",
        f"| episodes with torch's success | - | {onnx_cmp['success']} | {control_cmp['success']} |",
        f"| wall time of the evaluation | {torch_s:.0f} s (with the twin) | {onnx_s:.0f} s | "
        f"{control_s:.0f} s |",
        "",
        f"- Same observations and noise (every chunk of the torch run, {twin.chunks} calls of "
        f"{run['n_envs']} rows): max |onnx - torch| = {twin.worst_raw:.3g} (raw action units, "
        f"pixels) = {twin.worst_normalised:.3g} of the half action range (normalised units; "
        "the bar is 1e-5).",
        "- Closed loop: both runs start from the same states and noise, and their actions "
        "differ by float rounding, which PushT's contact physics can amplify over an episode "
        "until a push lands elsewhere. The control column is torch against torch with other "
        "rounding (the same episodes in waves of half as many envs: other batch sizes in the "
        "kernels), for the size of such differences without any export.",
        "",
        "Per-episode scores (JSON): "
        + json.dumps(
            {
                "torch": [round(r.max_reward, 6) for r in torch_results],
                "onnx": [round(r.max_reward, 6) for r in onnx_results],
                "control": [round(r.max_reward, 6) for r in control_results],
            }
        ),
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
