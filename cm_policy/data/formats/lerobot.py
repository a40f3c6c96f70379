"""LeRobotDataset folders (codebase v2.0, v2.1 and v3.0) as replay buffers.

``cm-policy data convert lerobot SRC [SRC2 ...] OUT.zarr [keys=A,B resize=H,W overwrite=BOOL]``
(the options and their defaults: ``config/convert/lerobot.yaml``)

A LeRobotDataset is a folder::

    meta/info.json          codebase_version, fps, features {name: {dtype, shape, names, info}},
                            data_path and video_path (templates), chunks_size, totals
    v3.0:  meta/episodes/chunk-XXX/file-YYY.parquet   one row per episode: episode_index, length,
               data/chunk_index, data/file_index, dataset_from_index, dataset_to_index and, per
               camera, videos/<key>/chunk_index, file_index, from_timestamp, to_timestamp
           data/chunk-XXX/file-YYY.parquet            frames of many episodes
           videos/<key>/chunk-XXX/file-YYY.mp4        many episodes, one after the other
    v2.x:  meta/episodes.jsonl                        {"episode_index", "tasks", "length"}
           data/chunk-XXX/episode_NNNNNN.parquet      one episode's frames
           videos/chunk-XXX/<key>/episode_NNNNNN.mp4  one episode's frames

Frames are parquet rows (``timestamp``, ``frame_index``, ``episode_index``, ``index``,
``task_index`` and the numeric features); a ``video`` feature's frames are in its MP4 files, at
the row's ``timestamp`` (plus the episode's ``from_timestamp`` in v3.0); an ``image`` feature's
frames are PNG/JPEG bytes in the parquet rows.

The buffer gets one array per feature, keyed by the feature's name with ``.`` (and ``/``)
replaced by ``_`` (``observation.images.top`` -> ``observation_images_top``), because
Hydra/OmegaConf keys cannot hold dots: float features as float32 ``(T, *shape)``, integer and
boolean features as they are, camera features as uint8 ``(T, H, W, 3)`` RGB (optionally
resized). Episodes follow ``episode_index``. The bookkeeping columns and string features are
left out unless ``keys=`` names them (strings cannot be). Where it came from (source folders,
codebase versions, fps, the original feature names and definitions) is kept in the buffer's
root attributes (``lerobot``) and, with each source's ``info.json``, in
``<OUT>/lerobot_source.json``. ``<OUT>/task.yaml`` is the buffer's task config, every feature
named, at the dataset's fps (:mod:`cm_policy.data.task_file`):
``cm-policy train task=<OUT>/task.yaml`` trains on it.

Everything is checked before and while it is read; an inconsistency (no ``meta/info.json``, an
unsupported version, an unknown ``keys=`` feature, an episode whose frames disagree with the
metadata, a video that cannot be decoded or lacks frames) raises :class:`DatasetError` naming
the file, what was expected and what was found. The buffer is written under a temporary name and
renamed at the end, so a failure leaves nothing at ``OUT``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cm_policy.data.formats import DataFormat
from cm_policy.data.outputs import OutputExistsError as OutputExistsError  # re-exported
from cm_policy.data.outputs import prepare_output
from cm_policy.data.replay_buffer import DatasetError, ReplayBuffer, atomic_directory
from cm_policy.data.task_file import TASK_FILE, write_task_file

SUPPORTED_VERSIONS = ("v2.0", "v2.1", "v3.0")
INFO_PATH = "meta/info.json"
SOURCE_FILE = "lerobot_source.json"  # beside the arrays of a converted buffer
ATTRS_KEY = "lerobot"  # the buffer root's attribute with the provenance
# Columns every LeRobotDataset has; converted only when keys= names them.
BOOKKEEPING = ("timestamp", "frame_index", "episode_index", "index", "task_index")
CAMERA_DTYPES = ("video", "image")
# A video frame belongs to a parquet row when their times differ by less than this fraction of
# the frame period (LeRobot's own loader asks for 1e-4 s; half a period still picks one frame).
FRAME_TOLERANCE = 0.4
# Seek (rather than decode from the start) when an episode starts this far into a video.
_SEEK_AFTER_S = 2.0


def buffer_key(feature: str) -> str:
    """The buffer key of a LeRobot feature: dots (and slashes) become underscores."""
    return feature.replace(".", "_").replace("/", "_")


def parse_resize(value: str | Sequence[int] | None) -> tuple[int, int] | None:
    """``"H,W"`` (or ``"HxW"``) as ``(H, W)``; None stays None."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        parts = value.lower().replace("x", ",").split(",")
    else:
        parts = list(value)
    try:
        size = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        size = ()
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(
            f"resize must be H,W with two positive integers (e.g. 96,96), got {value!r}"
        )
    return size  # type: ignore[return-value]


@dataclass
class Feature:
    """A feature of a LeRobotDataset as info.json declares it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    spec: dict[str, Any]

    @property
    def key(self) -> str:
        return buffer_key(self.name)

    @property
    def is_camera(self) -> bool:
        return self.dtype in CAMERA_DTYPES

    @property
    def is_numeric(self) -> bool:
        try:
            return np.dtype(self.dtype).kind in "biuf"
        except TypeError:
            return False


@dataclass
class Episode:
    """One episode: its frames' data file (and rows) and, per video feature, its video file."""

    index: int
    length: int
    data_file: Path
    # v3.0: the episode's global frame range (dataset_from_index, dataset_to_index)
    frame_range: tuple[int, int] | None = None
    videos: dict[str, tuple[Path, float]] = field(default_factory=dict)  # key -> (file, start s)


class LeRobotSource:
    """A local LeRobotDataset folder, opened and checked (metadata only; frames are read per
    episode by :meth:`read_episode`)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(
                f"no LeRobotDataset at {self.root}: expected a folder holding {INFO_PATH}, "
                "data/ and videos/"
            )
        info_file = self.root / INFO_PATH
        if not info_file.is_file():
            found = sorted(p.name for p in self.root.iterdir())
            raise DatasetError(
                f"{self.root}: missing {INFO_PATH} (a LeRobotDataset folder holds meta/info.json "
                f"with codebase_version, fps and features); found {found}"
            )
        try:
            self.info: dict[str, Any] = json.loads(info_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DatasetError(f"{info_file}: not valid JSON: {exc}") from exc
        if not isinstance(self.info, dict):
            raise DatasetError(f"{info_file}: expected a JSON object, found {type(self.info)}")
        self.version = str(self.info.get("codebase_version"))
        if self.version not in SUPPORTED_VERSIONS:
            raise DatasetError(
                f"{info_file}: codebase_version {self.info.get('codebase_version')!r} is not "
                f"supported (expected one of {list(SUPPORTED_VERSIONS)}); LeRobot's "
                "convert_dataset_v21_to_v30 converts older datasets (v1.x: first to v2.1)"
            )
        missing = [k for k in ("fps", "features", "data_path") if k not in self.info]
        if missing:
            raise DatasetError(
                f"{info_file}: missing {missing} (a {self.version} info.json has fps, features, "
                f"data_path, video_path); found {sorted(self.info)}"
            )
        self.fps = float(self.info["fps"])
        if not self.fps > 0:
            raise DatasetError(f"{info_file}: fps must be positive, found {self.info['fps']!r}")
        self.features = self._read_features(info_file)
        if any(f.dtype == "video" for f in self.features.values()) and not self.info.get(
            "video_path"
        ):
            raise DatasetError(f"{info_file}: has video features but no video_path template")
        self.episodes = self._read_episodes()
        self._check_totals(info_file)

    # --- metadata ------------------------------------------------------------------------------
    def _read_features(self, info_file: Path) -> dict[str, Feature]:
        raw = self.info["features"]
        if not isinstance(raw, dict) or not raw:
            raise DatasetError(f"{info_file}: 'features' must be a non-empty object, found {raw!r}")
        features = {}
        for name, spec in raw.items():
            if not isinstance(spec, dict) or "dtype" not in spec:
                raise DatasetError(
                    f"{info_file}: feature {name!r} needs a dtype (and a shape), found {spec!r}"
                )
            shape = tuple(int(s) for s in spec.get("shape") or (1,))
            features[name] = Feature(name, str(spec["dtype"]), shape, spec)
        return features

    def _template(self, key: str, **fields: Any) -> Path:
        try:
            return self.root / str(self.info[key]).format(**fields)
        except (KeyError, IndexError, ValueError) as exc:
            raise DatasetError(
                f"{self.root / INFO_PATH}: cannot fill the {key} template "
                f"{self.info[key]!r} with {sorted(fields)}: {exc}"
            ) from None

    def _read_episodes(self) -> list[Episode]:
        episodes = self._read_v3_episodes() if self.version == "v3.0" else self._read_v2_episodes()
        if not episodes:
            raise DatasetError(f"{self.root}: the episode metadata lists no episodes")
        indices = [e.index for e in episodes]
        if len(set(indices)) != len(indices):
            dup = sorted({i for i in indices if indices.count(i) > 1})
            raise DatasetError(f"{self.root}: episode metadata lists episode(s) {dup} twice")
        for ep in episodes:
            if ep.length <= 0:
                raise DatasetError(
                    f"{self.root}: episode {ep.index} has length {ep.length} in the metadata "
                    "(expected >= 1 frame)"
                )
            if not ep.data_file.is_file():
                raise DatasetError(
                    f"{self.root}: episode {ep.index}'s data file {ep.data_file} is missing"
                )
            for key, (path, _) in ep.videos.items():
                if not path.is_file():
                    raise DatasetError(
                        f"{self.root}: episode {ep.index}'s video of {key!r} ({path}) is missing"
                    )
        return sorted(episodes, key=lambda e: e.index)

    def _read_v2_episodes(self) -> list[Episode]:
        meta = self.root / "meta/episodes.jsonl"
        if not meta.is_file():
            raise DatasetError(
                f"{self.root}: missing meta/episodes.jsonl (a {self.version} dataset lists its "
                "episodes there: episode_index, tasks, length)"
            )
        chunks = int(self.info.get("chunks_size") or 1000)
        videos = [f.name for f in self.features.values() if f.dtype == "video"]
        episodes = []
        for n, line in enumerate(meta.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                index, length = int(row["episode_index"]), int(row["length"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise DatasetError(
                    f"{meta}:{n}: expected a JSON object with episode_index and length, found "
                    f"{line[:200]!r} ({exc})"
                ) from None
            fields = {"episode_chunk": index // chunks, "episode_index": index}
            episode = Episode(index, length, self._template("data_path", **fields))
            for key in videos:
                path = self._template("video_path", video_key=key, **fields)
                episode.videos[key] = (path, 0.0)
            episodes.append(episode)
        return episodes

    def _read_v3_episodes(self) -> list[Episode]:
        import pyarrow.parquet as pq

        files = sorted((self.root / "meta/episodes").glob("chunk-*/file-*.parquet"))
        if not files:
            raise DatasetError(
                f"{self.root}: missing meta/episodes/chunk-*/file-*.parquet (a v3.0 dataset "
                "lists its episodes there)"
            )
        videos = [f.name for f in self.features.values() if f.dtype == "video"]
        need = ["episode_index", "length", "data/chunk_index", "data/file_index"]
        need += ["dataset_from_index", "dataset_to_index"]
        for key in videos:
            need += [f"videos/{key}/{c}" for c in ("chunk_index", "file_index", "from_timestamp")]
        episodes = []
        for file in files:
            try:
                names = pq.read_schema(file).names
                missing = [c for c in need if c not in names]
                if missing:
                    raise DatasetError(
                        f"{file}: missing column(s) {missing} of the v3.0 episode metadata; "
                        f"found {[n for n in names if not n.startswith('stats/')]}"
                    )
                rows = pq.read_table(file, columns=need).to_pylist()
            except DatasetError:
                raise
            except Exception as exc:  # pyarrow's errors for files that are not parquet
                raise DatasetError(f"{file}: cannot read the episode metadata: {exc}") from exc
            for row in rows:
                index = int(row["episode_index"])
                data = self._template(
                    "data_path",
                    chunk_index=int(row["data/chunk_index"]),
                    file_index=int(row["data/file_index"]),
                )
                span = (int(row["dataset_from_index"]), int(row["dataset_to_index"]))
                episode = Episode(index, int(row["length"]), data, frame_range=span)
                if span[1] - span[0] != episode.length:
                    raise DatasetError(
                        f"{file}: episode {index} has length {episode.length} but "
                        f"dataset_from_index..dataset_to_index {span[0]}..{span[1]} spans "
                        f"{span[1] - span[0]} frames"
                    )
                for key in videos:
                    path = self._template(
                        "video_path",
                        video_key=key,
                        chunk_index=int(row[f"videos/{key}/chunk_index"]),
                        file_index=int(row[f"videos/{key}/file_index"]),
                    )
                    episode.videos[key] = (path, float(row[f"videos/{key}/from_timestamp"]))
                episodes.append(episode)
        return episodes

    def _check_totals(self, info_file: Path) -> None:
        n_frames = sum(e.length for e in self.episodes)
        declared = {
            "total_episodes": len(self.episodes),
            "total_frames": n_frames,
        }
        for key, value in declared.items():
            if key in self.info and int(self.info[key]) != value:
                raise DatasetError(
                    f"{info_file}: {key} is {self.info[key]} but the episode metadata lists "
                    f"{len(self.episodes)} episodes of {n_frames} frames in all"
                )

    # --- selection -----------------------------------------------------------------------------
    def select(self, keys: Sequence[str] | None) -> list[Feature]:
        """The features to convert: those named (by feature name or buffer key; ``action`` is
        always included when the dataset has it), or every numeric and camera feature except
        the bookkeeping columns."""
        if keys is None:
            return [
                f
                for f in self.features.values()
                if f.name not in BOOKKEEPING and (f.is_numeric or f.is_camera)
            ]
        by_key = {f.key: f for f in self.features.values()}
        chosen: list[Feature] = []
        unknown = []
        for name in keys:
            feature = self.features.get(name) or by_key.get(name)
            if feature is None:
                unknown.append(name)
            elif feature not in chosen:
                chosen.append(feature)
        if unknown:
            raise DatasetError(
                f"{self.root}: keys= names {unknown}, which the dataset does not have; its "
                f"features are {sorted(self.features)} (buffer keys: the names with '.' as '_')"
            )
        for feature in chosen:
            if not (feature.is_numeric or feature.is_camera):
                raise DatasetError(
                    f"{self.root}: feature {feature.name!r} has dtype {feature.dtype!r}; only "
                    "numeric, image and video features can go into a replay buffer"
                )
        if "action" in self.features and self.features["action"] not in chosen:
            chosen.insert(0, self.features["action"])
        return chosen

    # --- frames ------------------------------------------------------------------------------
    def read_episode(
        self,
        episode: Episode,
        features: Sequence[Feature],
        tables: _TableCache,
        videos: Mapping[str, _VideoReader],
        resize: tuple[int, int] | None,
    ) -> dict[str, np.ndarray]:
        """One episode's arrays, keyed by buffer key."""
        where = f"{episode.data_file} (episode {episode.index})"
        columns = [f.name for f in features if f.dtype != "video"]
        rows = tables.episode_rows(episode, columns)
        n = rows.num_rows
        if n != episode.length:
            raise DatasetError(
                f"{where}: {n} frame rows, but the episode metadata says length {episode.length}"
            )
        if "frame_index" in rows.column_names:
            frame_index = _column(rows, "frame_index", (1,), where).reshape(-1)
            if not np.array_equal(frame_index, np.arange(n)):
                bad = int(np.flatnonzero(frame_index != np.arange(n))[0])
                raise DatasetError(
                    f"{where}: frame_index should run 0..{n - 1}; row {bad} has "
                    f"{frame_index[bad]} (frames missing, repeated or out of order)"
                )
        if episode.frame_range is not None and "index" in rows.column_names:
            index = _column(rows, "index", (1,), where).reshape(-1)
            expected = np.arange(*episode.frame_range)
            if not np.array_equal(index, expected):
                raise DatasetError(
                    f"{where}: the rows' index runs {index[0]}..{index[-1]}, but the episode "
                    f"metadata says dataset_from_index..dataset_to_index "
                    f"{episode.frame_range[0]}..{episode.frame_range[1]}"
                )
        out: dict[str, np.ndarray] = {}
        for feature in features:
            if feature.dtype == "video":
                path, start = episode.videos[feature.name]
                if "timestamp" in rows.column_names:
                    stamps = _column(rows, "timestamp", (1,), where).reshape(-1).astype(np.float64)
                else:
                    stamps = np.arange(n) / self.fps
                images = videos[feature.name].frames(
                    path, start + stamps, FRAME_TOLERANCE / self.fps, where, resize
                )
            elif feature.dtype == "image":
                images = _decode_images(rows, feature.name, self.root, where, resize)
            else:
                values = _column(rows, feature.name, feature.shape, where)
                if values.dtype.kind == "f":
                    values = values.astype(np.float32)
                out[feature.key] = values
                continue
            out[feature.key] = images
        return out


# --- parquet ----------------------------------------------------------------------------------
_ROW_COLUMNS = ("episode_index", "frame_index", "timestamp", "index")


class _TableCache:
    """Reads a data file once (the needed columns) and hands out each episode's rows."""

    def __init__(self) -> None:
        self._path: Path | None = None
        self._columns: tuple[str, ...] = ()
        self._table: Any = None
        self._rows_of: dict[int, np.ndarray] = {}

    def episode_rows(self, episode: Episode, columns: Sequence[str]) -> Any:
        import pyarrow.parquet as pq

        path = episode.data_file
        wanted = tuple(dict.fromkeys([*_ROW_COLUMNS, *columns]))
        if path != self._path or wanted != self._columns:
            try:
                names = pq.read_schema(path).names
            except Exception as exc:
                raise DatasetError(f"{path}: cannot read it as parquet: {exc}") from exc
            missing = [c for c in ("episode_index", *columns) if c not in names]
            if missing:
                raise DatasetError(
                    f"{path}: missing column(s) {missing} (features of info.json); found {names}"
                )
            try:
                table = pq.read_table(path, columns=[c for c in wanted if c in names])
            except Exception as exc:
                raise DatasetError(f"{path}: cannot read it as parquet: {exc}") from exc
            episodes = _column(table, "episode_index", (1,), str(path)).reshape(-1)
            order = np.argsort(episodes, kind="stable")
            values, starts = np.unique(episodes[order], return_index=True)
            stops = [*starts[1:], len(order)]
            self._rows_of = {
                int(v): order[a:b] for v, a, b in zip(values, starts, stops, strict=True)
            }
            self._path, self._columns, self._table = path, wanted, table
        rows = self._rows_of.get(episode.index, np.zeros(0, np.int64))
        if len(rows) and np.all(np.diff(rows) == 1):
            return self._table.slice(int(rows[0]), len(rows))
        return self._table.take(rows)


def _column(table: Any, name: str, shape: tuple[int, ...], where: str) -> np.ndarray:
    """A parquet column as a numpy array of shape (rows, *shape): scalar, list, fixed-size list
    and nested list (HF Array2D...) columns alike."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = table.column(name)
    values = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if isinstance(values.type, pa.ExtensionType):
        values = values.storage
    n = len(values)
    dims = []
    while True:
        if values.null_count:
            raise DatasetError(f"{where}: column {name!r} has missing (null) values")
        kind = values.type
        if pa.types.is_fixed_size_list(kind):
            dims.append(kind.list_size)
        elif pa.types.is_list(kind) or pa.types.is_large_list(kind):
            lengths = pc.list_value_length(values).to_numpy(zero_copy_only=False)
            if len(lengths) and (lengths != lengths[0]).any():
                raise DatasetError(
                    f"{where}: column {name!r} holds lists of different lengths "
                    f"{sorted(set(lengths.tolist()))[:5]} (expected shape {list(shape)})"
                )
            dims.append(int(lengths[0]) if len(lengths) else 0)
        else:
            break
        values = values.flatten()
        if isinstance(values.type, pa.ExtensionType):
            values = values.storage
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)):
        raise DatasetError(f"{where}: column {name!r} holds {kind}, expected numbers")
    array = values.to_numpy(zero_copy_only=False)
    size = math.prod(shape)
    if math.prod(dims) != size:
        raise DatasetError(
            f"{where}: column {name!r} holds {dims or 'scalars'} per frame, but info.json "
            f"declares shape {list(shape)}"
        )
    return array.reshape(n, *shape)


# --- images and videos -------------------------------------------------------------------------
def _fit(image: np.ndarray, resize: tuple[int, int] | None) -> np.ndarray:
    if resize is None or image.shape[:2] == resize:
        return image
    import cv2

    # INTER_AREA averages when shrinking (no aliasing); it interpolates when enlarging.
    return cv2.resize(image, (resize[1], resize[0]), interpolation=cv2.INTER_AREA)


def _stack(frames: list[np.ndarray], name: str, where: str) -> np.ndarray:
    shapes = sorted({f.shape for f in frames})
    if len(shapes) > 1:
        raise DatasetError(
            f"{where}: frames of {name!r} have different sizes {shapes}; pass resize=H,W to "
            "bring them to one"
        )
    return np.stack(frames)


def _decode_images(
    rows: Any, name: str, root: Path, where: str, resize: tuple[int, int] | None
) -> np.ndarray:
    """An ``image`` feature's frames: structs {bytes, path} holding PNG/JPEG files."""
    import cv2

    frames = []
    for i, item in enumerate(rows.column(name).to_pylist()):
        data = item.get("bytes") if isinstance(item, dict) else item
        if data is None and isinstance(item, dict) and item.get("path"):
            path = Path(item["path"])
            path = path if path.is_absolute() else root / path
            if not path.is_file():
                raise DatasetError(f"{where}: frame {i} of {name!r} names {path}, which is missing")
            data = path.read_bytes()
        if not data:
            raise DatasetError(f"{where}: frame {i} of {name!r} holds no image bytes")
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise DatasetError(f"{where}: frame {i} of {name!r} is not a decodable image")
        frames.append(_fit(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), resize))
    return _stack(frames, name, where)


class _VideoReader:
    """Decodes one camera's videos front to back, keeping its place: episodes that follow one
    another in a v3.0 file are read in one pass."""

    def __init__(self, feature: Feature):
        self.feature = feature
        self._path: Path | None = None
        self._container: Any = None
        self._frames: Iterator[Any] | None = None
        self._frame: Any = None  # the current decoded frame (None before the first)

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
        self._container = self._frames = self._frame = self._path = None

    def _open(self, path: Path, start: float, where: str) -> None:
        import av

        self.close()
        try:
            container = av.open(str(path))
            if not container.streams.video:
                container.close()
                raise DatasetError(f"{path}: holds no video stream ({where})")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            if start > _SEEK_AFTER_S and stream.time_base:
                # To the key frame at or before ``start``; decoding goes on from there.
                container.seek(int(start / stream.time_base), stream=stream, backward=True)
        except DatasetError:
            raise
        except Exception as exc:
            raise DatasetError(
                f"{path}: cannot open the video of {self.feature.name!r} ({where}): {exc}"
            ) from exc
        self._container, self._path = container, path
        self._frames = container.decode(stream)

    def _next(self, path: Path, where: str) -> Any:
        try:
            return next(self._frames)  # type: ignore[arg-type]
        except StopIteration:
            return None
        except Exception as exc:
            raise DatasetError(
                f"{path}: cannot decode the video of {self.feature.name!r} ({where}): {exc}"
            ) from exc

    def frames(
        self,
        path: Path,
        times: np.ndarray,
        tolerance: float,
        where: str,
        resize: tuple[int, int] | None,
        retry: bool = True,
    ) -> np.ndarray:
        """The frames shown at ``times`` (seconds into the file), uint8 (len(times), H, W, 3)."""
        current = None if self._frame is None else float(self._frame.time)
        if path != self._path or current is None or times[0] < current - tolerance:
            self._open(path, float(times[0]), where)
        out = []
        for want in times:
            while self._frame is None or float(self._frame.time) < want - tolerance:
                frame = self._next(path, where)
                if frame is None:
                    last = None if self._frame is None else float(self._frame.time)
                    self.close()
                    raise DatasetError(
                        f"{path}: the video of {self.feature.name!r} ends (last frame at "
                        f"{last if last is None else round(last, 4)} s) before the frame at "
                        f"{want:.4f} s that {where} needs: it has fewer frames than the "
                        "episode's rows"
                    )
                self._frame = frame
            found = float(self._frame.time)
            if abs(found - want) > tolerance:
                seeked = times[0] > _SEEK_AFTER_S
                self.close()
                if seeked and retry:  # an imprecise seek: decode from the start instead
                    return self._frames_from_start(path, times, tolerance, where, resize)
                raise DatasetError(
                    f"{path}: the video of {self.feature.name!r} has no frame at {want:.4f} s "
                    f"(within {tolerance:.4f} s) for {where}; the nearest is at {found:.4f} s"
                )
            try:
                image = self._frame.to_ndarray(format="rgb24")
            except Exception as exc:
                raise DatasetError(
                    f"{path}: cannot convert a frame of {self.feature.name!r} to RGB: {exc}"
                ) from exc
            out.append(_fit(image, resize))
        return _stack(out, self.feature.name, where)

    def _frames_from_start(self, path, times, tolerance, where, resize) -> np.ndarray:
        self._open(path, 0.0, where)
        self._frame = self._next(path, where)
        return self.frames(path, times, tolerance, where, resize, retry=False)


# --- conversion -----------------------------------------------------------------------------
def _provenance(source: LeRobotSource, features: Sequence[Feature]) -> dict[str, Any]:
    return {
        "source": str(source.root.resolve()),
        "codebase_version": source.version,
        "fps": source.info["fps"],
        "robot_type": source.info.get("robot_type"),
        "episodes": len(source.episodes),
        "frames": sum(e.length for e in source.episodes),
        "features": {f.key: {"name": f.name, **f.spec} for f in features},
    }


def convert_lerobot(
    sources: str | Path | Sequence[str | Path],
    out: str | Path,
    keys: str | Sequence[str] | None = None,
    resize: str | Sequence[int] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write LeRobotDataset folder(s) as one replay buffer at ``out`` (see the module doc).

    ``keys``: the features to convert (names or buffer keys, a list or ``"a,b"``; ``action`` is
    always included), default every numeric and camera feature but the bookkeeping columns.
    ``resize``: ``(H, W)`` or ``"H,W"`` for every camera feature. Several sources (one robot's
    datasets) go one after the other into one buffer; they need the same fps and features.
    Returns a summary (sources, versions, episodes, steps, keys and their shapes, wall time).
    ``overwrite`` replaces only a buffer this package wrote, never a source
    (:func:`~cm_policy.data.outputs.prepare_output`: OutputError, OutputExistsError).
    """
    from tqdm import tqdm

    started = time.perf_counter()
    out = Path(out)
    roots = [sources] if isinstance(sources, (str, Path)) else list(sources)
    if not roots:
        raise ValueError("convert_lerobot needs at least one LeRobotDataset folder")
    prepare_output(out, overwrite, sources=roots)
    if isinstance(keys, str):
        keys = [k.strip() for k in keys.split(",") if k.strip()] or None
    size = parse_resize(resize)

    opened = [LeRobotSource(root) for root in roots]
    selected = [source.select(keys) for source in opened]
    first = opened[0]
    for source, features in zip(opened[1:], selected[1:], strict=True):
        if source.fps != first.fps:
            raise DatasetError(
                f"{source.root}: fps {source.fps:g} differs from {first.root}'s {first.fps:g}; "
                "one buffer holds one control rate"
            )
        if [f.key for f in features] != [f.key for f in selected[0]]:
            raise DatasetError(
                f"{source.root}: features {[f.name for f in features]} differ from "
                f"{first.root}'s {[f.name for f in selected[0]]}; name the common ones with keys="
            )
    for source, features in zip(opened, selected, strict=True):
        keys_seen: dict[str, str] = {}
        for feature in features:
            if feature.key in keys_seen:
                raise DatasetError(
                    f"{source.root}: features {keys_seen[feature.key]!r} and {feature.name!r} "
                    f"would both be stored as {feature.key!r}; convert one of them (keys=)"
                )
            keys_seen[feature.key] = feature.name
            if feature.dtype == "video" and feature.spec.get("info", {}).get("video.is_depth_map"):
                raise DatasetError(
                    f"{source.root}: {feature.name!r} is a depth-map video, which is not "
                    "converted (RGB cameras only); leave it out with keys="
                )

    total = sum(len(s.episodes) for s in opened)
    shapes: dict[str, tuple[list[int], str]] = {}
    with atomic_directory(out) as tmp:
        buffer = ReplayBuffer.create(tmp)
        bar = tqdm(total=total, desc="convert", unit="episode", disable=not progress)
        for source, features in zip(opened, selected, strict=True):
            tables = _TableCache()
            videos = {f.name: _VideoReader(f) for f in features if f.dtype == "video"}
            try:
                for episode in source.episodes:
                    arrays = source.read_episode(episode, features, tables, videos, size)
                    for key, value in arrays.items():
                        shape = (list(value.shape[1:]), str(value.dtype))
                        if shapes.setdefault(key, shape) != shape:
                            raise DatasetError(
                                f"{source.root} episode {episode.index}: {key} has per-frame "
                                f"shape {shape[0]} {shape[1]}, earlier episodes "
                                f"{shapes[key][0]} {shapes[key][1]}"
                                + ("; pass resize=H,W" if value.dtype == np.uint8 else "")
                            )
                    buffer.add_episode(arrays)
                    bar.update(1)
            finally:
                for reader in videos.values():
                    reader.close()
        bar.close()
        provenance = [_provenance(s, f) for s, f in zip(opened, selected, strict=True)]
        attrs = {"format": "lerobot", "resize": list(size) if size else None}
        attrs["sources"] = provenance
        _write_attrs(tmp, attrs)
        record = {**attrs, "info": {str(s.root.resolve()): s.info for s in opened}}
        (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=2, default=str))
        # After the attributes: the task's control_hz is the fps they record.
        write_task_file(tmp, made_by="cm-policy data convert lerobot", location=out)
        buffer.close()  # its manifest, before the folder is renamed into place
    return {
        "sources": [str(s.root) for s in opened],
        "codebase_version": [s.version for s in opened],
        "fps": first.fps,
        "episodes": buffer.n_episodes,
        "steps": buffer.n_steps,
        "keys": {f.key: f.name for f in selected[0]},
        "shapes": {k: v[0] for k, v in shapes.items()},
        "resize": list(size) if size else None,
        "out": str(out),
        "task_file": str(out / TASK_FILE),
        "wall_s": round(time.perf_counter() - started, 3),
    }


def _write_attrs(path: Path, attrs: Mapping[str, Any]) -> None:
    import zarr
    from zarr.storage import LocalStore

    root = zarr.open_group(LocalStore(path), mode="r+")
    root.attrs[ATTRS_KEY] = json.loads(json.dumps(attrs, default=str))


def source_attrs(path: str | Path) -> dict[str, Any] | None:
    """The provenance a converted buffer records (its root's ``lerobot`` attribute), or None."""
    import zarr
    from zarr.storage import LocalStore

    root = zarr.open_group(LocalStore(Path(path), read_only=True), mode="r")
    value = root.attrs.get(ATTRS_KEY)
    return dict(value) if value is not None else None


class LeRobotFormat(DataFormat):
    name = "lerobot"

    @classmethod
    def convert(cls, sources: list[str], out: str, opts: Mapping[str, Any]) -> dict[str, Any]:
        """``cm-policy data convert lerobot``: options in config/convert/lerobot.yaml."""
        return convert_lerobot(
            sources, out, keys=opts["keys"], resize=opts["resize"], overwrite=opts["overwrite"]
        )
