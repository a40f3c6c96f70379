"""The image training step on the CPU with the encoder's speed choices off and on, in one run.

One iSD training step of ``pusht_image`` (the human PushT images, batch 64, 1 torch thread by
default) with three encoder variants taking turns on the same policy, so that a slow spell of a
shared machine hits them alike:

- ``index crop, NCHW``: each training crop gathered with a row and a column index per pixel, the
  convolutions on plain (N, C, H, W) input (the encoder before these choices);
- ``gather crop, NCHW``: each sample's window with one gather from an unfolded view;
- ``gather crop, channels-last``: the same, with channels-last input to the convolutions (what
  ``ImageEncoder`` does on the CPU; a crop of the (N, H, W, C) frames is channels-last already,
  so the first two variants make theirs contiguous (N, C, H, W)).

The batches are drawn before the clock starts; the median over rounds is reported.

Usage: python eval/bench_image_step.py [--size tiny|mid] [--rounds 5] [--steps 3]
       [--dataset ../shared/data/pusht/pusht_cchi_v7_replay.zarr] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from cm_policy.configs import compose
from cm_policy.evaluation.machine import describe_machine
from cm_policy.models.encoders import ImageEncoder
from cm_policy.policy import Policy
from cm_policy.training.data import TrainingData, fit_normalizer
from cm_policy.training.trainer import policy_spec

REPO = Path(__file__).resolve().parents[1]
SIZES = {
    "tiny": ["model=unet_tiny"],
    "mid": ["model=unet_cpu", "model.resnet_widths=[32,64,128,256]"],
}


def index_crop(self: ImageEncoder, x: torch.Tensor, key: str = "") -> torch.Tensor:
    """The training crop by a row and a column index per pixel (the earlier implementation)."""
    h, w = x.shape[-2:]
    ch, cw = self.crops[key]
    if not self.training:
        top, left = (h - ch) // 2, (w - cw) // 2
        return x[..., top : top + ch, left : left + cw]
    top = torch.randint(0, h - ch + 1, (x.shape[0],))
    left = torch.randint(0, w - cw + 1, (x.shape[0],))
    rows = (top[:, None] + torch.arange(ch))[:, None, :, None]
    cols = (left[:, None] + torch.arange(cw))[:, None, None, :]
    batch = torch.arange(x.shape[0])[:, None, None, None]
    chan = torch.arange(x.shape[1])[None, :, None, None]
    return x[batch, chan, rows, cols]


VARIANTS = {
    "index crop, NCHW": (index_crop, staticmethod(lambda img: img.contiguous())),
    "gather crop, NCHW": (ImageEncoder._crop, staticmethod(lambda img: img.contiguous())),
    "gather crop, channels-last": (ImageEncoder._crop, ImageEncoder.__dict__["_conv_layout"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant and round")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--dataset", default=str(REPO.parent / "shared/data/pusht/pusht_cchi_v7_replay.zarr")
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = compose(
        "config",
        [
            "task=pusht_image",
            "method=isd",
            *SIZES[args.size],
            f"training.batch_size={args.batch_size}",
            f"training.num_threads={args.threads}",
            f"task.dataset_path={args.dataset}",
        ],
    )
    data = TrainingData(cfg)
    torch.manual_seed(0)
    policy = Policy(policy_spec(cfg, data), fit_normalizer(cfg, data))
    policy.method.set_progress(0, 1000)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    rng = np.random.default_rng(0)
    device = torch.device("cpu")
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    kept = ImageEncoder._crop, ImageEncoder.__dict__["_conv_layout"]
    try:
        for r in range(args.rounds + 1):  # round 0 warms up
            for name, (crop, layout) in VARIANTS.items():
                ImageEncoder._crop, ImageEncoder._conv_layout = crop, layout
                batches = [
                    data.windows(data.draw(rng, args.batch_size), policy.n_obs_steps, device)
                    for _ in range(args.steps)
                ]
                started = time.perf_counter()
                for obs, action in batches:
                    loss, _ = policy.compute_loss(obs, action)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                if r:
                    times[name].append((time.perf_counter() - started) / args.steps)
    finally:
        ImageEncoder._crop, ImageEncoder._conv_layout = kept
    medians = {name: statistics.median(t) for name, t in times.items()}
    first = medians["index crop, NCHW"]
    lines = [
        f"Image training step, `{args.size}` (iSD, batch {args.batch_size}, "
        f"{args.threads} torch thread(s)), {args.rounds} rounds x {args.steps} steps per variant "
        f"in turns; {describe_machine()}. Command: `python eval/bench_image_step.py "
        f"--size {args.size}`.",
        "",
        "| encoder variant | s per step (median) | samples/s | vs the first |",
        "|---|---|---|---|",
    ]
    for name, m in medians.items():
        lines.append(f"| {name} | {m:.3f} | {args.batch_size / m:.1f} | {m / first:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
