"""Datasets: episode storage (zarr), window sampling and normalization."""

from cm_policy.data.normalizer import LinearNormalizer
from cm_policy.data.replay_buffer import DatasetError, ReplayBuffer, describe
from cm_policy.data.sampler import SequenceSampler, downsample_mask, get_val_mask

__all__ = [
    "DatasetError",
    "LinearNormalizer",
    "ReplayBuffer",
    "SequenceSampler",
    "describe",
    "downsample_mask",
    "get_val_mask",
]
