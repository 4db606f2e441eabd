"""Stopping every process a start-up began, by the session they share (Linux's /proc).

Ray's raylet starts each worker (every host actor is one) in a process group of its own, so
killing the launcher's process group leaves the workers behind as orphans until they notice
their raylet is gone (about a minute). They all keep the session the launcher opened with
`start_new_session`, though: its session id names every process of that start-up, workers
included, and nothing else.
"""

import os
import signal
import time


def proc_stats() -> dict[int, list[str]]:
    """pid -> the fields of /proc/<pid>/stat after the command (state, ppid, pgrp, sid...)
    of every process but this one."""
    out: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        out[int(entry)] = stat[stat.rindex(")") + 2:].split()
    return out


def session_processes(sid: int, zombies: bool = False) -> list[int]:
    """Every process of session `sid`, this one excluded; with `zombies`, also those dead
    but not yet reaped."""
    return [pid for pid, f in proc_stats().items()
            if (zombies or f[0] != "Z") and int(f[3]) == sid]


def kill_session(sid: int, grace_seconds: float = 2.0, reap_seconds: float = 5.0) -> int:
    """SIGTERM every process of session `sid`, SIGKILL what is left after `grace_seconds`
    (Ray's GCS and raylet take longer than that to stop on SIGTERM), then wait up to
    `reap_seconds` until even their zombies are gone; returns how many there were. A
    session of no process (already gone) is fine."""
    pids = session_processes(sid)
    for sig, wait in ((signal.SIGTERM, grace_seconds), (signal.SIGKILL, reap_seconds)):
        left = session_processes(sid)
        if not left:
            break
        for pid in left:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and session_processes(sid):
            time.sleep(0.05)
    deadline = time.monotonic() + reap_seconds
    while time.monotonic() < deadline and session_processes(sid, zombies=True):
        time.sleep(0.05)
    return len(pids)
