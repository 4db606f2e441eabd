"""Post-copy's native fault path of a process guest: `libmigbedfault.so`
(`nodes/host/native/faultpath.c`, built by `make setup`), loaded by ctypes, on both sides.

Why: through the Python path a fault's page crosses four interpreted threads in two host
processes, each waiting for its GIL behind the push's (measured 0.54-0.80 ms a fault against
a 0.12 ms raw page round trip). With the library one thread per side does it with no GIL: on
the destination a thread reads the guest's userfaultfd and writes the pfn on a connection of
its own (the fault channel, opened at the switch and after a recovery as the preempt channel
is, and which is that channel under `--postcopy-preempt`); on the source a
thread reads it and sends the page straight from its frame, taking it from the push's cursor
under a mutex the push takes too (`NativeCursorLock`); the destination's thread claims it,
receives it into its frame, hashes it, marks it received, times it, and maps it
(UFFDIO_CONTINUE). A page lands once: the Python landing claims the same byte map
(`NativeFaults.claim`) before it writes a page. What the channel cannot carry (page tables,
requests while it is down) goes by the Python path (the return path's REQ_PAGES).

It runs only where both hosts have the library, the guest is a process guest, and the link
has no emulated latency (the fault channel would not pay it); the push's pacer is charged the
bytes it carried, as the preempt channel's are. Without the library (or with
`MIGBED_NO_NATIVE_FAULTS=1`) everything is as before.
"""

import ctypes
import os
import time
import weakref
from functools import cache
from pathlib import Path

import numpy as np

from nodes.errors import ConnectionLost, MigbedError, StreamError
from nodes.migration.receive.reader import RecordReader
from nodes.migration.wire.channel import connect
from nodes.migration.wire.records import RecordType as RT
from nodes.migration.wire.records import encode_record
from nodes.xen.digest import _multipliers

LIBRARY = Path(__file__).resolve().parents[2] / "host" / "native" / "libmigbedfault.so"
CHANNEL = "native"            # the hello's `channel` field on the fault channel
BUCKETS = 25
_P, _I64, _U64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_int

_SIGNATURES = {
    "fs_new": (_P, [_INT, _P, _I64, _P, _P, _P, _I64, _INT]),
    "fs_start": (_INT, [_P]), "fs_lock": (None, [_P]), "fs_unlock": (None, [_P]),
    "fs_fold": (None, [_P, _P]), "fs_counts": (None, [_P, _P]), "fs_finish": (_INT, [_P]),
    "fs_stop": (None, [_P]), "fs_free": (None, [_P]), "fs_reattach": (_INT, [_P, _INT]),
    "fd_new": (_P, [_INT, _U64, _INT, _I64, _P, _P, _P, _P, _P, _P, _P, _INT]),
    "fd_channel": (None, [_P, _INT, _P, _I64, _P, _P, _P, _P]),
    "fd_start": (_INT, [_P]), "fd_claim": (None, [_P, _P, _I64, _P]),
    "fd_unclaim": (None, [_P, _P, _I64]), "fd_landed": (_INT, [_P, _P, _I64]),
    "fd_ask": (_I64, [_P, _P, _I64, _P]), "fd_drain": (_I64, [_P, _P, _I64]),
    "fd_stats": (None, [_P, _P, _P]), "fd_detach": (None, [_P]), "fd_stop": (None, [_P]),
    "fd_reattach": (None, [_P, _INT]),
    "fd_free": (None, [_P]),
}


@cache
def library() -> ctypes.CDLL | None:
    """The library, or None when it was not built (`make setup` builds it; the Python path
    then serves every fault). `MIGBED_NO_NATIVE_FAULTS=1` leaves it unloaded."""
    if os.environ.get("MIGBED_NO_NATIVE_FAULTS") or not LIBRARY.exists():
        return None
    try:
        lib = ctypes.CDLL(str(LIBRARY))
    except OSError:
        return None
    for name, (res, args) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


# -- the source -------------------------------------------------------------------------------
class NativeServer:
    """The source's fault-channel thread over a connected socket (it takes the descriptor):
    it serves pages of `unsent` (the push's cursor) from the frozen frames."""

    def __init__(self, lib: ctypes.CDLL, fd: int, frames: np.ndarray, p2m: np.ndarray,
                 unsent: np.ndarray, is_pt: np.ndarray, page_size: int):
        self.lib = lib
        self._keep = (frames, np.ascontiguousarray(p2m, dtype=np.int64), unsent,
                      np.ascontiguousarray(is_pt, dtype=np.uint8))
        frames, p2m, unsent, is_pt = self._keep
        if unsent.dtype != np.bool_ or not unsent.flags.c_contiguous:
            raise ValueError("the cursor's bitmap must be a contiguous bool array")
        self.h = lib.fs_new(fd, _ptr(frames), len(frames), _ptr(p2m), _ptr(unsent),
                            _ptr(is_pt), len(unsent), page_size)
        if not self.h:
            os.close(fd)
            raise MemoryError("the native fault server could not be made")
        weakref.finalize(self, lib.fs_free, self.h)
        self.stopped = False
        if lib.fs_start(self.h):
            lib.fs_stop(self.h)
            raise OSError("the native fault server's thread did not start")

    def fold(self) -> tuple[int, int, int]:
        """Under the lock: pages it took from the cursor since, their bytes, the last pfn."""
        out = np.zeros(3, np.int64)
        self.lib.fs_fold(self.h, _ptr(out))
        return int(out[0]), int(out[1]), int(out[2])

    def counts(self) -> dict:
        out = np.zeros(6, np.int64)
        self.lib.fs_counts(self.h, _ptr(out))
        keys = ("requests", "served", "already_sent", "bytes", "bad", "ended")
        return dict(zip(keys, out.tolist(), strict=True))

    def finish(self) -> None:
        """Every page has gone: no page from here after this; END on the channel."""
        if not self.stopped:
            self.lib.fs_finish(self.h)

    def stop(self) -> None:
        """Its thread ends and its connection closes (the handle stays: the lock's)."""
        if not self.stopped:
            self.stopped = True
            self.lib.fs_stop(self.h)

    def reattach(self, fd: int) -> None:
        """A recovered link: serve again on a new connection (its descriptor taken)."""
        self.stop()
        self.stopped = False
        if self.lib.fs_reattach(self.h, fd):
            self.stopped = True
            raise OSError("the native fault server's thread did not start again")


class NativeCursorLock:
    """The push's cursor lock when the fault channel serves from the same cursor: the
    server's mutex. Taking it folds what the server took into the cursor (its pending count,
    the scan's position after the last page asked for, as `serve` does) and charges the
    push's pacer the bytes it sent (`wire.charge`)."""

    def __init__(self, server: NativeServer, cursor, wire):
        self.server, self.cursor, self.wire = server, cursor, wire
        self.taken = 0

    def __enter__(self) -> "NativeCursorLock":
        s = self.server
        s.lib.fs_lock(s.h)
        taken, nbytes, last = s.fold()
        if taken:
            self.taken += taken
            self.cursor.pending_pages -= taken
            if last >= 0:
                self.cursor.seek(last + 1)
        if nbytes:
            self.wire.charge(nbytes, time.monotonic())
        return self

    def __exit__(self, *exc) -> None:
        self.server.lib.fs_unlock(self.server.h)


# -- the destination --------------------------------------------------------------------------
class NativeFaults:
    """The destination's fault thread of one guest (see the module docstring); made and
    driven by `nodes.host.faultreader.FaultReader.go_native`, whose arrays it shares."""

    def __init__(self, lib: ctypes.CDLL, reader, fwd_fd: int):
        self.lib = lib
        self.claimed = reader.received.astype(np.uint8)     # present pages: claimed
        self.is_pt = np.zeros(len(reader.received), np.uint8)
        cuts = None if reader.cuts is None else reader.cuts.astype(np.uint8)
        self._keep = [reader.received, reader.asked_at, reader.waiters, reader.waited_since,
                      cuts]
        self.h = lib.fd_new(reader.uffd.fd, reader.base, reader.page_size,
                            len(reader.received), _ptr(reader.received), _ptr(self.claimed),
                            _ptr(self.is_pt), None if cuts is None else _ptr(cuts),
                            _ptr(reader.asked_at), _ptr(reader.waiters),
                            _ptr(reader.waited_since), fwd_fd)
        if not self.h:
            raise MemoryError("the native fault thread could not be made")
        self._free = weakref.finalize(self, lib.fd_free, self.h)

    def channel(self, fd: int, frames: np.ndarray, p2m: np.ndarray, applied: np.ndarray,
                hashes: np.ndarray | None, mult: np.ndarray, is_pt: np.ndarray) -> None:
        """Where its pages land; takes the connection's descriptor."""
        self.is_pt[:] = is_pt
        p2m = np.ascontiguousarray(p2m, dtype=np.int64)
        self._keep += [frames, p2m, applied, hashes, mult]
        self.lib.fd_channel(self.h, fd, _ptr(frames), len(frames), _ptr(p2m), _ptr(applied),
                            None if hashes is None else _ptr(hashes), _ptr(mult))

    def start(self) -> None:
        if self.lib.fd_start(self.h):
            raise OSError("the native fault thread did not start")

    def claim(self, pfns: np.ndarray) -> np.ndarray:
        """Which of `pfns` this caller now owns (and must land): a page is claimed once."""
        pfns = np.ascontiguousarray(pfns, dtype=np.int64)
        out = np.zeros(len(pfns), np.uint8)
        if len(pfns):
            self.lib.fd_claim(self.h, _ptr(pfns), len(pfns), _ptr(out))
        return out.view(bool)

    def unclaim(self, pfns: np.ndarray) -> None:
        """Claimed pages that did not land (their record broke off): free to land again."""
        pfns = np.ascontiguousarray(pfns, dtype=np.int64)
        if len(pfns):
            self.lib.fd_unclaim(self.h, _ptr(pfns), len(pfns))

    def landed(self, pfns: np.ndarray) -> int:
        """Pages the Python landing made present: timed, mapped, their waiters woken."""
        pfns = np.ascontiguousarray(pfns, dtype=np.int64)
        return self.lib.fd_landed(self.h, _ptr(pfns), len(pfns))

    def ask(self, pfns: np.ndarray) -> np.ndarray:
        """Of `pfns`, those not asked for nor here, now marked asked for."""
        pfns = np.ascontiguousarray(pfns, dtype=np.int64)
        out = np.zeros(len(pfns), np.int64)
        n = self.lib.fd_ask(self.h, _ptr(pfns), len(pfns), _ptr(out))
        return out[:n]

    def drain(self, most: int = 4096) -> np.ndarray:
        """Requests the native thread left to the Python path."""
        out = np.zeros(most, np.int64)
        return out[:self.lib.fd_drain(self.h, _ptr(out), most)]

    def stats(self) -> dict:
        ints, dbl = np.zeros(12 + 2 * BUCKETS, np.int64), np.zeros(3, np.float64)
        self.lib.fd_stats(self.h, _ptr(ints), _ptr(dbl))
        keys = ("faults", "pages_requested", "local_faults", "continues", "landed",
                "duplicates", "bytes", "ended", "gone", "error", "channel_up",
                "native_latency_count")
        d = dict(zip(keys, ints[:12].tolist(), strict=True))
        d.update(counts=ints[12:12 + BUCKETS], native_counts=ints[12 + BUCKETS:],
                 blocked_seconds=float(dbl[0]), latency_sum=float(dbl[1]),
                 native_latency_sum=float(dbl[2]))
        return d

    def detach(self) -> None:
        """The link broke: the channel goes; its requests go by the Python path."""
        self.lib.fd_detach(self.h)

    def reattach(self, fd: int) -> None:
        """A recovered link's new channel (its descriptor taken)."""
        self.lib.fd_reattach(self.h, fd)

    def stop_thread(self) -> None:
        """The thread ends and the channel closes (its counts stay readable)."""
        self.lib.fd_stop(self.h)

    def stop(self) -> None:
        """The thread ends, the channel closes, the handle goes."""
        self._free()


__all__ = ["CHANNEL", "LIBRARY", "NativeCursorLock", "NativeFaults", "NativeServer",
           "library"]


# -- the source's channel, as the switch and a recovery open it -------------------------------------
def _connect(ctx) -> int:
    """A connection to the destination with the fault channel's hello sent: its descriptor
    (the native thread's from here on)."""
    s = ctx.session
    sock = connect(s.ticket, s.settings.timeout_seconds)
    try:
        sock.sendall(encode_record(RT.POSTCOPY_PREEMPT, {
            "migration_id": s.ticket.migration_id, "channel": CHANNEL}))
    except OSError as exc:
        sock.close()
        raise ConnectionLost(f"the fault channel did not open: {exc}") from None
    return sock.detach()


def open_source(ctx, pc) -> bool:
    """At the switch (before RUN): the fault channel for a process guest, when this host has
    the library and the link emulates no latency (the channel would not pay it); its server
    thread; the push's cursor lock made its mutex. With `--postcopy-preempt` it is the
    preempt channel (counted as it). False when it does not apply (RUN then says nothing)."""
    s = ctx.session
    lib = library()
    if (lib is None or s.settings.latency_seconds or s.settings.multifd_channels
            or s.runtime.vcpu_config(s.guest).get("vcpu") != "process"):
        return False
    fd = _connect(ctx)
    pages = ctx.pages
    pc.native = NativeServer(lib, fd, s.hv.memory.frames, s.dom.p2m, pages.cursor.unsent,
                             pages.pipeline.encoder.is_pt, s.hv.page_size)
    pc.native_label = "preempt" if s.settings.postcopy_preempt else CHANNEL
    pc.preempt_channels += pc.native_label == "preempt"
    pc.cursor_lock = NativeCursorLock(pc.native, pages.cursor, ctx.channel.link.link)
    return True


def reopen_source(ctx, pc) -> None:
    """After a recovery's bitmap: the fault channel again, on the same server."""
    fd = _connect(ctx)
    try:
        pc.native.reattach(fd)
    except OSError as exc:
        raise ConnectionLost(str(exc)) from None
    pc.cursor_lock.wire = ctx.channel.link.link
    pc.preempt_channels += pc.native_label == "preempt"


# -- the destination's channel, as the post-copy destination opens it ----------------------------
def _accept(rx):
    try:
        conn = rx.listener.accept(rx.settings.timeout_seconds)
    except (MigbedError, OSError) as exc:
        raise ConnectionLost(f"the fault channel did not connect: {exc}") from None
    try:
        hello = RecordReader(conn.recv_into).expect(RT.POSTCOPY_PREEMPT).fields
        if hello["migration_id"] != rx.info.migration_id or hello.get("channel") != CHANNEL:
            raise StreamError("a fault channel for another migration")
    except BaseException:
        conn.close()
        raise
    return conn


def reopen_native(rx, faults) -> bool:
    """A recovery: the source opens its fault channel again; accepted and handed to the
    same native thread (closed if this host has none running: the Python path serves)."""
    conn = _accept(rx)
    running = getattr(faults, "native_stats", lambda: None)() is not None
    if not running or faults.native_final():
        conn.close()
        return False
    faults.reattach_native(conn.detach())
    return True


def open_native(rx, faults) -> bool:
    """RUN said a fault channel follows: accept it (it is the only extra connection of the
    switch: with `--postcopy-preempt` it is the preempt channel) and hand it to the guest's
    fault reader's native thread. A host without the library, or a guest whose faults are
    not real (`go_native`), closes it: the source's thread then ends, and every request goes
    by the return path."""
    conn = _accept(rx)
    try:
        lib = library()
        if lib is None or not hasattr(faults, "go_native"):
            conn.close()
            return False
        landing, memory = rx.landing, rx.landing.memory
        native = NativeFaults(lib, faults, faults.native_fwd_fd())
        native.channel(conn.detach(), memory.frames, rx.dom.p2m, landing.applied,
                       landing.hashes if landing.verify else None,
                       _multipliers(memory.page_size // 8), landing.is_pt)
    except BaseException:
        conn.close()
        raise
    faults.go_native(native)
    landing.claimer, landing.unclaimer = faults.claim, faults.unclaim
    return True


def wait_native_end(faults, timeout: float) -> None:
    """The data channel's END came: the fault channel's END too, each page of it landed
    (else the link broke: the recovery asks again for what is missing)."""
    deadline = time.monotonic() + timeout
    while True:
        st = faults.native_stats()
        if st is None or st["ended"]:
            return
        if not st["channel_up"] or time.monotonic() > deadline:
            raise ConnectionLost("the native fault channel broke before its END")
        time.sleep(0.0005)
