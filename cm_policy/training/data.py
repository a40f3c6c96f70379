"""The training data: a dataset in RAM, its episode split, and random windows of it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from cm_policy.data import DatasetError, LinearNormalizer, ReplayBuffer, SequenceSampler
from cm_policy.data.sampler import downsample_mask, get_val_mask
from cm_policy.data.task_file import mismatches
from cm_policy.tasks import load_task


class TrainingData:
    """The dataset in RAM, its episode split, and a sampler over training windows."""

    def __init__(self, cfg: DictConfig):
        path = Path(cfg.task.dataset_path)
        task = load_task(cfg.task)
        keys = task.dataset_keys()
        # Image arrays stay on disk until dataset_obs converts them a chunk at a time: loading
        # the human PushT images (float32) whole would take 2.8 GB before the uint8 copy.
        lazy = ReplayBuffer.open(path, keys=keys)
        _refuse(cfg.task, path, _dtype_mismatches(lazy, keys))
        images = [k for k in keys if len(lazy[k].shape) >= 4]
        buffer = ReplayBuffer.load(path, keys=[k for k in keys if k not in images])
        raw = {k: buffer[k] for k in buffer.keys} | {k: lazy[k] for k in images}
        with lazy.naming_damaged_chunks():  # a damaged image chunk: a DatasetError naming it
            self.arrays = task.dataset_obs(raw)
        self.arrays["action"] = np.asarray(buffer["action"], dtype=np.float32)
        shapes = {k: tuple(a.shape) for k, a in self.arrays.items()}
        _refuse(cfg.task, path, mismatches(cfg.task, shapes))
        # Every camera's frame shape, as the data has them (checked against any declared):
        # the policy's spec carries them, so a checkpoint always knows its cameras' sizes.
        self.image_shapes = {
            str(k): tuple(int(d) for d in self.arrays[k].shape[1:])
            for k in cfg.task.get("image_keys") or []
        }
        self.n_episodes = buffer.n_episodes
        val_mask = get_val_mask(buffer.n_episodes, cfg.training.val_ratio, cfg.seed)
        train_mask = ~val_mask
        if cfg.training.max_train_episodes:
            train_mask = downsample_mask(train_mask, cfg.training.max_train_episodes, cfg.seed)
        self.n_train_episodes = int(train_mask.sum())
        self.sampler = SequenceSampler(
            buffer.episode_ends,
            sequence_length=cfg.horizon,
            pad_before=cfg.n_obs_steps - 1,
            pad_after=_pad_after(cfg),
            episode_mask=train_mask,
        )
        if len(self.sampler) == 0:
            raise ValueError(f"{path}: no training windows (all episodes held out?)")
        starts = np.concatenate([[0], buffer.episode_ends[:-1]])
        rows = np.concatenate(
            [
                np.arange(s, e)
                for s, e, m in zip(starts, buffer.episode_ends, train_mask, strict=True)
                if m
            ]
        )
        self.train_rows = rows  # time steps of the training episodes, to fit the normaliser on

    def batch(
        self, rng: np.random.Generator, size: int, n_obs_steps: int
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``size`` random training windows, as CPU tensors (see :meth:`windows`)."""
        return self.windows(self.draw(rng, size), n_obs_steps)

    def draw(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """Indices of ``size`` random training windows."""
        return rng.integers(0, len(self.sampler), size=size)

    def windows(
        self, idx: np.ndarray, n_obs_steps: int, device: torch.device | str = "cpu"
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Observations (first ``n_obs_steps`` steps) and actions of windows ``idx`` on
        ``device``; CUDA copies go through pinned memory, asynchronously."""
        first_k = {k: n_obs_steps for k in self.arrays if k != "action"}
        window = self.sampler.sample_batch(self.arrays, idx, first_k=first_k)
        tensors = {k: _to_device(torch.from_numpy(v), device) for k, v in window.items()}
        action = tensors.pop("action")
        return tensors, action


def _dtype_mismatches(buffer: ReplayBuffer, keys: list[str]) -> list[str]:
    return [
        f"{k} has dtype {buffer[k].dtype}, expected numbers (int, float or bool)"
        for k in keys
        if np.dtype(buffer[k].dtype).kind not in "biuf"
    ]


def _refuse(task: Mapping[str, Any], path: Path, problems: list[str]) -> None:
    if problems:
        raise DatasetError(
            f"task {task.get('name', '?')!r} does not match the data in {path}: "
            + "; ".join(problems)
        )


def _pad_after(cfg: DictConfig) -> int:
    """Steps a window may run past its episode's end (repeating the last frame): Diffusion
    Policy's n_action_steps - 1 unless training.pad_after says otherwise (up to horizon - 1)."""
    pad = cfg.training.get("pad_after")
    return int(cfg.n_action_steps - 1 if pad is None else pad)


def _to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def fit_normalizer(cfg: DictConfig, data: TrainingData) -> LinearNormalizer:
    normalizer = LinearNormalizer()
    # Only the normalised keys are gathered: copying the training rows of an image array would
    # duplicate the largest array in RAM for nothing.
    keys = ["action", *cfg.task.low_dim]
    normalizer.fit({k: data.arrays[k][data.train_rows] for k in keys}, mode="limits")
    return normalizer
