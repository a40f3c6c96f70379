"""Where robomimic demonstrations go: end-effector paths of clean and recovery demos, one figure.

Usage:
  python eval/plot_robomimic_demos.py OUT.png data/robomimic_can.hdf5 \
      data/robomimic_can_recovery_1000.hdf5 [--per-kind 25]

Two panels (top view x-y and side view x-z, world metres) of the gripper's path in up to
``--per-kind`` demos of each kind: clean (full) demos in grey, recovery demos (the filter key
``mask/recovery`` of ``cm-policy data generate robomimic ... recovery=F``) in orange with a dot
where each recording starts, the gripper just pushed off course. Also measures how far each
recovery demo starts from where the undisturbed expert is at the same moment from the same
initial state (the expert rerun from the demo's ``seed`` for ``recorded_from`` steps): the
off-course distances that the demos show being corrected.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from cm_policy.data.replay_buffer import DatasetError
from cm_policy.data.robomimic_hdf5 import RobomimicDataset


def eef_paths(paths: list[str], per_kind: int) -> tuple[dict[str, list[np.ndarray]], list]:
    """End-effector positions (T, 3) of up to ``per_kind`` demos per kind (full, recovery), and
    (env_meta, seed, recorded_from) of each recovery demo."""
    out: dict[str, list[np.ndarray]] = {"full": [], "recovery": []}
    starts = []
    for path in paths:
        with RobomimicDataset(path) as ds:
            for kind in out:
                try:
                    names = ds.mask(kind)
                except DatasetError:  # no masks: a clean dataset written without recovery=
                    names = ds.demo_names if kind == "full" else []
                for name in names[: max(0, per_kind - len(out[kind]))]:
                    demo = ds.demo(name, obs_keys=["robot0_eef_pos"])
                    out[kind].append(demo["obs"]["robot0_eef_pos"])
                    if kind == "recovery":
                        attrs = ds.demo_attrs(name)
                        starts.append(
                            (ds.env_meta, int(attrs["seed"]), int(attrs["recorded_from"]))
                        )
    return out, starts


def start_offsets(paths: dict[str, list[np.ndarray]], starts: list) -> np.ndarray:
    """Distance (m) from each recovery demo's first gripper position to the undisturbed
    expert's at the same step from the same initial state."""
    from cm_policy.envs.robomimic_experts import run_expert
    from cm_policy.envs.robosuite_env import RobosuiteEnv

    offsets, envs = [], {}
    try:
        for path, (env_meta, seed, skipped) in zip(paths["recovery"], starts, strict=True):
            name = env_meta["env_name"]
            if name not in envs:  # the env the demos were recorded in
                envs[name] = RobosuiteEnv(env_meta=env_meta, obs_type="lowdim")
            env = envs[name]
            ref = run_expert(env, seed).obs["robot0_eef_pos"]
            if skipped < len(ref):  # else the undisturbed expert had already succeeded
                offsets.append(float(np.linalg.norm(path[0] - ref[skipped])))
    finally:
        for env in envs.values():
            env.close()
    return np.array(offsets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out")
    parser.add_argument("hdf5", nargs="+")
    parser.add_argument("--per-kind", type=int, default=25)
    args = parser.parse_args()
    paths, starts = eef_paths(args.hdf5, args.per_kind)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    views = [(0, 1, "top view: y (m)"), (0, 2, "side view: z (m)")]
    for ax, (i, j, label) in zip(axes, views, strict=True):
        for k, p in enumerate(paths["full"]):
            ax.plot(p[:, i], p[:, j], color="0.6", lw=0.8, label="clean demo" if k == 0 else None)
        for k, p in enumerate(paths["recovery"]):
            ax.plot(
                p[:, i],
                p[:, j],
                color="tab:orange",
                lw=0.9,
                alpha=0.85,
                label="recovery demo" if k == 0 else None,
            )
            ax.plot(
                p[0, i],
                p[0, j],
                "o",
                color="tab:red",
                ms=3.5,
                label="recording starts (just pushed)" if k == 0 else None,
            )
        ax.set_xlabel("x (m)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="best", fontsize=8)
    offsets = start_offsets(paths, starts)
    title = f"{len(paths['full'])} clean and {len(paths['recovery'])} recovery demos"
    if len(offsets):
        title += (
            f"; recordings start {100 * np.median(offsets):.1f} cm (median; 90th percentile "
            f"{100 * np.quantile(offsets, 0.9):.1f} cm) from the undisturbed expert's gripper"
        )
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(title)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
