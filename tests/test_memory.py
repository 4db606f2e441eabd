"""Machine memory, the frame allocator and the M2P table (pure, no Ray)."""

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from nodes.errors import ConfigError, OutOfFramesError
from nodes.units import parse_duration, parse_size
from nodes.xen.allocator import OWNER_FREE, OWNER_HYPERVISOR, SUPERPAGE_FRAMES, FrameAllocator
from nodes.xen.memory import MachineMemory

MiB = 1024 * 1024


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_memory_is_real_bytes_and_lazy():
    before = rss_bytes()
    mem = MachineMemory(1024 * MiB)
    after = rss_bytes()
    assert mem.nframes == 262144
    assert after - before < 64 * MiB, "an idle 1 GiB host must not be resident"
    mem.write(np.array([5, 7]), np.full((2, 4096), 0xAB, dtype=np.uint8))
    assert (mem.read(np.array([7]))[0] == 0xAB).all()
    assert mem.words[5, 0] == 0xABABABABABABABAB
    mem.scrub(np.array([5]))
    assert not mem.read(np.array([5])).any()


@pytest.mark.parametrize("total,page", [(0, 4096), (-4096, 4096), (5000, 4096), (8192, 1000)])
def test_memory_rejects_bad_sizes(total, page):
    with pytest.raises(ConfigError):
        MachineMemory(total, page)


def test_reserved_frames_at_bottom_or_top():
    low = FrameAllocator(100, 10, "bottom")
    assert (low.owner[:10] == OWNER_HYPERVISOR).all() and (low.owner[10:] == OWNER_FREE).all()
    high = FrameAllocator(100, 10, "top")
    assert (high.owner[90:] == OWNER_HYPERVISOR).all()
    with pytest.raises(ConfigError, match="larger than the hypervisor"):
        FrameAllocator(10, 10)


def test_scattered_frames_are_not_contiguous_nor_in_order():
    a = FrameAllocator(4096, 64, seed=3, superpages=False)
    mfns = a.alloc_scattered(512, domid=1)
    assert len(set(mfns.tolist())) == 512
    assert not np.all(np.diff(mfns) == 1)
    assert not np.all(np.diff(mfns) > 0)
    assert np.count_nonzero(np.diff(mfns) == 1) < 64, "frame by frame: hardly any neighbours"


def test_superpage_extents_are_aligned_runs_in_shuffled_order():
    a = FrameAllocator(1 << 15, 64, seed=3)
    n = 8 * SUPERPAGE_FRAMES + 100                 # eight extents and a remainder
    mfns = a.alloc_scattered(n, domid=1)
    assert len(set(mfns.tolist())) == n and (a.owner[mfns] == 1).all()
    extents = mfns[:8 * SUPERPAGE_FRAMES].reshape(8, SUPERPAGE_FRAMES)
    assert (extents[:, 0] % SUPERPAGE_FRAMES == 0).all(), "extents are superpage-aligned"
    assert (np.diff(extents, axis=1) == 1).all(), "in order within an extent"
    assert not (np.diff(extents[:, 0]) > 0).all(), "extents in shuffled machine order"
    # A host with no free superpage left gives single frames, and still every frame asked.
    frag = FrameAllocator(4096, 64, seed=1)
    frag.owner[::SUPERPAGE_FRAMES // 2] = 99         # a used frame in every half superpage
    got = frag.alloc_scattered(600, domid=2)
    assert len(set(got.tolist())) == 600 and not np.all(np.diff(got[:512]) == 1)


def test_contiguous_run_and_out_of_frames():
    a = FrameAllocator(1000, 100)
    start = a.alloc_contiguous(200, domid=2)
    assert start == 100 and (a.owner[100:300] == 2).all()
    with pytest.raises(OutOfFramesError) as exc:
        a.alloc_scattered(10_000, domid=3)
    assert exc.value.needed_frames == 10_000 and exc.value.free_frames == 700


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "run", "free"]), st.integers(1, 300)),
                max_size=30))
def test_allocator_property_no_frame_owned_twice(ops):
    """Any sequence of allocations and frees: accounting exact, reserved never handed out."""
    a = FrameAllocator(2048, 32, seed=1)
    held: dict[int, np.ndarray] = {}
    domid = 1
    for op, n in ops:
        try:
            if op == "alloc":
                mfns = a.alloc_scattered(n, domid)
            elif op == "run":
                s = a.alloc_contiguous(n, domid)
                mfns = np.arange(s, s + n)
            else:
                if not held:
                    continue
                victim = sorted(held)[n % len(held)]
                a.free(held.pop(victim))
                continue
        except OutOfFramesError:
            continue
        a.set_m2p(mfns, domid, np.arange(len(mfns)))
        held[domid] = mfns
        domid += 1
    owned = np.concatenate(list(held.values())) if held else np.zeros(0, dtype=np.int64)
    assert len(owned) == len(np.unique(owned)), "a frame is owned twice"
    assert not np.isin(owned, np.arange(32)).any(), "a reserved frame was handed out"
    c = a.counts()
    assert c["used"] == len(owned) and c["free"] + c["used"] + c["reserved"] == c["total"]
    for d, mfns in held.items():   # M2P agrees with what each domain holds
        assert (a.owner[mfns] == d).all() and (a.pfn[mfns] == np.arange(len(mfns))).all()


@pytest.mark.parametrize("text,value", [("64MiB", 64 * MiB), ("1GiB", 1024 * MiB),
                                        ("4096", 4096), ("1.5KiB", 1536), ("2k", 2000)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "abc", "12XB", "-5MiB", "0.3"])
def test_parse_size_rejects(text):
    with pytest.raises(ConfigError):
        parse_size(text)


def test_parse_duration():
    assert parse_duration("300ms") == pytest.approx(0.3)
    assert parse_duration("2s") == 2.0 and parse_duration("1.5") == 1.5
    with pytest.raises(ConfigError):
        parse_duration("soon")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 200), st.integers(1, 40)), min_size=1, max_size=30))
@example(runs=[(0, 3), (4, 15), (20, 15)])       # short runs adding up past one piece
def test_frames_as_buffers_and_pieces(runs):
    """Any mix of runs and single frames: the buffers carry exactly the frames' bytes in
    order, the pieces cover every frame once (views where frames are adjacent), and a
    scrub through them zeroes exactly those frames."""
    mem = MachineMemory(256 * 4096 + 64 * 4096)
    mem.words[:] = np.arange(mem.words.size, dtype=np.uint64).reshape(mem.words.shape)
    mfns = np.concatenate([np.arange(a, a + k) for a, k in runs]).astype(np.int64)
    mfns = mfns[np.unique(mfns, return_index=True)[1]]       # distinct, first-seen order
    sent = b"".join(bytes(b) for b in mem.buffers(mfns))
    assert sent == mem.frames[mfns].tobytes()
    seen = np.zeros(len(mfns), dtype=int)
    for i, pages, is_view in mem.pieces(mfns, max_pages=32):
        assert (pages == mem.frames[mfns[i:i + len(pages)]]).all() and len(pages) <= 32
        assert is_view == np.shares_memory(pages, mem.frames)
        seen[i:i + len(pages)] += 1
    assert (seen == 1).all()
    keep = np.setdiff1d(np.arange(mem.nframes), mfns)
    before = mem.frames[keep].copy()
    mem.scrub(mfns, batch_frames=32)
    assert not mem.frames[mfns].any() and (mem.frames[keep] == before).all()


def test_machine_memory_is_a_memfd_another_mapping_sees():
    """Another mapping of `fd` (a guest process's) reads and writes the same frames."""
    import mmap
    mem = MachineMemory(4 * MiB)
    assert mem.fd is not None
    other = np.frombuffer(mmap.mmap(mem.fd, 4 * MiB, flags=mmap.MAP_SHARED), np.uint64)
    mem.words[3, 0] = 77
    assert other[3 * 512] == 77
    other[9 * 512 + 1] = 5
    assert mem.words[9, 1] == 5


def test_discard_punches_frames_out_so_they_read_zero_and_hold_no_ram():
    import os
    mem = MachineMemory(8 * MiB)
    mem.frames[10:20] = 0xCD
    assert not mem.holes(np.arange(10, 20)).any() and mem.holes(np.array([30, 40])).all()
    held = os.fstat(mem.fd).st_blocks
    mem.discard(np.array([10, 15]), np.array([3, 5]))          # frames 10-12 and 15-19
    assert mem.holes(np.array([10, 12, 15, 19])).all() and not mem.holes(np.array([13])).any()
    assert os.fstat(mem.fd).st_blocks < held, "punched frames give their RAM back"
    assert not mem.frames[[10, 11, 12, 15, 19]].any() and (mem.frames[[13, 14]] == 0xCD).all()


def test_free_returns_the_free_runs_that_hold_the_freed_frames():
    a = FrameAllocator(64, 4, superpages=False)
    a.owner[[10, 11, 20, 30, 31, 32]] = 1
    a.owner[[12, 25]] = 2
    starts, lengths = a.free(np.array([11, 10, 20, 31]))
    # 10-11 are bounded by 2's frame 12 and 9 free below down to the reserve: 4..11
    assert list(zip(starts.tolist(), lengths.tolist(), strict=True)) == [(4, 8), (13, 12), (31, 1)]


def test_destroy_punches_a_guests_frames_out():
    from nodes.xen.hypervisor import Hypervisor
    hv = Hypervisor("h", 64 * MiB, seed=3)
    dom = hv.create_domain("g", 8 * MiB, "p2m")
    dom.write_words(np.arange(dom.data_pages), 0, np.ones(dom.data_pages, np.uint64))
    assert not hv.memory.holes(dom.p2m).any()
    hv.destroy_domain("g")
    assert hv.memory.holes(dom.p2m).all(), "every freed frame is a hole again"
