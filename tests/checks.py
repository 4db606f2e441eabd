"""The promises every migration test checks, written once."""

import os
import time


def frames_exact(tb) -> None:
    """On every host, the used frames are exactly those its domains own: nothing leaked."""
    for name, h in tb.hosts.items():
        c = h.call("frame_counts")
        assert c["used"] == sum(h.call("guest_frames").values()), f"{name}: frames leaked"
        assert c["free"] + c["used"] + c["reserved"] == c["total"]


def wait_progress(host, guest: str, timeout: float = 10.0) -> None:
    """The guest's vCPU keeps going: the pages it writes (a scan: reads) rise (bounded wait,
    no timing claim)."""
    start = host.call("guest_status", guest)["progress_pages_total"]
    deadline = time.monotonic() + timeout
    while host.call("guest_status", guest)["progress_pages_total"] <= start:
        assert time.monotonic() < deadline, f"{guest} made no progress on {host.name}"
        time.sleep(0.01)


def processes_with_env(name: str, value: str) -> list[int]:
    """Live processes whose environment holds name=value (every process a migbed start-up
    began inherits its MIGBED_HOME): what a start-up or `down` must leave none of."""
    want = f"{name}={value}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        if want in env and stat[stat.rindex(")") + 2] != "Z":
            found.append(int(entry))
    return found
