"""The machine and the code a bench run measured, saved beside its figures so a later run
can be held against it knowing what differed: CPUs, memory, kernel, the socket-buffer caps
(which bound migbed's TCP data path), the Python, Ray and numpy versions, and the commit."""

import os
import platform
import subprocess
from pathlib import Path

import numpy as np

SOCKET_CAPS = {             # /proc/sys entries: the kernel's socket-buffer limits
    "wmem_max_bytes": "net/core/wmem_max",
    "rmem_max_bytes": "net/core/rmem_max",
    "tcp_wmem_bytes": "net/ipv4/tcp_wmem",      # min default max
    "tcp_rmem_bytes": "net/ipv4/tcp_rmem",
}
SOURCE_ROOT = Path(__file__).resolve().parents[2]


def machine() -> dict:
    """This machine, as the figures depend on it."""
    import ray
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    return {"cpus": os.cpu_count(), "cpus_usable": usable,
            "cpu_model": _cpu_model(), "memory_bytes": _memory_bytes(),
            "kernel": platform.release(), "platform": platform.platform(),
            "socket_buffers": socket_caps(),
            "python": platform.python_version(), "ray": ray.__version__,
            "numpy": np.__version__}


def socket_caps() -> dict[str, int | list[int] | None]:
    out: dict[str, int | list[int] | None] = {}
    for key, entry in SOCKET_CAPS.items():
        try:
            values = [int(v) for v in Path("/proc/sys", entry).read_text().split()]
        except (OSError, ValueError):
            out[key] = None
            continue
        out[key] = values[0] if len(values) == 1 else values
    return out


def commit(root: Path = SOURCE_ROOT) -> dict:
    """The commit of the code that ran, and whether it had uncommitted changes (None where
    the code is not a git checkout)."""
    def git(*args: str) -> str | None:
        try:
            p = subprocess.run(["git", "-C", str(root), *args], capture_output=True,
                               text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return p.stdout.strip() if p.returncode == 0 else None
    head = git("rev-parse", "HEAD")
    if head is None:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": head, "dirty": bool(status) if status is not None else None}


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
