"""Where a benchmark figure comes from: the machine, the versions and the commit (``+dirty`` when the
checkout has uncommitted changes to tracked files). Every script under benchmarks/ writes it in its JSON."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def commit() -> str:
    revision = _git("rev-parse", "--short=12", "HEAD") or "unknown"
    return revision + ("+dirty" if _git("status", "--porcelain", "--untracked-files=no") else "")


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (platform.processor() is often empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance() -> dict:
    """Machine (platform, CPU, cores, device), torch/CUDA/Triton versions and commit."""
    on_cuda = torch.cuda.is_available()
    info = {
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "device": torch.cuda.get_device_name() if on_cuda else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda if on_cuda else None,
        "commit": commit(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info
