"""Where a fault fires on the source: the seam a sender calls at every stage (`at`), which
carries out link faults itself and waits at host kills for the control plane to do them."""

import select
import socket
import threading
import time
from collections.abc import Callable, Iterable

from nodes.errors import MigrationCancelled, MigrationError
from nodes.faults.spec import HOST_KILLS, SOURCE_KINDS, FaultKind, FaultSpec
from nodes.faults.stats import FaultStats
from nodes.phase import Phase

PEER_CHECK_SECONDS = 0.02      # how often a stalled sender looks whether its peer gave up
# How long a sender held at a host kill waits for the control plane at least: the driver sees
# the fault by polling progress, which a loaded machine can delay past a short --timeout (a
# 1 s one was missed once); the migration's own timeout still bounds it when longer.
CONTROL_PLANE_WAIT_SECONDS = 10.0


class SourceFaults:
    """The faults a sender carries out (link faults) or waits at (host kills).

    `at(stage, round)` is called by the sender at every injection point; a fault fires once.
    """

    def __init__(self, faults: Iterable[FaultSpec], progress, cancel: threading.Event,
                 timeout_seconds: float, stats: FaultStats | None = None):
        self.pending = [f for f in faults if FaultKind(f.kind) in SOURCE_KINDS]
        self.progress = progress
        self.cancel = cancel
        self.timeout = timeout_seconds
        self.stats = stats
        self.fired: list[dict] = []
        self.sock: socket.socket | None = None
        self.link = None
        self._released: set[int] = set()
        self._wake = threading.Condition()
        self._killed = False
        # The sender's progress history: told of each fault that fires (its text), and
        # looked at (None) while a stall lasts, so the timeline shows both.
        self.sample: Callable[[str | None], None] | None = None
        # A cut link is down for good: a post-copy migration's reconnects fail until
        # `repair` (the operator's `migrate-recover`) says it is back.
        self.link_down = False
        # Told of the link once it is up (the host's paced rate, `nodes.host.pacedrates`).
        self.on_attach: Callable[[object], None] | None = None

    @property
    def armed(self) -> bool:
        return bool(self.pending)

    @property
    def killed(self) -> bool:
        """This host died (in one process: its threads go on, but must not act)."""
        return self._killed

    def repair(self) -> None:
        """The link is back (the operator repaired it)."""
        self.link_down = False

    def attach(self, sock: socket.socket, link) -> None:
        self.sock = sock
        self.link = link
        if self.on_attach is not None:
            self.on_attach(link)

    def at(self, stage: Phase, round_index: int = 0) -> None:
        if not self.pending:
            return
        for f in [f for f in self.pending if f.matches(stage, round_index)]:
            self.pending.remove(f)
            index = len(self.fired)
            self.fired.append({**f.to_dict(), "text": f.to_text(), "fired": True,
                               "side": "source"})
            if self.stats is not None:
                self.stats.count_injected(f)
            if self.sample is not None:
                self.sample(f"fault {f.to_text()}")
            self._fire(f, index, stage)

    def _fire(self, f: FaultSpec, index: int, stage: Phase) -> None:
        kind = FaultKind(f.kind)
        if kind in HOST_KILLS:
            self._wait_for_control_plane(f, index)
        elif kind is FaultKind.STALL_LINK:
            # After the hand-over or the post-copy switch the peer speaks on its own (RESULT,
            # page requests): a stall there only delays, it is not the peer giving up.
            self._stall(f.duration_seconds or 0.0,
                        watch_peer=stage not in (Phase.HANDOVER, Phase.POSTCOPY))
        elif kind is FaultKind.CUT_LINK:
            self.link_down = True
            self._cut()
        elif kind is FaultKind.SLOW_LINK:
            self.link.set_link_rate(f.bandwidth_bytes_per_second)
        elif kind is FaultKind.CORRUPT_RECORD:
            self.link.tamper = self._corrupt_next
        elif kind is FaultKind.TRUNCATE_STREAM:
            self.link.tamper = self._truncate_next
        elif kind is FaultKind.CUT_CHANNEL:
            self.link.cut(f.channel)            # the multifd channels (`nodes.migration.send.multifd`)

    # -- host kills: the control plane does them ----------------------------------------
    def _wait_for_control_plane(self, f: FaultSpec, index: int) -> None:
        """Stop here, show the fault in the progress, and wait until the driver has killed
        the host (`release`) or this host is killed itself. Bounded by the timeout."""
        self.progress.fault = {**f.to_dict(), "index": index, "text": f.to_text()}
        wait = max(self.timeout, CONTROL_PLANE_WAIT_SECONDS)
        try:
            with self._wake:
                ok = self._wake.wait_for(lambda: index in self._released or self._killed, wait)
        finally:
            self.progress.fault = None
        if not ok:
            raise MigrationError(f"fault {f.to_text()} was not carried out by the control "
                                 f"plane within {wait:g} s (run the migration through "
                                 "migbed's driver to kill hosts)")

    def release(self, index: int) -> None:
        with self._wake:
            self._released.add(index)
            self._wake.notify_all()

    def kill(self) -> None:
        """This (in-process) host died: its connections drop, nothing waits any more."""
        with self._wake:
            self._killed = True
            self._wake.notify_all()
        self._cut()

    # -- link faults -------------------------------------------------------------------------
    def _stall(self, seconds: float, watch_peer: bool) -> None:
        """Send nothing for `seconds`. Ends early, with an error, if the operator cancels
        or the destination gives up on the stalled stream (its timeout) and says so."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0 and not self._killed:
            if self.cancel.is_set():
                raise MigrationCancelled("migration cancelled by the operator during a "
                                         "link stall")
            step = min(left, PEER_CHECK_SECONDS)
            if watch_peer and self.sock is not None:
                if self._peer_spoke(step):
                    raise MigrationError(f"the destination gave up during a {seconds:g} s "
                                         "link stall (its timeout is shorter than the stall)")
            else:
                self.cancel.wait(step)
            if self.sample is not None:
                self.sample(None)

    def _peer_spoke(self, wait: float) -> bool:
        try:
            readable, _, _ = select.select([self.sock], [], [], wait)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def _cut(self) -> None:
        if self.sock is None:
            return
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _corrupt_next(self, buffers: list) -> list:
        """The next record with its body overwritten by 0xc1, a byte msgpack never uses:
        the receiver must refuse it."""
        self.link.tamper = None
        data = bytearray(b"".join(bytes(b) for b in buffers))
        end = min(len(data), 16)
        data[8:end] = b"\xc1" * (end - 8)
        return [bytes(data)]

    def _truncate_next(self, buffers: list) -> list:
        """Half of the next record on the wire, then the connection goes down."""
        self.link.tamper = None
        data = b"".join(bytes(b) for b in buffers)
        self.link.send([data[:len(data) // 2]])
        self.link.flush(self.timeout)
        self._cut()
        raise MigrationError(f"stream truncated after {len(data) // 2} of the "
                             f"{len(data)} bytes of a record (injected fault)")


