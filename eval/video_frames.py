"""A figure of chosen frames from evaluation videos, one row per video (to look at failures).

Usage:
  python eval/video_frames.py OUT.png --title TITLE \
      --row 'VIDEO.mp4|0,40,80,160|caption' [--row ...]

Each ``--row`` is ``video|comma-separated frame indices|caption`` (a negative index counts from
the end). Videos are the runner's mp4s (``cm-policy eval ... n_videos=N``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import av
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def read_frames(path: str | Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def parse_row(text: str) -> tuple[str, list[int], str]:
    parts = text.split("|")
    if len(parts) != 3:
        raise SystemExit(f"--row must be 'video|i,j,k|caption', got {text!r}")
    video, indices, caption = parts
    try:
        steps = [int(i) for i in indices.split(",") if i.strip()]
    except ValueError:
        raise SystemExit(f"--row frame indices must be integers, got {indices!r}") from None
    if not steps:
        raise SystemExit(f"--row {text!r} names no frame")
    return video, steps, caption


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("out", type=Path)
    parser.add_argument("--row", action="append", required=True)
    parser.add_argument("--title", default="")
    args = parser.parse_args()
    rows = [parse_row(r) for r in args.row]
    cols = max(len(steps) for _, steps, _ in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.5 * cols, 3.1 * len(rows)), squeeze=False)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.86, bottom=0.05, wspace=0.03, hspace=0.35)
    for r, (video, steps, caption) in enumerate(rows):
        frames = read_frames(video)
        for c in range(cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(steps):
                ax.axis("off")
                continue
            i = steps[c] if steps[c] >= 0 else len(frames) + steps[c]
            if not 0 <= i < len(frames):
                raise SystemExit(f"{video} has {len(frames)} frames, no frame {steps[c]}")
            ax.imshow(frames[i])
            ax.set_xlabel(f"step {i}", fontsize=9)
        pos = axes[r, 0].get_position()
        fig.text(pos.x0, pos.y1 + 0.012, caption, fontsize=11)
    fig.suptitle(args.title, fontsize=12)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
