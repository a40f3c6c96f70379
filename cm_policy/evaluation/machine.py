"""A one-line description of the machine, for every reported figure."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def describe_machine() -> str:
    """CPU model, core count, OS and the GPU torch sees, e.g. 'Intel(R) Xeon(R) Processor,
    2 CPU cores, Linux 6.1, no GPU' or '..., GPU NVIDIA H100 80GB HBM3'."""
    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        gpu = "GPU " + ", ".join(names)
    else:
        gpu = "no GPU"
    return f"{cpu}, {os.cpu_count()} CPU cores, {platform.system()} {platform.release()}, {gpu}"
