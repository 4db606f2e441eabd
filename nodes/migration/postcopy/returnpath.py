"""The return path of a post-copy migration: the destination -> source direction of the data
connection, which carried READY, RESULT and SYNC_ACK before and now carries what the
destination says while its guest runs (QEMU's return path: MIG_RP_MSG_REQ_PAGES,
MIG_RP_MSG_RECV_BITMAP).

- `ReturnPath`, on the destination: its records, written by the receiver's thread and by the
  vCPU that faults, one at a time; each pays the link's latency, as every record back does.
  While the link is down it sends nothing (`attach` gives it the next connection).
- `RequestReader`, on the source: a thread that reads the destination's records while the
  push runs (REQ_PAGES, POSTCOPY_RESUMED, RECEIVER_RESULT) and hands them to the
  `PostcopySource` (`requests`, `resumed`, `result`), or says the link broke. It waits for
  each record with `select`, so a quiet return path (a guest that faults on nothing) is not
  a timeout; a record once begun must arrive within the migration's timeout.
"""

import select
import socket
import threading
import time
from typing import Protocol

import numpy as np

from nodes.errors import ConnectionLost
from nodes.migration.receive.reader import RecordReader
from nodes.migration.wire import pagesets, records
from nodes.migration.wire.records import RecordType as RT

POLL_SECONDS = 0.05


class ReturnPath:
    """The destination's records back to the source, from any of its threads."""

    def __init__(self, latency_seconds: float):
        self.latency = latency_seconds
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None

    def attach(self, sock: socket.socket | None) -> None:
        with self._lock:
            self._sock = sock

    def send(self, rtype: RT, fields: dict | None = None) -> bool:
        """One record back; False if the link is down (it is not sent)."""
        data = records.encode_record(rtype, fields)
        with self._lock:
            if self._sock is None:
                return False
            if self.latency:
                time.sleep(self.latency)
            try:
                self._sock.sendall(data)
            except OSError:
                self._sock = None
                return False
        return True

    def request(self, pfns) -> bool:
        """Ask for pages, in records of at most MAX_REQUEST_PAGES."""
        ok = True
        for i in range(0, len(pfns), pagesets.MAX_REQUEST_PAGES):
            part = pfns[i:i + pagesets.MAX_REQUEST_PAGES]
            ok = self.send(RT.REQ_PAGES, {"pfns": pagesets.encode_pfns(part)}) and ok
        return ok


class ReturnPathNews(Protocol):
    """Where the `RequestReader` hands what it reads: the migration's post-copy state on the
    source (`nodes.migration.postcopy.state.PostcopySource`, which starts the reader, so a
    Protocol here and no import back)."""

    def requested(self, pfns: np.ndarray) -> None: ...

    def resumed(self, wall: float) -> None: ...

    def finished(self, fields: dict) -> None: ...

    def broke(self, exc: BaseException) -> None: ...


class RequestReader:
    """The source's thread reading the return path; see the module docstring."""

    def __init__(self, sock: socket.socket, reader: RecordReader, owner: ReturnPathNews,
                 guest_pages: int):
        self.sock = sock
        self.reader = reader
        self.owner = owner
        self.guest_pages = guest_pages
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="postcopy-return-path",
                                       daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(5.0)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self._readable():
                    continue
                rec = self.reader.expect(RT.REQ_PAGES, RT.POSTCOPY_RESUMED,
                                         RT.RECEIVER_RESULT)
                if rec.type == RT.REQ_PAGES:
                    self.owner.requested(pagesets.decode_pfns(rec.fields["pfns"],
                                                             self.guest_pages))
                elif rec.type == RT.POSTCOPY_RESUMED:
                    self.owner.resumed(float(rec.fields["resume_wall"]))
                else:
                    self.owner.finished(rec.fields)
                    return
        except BaseException as exc:  # noqa: BLE001 - any end of the return path is news
            if not self._stop.is_set():
                self.owner.broke(exc)

    def _readable(self) -> bool:
        try:
            ready, _, _ = select.select([self.sock], [], [], POLL_SECONDS)
        except (OSError, ValueError) as exc:
            raise ConnectionLost(f"the return path is gone: {exc}") from None
        return bool(ready)
