"""The baselines a migration is measured against, run inside the host actors themselves:
the raw data path (the guest's bytes pushed memory to memory over migbed's own transport, no
encoding, no page lookups), Ray's object store as the other data plane, and a memory copy.

The functions that run in a host's process (`_raw_sink`, `_raw_push`, `_ray_put`,
`_ray_get`) are module-level so Ray ships them by reference through `__ray_call__`.
"""

import concurrent.futures
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from cluster.bench.bench_options import MiB
from cluster.bench.figures import Results
from nodes.migration.wire.channel import Ticket

RECORD_BYTES = 4 * MiB          # one PAGE_DATA record: the unit both data planes move
RAY_WINDOW_BYTES = 64 * MiB     # objects in flight at once: half the default object store


def on_host(handle: Any, fn: Callable, *args: Any) -> Callable[..., Any]:
    """Start fn(host_service, *args) in the host's own process (the Ray actor's, or this one
    for an in-process host); returns a zero-argument function that waits for the result."""
    actor = getattr(handle, "actor", None)
    if actor is None:
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        fut = pool.submit(fn, handle.service, *args)
        pool.shutdown(wait=False)
        return lambda timeout=120.0: fut.result(timeout)
    import ray
    ref = actor.__ray_call__.remote(fn, *args)
    return lambda timeout=120.0: ray.get(ref, timeout=timeout)


def _machine_bytes(nbytes: int) -> np.ndarray:
    """A buffer allocated as a host's machine memory is (`nodes.xen.memory`), as bytes."""
    from nodes.xen.memory import MachineMemory
    return MachineMemory(max(nbytes, RECORD_BYTES)).frames.reshape(-1)


def _raw_sink(host, nbytes: int, timeout: float, memory_bytes: int) -> Ticket:
    """Destination side of the raw data path: listen like a migration does and receive
    `nbytes` into a `memory_bytes` buffer, resident before the first byte as a destination's
    reserved frames are (`populate_frames`), record-sized receives in order (wrapping round
    when the stream is longer); answer one byte. Returns the ticket at once."""
    from nodes.migration.wire.channel import Listener
    listener = Listener(host.config.address, "bench-raw")
    memory = _machine_bytes(memory_bytes)
    memory[:] = 0                                     # resident, like populated frames

    def receive() -> None:
        conn = None
        try:
            conn = listener.accept(timeout)
            view = memoryview(memory)
            got = 0
            while got < nbytes:
                at = got % len(memory)
                n = min(RECORD_BYTES, nbytes - got, len(memory) - at)
                k = conn.recv_into(view[at:at + n])
                if not k:
                    return
                got += k
            conn.sendall(b"\x01")
        finally:
            listener.close()
            if conn is not None:
                conn.close()
    threading.Thread(target=receive, name="bench-raw-sink", daemon=True).start()
    return listener.ticket


def _raw_push(host, ticket: Ticket, nbytes: int, timeout: float, memory_bytes: int) -> float:
    """Source side: push `nbytes` from a resident `memory_bytes` buffer (as the guest's frames
    are once a migration has populated them) in record-sized sends through a LinkSender, as
    migrations do; seconds from the first byte until the destination confirmed the last."""
    from nodes.migration.send.link import LinkSender
    from nodes.migration.wire.channel import connect
    sock = connect(ticket, timeout)
    try:
        link = LinkSender(sock)
        memory = _machine_bytes(memory_bytes)
        memory[:] = 0                                 # resident
        view = memoryview(memory)
        start = time.perf_counter()
        sent = 0
        while sent < nbytes:
            at = sent % len(memory)
            n = min(RECORD_BYTES, nbytes - sent, len(memory) - at)
            link.send([view[at:at + n]])
            sent += n
        if sock.recv(1) != b"\x01":
            raise ConnectionError("raw data path: the sink did not confirm")
        return time.perf_counter() - start
    finally:
        sock.close()


def _ray_put(host, count: int, nbytes: int) -> list:
    """`count` objects of `nbytes` in this node's object store; refs inside a list so Ray
    hands them back as refs."""
    import ray
    data = np.ones(nbytes, dtype=np.uint8)
    return [[ray.put(data) for _ in range(count)]]


def _ray_get(host, refs: list) -> int:
    """Fetch the objects into this node's object store; returns the bytes fetched."""
    import ray
    return sum(ray.get(ref).nbytes for ref in refs)


def raw_path_seconds(source: Any, destination: Any, nbytes: int, memory_bytes: int,
                     timeout: float = 30.0) -> float:
    """Seconds to push `nbytes` from host handle `source` to `destination` over the raw
    data path, from and into resident buffers of `memory_bytes`."""
    ticket = on_host(destination, _raw_sink, nbytes, timeout, memory_bytes)()
    return on_host(source, _raw_push, ticket, nbytes, timeout, memory_bytes)()


def cross_node_pair(tb: Any) -> tuple[Any, Any]:
    """Two hosts on two different Ray nodes: within one node `ray.get` maps the object from
    shared memory, which is not the data plane between machines being compared."""
    nodes = {name: h.call("describe")["ray_node"]["node_id"] for name, h in tb.hosts.items()}
    names = list(nodes)
    for other in names[1:]:
        if nodes[other] != nodes[names[0]]:
            return tb.host(names[0]), tb.host(other)
    raise RuntimeError("the Ray-object baseline needs two hosts on two Ray nodes; every host "
                       "is on one (give --hosts-per-node below --hosts)")


def ray_objects_seconds(source: Any, destination: Any, nbytes: int) -> tuple[int, float]:
    """(bytes moved, seconds) for `nbytes` of 4 MiB objects put on one node and fetched by
    the other, a window of them at a time."""
    count = max(1, min(RAY_WINDOW_BYTES, nbytes) // RECORD_BYTES)
    moved = 0
    t0 = time.perf_counter()
    while moved < nbytes:
        refs = on_host(source, _ray_put, count, RECORD_BYTES)()[0]
        moved += on_host(destination, _ray_get, refs)()
        del refs
    return moved, time.perf_counter() - t0


def memcpy(size: int, repeats: int, res: Results) -> None:
    """np.copyto between two warm buffers of `size`: the in-process ceiling."""
    src = np.ones(size, dtype=np.uint8)
    dst = np.zeros(size, dtype=np.uint8)
    dst[:] = 1                                      # touched: a copy, not first-touch faults
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        res.add("memcpy_throughput_bytes_per_second", "bytes_per_second",
                size / (time.perf_counter() - t0), "np.copyto between two warm buffers")
