"""Machine and date stamps for benchmark results (every figure in the README carries them)."""
from __future__ import annotations

import datetime
import os
import platform

import torch


def machine() -> str:
    """A one-line description: CPU model and count, memory, GPU if any, torch version."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = float("nan")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, {gpu}, torch {torch.__version__}"


def today() -> str:
    return datetime.date.today().isoformat()
