"""A host process as /proc sees it: for the soak's check that hosts do not grow."""

import os

import numpy as np


def process_stats(arena: np.ndarray) -> dict:
    """This process: pid, resident memory, and how much of it is the machine-memory `arena`
    (frames stay resident once touched: that is not a leak), in bytes, from /proc (0 where
    /proc is missing)."""
    rss, arena_rss = vm_rss_bytes(), 0
    start = arena.ctypes.data
    end = start + arena.nbytes
    try:
        with open("/proc/self/smaps") as f:     # the arena may span several mappings
            inside = False
            for line in f:
                head = line.split(maxsplit=1)[0]
                if "-" in head and not head.endswith(":"):
                    lo, _, hi = head.partition("-")
                    inside = int(lo, 16) < end and start < int(hi, 16)
                elif inside and head == "Rss:":
                    arena_rss += int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return {"pid": os.getpid(), "rss_bytes": rss, "arena_rss_bytes": arena_rss}


def vm_rss_bytes(pid: int | str = "self") -> int:
    """The resident memory of process `pid` (VmRSS), in bytes; 0 if /proc cannot say."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0
