"""Post-copy's native fault path (`nodes.migration.postcopy.nativefault`, `libmigbedfault.so`):
a process guest's faults read, asked for, served, landed and mapped by native threads on a
fault channel of their own; every page still lands once and every migration verifies; the
figures (latency by channel, bytes by channel, requests) add up; a broken link opens the
channel again; without the library the Python path serves every fault as before."""

import os
import time

import pytest
from checks import frames_exact, wait_progress
from test_processpostcopy import postcopy, process_guest, switched_and_verified

from nodes.migration.postcopy import nativefault

MiB = 1024 * 1024


@pytest.fixture
def native(uffd_kernel):
    """The library (`make setup` builds it); under CI its absence fails."""
    lib = nativefault.library()
    if lib is None:
        why = f"{nativefault.LIBRARY} is not built: make native"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return lib


@pytest.fixture
def pair(in_process, uffd_kernel):
    return in_process(hosts=2, host_memory_bytes=64 * MiB)


def channels_add_up(r) -> dict:
    b = r.postcopy
    assert sum(b["channel_bytes"].values()) == r.postcopy_bytes, "the channels' bytes add up"
    assert b["pages_requested"] + b["pages_pushed"] == b["discard_pages"], "each page once"
    by = b["fault_latency_by_channel"]
    timed = sum(ch["pages"] for ch in by.values())
    assert timed == sum(b["fault_latency_seconds"].values()), "every timed fault, by channel"
    return b


@pytest.mark.uffd
def test_a_process_guests_faults_go_by_the_native_path(pair, native):
    tb = pair
    process_guest(tb, "uniform")
    r = tb.migrate("g", "host-1", postcopy(0))
    switched_and_verified(r, tb, "uniform")
    b = channels_add_up(r)
    assert b["channel_bytes"]["native"] > 0 and b["channel_bytes"]["preempt"] == 0
    assert b["fault_latency_by_channel"]["native"]["pages"] > 0, r.table()
    assert b["duplicates_dropped"] == 0


@pytest.mark.uffd
def test_without_the_library_the_python_path_serves_them(pair, monkeypatch):
    monkeypatch.setattr(nativefault, "library", lambda: None)
    tb = pair
    process_guest(tb, "uniform")
    r = tb.migrate("g", "host-1", postcopy(0))
    switched_and_verified(r, tb, "uniform")
    b = channels_add_up(r)
    assert "native" not in b["channel_bytes"]
    assert "native" not in b["fault_latency_by_channel"]
    assert b["fault_latency_by_channel"]["main"]["pages"] > 0


@pytest.mark.uffd
def test_a_cut_link_opens_the_native_channel_again(pair, native):
    tb = pair
    process_guest(tb, "uniform")
    r = tb.migrate("g", "host-1", postcopy(0, timeout_seconds=1.0,
                                           postcopy_bandwidth_bytes_per_second=2 * MiB,
                                           faults=("cut-link@postcopy",)))
    assert r.status == "postcopy-paused" and r.guest_host == "host-1", r.error
    time.sleep(0.05)
    r = tb.recover("g")
    b = r.postcopy
    assert r.status == "completed" and r.integrity.verified and b["recoveries"] == 1
    assert b["pages_applied"] == b["discard_pages"] and b["pages_applied_more_than_once"] == 0
    assert sum(b["channel_bytes"].values()) == r.postcopy_bytes
    assert b["channel_bytes"]["native"] > 0
    wait_progress(tb.host("host-1"), "g")
    frames_exact(tb)
