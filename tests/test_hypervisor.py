"""The hypervisor: domains in the three modes, page tables, log-dirty, digests (pure)."""

import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodes.errors import (
    AccessViolation,
    ConfigError,
    DomainExistsError,
    DomainStateError,
    ModeError,
    NoSuchDomainError,
    OutOfFramesError,
)
from nodes.xen import pagetable
from nodes.xen.hypervisor import DOM0_NAME, Hypervisor
from nodes.xen.logdirty import ShadowOp
from nodes.xen.profiles import Mode

MiB = 1024 * 1024


@pytest.fixture
def hv():
    return Hypervisor("h", 64 * MiB, seed=7)


def frames_accounted(hv: Hypervisor) -> bool:
    c = hv.frame_counts()
    owned = sum(int(np.count_nonzero(hv.allocator.owner == d.domid))
                for d in hv.domains.values())
    return c["used"] == owned and c["free"] + c["used"] + c["reserved"] == c["total"]


@pytest.mark.parametrize("mode", ["p2m", "vp", "p==m"])
def test_create_and_destroy_return_every_frame(hv, mode):
    free = hv.frame_counts()["free"]
    dom = hv.create_domain("g", 4 * MiB, mode)
    assert dom.npages == 1024 and hv.frame_counts()["free"] == free - 1024
    assert frames_accounted(hv)
    assert (hv.allocator.owner[dom.p2m] == dom.domid).all()
    assert (hv.allocator.pfn[dom.p2m] == np.arange(1024) + dom.pfn_base).all()  # M2P == P2M^-1
    hv.destroy_domain("g")
    assert hv.frame_counts()["free"] == free and frames_accounted(hv)
    assert not hv.memory.frames[dom.p2m].any(), "freed frames are scrubbed"


def test_p2m_guest_is_scattered_and_peqm_is_identity(hv):
    g = hv.create_domain("g", 16 * MiB, "p2m")      # eight superpage extents, shuffled
    assert not np.all(np.diff(g.p2m) == 1)
    pm = hv.create_domain("pm", 4 * MiB, "p==m")
    assert np.all(np.diff(pm.p2m) == 1)
    base = int(pm.p2m[0])
    assert pm.pfn_base == base, "a P==M guest's physical frame numbers are machine frames"
    pm.write_words(np.array([base + 3]), 0, np.array([42], dtype=np.uint64))
    assert hv.memory.words[base + 3, 0] == 42
    with pytest.raises(AccessViolation, match="outside the guest's run"):
        pm.write_words(np.array([base - 1]), 0, np.array([1], dtype=np.uint64))
    with pytest.raises(AccessViolation):
        pm.read_words(np.array([base + 1024]), 0)


def test_p2m_writes_go_through_the_guests_own_table(hv):
    g = hv.create_domain("g", 4 * MiB, "p2m")
    pfns = np.array([0, 10, 500])
    g.write_words(pfns, 1, np.array([7, 8, 9], dtype=np.uint64))
    assert (hv.memory.words[g.p2m[pfns], 1] == [7, 8, 9]).all()
    assert (g.read_words(pfns, 1) == [7, 8, 9]).all()
    with pytest.raises(AccessViolation, match="outside"):
        g.write_words(np.array([1024]), 0, np.array([1], dtype=np.uint64))
    with pytest.raises(AccessViolation, match="page-table page"):
        g.write_words(g.pt_pfns[:1], 0, np.array([1], dtype=np.uint64))


def test_bad_input_changes_nothing(hv):
    hv.create_domain("g", 4 * MiB)
    before = hv.frame_counts()
    cases = [
        (OutOfFramesError, lambda: hv.create_domain("big", 1024 * MiB)),
        (ConfigError, lambda: hv.create_domain("z", 0)),
        (ConfigError, lambda: hv.create_domain("n", -4096)),
        (ConfigError, lambda: hv.create_domain("odd", 5000)),
        (ModeError, lambda: hv.create_domain("m", 4 * MiB, "hvm")),
        (ModeError, lambda: hv.create_domain("d", 4 * MiB, "vp", dma=True)),
        (DomainExistsError, lambda: hv.create_domain("g", 4 * MiB)),
        (ConfigError, lambda: hv.create_domain("bad name", 4 * MiB)),
        (NoSuchDomainError, lambda: hv.destroy_domain("nope")),
        (DomainStateError, lambda: hv.destroy_domain(DOM0_NAME)),
        (DomainStateError, lambda: hv.pause(DOM0_NAME)),
    ]
    for exc, call in cases:
        with pytest.raises(exc):
            call()
    assert hv.frame_counts() == before
    with pytest.raises(ConfigError, match="larger than the hypervisor"):
        Hypervisor("tiny", 4 * MiB, reserved_bytes=4 * MiB)


def test_dma_guest_cannot_enter_vp(hv):
    hv.create_domain("d", 4 * MiB, "p2m", dma=True)
    with pytest.raises(ModeError, match="DMA"):
        hv.set_mode("d", "vp")


def test_pause_stops_writes(hv):
    g = hv.create_domain("g", 4 * MiB)
    hv.pause("g")
    with pytest.raises(DomainStateError):
        g.write_words(np.array([1]), 0, np.array([1], dtype=np.uint64))
    hv.unpause("g")
    g.write_words(np.array([1]), 0, np.array([1], dtype=np.uint64))


def test_page_tables_hold_machine_frames(hv):
    g = hv.create_domain("g", 8 * MiB)
    assert len(g.pt_pfns) == 4   # one L1 page per 512 pages
    tables = g.page_tables()
    assert hv.check_page_tables("g") is None
    frames = (tables.reshape(-1)[:g.npages] >> np.uint64(12)).astype(np.int64)
    assert (frames == g.p2m).all()


def test_canonicalise_round_trip_across_two_hosts():
    a, b = Hypervisor("a", 64 * MiB, seed=1), Hypervisor("b", 64 * MiB, seed=2)
    ga = a.create_domain("g", 8 * MiB)
    canon = a.canonical_tables(ga)
    pfns = (canon.reshape(-1)[:ga.npages] >> np.uint64(12)).astype(np.int64)
    assert (pfns == np.arange(ga.npages)).all(), "canonical entries hold pfns"
    gb = b.create_incoming("g", ga.npages, Mode.VP)
    assert not np.array_equal(ga.p2m, gb.p2m)
    restored = pagetable.uncanonicalise(canon, gb.p2m, 12)
    assert pagetable.check(restored, gb.p2m, 12) is None
    assert pagetable.check(restored, ga.p2m, 12) is not None
    # A table pointing at a frame the guest does not own cannot be canonicalised.
    bad = ga.page_tables().copy()
    bad[0, 0] = np.uint64(int(a.domains[DOM0_NAME].p2m[0]) << 12 | 1)
    with pytest.raises(ValueError, match="does not own"):
        pagetable.canonicalise(bad, ga.domid, a.allocator.owner, a.allocator.pfn, 12)


def test_digest_is_placement_independent():
    a, b = Hypervisor("a", 64 * MiB, seed=1), Hypervisor("b", 64 * MiB, seed=9)
    ga, gb = a.create_domain("g", 4 * MiB), b.create_domain("g", 4 * MiB)
    assert not np.array_equal(ga.p2m, gb.p2m)
    assert a.canonical_digest("g") == b.canonical_digest("g")
    pfns = np.array([1, 2, 3])
    ga.write_words(pfns, 5, np.array([1, 2, 3], dtype=np.uint64))
    assert a.canonical_digest("g") != b.canonical_digest("g")
    gb.write_words(pfns, 5, np.array([1, 2, 3], dtype=np.uint64))
    assert a.canonical_digest("g") == b.canonical_digest("g")


def test_logdirty_peek_clean_off(hv):
    hv.create_domain("g", 4 * MiB)
    with pytest.raises(ModeError, match="VP"):
        hv.shadow_op("g", ShadowOp.ENABLE_LOGDIRTY)
    hv.set_mode("g", "vp")
    g = hv.domain("g")
    g.write_words(np.array([1]), 0, np.array([1], dtype=np.uint64))   # before enable: not logged
    hv.shadow_op("g", ShadowOp.ENABLE_LOGDIRTY)
    g.write_words(np.array([3, 5, 5, 9]), 0, np.ones(4, dtype=np.uint64))
    bitmap, stats = hv.shadow_op("g", ShadowOp.PEEK)
    assert list(np.flatnonzero(bitmap)) == [3, 5, 9] and stats.dirty_count == 3
    assert stats.fault_count == 3
    bitmap2, _ = hv.shadow_op("g", ShadowOp.PEEK)
    assert (bitmap == bitmap2).all(), "PEEK keeps the bitmap"
    cleaned, _ = hv.shadow_op("g", ShadowOp.CLEAN)
    assert (cleaned == bitmap).all()
    after, stats = hv.shadow_op("g", ShadowOp.PEEK)
    assert not after.any() and stats.dirty_count == 0 and stats.fault_count == 0
    g.write_words(np.array([5]), 0, np.ones(1, dtype=np.uint64))
    assert hv.shadow_op("g", ShadowOp.PEEK)[1].fault_count == 1, "re-fault after CLEAN"
    hv.shadow_op("g", ShadowOp.OFF)
    with pytest.raises(DomainStateError):
        hv.shadow_op("g", ShadowOp.PEEK)


def test_p2m_writes_are_invisible_to_logdirty(hv):
    hv.create_domain("g", 4 * MiB, "vp")
    hv.shadow_op("g", ShadowOp.ENABLE_LOGDIRTY)
    hv.set_mode("g", "p2m")
    hv.domain("g").write_words(np.array([2]), 0, np.ones(1, dtype=np.uint64))
    assert not hv.domain("g").logdirty.bitmap.any()


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(0, 2), min_size=2, max_size=12))
@pytest.mark.inprocess
def test_mode_switch_under_concurrent_writes_loses_nothing(switch_after_batches):
    """A writer thread bumps counters while the main thread flips P2M <-> VP with log-dirty
    on: every write lands (counter sum == writes) and every write made in VP with log-dirty
    on is logged. (Between the switch to VP and ENABLE_LOGDIRTY, two calls, VP logs
    nothing yet, as in Xen.)"""
    hv = Hypervisor("h", 32 * MiB, seed=1)
    g = hv.create_domain("g", 2 * MiB)
    rng = np.random.default_rng(0)
    stop = threading.Event()
    writes = [0]
    failed: list[BaseException] = []

    def writer():
        try:
            while not stop.is_set():
                pfns = np.unique(rng.integers(0, g.data_pages, 64))
                with g.lock:
                    old = g.read_words(pfns, 0)
                    g.write_words(pfns, 0, old + 1)
                    writes[0] += len(pfns)
                    if g.mode is Mode.VP and g.logdirty.enabled:
                        assert g.logdirty.bitmap[pfns].all(), "a VP write not logged"
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            failed.append(exc)

    t = threading.Thread(target=writer)
    t.start()
    try:
        for n in switch_after_batches:
            for _ in range(n + 1):
                threading.Event().wait(0.001)
            if g.mode is Mode.P2M:
                hv.set_mode("g", "vp")
                hv.shadow_op("g", ShadowOp.ENABLE_LOGDIRTY)
            else:
                hv.set_mode("g", "p2m")
    finally:
        stop.set()
        t.join()
    assert not failed, failed
    counters = hv.memory.words[g.p2m[:g.data_pages], 0]
    assert int(counters.sum()) == writes[0]
