"""Fixed-length windows over episodes, padded by repeating the edge frames of each episode."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


class SequenceSampler:
    """All windows of `sequence_length` steps that lie within one episode, up to padding.

    Window starts run from `-pad_before` to `episode_len - sequence_length + pad_after` inside
    each selected episode (Diffusion Policy's semantics). Steps before an episode's start read its
    first frame and steps past its end read its last frame, so a window never mixes episodes.
    Each window is stored as a row of absolute time indices, so a batch is one gather per key.
    """

    def __init__(
        self,
        episode_ends: np.ndarray,
        sequence_length: int,
        pad_before: int = 0,
        pad_after: int = 0,
        episode_mask: np.ndarray | None = None,
    ) -> None:
        episode_ends = np.asarray(episode_ends, dtype=np.int64)
        if sequence_length < 1:
            raise ValueError(f"sequence_length must be >= 1, got {sequence_length}")
        for name, pad in (("pad_before", pad_before), ("pad_after", pad_after)):
            if not 0 <= pad < sequence_length:
                raise ValueError(
                    f"{name} must be in [0, sequence_length - 1] = [0, {sequence_length - 1}], "
                    f"got {pad}"
                )
        if episode_mask is None:
            episode_mask = np.ones(len(episode_ends), dtype=bool)
        episode_mask = np.asarray(episode_mask, dtype=bool)
        if episode_mask.shape != episode_ends.shape:
            raise ValueError(
                f"episode_mask has shape {episode_mask.shape}, expected {episode_ends.shape} "
                "(one entry per episode)"
            )
        self.sequence_length = sequence_length
        self.pad_before = pad_before
        self.pad_after = pad_after

        lengths = np.diff(episode_ends, prepend=0)[episode_mask]
        starts = episode_ends[episode_mask] - lengths
        n_windows = np.maximum(lengths - sequence_length + pad_before + pad_after + 1, 0)
        episode_of_window = np.repeat(np.arange(len(lengths)), n_windows)
        # Position of each window within its episode's run of windows, 0, 1, ... per episode.
        first_window = np.cumsum(n_windows) - n_windows
        rank = np.arange(n_windows.sum()) - first_window[episode_of_window]
        offsets = rank[:, None] - pad_before + np.arange(sequence_length)[None, :]
        max_offset = (lengths[episode_of_window] - 1)[:, None]
        self._table = (np.clip(offsets, 0, max_offset) + starts[episode_of_window][:, None]).astype(
            np.intp
        )
        self._table.flags.writeable = False

    def __len__(self) -> int:
        return len(self._table)

    @property
    def indices(self) -> np.ndarray:
        """(n_windows, sequence_length) absolute time indices of every window (read-only)."""
        return self._table

    def sample_sequence(
        self,
        arrays: Mapping[str, Any],
        idx: int,
        first_k: Mapping[str, int] | None = None,
    ) -> dict[str, np.ndarray]:
        """Window `idx` of every array, (sequence_length, ...); works on zarr arrays too.

        `first_k` maps a key to how many leading steps to return for it, e.g. only the
        observation steps of an image stream.
        """
        rows = self._table[idx]
        # One contiguous read per key, then the padding gather in RAM: cheap for lazy arrays.
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        out = {}
        for key, arr in arrays.items():
            key_rows = rows[: first_k[key]] if first_k and key in first_k else rows
            out[key] = np.asarray(arr[lo:hi])[key_rows - lo]
        return out

    def sample_batch(
        self,
        arrays: Mapping[str, np.ndarray],
        idxs: np.ndarray,
        first_k: Mapping[str, int] | None = None,
    ) -> dict[str, np.ndarray]:
        """Windows `idxs` of every in-RAM array, (B, sequence_length, ...); one gather per key."""
        rows = self._table[np.asarray(idxs)]
        out = {}
        for key, arr in arrays.items():
            if not isinstance(arr, np.ndarray):
                raise TypeError(
                    f"sample_batch needs numpy arrays in RAM (see ReplayBuffer.load); "
                    f"{key!r} is a {type(arr).__name__}"
                )
            key_rows = rows[:, : first_k[key]] if first_k and key in first_k else rows
            out[key] = np.take(arr, key_rows, axis=0)
        return out


def get_val_mask(n_episodes: int, val_ratio: float, seed: int = 0) -> np.ndarray:
    """Boolean mask of validation episodes, drawn per episode with a seeded generator.

    At least one episode is held out when `val_ratio` > 0 and there are two or more episodes,
    and at least one is always left for training.
    """
    if not 0.0 <= val_ratio < 1.0:
        raise ValueError(f"val_ratio must be in [0, 1), got {val_ratio}")
    mask = np.zeros(n_episodes, dtype=bool)
    if val_ratio == 0.0 or n_episodes < 2:
        return mask
    n_val = min(max(1, round(n_episodes * val_ratio)), n_episodes - 1)
    rng = np.random.default_rng(seed)
    mask[rng.choice(n_episodes, size=n_val, replace=False)] = True
    return mask


def downsample_mask(mask: np.ndarray, max_n: int | None, seed: int = 0) -> np.ndarray:
    """A copy of `mask` keeping at most `max_n` of its True entries, chosen with `seed`."""
    mask = np.asarray(mask, dtype=bool).copy()
    if max_n is None:
        return mask
    if max_n < 0:
        raise ValueError(f"max_n must be >= 0 or None, got {max_n}")
    selected = np.flatnonzero(mask)
    if len(selected) > max_n:
        rng = np.random.default_rng(seed)
        mask[:] = False
        mask[rng.choice(selected, size=max_n, replace=False)] = True
    return mask
