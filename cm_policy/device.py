"""Torch devices by name: ``auto`` (CUDA when this torch sees a GPU, else the CPU), ``cpu``,
``cuda`` or ``cuda:INDEX``; for training processes under torchrun, ``cuda:LOCAL_RANK``."""

from __future__ import annotations

import torch

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(
    name: str, local_rank: int = 0, distributed: bool = False, key: str = "training.device"
) -> torch.device:
    """``key`` (auto | cpu | cuda[:index]) as the torch device of this process."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"{key} must be one of {DEVICES} or cuda:INDEX, got {name!r}")
    if device.type == "cpu":
        return device
    if not torch.cuda.is_available():
        raise ValueError(
            f"{key}={name} but this torch build ({torch.__version__}) sees no CUDA "
            f"device; use {key}=cpu or auto"
        )
    if not distributed:
        index = torch.cuda.current_device() if device.index is None else device.index
        return torch.device("cuda", index)
    if device.index is not None:
        raise ValueError(
            f"training.device={name}: under torchrun each process trains on cuda:LOCAL_RANK; "
            "use training.device=cuda or auto"
        )
    if local_rank >= torch.cuda.device_count():
        raise ValueError(
            f"LOCAL_RANK={local_rank} has no GPU of its own ({torch.cuda.device_count()} visible): "
            "start at most one process per GPU (torchrun --nproc_per_node)"
        )
    return torch.device("cuda", local_rank)
