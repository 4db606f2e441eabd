"""Post-copy's parts on their own, with the real objects: the guest's access path faulting,
the fault handler's wait, the landing taking a page at most once, the source serving
requests before its push, the switch rule, and the decoders of the new records."""

import socket
import threading
import time

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodes.errors import GuestLost, StreamError
from nodes.faults.at_source import SourceFaults
from nodes.migration.decide.convergence import Convergence
from nodes.migration.decide.policy import Action, Decision, PrecopyStats, StopCode
from nodes.migration.postcopy.pagefault import FaultLatency, PageFaults
from nodes.migration.postcopy.postcopy_source import serve
from nodes.migration.postcopy.state import PostcopySource
from nodes.migration.postcopy.trigger import SwitchRule, prefer
from nodes.migration.progress import PhaseClock, Progress, RoundStats
from nodes.migration.receive.landing import Landing
from nodes.migration.receive.reader import RecordReader
from nodes.migration.results import SourceResult
from nodes.migration.send.dirtysync import SyncLog
from nodes.migration.send.link import LinkSender
from nodes.migration.send.pipeline import PagePipeline, PassCursor
from nodes.migration.send.source_context import (
    Channel,
    Pages,
    Session,
    SourceContext,
    SwitchOver,
)
from nodes.migration.settings import MigrationSettings
from nodes.migration.wire import pagesets, records
from nodes.migration.wire.channel import Ticket
from nodes.migration.wire.records import RecordType as RT
from nodes.xen.hypervisor import Hypervisor
from nodes.xen.profiles import Mode

MiB = 1024 * 1024


@pytest.fixture
def hv():
    return Hypervisor("h", 32 * MiB)


# -- the guest's access path -------------------------------------------------------------------
def test_an_access_to_missing_pages_calls_the_handler_with_all_of_them(hv):
    dom = hv.create_domain("g", 1 * MiB, Mode.VP)
    present = np.ones(dom.npages, dtype=bool)
    present[[3, 7, 9]] = False
    calls = []

    def on_missing(pfns):
        calls.append(pfns.tolist())
        present[pfns] = True            # they "land"
    dom.on_missing, dom.present = on_missing, present
    dom.read_words(np.array([1, 2]), 0)
    assert calls == [], "present pages fault on nothing"
    dom.write_words(np.array([1, 3, 7, 8]), 0, np.ones(4, np.uint64))
    assert calls == [[3, 7]], "one call for the batch's missing pages, at once"
    dom.read_words(np.array([9]), 0)
    assert calls == [[3, 7], [9]], "reads fault too"
    assert int(dom.read_words(np.array([3]), 0)[0]) == 1


# -- the fault handler -------------------------------------------------------------------------
@pytest.mark.inprocess
def test_a_fault_asks_once_and_waits_until_its_pages_land():
    received = np.zeros(16, dtype=bool)
    asked = []
    faults = PageFaults(received, lambda pfns: asked.append(pfns.tolist()))
    done = threading.Event()

    def vcpu():
        faults.handle(np.array([2, 5, 6]))
        done.set()
    t = threading.Thread(target=vcpu)
    t.start()
    deadline = time.monotonic() + 5
    while not asked:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert asked == [[2, 5, 6]] and sorted(faults.outstanding().tolist()) == [2, 5, 6]
    received[[2, 5]] = True
    faults.landed(np.array([2, 5]))
    assert not done.wait(0.05), "the vCPU waits for every page of its batch"
    received[6] = True
    faults.landed(np.array([6]))
    assert done.wait(5)
    t.join(5)
    s = faults.stats()
    assert s["faults"] == 1 and s["pages_faulted"] == 3
    assert sum(s["fault_latency_seconds"].values()) == 3 and s["blocktime_seconds"] > 0
    assert len(faults.outstanding()) == 0
    faults.handle(np.array([2]))      # present meanwhile (a re-check): nothing asked again
    assert asked == [[2, 5, 6]]


@pytest.mark.inprocess
def test_a_waiting_vcpu_stops_when_the_guest_is_lost():
    faults = PageFaults(np.zeros(4, dtype=bool), lambda pfns: None)
    errors = []

    def vcpu():
        try:
            faults.handle(np.array([1]))
        except GuestLost as exc:
            errors.append(exc)
    t = threading.Thread(target=vcpu)
    t.start()
    time.sleep(0.05)
    faults.lose("the source died")
    t.join(5)
    assert errors and "the source died" in str(errors[0])
    with pytest.raises(GuestLost):
        faults.handle(np.array([2]))


def test_latency_histogram_is_log2_from_one_microsecond():
    h = FaultLatency()
    h.observe(np.array([0.5e-6, 1e-6, 1.5e-6, 3e-6, 1e-3, 100.0]))
    d = h.to_dict()
    assert d["1e-06"] == 2 and d["2e-06"] == 1 and d["4e-06"] == 1
    assert d["0.001024"] == 1 and d["+Inf"] == 1 and sum(d.values()) == 6
    assert h.mean_seconds == pytest.approx((0.5e-6 + 1e-6 + 1.5e-6 + 3e-6 + 1e-3 + 100) / 6)


# -- the landing -------------------------------------------------------------------------------
def _landing(hv, name="d"):
    dom = hv.create_incoming(name, 256, Mode.VP)
    return dom, Landing(hv.memory, dom, verify=True)


def _page_data(pfns, fill):
    pfns = np.asarray(pfns, dtype=np.int64)
    pages = np.full((len(pfns), 4096), fill, dtype=np.uint8)
    parts = records.encode_page_data(pfns, np.zeros(len(pfns), np.uint8), pages)
    body = b"".join(bytes(b) for b in parts[1:-1])      # no record header, no padding
    return records.decode_page_data(body, 4096, 256)


def test_after_the_switch_a_page_lands_once_and_a_late_copy_is_dropped(hv):
    dom, landing = _landing(hv)
    landing.land(_page_data(range(0, 252), 1))        # pre-copy: every data page
    landing.received[252:] = True                       # (its page tables: not under test)
    discard = np.zeros(256, dtype=bool)
    discard[[10, 11, 12]] = True
    told = []
    assert landing.begin_postcopy(discard, lambda p: told.append(p.tolist())) == 3
    assert landing.missing_pages == 3 and not landing.received[10]
    landing.land(_page_data([10, 11], 2))
    assert told == [[10, 11]] and landing.applied[10] == 1
    # the guest writes page 10 now that it is present
    hv.memory.words[dom.p2m[10], 0] = 0xABCD
    landing.land(_page_data([10, 12], 3))               # a copy of 10 arriving late, and 12
    assert int(hv.memory.words[dom.p2m[10], 0]) == 0xABCD, "the guest's write survives"
    assert landing.duplicates == 1 and int(landing.applied.max()) == 1
    assert hv.memory.frames[dom.p2m[12]][0] == 3 and landing.missing_pages == 0


def test_the_switch_refuses_pages_neither_arrived_nor_discarded(hv):
    _, landing = _landing(hv)
    with pytest.raises(StreamError, match="not in the discard set"):
        landing.begin_postcopy(np.zeros(256, dtype=bool), lambda p: None)


def test_after_the_switch_a_record_naming_a_page_twice_is_refused(hv):
    _, landing = _landing(hv)
    landing.begin_postcopy(np.ones(256, dtype=bool), lambda p: None)
    with pytest.raises(StreamError, match="twice"):
        landing.land(_page_data([4, 4], 1))


# -- the source's requests before its push -------------------------------------------------------
def test_requests_go_first_skip_what_was_sent_and_the_push_follows_them(hv):
    dom = hv.create_domain("s", 1 * MiB, Mode.VP)
    a, b = socket.socketpair()
    try:
        settings = MigrationSettings(postcopy_after_rounds=0)
        progress = Progress("m", "s")
        link = LinkSender(a)
        t0 = time.monotonic()
        session = Session(
            hv=hv, dom=dom, guest="s", settings=settings, runtime=None, progress=progress,
            cancel=threading.Event(), faults=SourceFaults((), progress, threading.Event(), 1.0),
            ticket=Ticket("m", "127.0.0.1", 1, "00"), shared_link=None, result=SourceResult(),
            clock=PhaseClock(t0), mode_before=Mode.P2M)
        pc = PostcopySource(settings)
        pc.round = RoundStats(index=0, final=True, postcopy=True)
        switch = SwitchOver(settings.make_policy(), Convergence(
            settings, None, "s", hv.page_size, dom.npages * hv.page_size, progress, t0), pc)
        ctx = SourceContext(session, switch, Channel(a, link, RecordReader(a.recv_into)),
                            Pages(PagePipeline(hv, dom, link, progress), PassCursor(dom.npages),
                                  SyncLog(hv.page_size, dom.npages), dom.p2m.copy()))
        cursor = ctx.pages.cursor
        cursor.take(4)                                      # pages 0-3 already pushed
        pc.requested(np.array([2, 100, 40]))
        serve(ctx, pc)
        assert pc.requests == 3 and pc.pages_requested == 2 and pc.requests_already_sent == 1
        assert cursor.cursor == 41, "the push goes on after the last requested page"
        assert cursor.pending_pages == dom.npages - 6
        reader = RecordReader(b.recv_into)
        reader.guest_pages = dom.npages
        pd = reader.read_record().fields["page_data"]
        assert sorted(pd.pfns.tolist()) == [40, 100]
        assert cursor.take(1).tolist() == [41]
    finally:
        a.close()
        b.close()


def test_pass_cursor_takes_pages_out_of_turn_and_resets():
    c = PassCursor(10)
    assert c.take_these(np.array([3, 5])).tolist() == [3, 5]
    assert c.take_these(np.array([5, 6])).tolist() == [6] and c.pending_pages == 7
    c.seek(4)
    assert c.take(2).tolist() == [4, 7]
    c.reset(np.arange(10) % 3 == 0)
    assert c.pending_pages == 4 and c.cursor == 0 and c.take(10).tolist() == [0, 3, 6, 9]


# -- the switch rule ---------------------------------------------------------------------------
def _stats(iteration=0, elapsed=0.0):
    return PrecopyStats(iteration=iteration, dirty_count=500, total_written=0, guest_pages=1000,
                        page_size=4096, elapsed_seconds=elapsed)


def test_the_switch_rule_and_what_comes_first():
    go = Decision.go_on()
    converged = Decision.stop(StopCode.DIRTY_THRESHOLD, "few dirty")
    capped = Decision.stop(StopCode.MAX_ITERATIONS, "cap")
    after2 = SwitchRule(after_rounds=2)
    assert prefer(after2, go, _stats(1)) is go
    switch = prefer(after2, go, _stats(2))
    assert switch.action is Action.POSTCOPY and switch.stop_code is StopCode.POSTCOPY
    assert prefer(after2, converged, _stats(5)) is converged, "converged: QEMU completes"
    assert prefer(after2, capped, _stats(5)).action is Action.POSTCOPY, "a cap gives way"
    assert prefer(after2, Decision.abort("no"), _stats(5)).action is Action.ABORT
    own = Decision(Action.POSTCOPY, "a policy's own switch", StopCode.POSTCOPY)
    assert prefer(SwitchRule(), own, _stats()) is own
    assert prefer(SwitchRule(), go, _stats(), requested=True).action is Action.POSTCOPY
    timed = SwitchRule(after_seconds=1.5)
    assert prefer(timed, go, _stats(0, 1.4)) is go
    assert "1.5 s after the start" in prefer(timed, go, _stats(0, 1.5)).reason
    assert timed.timed_out(1.6, False) and not after2.timed_out(99, False)


# -- the new records ---------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=300))
def test_bitmaps_round_trip(bits):
    mask = np.array(bits, dtype=bool)
    assert np.array_equal(pagesets.decode_bitmap(pagesets.encode_bitmap(mask), len(mask)), mask)


@pytest.mark.parametrize("data,pages,match", [
    (b"\x00", 9, "expected 2"), (b"\x00\x00\x00", 9, "expected 2"),
    (b"\x00\x02", 9, "beyond the guest"), (b"", 1, "expected 1"),
])
def test_bad_bitmaps_are_refused(data, pages, match):
    with pytest.raises(StreamError, match=match):
        pagesets.decode_bitmap(data, pages)


@pytest.mark.parametrize("data,match", [
    (b"", "1 to"), (b"\0" * 7, "1 to"), (b"\0" * 8 * (pagesets.MAX_REQUEST_PAGES + 1), "1 to"),
    ((99).to_bytes(8, "little"), "beyond the guest"), (b"\0" * 16, "twice"),
])
def test_bad_page_requests_are_refused(data, match):
    with pytest.raises(StreamError, match=match):
        pagesets.decode_pfns(data, 64)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=2048), pages=st.integers(1, 4096))
def test_fuzz_the_postcopy_decoders(data, pages):
    """Any bytes as a bitmap or a request: a StreamError or a valid, bounded value."""
    try:
        mask = pagesets.decode_bitmap(data, pages)
        assert len(mask) == pages
    except StreamError:
        pass
    try:
        pfns = pagesets.decode_pfns(data, pages)
        assert 0 < len(pfns) <= pagesets.MAX_REQUEST_PAGES and int(pfns.max()) < pages
    except StreamError:
        pass


@pytest.mark.parametrize("rtype", [RT.POSTCOPY_DISCARD, RT.RECV_BITMAP])
def test_bitmap_records_are_bounded_by_the_guest(rtype):
    assert records.max_record_bytes(rtype, 4096, 1 << 20) < records.MAX_CONTROL_RECORD_BYTES
    head = records.encode_image_header() + records.encode_domain_header("vp", 12)
    body = msgpack.packb({"bitmap": b"\0" * 100})
    stream = head + records.RECORD_HEADER.pack(rtype, len(body)) + body + b"\0" * (
        -len(body) % 8)
    import io
    r = RecordReader(io.BytesIO(stream).readinto)
    r.guest_pages = 64                                   # 8 bytes of bitmap, at most 72
    r.read_image_header()
    r.read_domain_header()
    with pytest.raises(StreamError, match="exceeds its limit"):
        r.read_record()
