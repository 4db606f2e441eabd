"""The wire section: what zero-page detection, XBZRLE, parallel channels and compression cost
and give, each against the plain path measured in the same run.

- encoders alone, on one 4 MiB batch: zero-page detection over zero and over random frames
  (against gathering the same frames: a memory read), and the XBZRLE encoder on pages whose
  counter and 64 bytes changed, and on pages rewritten whole (overflows);
- round 0 of a random-filled guest with zero-page detection on and off (the cheap test must
  not cost round 0 its throughput);
- migrations of a random-filled guest over 1, 2 and 4 multifd channels against the plain
  path, and with zlib and zstd at QEMU's default level 1 on random and on text memory, each
  repeat of a variant beside a plain migration of the same guest.

On a machine of 2 cores the channels' threads and the compressors compete with the guest and
the receiver for the same CPUs: what they cost against what they save is what is printed.
"""

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from cluster.bench.bench_options import BenchOptions
from cluster.bench.figures import Results, mib_per_second, unique_name
from nodes.migration.wire import records
from nodes.phase import Outcome

if TYPE_CHECKING:
    from cluster.testbed import Testbed

CHANNELS = (1, 2, 4)
CODECS = ("zlib", "zstd")


def bench_encoders(opts: BenchOptions, res: Results, say: Callable[[str], None]) -> None:
    from nodes.migration.wire import xbzrle
    from nodes.migration.wire.zeropage import zero_frames
    from nodes.xen.memory import MachineMemory
    batch = records.MAX_BATCH_PAGES
    mem = MachineMemory(2 * batch * 4096)
    zero, full = np.arange(batch), np.arange(batch, 2 * batch)
    mem.frames[full] = np.random.default_rng(0).integers(0, 256, (batch, 4096), np.uint8)
    nbytes = batch * 4096
    rng = np.random.default_rng(1)
    old = rng.integers(0, 256, (batch, 4096), dtype=np.uint8)
    small = old.copy()
    small[:, :8] += 1
    small[:, 1000:1064] = rng.integers(0, 256, (batch, 64), dtype=np.uint8)
    whole = rng.integers(0, 256, (batch, 4096), dtype=np.uint8)
    cases = {
        "zero-page detection, zero frames": lambda: zero_frames(mem, zero),
        "zero-page detection, random frames": lambda: zero_frames(mem, full),
        "plain path: gather the frames": lambda: mem.frames[full],
        "xbzrle encode, counter + 64 bytes changed": lambda: xbzrle.encode(old, small),
        "xbzrle encode, pages rewritten (overflow)": lambda: xbzrle.encode(old, whole),
    }
    for label, fn in cases.items():
        fn()
        for _ in range(max(3, opts.repeats)):
            t0 = time.perf_counter()
            fn()
            res.add(f"encoder {label}", "bytes_per_second", nbytes / (time.perf_counter() - t0))
        say(f"  {label}: {mib_per_second(res.median(f'encoder {label}'))}")
    res.ratio("zero-page detection (random frames) / gathering them",
              "encoder zero-page detection, random frames",
              "encoder plain path: gather the frames")


def bench_wire(tb: "Testbed", opts: BenchOptions, res: Results,
               say: Callable[[str], None]) -> None:
    """Migrations of a guest with content, each variant beside the plain one."""
    from nodes.host.specs import GuestSpec
    from workloads.spec import WorkloadSpec
    bench_encoders(opts, res, say)
    a, b = list(tb.hosts)[:2]
    size = opts.wire_guest_memory_bytes
    variants = [("zero-page detection off", "random", {"zero_page_detection": "none"}),
                *((f"multifd {n} channel{'s' * (n > 1)}", "random", {"multifd_channels": n})
                  for n in CHANNELS),
                *((f"multifd 2 channels {codec}", fill,
                   {"multifd_channels": 2, "multifd_compression": codec})
                  for fill in ("random", "text") for codec in CODECS)]
    for fill in ("random", "text"):
        name = unique_name(fill)
        tb.create(a, GuestSpec(name, size, workload=WorkloadSpec("idle", fill=fill)))
        where = [a]
        try:
            for label, want, kw in variants:
                if want == fill:
                    _variant(tb, name, where, (a, b), f"{label} on {fill}", kw, opts, res,
                             say)
        finally:
            tb.destroy(name)
    best = max((k for k in res.ratios if k.startswith("multifd") and "round 0" not in k),
               default=None,
               key=lambda k: res.ratios[k] or 0)
    if best is not None:
        res.conclusions.append(
            f"wire: the best multifd variant here is {best.removesuffix(' / plain')} at "
            f"{res.ratios[best]:.2f}x the plain path ({tb.__class__.__name__} on this "
            "machine's cores: channels and compressors share them with the receiver)")


def _variant(tb: "Testbed", name: str, where: list, hosts: tuple[str, str], label: str,
             kw: dict, opts: BenchOptions, res: Results, say: Callable[[str], None]) -> None:
    """Repeats of the plain migration and of the variant, back to back."""
    from nodes.migration.settings import MigrationSettings
    size = opts.wire_guest_memory_bytes
    fill = label.rsplit(" on ", 1)[1]
    plain = f"wire plain on {fill}"
    for _ in range(opts.repeats):
        for tag, extra in ((plain, {}), (f"wire {label}", kw)):
            r = _move(tb, name, where, *hosts, MigrationSettings(**extra))
            res.add(f"{tag} throughput_bytes_per_second", "bytes_per_second",
                    size / r.total_time_seconds if r.total_time_seconds else 0.0,
                    "guest bytes / total time: what the migration moved per second")
            res.add(f"{tag} round0_throughput_bytes_per_second", "bytes_per_second",
                    size / r.rounds[0]["duration_seconds"]
                    if r.rounds[0]["duration_seconds"] else 0.0, "guest bytes / round 0")
            if r.multifd and r.multifd.compression_ratio:
                res.add(f"{tag} compression_ratio", "ratio", r.multifd.compression_ratio)
    ratio = res.ratio(f"{label} / plain", f"wire {label} throughput_bytes_per_second",
                      f"{plain} throughput_bytes_per_second")
    res.ratio(f"{label} / plain, round 0", f"wire {label} round0_throughput_bytes_per_second",
              f"{plain} round0_throughput_bytes_per_second")
    say(f"  {label}: {ratio:.2f}x the plain path")


def _move(tb: "Testbed", name: str, where: list, a: str, b: str, settings):
    dest = b if where[0] == a else a
    r = tb.migrate(name, dest, settings)
    if r.status != Outcome.COMPLETED or not r.integrity.verified:
        raise RuntimeError(f"wire migration {r.status}: {r.error}")
    where[0] = dest
    return r


