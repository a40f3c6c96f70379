"""Round trip through LeRobot's own writer: PushT human data -> LeRobotDataset -> replay buffer.

    python -m cm_policy.experiments.lerobot_roundtrip --out eval/results

Diffusion Policy's human PushT buffer (206 episodes, 25,650 frames with 96x96 images) is written
as a LeRobotDataset by LeRobot's code, in both layouts users have: codebase v3.0 by
``lerobot-dataset`` (the standalone release of LeRobot 0.4.4's dataset code) and v2.1 by
``lerobot==0.3.3``. Each is converted back with ``cm-policy data convert lerobot`` and compared
with the original (low-dim arrays must be equal; images differ by the video codec's loss, which
is measured), and ``cm-policy train task=lerobot_pusht`` runs a few steps on the result. Writes
``lerobot_roundtrip.md`` to ``--out``.

The writers run in their own virtualenv (``--venv``, created on first use, about 2 minutes and
1.8 GB): LeRobot pins torch, datasets and PyAV versions of its own. Two adjustments keep that
virtualenv small and installable from the package index here:

- torch is the CPU build 2.13.0 (lerobot-dataset leaves torch to the user; lerobot 0.3.3 is
  installed with ``--no-deps``, since its pins would pull a multi-GB CUDA torch; its dataset code
  runs unchanged on the newer torch and on lerobot-dataset's ``datasets`` release).
- torchvision is a stub package. LeRobot's dataset modules import it at the top, but use it only
  to *read* frames (``transforms.ToTensor``, the torchvision video backend); PyPI's torchvision
  does not load beside the CPU torch build. Every attribute of the stub raises, so a writer path
  that needed torchvision would fail loudly, not write something different.

The same helpers write the small datasets of ``tests/test_lerobot.py``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Relative to the repository's root, where the check runs from.
DEFAULT_DATASET = Path("../shared/data/pusht/pusht_cchi_v7_replay.zarr")
VENV_ENV = "CM_POLICY_LEROBOT_VENV"
DEFAULT_VENV = Path(os.environ.get(VENV_ENV) or "/tmp/cm_policy_lerobot/writer_venv")
# The writers: v3.0 (lerobot-dataset = LeRobot 0.4.4's dataset code) and v2.1 (lerobot 0.3.3).
WRITER_V30 = "lerobot-dataset==0.4.4"
WRITER_V21 = "lerobot==0.3.3"
TORCH = "torch==2.13.0"  # the CPU build this project's machines hold (README: Quick start)
WRITER_SPEC = f"{TORCH} {WRITER_V30} {WRITER_V21} +torchvision-stub 1"
PUSHT_FPS = 10
TASK_TEXT = "Push the T-shaped block onto the target."

# Diffusion Policy's PushT arrays as LeRobot features (LeRobot's naming: observation.*, action).
PUSHT_FEATURES: dict[str, tuple[str, dict[str, Any]]] = {
    "state": (
        "observation.state",
        {
            "dtype": "float32",
            "shape": [5],
            "names": ["agent_x", "agent_y", "block_x", "block_y", "block_angle"],
        },
    ),
    "keypoint": (
        "observation.environment_state",
        {"dtype": "float32", "shape": [9, 2], "names": ["keypoint", "xy"]},
    ),
    "img": (
        "observation.image",
        {"dtype": "video", "shape": [96, 96, 3], "names": ["height", "width", "channel"]},
    ),
    "action": ("action", {"dtype": "float32", "shape": [2], "names": ["x", "y"]}),
    "n_contacts": ("n_contacts", {"dtype": "float32", "shape": [1], "names": None}),
}

# Stub torchvision (see the module doc): importable, useless, loud.
_STUB_INIT = '''"""A stub: LeRobot's dataset code imports torchvision only to read frames."""

from torchvision import transforms  # noqa: F401


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    raise RuntimeError(f"torchvision.{name}: torchvision is a stub in this writer-only venv")
'''
_STUB_TRANSFORMS = """def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    raise RuntimeError(f"torchvision.transforms.{name}: a stub in this writer-only venv")
"""

# Runs in the writer venv: argv[1] is a JSON file {"datasets": [spec, ...]}; a spec names the
# codebase version, root, fps, features, an .npz of frames (one array per feature, plus
# episode_ends) and optional video codec and v3.0 file-size settings. Prints JSON results.
WRITER = r"""
import json, sys, time
from pathlib import Path
import numpy as np

job = json.loads(Path(sys.argv[1]).read_text())
results = []
for spec in job["datasets"]:
    started = time.perf_counter()
    if spec["version"] == "v3.0":
        from ledataset.datasets import lerobot_dataset as module
    elif spec["version"] == "v2.1":
        from lerobot.datasets import lerobot_dataset as module
    else:
        raise SystemExit(f"no writer for {spec['version']}")
    assert module.CODEBASE_VERSION == spec["version"], module.CODEBASE_VERSION
    features = {k: {**v, "shape": tuple(v["shape"])} for k, v in spec["features"].items()}
    extra = {"vcodec": spec["vcodec"]} if spec.get("vcodec") else {}
    dataset = module.LeRobotDataset.create(
        repo_id=spec.get("repo_id", "cm_policy/test"), fps=spec["fps"], features=features,
        root=spec["root"], use_videos=True, **extra,
    )
    if spec.get("chunk_settings"):
        dataset.meta.update_chunk_settings(**spec["chunk_settings"])
    data = np.load(spec["arrays"])
    arrays = {name: data[name] for name in features}
    start = 0
    for end in data["episode_ends"].tolist():
        for t in range(start, end):
            frame = {name: arrays[name][t] for name in features}
            if spec["version"] == "v3.0":
                dataset.add_frame({**frame, "task": spec["task"]})
            else:
                dataset.add_frame(frame, task=spec["task"])
        dataset.save_episode()
        start = end
    if hasattr(dataset, "finalize"):
        dataset.finalize()
    results.append({"root": spec["root"], "version": spec["version"],
                    "wall_s": time.perf_counter() - started})
print("RESULTS " + json.dumps(results))
"""


# --- the writer virtualenv ----------------------------------------------------------------------
def _run(command: Sequence[str], what: str, **kwargs: Any) -> subprocess.CompletedProcess:
    result = subprocess.run(list(command), capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise RuntimeError(
            f"{what} failed (exit {result.returncode}): {' '.join(command)}\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def _writers_import(python: Path) -> bool:
    check = subprocess.run(
        [
            str(python),
            "-c",
            "import ledataset.datasets.lerobot_dataset, lerobot.datasets.lerobot_dataset",
        ],
        capture_output=True,
        env=_writer_env(Path(tempfile.gettempdir())),
    )
    return check.returncode == 0


def ensure_writer_venv(venv: Path = DEFAULT_VENV) -> Path:
    """The python of a virtualenv holding LeRobot's v3.0 and v2.1 dataset writers, created on
    first use (a lock keeps concurrent callers from building it twice)."""
    venv = Path(venv)
    python = venv / "bin" / "python"
    marker = venv / ".cm_policy_writer"

    def ready() -> bool:
        return python.exists() and marker.exists() and marker.read_text() == WRITER_SPEC

    if ready():
        return python
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if ready():
            return python
        shutil.rmtree(venv, ignore_errors=True)
        _run([sys.executable, "-m", "venv", str(venv)], "creating the writer venv")
        pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        _run([*pip, TORCH, WRITER_V30], f"pip install {TORCH} {WRITER_V30} into {venv}")
        _run([*pip, "--no-deps", WRITER_V21], f"pip install --no-deps {WRITER_V21} into {venv}")
        site = _run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            "finding the writer venv's site-packages",
        ).stdout.strip()
        stub = Path(site) / "torchvision"
        stub.mkdir(exist_ok=True)
        (stub / "__init__.py").write_text(_STUB_INIT)
        (stub / "transforms.py").write_text(_STUB_TRANSFORMS)
        if not _writers_import(python):
            check = subprocess.run(
                [str(python), "-c", "import ledataset.datasets.lerobot_dataset"],
                capture_output=True,
                text=True,
            )
            raise RuntimeError(f"the writers in {venv} do not import:\n{check.stderr[-3000:]}")
        marker.write_text(WRITER_SPEC)
    return python


def _writer_env(work: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HOME=str(work / "hf_home"),
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def write_lerobot(
    python: Path, specs: Sequence[Mapping[str, Any]], work: Path
) -> list[dict[str, Any]]:
    """Write LeRobotDatasets with LeRobot's writers (one process for all ``specs``). A spec:
    version (``v3.0`` | ``v2.1``), root, fps, features (LeRobot's feature dicts), arrays (an
    .npz: one array per feature and ``episode_ends``), task; optionally vcodec and
    chunk_settings (v3.0 file sizes)."""
    work.mkdir(parents=True, exist_ok=True)
    job = work / f"write_job_{os.getpid()}_{time.monotonic_ns()}.json"
    job.write_text(json.dumps({"datasets": [dict(s) for s in specs]}, default=str))
    result = _run(
        [str(python), "-c", WRITER, str(job)],
        "LeRobot's writer",
        env=_writer_env(work),
        cwd=work,
    )
    line = [x for x in result.stdout.splitlines() if x.startswith("RESULTS ")][-1]
    return json.loads(line[len("RESULTS ") :])


# --- PushT as a LeRobotDataset ----------------------------------------------------------------
def pusht_arrays(dataset: Path, episodes: int | None = None) -> dict[str, np.ndarray]:
    """The first ``episodes`` episodes (all: None) of a PushT buffer: its arrays (images as
    uint8) and ``episode_ends``."""
    from cm_policy.data import ReplayBuffer
    from cm_policy.tasks import as_uint8

    buffer = ReplayBuffer.open(dataset)
    ends = buffer.episode_ends[: episodes or buffer.n_episodes].copy()
    steps = int(ends[-1])
    out = {key: np.asarray(buffer[key][:steps]) for key in PUSHT_FEATURES if key != "img"}
    out["img"] = as_uint8(buffer["img"][:steps])
    out["episode_ends"] = ends
    return out


def pusht_spec(
    arrays: Mapping[str, np.ndarray], version: str, root: Path, work: Path, **extra: Any
) -> dict[str, Any]:
    """A writer spec for PushT arrays (see :func:`pusht_arrays`), saving its .npz in ``work``."""
    npz = work / f"{root.name}_frames.npz"
    frames = {PUSHT_FEATURES[k][0]: np.asarray(v) for k, v in arrays.items() if k != "episode_ends"}
    np.savez(npz, episode_ends=arrays["episode_ends"], **frames)
    features = {name: spec for name, spec in PUSHT_FEATURES.values()}
    spec = {"version": version, "root": str(root), "fps": PUSHT_FPS, "features": features}
    return {**spec, "arrays": str(npz), "task": TASK_TEXT, "repo_id": "cm_policy/pusht", **extra}


def image_errors(original: np.ndarray, decoded: np.ndarray) -> dict[str, float]:
    """How far decoded frames are from the originals (uint8, same shape): mean and max absolute
    error, the 99th percentile, the worst frame's mean error and the PSNR, in 0..255 units."""
    if original.shape != decoded.shape:
        raise ValueError(f"shapes differ: {original.shape} vs {decoded.shape}")
    frame_means = np.empty(len(original))
    counts = np.zeros(256, np.int64)
    total = 0.0
    squared = 0.0
    for start in range(0, len(original), 512):
        a = original[start : start + 512].astype(np.int16)
        b = decoded[start : start + 512].astype(np.int16)
        diff = np.abs(a - b)
        frame_means[start : start + 512] = diff.reshape(len(diff), -1).mean(axis=1)
        counts += np.bincount(diff.reshape(-1), minlength=256)
        total += float(diff.sum())
        squared += float((diff.astype(np.float64) ** 2).sum())
    n = original.size
    mse = squared / n
    p99 = int(np.searchsorted(np.cumsum(counts), 0.99 * n))
    return {
        "mean_abs": total / n,
        "max_abs": float(np.flatnonzero(counts)[-1]),
        "p99_abs": float(p99),
        "worst_frame_mean_abs": float(frame_means.max()),
        "psnr_db": float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse),
    }


def compare_pusht(
    arrays: Mapping[str, np.ndarray], converted: Path
) -> tuple[dict[str, bool], dict[str, float]]:
    """Low-dim equality per original key and the image errors of a converted PushT buffer."""
    from cm_policy.data import ReplayBuffer
    from cm_policy.data.formats.lerobot import buffer_key

    buffer = ReplayBuffer.open(converted)
    equal = {"episode_ends": np.array_equal(buffer.episode_ends, arrays["episode_ends"])}
    for key, (name, _) in PUSHT_FEATURES.items():
        if key != "img":
            mine = np.asarray(buffer[buffer_key(name)][:])
            equal[key] = mine.dtype == arrays[key].dtype and np.array_equal(mine, arrays[key])
    errors = image_errors(arrays["img"], np.asarray(buffer[buffer_key("observation.image")][:]))
    return equal, errors


def _cli(args: Sequence[str], what: str) -> float:
    started = time.perf_counter()
    _run([sys.executable, "-m", "cm_policy.cli", *args], what)
    return time.perf_counter() - started


def _folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--episodes", type=int, default=None, help="first N episodes (all)")
    parser.add_argument("--versions", nargs="+", default=["v3.0", "v2.1"])
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--work", type=Path, default=Path("/tmp/cm_policy_lerobot/roundtrip"))
    parser.add_argument("--train-steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("eval/results"))
    args = parser.parse_args()

    from cm_policy.evaluation.machine import describe_machine

    started = time.perf_counter()
    prebuilt = (args.venv / ".cm_policy_writer").exists()
    python = ensure_writer_venv(args.venv)
    venv_s = None if prebuilt else time.perf_counter() - started
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    arrays = pusht_arrays(args.dataset, args.episodes)
    n_episodes, n_frames = len(arrays["episode_ends"]), int(arrays["episode_ends"][-1])
    print(f"{n_episodes} episodes, {n_frames} frames from {args.dataset}", flush=True)
    rows = []
    for version in args.versions:
        root = args.work / f"pusht_lerobot_{version}"
        # v3.0 with small files, so that episodes span several data and video files and chunks.
        extra = (
            {"chunk_settings": {"chunks_size": 2, "data_files_size_in_mb": 1,
                                "video_files_size_in_mb": 1}}
            if version == "v3.0"
            else {}
        )  # fmt: skip
        spec = pusht_spec(arrays, version, root, args.work, **extra)
        [written] = write_lerobot(python, [spec], args.work)
        print(f"{version}: written in {written['wall_s']:.1f} s", flush=True)
        out = args.work / f"pusht_from_lerobot_{version}.zarr"
        convert_s = _cli(["data", "convert", "lerobot", str(root), str(out)], "convert")
        info_s = _cli(["data", "info", str(out)], "data info")
        equal, errors = compare_pusht(arrays, out)
        run = args.work / f"train_{version}"
        train_s = _cli(
            [
                "train",
                "task=lerobot_pusht",
                f"task.dataset_path={out}",
                f"training.steps={args.train_steps}",
                "training.batch_size=64",
                "training.warmup_steps=1",
                "training.num_threads=1",
                "training.checkpoint_every=1000000",
                f"output_dir={run}",
            ],
            "train",
        )
        files = {
            "data": len(list(root.glob("data/**/*.parquet"))),
            "videos": len(list(root.glob("videos/**/*.mp4"))),
        }
        rows.append(
            {
                "version": version,
                "write_s": written["wall_s"],
                "convert_s": convert_s,
                "info_s": info_s,
                "train_s": train_s,
                "equal": equal,
                "errors": errors,
                "files": files,
                "lerobot_mb": _folder_mb(root),
                "zarr_mb": _folder_mb(out),
            }
        )
        print(f"{version}: {json.dumps(rows[-1], default=float)}", flush=True)
    write_report(args, rows, n_episodes, n_frames, venv_s, describe_machine())


def write_report(
    args: argparse.Namespace,
    rows: list[dict[str, Any]],
    n_episodes: int,
    n_frames: int,
    venv_s: float | None,
    machine: str,
) -> None:
    import av

    lines = [
        "# LeRobotDataset round trip: PushT human data",
        "",
        "Generated by:",
        "",
        "```",
        "python -m cm_policy.experiments.lerobot_roundtrip --out eval/results",
        "```",
        "",
        f"- Machine: {machine}; load average before the run "
        + " / ".join(f"{x:.2f}" for x in os.getloadavg())
        + " (other jobs shared the machine: timings are indicative).",
        f"- Data: `{args.dataset.name}` (Diffusion Policy's human PushT demonstrations), "
        f"{n_episodes} episodes, {n_frames} frames, 96x96 RGB at {PUSHT_FPS} fps.",
        f"- Writers (LeRobot's own code) in `{args.venv}` "
        + ("(already built)" if venv_s is None else f"(built in {venv_s:.0f} s)")
        + f": v3.0 by `{WRITER_V30}`, v2.1 by `{WRITER_V21}` (`--no-deps`), with `{TORCH}` "
        "(CPU) and a torchvision stub (see the script's doc). Videos: each writer's defaults, "
        "libsvtav1, yuv420p, crf 30, a key frame every 2 frames; lerobot 0.4.4 (v3.0) also sets "
        "SVT-AV1's preset 12 (its fastest), lerobot 0.3.3 (v2.1) the encoder's default preset. "
        "v3.0 is written with 1 MB data and video files and 2 files a chunk, so its episodes "
        "span several files and chunk folders.",
        f"- Reader: `cm-policy data convert lerobot SRC OUT.zarr` (PyAV {av.__version__}, "
        f"Python {platform.python_version()}); training: `cm-policy train task=lerobot_pusht "
        f"training.steps={args.train_steps} training.batch_size=64` (config/task/"
        "lerobot_pusht.yaml, low-dim state).",
        "",
        "| version | files (data / video) | write | convert | train | low-dim equal | "
        "images: mean abs err | p99 | max | worst frame (mean) | PSNR |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        e = row["errors"]
        equal = "yes" if all(row["equal"].values()) else f"NO: {row['equal']}"
        lines.append(
            f"| {row['version']} | {row['files']['data']} / {row['files']['videos']} | "
            f"{row['write_s']:.0f} s | {row['convert_s']:.1f} s | {row['train_s']:.1f} s | "
            f"{equal} | {e['mean_abs']:.3f} | {e['p99_abs']:.0f} | {e['max_abs']:.0f} | "
            f"{e['worst_frame_mean_abs']:.3f} | {e['psnr_db']:.1f} dB |"
        )
    lines += [
        "",
        "Low-dim: `state`, `keypoint` (9x2), `action`, `n_contacts` and the episode ends come "
        "back bit for bit (float32). Image errors are in 0..255 units over every pixel of every "
        "frame: the loss of LeRobot's AV1 encoding (4:2:0 chroma subsampling, crf 30), larger "
        "for v3.0 because of its faster preset, not of the layout. Each decoded frame is the "
        "one of its parquet row (`tests/test_lerobot.py` checks that a one-frame shift would "
        "be seen), and its PushT subset is held to a mean absolute error below 1.2 and a worst "
        "frame below 4.0, from these measurements.",
        "",
        "Sizes: "
        + "; ".join(
            f"{r['version']} {r['lerobot_mb']:.1f} MB as LeRobotDataset, "
            f"{r['zarr_mb']:.1f} MB as zarr (uint8 frames, zstd)"
            for r in rows
        )
        + ".",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lerobot_roundtrip.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'lerobot_roundtrip.md'}")


if __name__ == "__main__":
    main()
