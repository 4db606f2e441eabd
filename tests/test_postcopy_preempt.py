"""Post-copy preempt (`--postcopy-preempt`, issue 25): requested pages on a connection of their
own, ahead of the push. Every page still lands once (on one channel or the other), the report
splits the bytes and the fault latency by channel, a broken link recovers with both channels
again, and a process guest's real faults are served on it too. How much faster a fault is
served is a bench figure (`migbed bench`'s post-copy section), not a test's."""

import socket
import time

import numpy as np
import pytest
from checks import frames_exact, wait_progress
from test_cli import one_line_error, run
from test_postcopy_cluster import scrape, value
from test_postcopy_parts import _landing, _page_data

from nodes.errors import ConfigError, ConnectionLost
from nodes.host.specs import GuestSpec
from nodes.migration.postcopy.preempt import PreemptReceiver
from nodes.migration.settings import MigrationSettings
from nodes.migration.wire import records
from nodes.migration.wire.channel import Listener, connect
from nodes.migration.wire.records import RecordType as RT
from nodes.xen.hypervisor import Hypervisor
from workloads.spec import WorkloadSpec

MiB = 1024 * 1024
BUSY = WorkloadSpec("uniform", 20000, fill="random", seed=3)


def preempt(**kw) -> MigrationSettings:
    """Pure post-copy, its push as fast as the link: it saturates it."""
    return MigrationSettings(**{"link_bytes_per_second": 64 * MiB, "postcopy_after_rounds": 0,
                                "postcopy_preempt": True, **kw})


def each_page_once(r, recovered: bool = False) -> dict:
    """Every missing page landed once; sent once too, but after a recovery, which sends
    again whatever was on its way when the link broke."""
    assert r.status == "completed" and r.integrity.verified, (r.error, r.notes)
    b = r.postcopy
    assert b["pages_applied"] == b["discard_pages"], "every missing page landed"
    assert b["pages_applied_more_than_once"] == 0
    sent = b["pages_requested"] + b["pages_pushed"]
    if recovered:
        assert sent >= b["discard_pages"]
    else:
        assert sent == b["discard_pages"] and b["duplicates_dropped"] == 0, "each page once"
    assert sum(b["channel_bytes"].values()) == r.postcopy_bytes, "the channels' bytes add up"
    return b


def test_the_setting_needs_postcopy_and_round_trips():
    with pytest.raises(ConfigError, match="--postcopy-preempt"):
        MigrationSettings(postcopy_preempt=True)
    s = preempt()
    assert MigrationSettings.from_dict(s.to_dict()) == s
    with pytest.raises(ConfigError, match="multifd"):
        preempt(multifd_channels=2)


@pytest.mark.parametrize("args,message", [
    (["migrate", "--postcopy-preempt"], "--postcopy-preempt sends requested pages"),
    (["migrate", "--postcopy", "--postcopy-preempt", "--multifd-channels", "2"],
     "cannot be used together"),
])
def test_bad_preempt_options_are_one_line_and_exit_2(tmp_path, args, message):
    assert message in one_line_error(run(*args, home=tmp_path, check_rc=None))


# -- the parts -------------------------------------------------------------------------------------
def switched_landing():
    """A destination's landing after the switch: pages 10-12 missing, the landing's own
    `on_present` logging what the data channel lands."""
    hv = Hypervisor("h", 32 * MiB)
    _, landing = _landing(hv)
    landing.land(_page_data(range(0, 252), 1))
    landing.received[252:] = True
    discard = np.zeros(256, dtype=bool)
    discard[[10, 11, 12]] = True
    main: list = []
    landing.begin_postcopy(discard, lambda p: main.append(p.tolist()))
    return landing, main


def test_a_sink_of_its_own_tells_its_own_on_present():
    landing, main = switched_landing()
    preempt: list = []
    landing.sink(lambda p: preempt.append(p.tolist())).land(_page_data([10], 2))
    landing.land(_page_data([11, 12], 3))
    assert preempt == [[10]] and main == [[11, 12]] and landing.missing_pages == 0


def hello(ticket, migration_id: str) -> socket.socket:
    sock = connect(ticket, 5.0)
    sock.sendall(records.encode_record(RT.POSTCOPY_PREEMPT, {"migration_id": migration_id}))
    return sock


@pytest.mark.inprocess
def test_the_receiver_lands_its_channel_until_its_end():
    landing, main = switched_landing()
    listener = Listener("127.0.0.1", "m1")
    told: list = []
    try:
        sock = hello(listener.ticket, "m1")
        rx = PreemptReceiver(listener, "m1", landing, lambda p: told.append(p.tolist()), 5.0)
        parts = records.encode_page_data(np.array([12, 10]), np.zeros(2, np.uint8),
                                         np.full((2, 4096), 7, np.uint8))
        sock.sendall(b"".join(bytes(b) for b in parts) + records.encode_record(RT.END))
        rx.wait_end(5.0)
        assert told == [[12, 10]] and main == [] and landing.missing_pages == 1
        rx.close()
        sock.close()
    finally:
        listener.close()


@pytest.mark.inprocess
def test_the_receiver_refuses_another_migrations_channel_and_a_channel_without_end():
    landing, _ = switched_landing()
    listener = Listener("127.0.0.1", "m1")
    try:
        sock = hello(listener.ticket, "m2")
        with pytest.raises(ConnectionLost, match="another migration"):
            PreemptReceiver(listener, "m1", landing, lambda p: None, 5.0)
        sock.close()
        sock = hello(listener.ticket, "m1")
        rx = PreemptReceiver(listener, "m1", landing, lambda p: None, 5.0)
        sock.close()                                   # gone before its END
        with pytest.raises(ConnectionLost, match="broke"):
            rx.wait_end(5.0)
        rx.close()
    finally:
        listener.close()


# -- migrations -------------------------------------------------------------------------------------
def test_requested_pages_go_on_the_preempt_channel_and_each_page_once(in_process):
    tb = in_process(hosts=2, host_memory_bytes=64 * MiB)
    tb.create("host-0", GuestSpec("vm", 8 * MiB, workload=BUSY))
    wait_progress(tb.host("host-0"), "vm")
    r = tb.migrate("vm", "host-1", preempt())
    b = each_page_once(r)
    by = b["fault_latency_by_channel"]
    assert b["channel_bytes"]["preempt"] > 0 and by["preempt"]["pages"] > 0, r.table()
    assert b["preempt_channels"] == 1
    assert sum(v["pages"] for v in by.values()) == sum(b["fault_latency_seconds"].values()), \
        "each timed page timed once, by the channel it landed from"
    assert "post-copy preempt:" in r.table()
    src, dst = scrape(tb, "host-0"), scrape(tb, "host-1")
    for ch in ("main", "preempt"):      # Prometheus splits them as the report does
        assert value(src, "migbed_migration_postcopy_channel_sent_bytes_total",
                     channel=ch) == b["channel_bytes"][ch]
        assert value(dst, "migbed_migration_postcopy_channel_fault_latency_seconds_count",
                     channel=ch) == by[ch]["pages"]
    plain = tb.migrate("vm", "host-0", preempt(postcopy_preempt=False))
    pb = each_page_once(plain)
    assert pb["channel_bytes"]["preempt"] == 0
    assert pb["fault_latency_by_channel"]["preempt"]["pages"] == 0
    wait_progress(tb.host("host-0"), "vm")
    frames_exact(tb)


def test_a_broken_link_recovers_with_the_preempt_channel(in_process):
    tb = in_process(hosts=2, host_memory_bytes=64 * MiB)
    tb.create("host-0", GuestSpec("vm", 4 * MiB, workload=BUSY))
    wait_progress(tb.host("host-0"), "vm")
    r = tb.migrate("vm", "host-1", preempt(
        timeout_seconds=0.5, postcopy_bandwidth_bytes_per_second=2 * MiB,
        faults=("cut-link@postcopy",)))
    assert r.status == "postcopy-paused" and r.guest_host == "host-1", r.error
    r = tb.recover("vm")
    b = each_page_once(r, recovered=True)
    assert b["recoveries"] == 1 and b["channel_bytes"]["preempt"] > 0
    assert b["preempt_channels"] == 2, "opened at the switch and again at the recovery"
    wait_progress(tb.host("host-1"), "vm")
    frames_exact(tb)


@pytest.mark.uffd
def test_a_process_guests_real_faults_are_served_on_the_preempt_channel(in_process,
                                                                         uffd_kernel):
    tb = in_process(hosts=2, host_memory_bytes=64 * MiB)
    tb.create("host-0", GuestSpec("g", 4 * MiB, workload=BUSY, vcpu="process"))
    time.sleep(0.05)
    r = tb.migrate("g", "host-1", preempt(postcopy_bandwidth_bytes_per_second=8 * MiB))
    b = each_page_once(r)
    assert (r.vcpu, r.dirty_log) == ("process", "kernel")
    assert b["fault_latency_by_channel"]["preempt"]["pages"] > 0, r.table()
    wait_progress(tb.host("host-1"), "g")
    frames_exact(tb)


@pytest.mark.uffd
def test_a_process_guest_recovers_a_cut_link_with_the_preempt_channel(in_process, uffd_kernel):
    tb = in_process(hosts=2, host_memory_bytes=64 * MiB)
    tb.create("host-0", GuestSpec("g", 4 * MiB, workload=BUSY, vcpu="process"))
    time.sleep(0.05)
    r = tb.migrate("g", "host-1", preempt(timeout_seconds=1.0,
                                          postcopy_bandwidth_bytes_per_second=2 * MiB,
                                          faults=("cut-link@postcopy",)))
    assert r.status == "postcopy-paused" and r.guest_host == "host-1", r.error
    b = each_page_once(tb.recover("g"), recovered=True)
    assert b["recoveries"] == 1 and b["preempt_channels"] == 2
    wait_progress(tb.host("host-1"), "g")
    frames_exact(tb)
