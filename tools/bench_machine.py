"""What every benchmark's JSON records about the machine it ran on (`machine_record`).

The processor is part of it: float results are reproducible run to run on one processor, not across processors.
The same commit, seed and torch (2.14.1) gave ATO 89.64% on the 2-core VM of 2026-11-30's table and 89.74% on the
VM of the next session (an AVX-512 Xeon): oneDNN picks its convolution kernels by the instruction sets it finds.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The processor's name as the OS reports it ("model name" on Linux), else what `platform` knows."""
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_record(**extra: Any) -> dict[str, Any]:
    """Platform, processor, the instruction set torch's CPU kernels use, core count, torch and Python; then `extra`."""
    return {"platform": platform.platform(), "cpu": cpu_model(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version()} | extra
