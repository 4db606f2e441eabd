"""Post-copy's native fault path (`nodes.migration.postcopy.nativefault`, `libmigbedfault.so`):
a process guest's faults read, asked for, served, landed and mapped by native threads on a
fault channel of their own; every page still lands once and every migration verifies; the
figures (latency by channel, bytes by channel, requests) add up; a broken link opens the
channel again; without the library the Python path serves every fault as before."""

import os
import socket
import struct
import threading
import time

import numpy as np
import pytest
from checks import frames_exact, wait_progress
from test_faultreader import (
    PS,
    WORDS,
    Guest,
    minor_kernel,
    no_fd_leaked,
    open_fds,
    pattern,
    scattered,
)
from test_processpostcopy import postcopy, process_guest, switched_and_verified

from nodes.host.faultreader import FaultReader
from nodes.migration.postcopy import nativefault
from nodes.xen.digest import _multipliers, page_hashes
from nodes.xen.memory import MachineMemory

__all__ = ["minor_kernel"]          # a fixture of test_faultreader's, used here

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


class FakeSource:
    """The source's end of the fault channel, in Python: each pfn asked for comes back as a
    page of its pattern, sent in two halves with a pause between (a window for a half-landed
    page to show)."""

    def __init__(self, sock):
        self.sock, self.asked = sock, []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        buf = b""
        while chunk := self.sock.recv(4096):
            buf += chunk
            while len(buf) >= 8:
                (pfn,), buf = struct.unpack("<Q", buf[:8]), buf[8:]
                self.asked.append(pfn)
                page = pattern(np.array([pfn])).tobytes()
                self.sock.sendall(struct.pack("<IIQ", 0x4750464D, 1, pfn) + page[:PS // 2])
                time.sleep(0.0002)
                self.sock.sendall(page[PS // 2:])


@pytest.mark.uffd
def test_native_and_python_landings_claim_each_page_once(minor_kernel, native):
    """Guest threads read and write every page while the native thread serves their faults
    and a Python push lands every missing page through the same claims: every read saw its
    page whole, no write was landed over, each page landed once (natively or by the push),
    hashed as it landed, each asked for once; nothing leaks."""
    n = 256
    mem = MachineMemory(1024 * PS)
    p2m = scattered(n, 1024, 1)
    missing = np.zeros(n, bool)
    missing[np.random.default_rng(2).permutation(n)[:160]] = True
    fds = open_fds()
    guest = Guest(mem, p2m, missing)
    received = ~missing
    ours, theirs = socket.socketpair()
    source = FakeSource(theirs)
    reader = FaultReader(guest.uffd, guest.base, PS, received, lambda pfns: True,
                         pid=guest.proc.pid, name="g", map_starts=guest.map_starts).start()
    applied, hashes = np.zeros(n, np.uint8), np.zeros(n, np.uint64)
    nf = nativefault.NativeFaults(native, reader, reader.native_fwd_fd())
    nf.channel(ours.detach(), mem.frames, p2m, applied, hashes, _multipliers(WORDS),
               np.zeros(n, bool))
    reader.go_native(nf)
    pushed = []

    def push() -> None:
        for start in range(0, n, 8):
            time.sleep(0.003)
            pfns = np.arange(start, min(start + 8, n))
            fresh = pfns[reader.claim(pfns)]
            words = pattern(fresh)
            mem.words[p2m[fresh], :WORDS // 2] = words[:, :WORDS // 2]
            time.sleep(0.0002)
            mem.words[p2m[fresh], WORDS // 2:] = words[:, WORDS // 2:]
            applied[fresh] += 1
            received[fresh] = True
            reader.landed(fresh)
            pushed.extend(fresh.tolist())
    try:
        writes = np.arange(0, n, 5)
        guest.go(np.setdiff1d(np.arange(n), writes), writes, threads=4)
        pusher = threading.Thread(target=push, daemon=True)
        pusher.start()
        out = guest.result()
        pusher.join(10)
        assert out["bad"] == [], "a page was read before it had landed whole"
        want = pattern(writes)
        for k in range(4):
            want[:, 400 + k] = 7_000_000 + 1000 * k + writes
        assert (mem.words[p2m[writes]] == want).all(), "a page landed over a guest's write"
        assert received.all() and not len(reader.outstanding())
        st = reader.stats()
        landed = st["native_fault_path"]["pages_landed"]
        assert landed > 0 and pushed, "both landed pages"
        assert landed + len(pushed) == missing.sum(), "each page landed once"
        assert (applied[missing] == 1).all() and (applied[~missing] == 0).all()
        here = hashes != 0                                   # those the native thread landed
        assert here.sum() == landed
        assert (hashes[here] == page_hashes(pattern(np.flatnonzero(here)))).all()
        asked = np.array(source.asked, np.int64)
        assert len(asked) == len(np.unique(asked)) and missing[asked].all()
        assert st["pages_faulted"] == len(asked) and st["faults"] >= len(asked)
        assert sum(st["fault_latency_seconds"].values()) == len(asked)
        assert st["blocktime_seconds"] > 0 and reader.lost is None
    finally:
        reader.stop()
        theirs.close()
        source.thread.join(5)
        guest.close()
    assert not reader.thread.is_alive() and no_fd_leaked(fds), "a thread or fd leaked"
