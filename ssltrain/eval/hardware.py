"""The machine a run trained on, as ``<run>/hardware.json``: written by the trainer at start so that the report shows
that machine (GPU and CPU models and counts, torch / CUDA / DALI versions) rather than the one the report is made on.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

__all__ = ["HARDWARE_FILE", "hardware_info", "write_hardware"]

HARDWARE_FILE = "hardware.json"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _dali_version() -> str | None:
    """The installed DALI wheel's version (``nvidia-dali-cuda120``, ``-cuda130``, ...), read from its metadata:
    importing DALI itself would take seconds at every training start."""
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name.startswith("nvidia-dali"):
            return dist.version
    return None


def hardware_info() -> dict[str, Any]:
    """Versions and devices of this machine, as plain JSON values."""
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dali": _dali_version(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
    }
    if info["gpu_count"]:
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(info["gpu_count"])]
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def write_hardware(run_dir: Path) -> Path:
    """Write this machine's :func:`hardware_info` to ``<run_dir>/hardware.json`` (atomically); returns its path.

    Called by rank 0 at training start; a resumed run on another machine overwrites it with the newer machine.
    """
    path = Path(run_dir) / HARDWARE_FILE
    tmp = path.with_name(f".{HARDWARE_FILE}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(hardware_info(), indent=2) + "\n")
    os.replace(tmp, path)
    return path
