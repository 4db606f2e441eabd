"""`migbed bench`: how close migbed runs to this machine's limits, each figure against a
baseline measured in the same run on the same machine.

Sections (each figure is the median of repeats, with min and max), one module each:

- throughput: an idle guest (its memory random, so every page goes whole) migrated over an unlimited link, against the raw data path (the
  same bytes pushed between the same two host actors over migbed's own transport: a
  `nodes.migration.wire.channel` TCP connection and a `LinkSender`, without encoding or page
  lookups), an in-process memory copy, and Ray's object store as the alternative data plane
  (`baselines`: the code that runs inside the host actors).
- downtime: the floor migbed adds to every downtime (idle guest) and with a ~50-page final
  round.
- dirtying: page writes per second one vCPU sustains per pattern in P2M mode and in VP mode
  with log-dirty on (CLEANed every round interval, as during a migration).
- stages: the pipeline's stages one at a time on one 4 MiB record, to show which is slowest.
- wire: zero-page detection and the XBZRLE encoder alone; migrations over 1, 2 and 4
  multifd channels and with zlib and zstd on random and text memory, each beside the plain
  path in the same run (`wire`).
- startup: seconds to bring up 2 / 8 / 32 hosts on a fresh local Ray cluster with their
  guests, listed and torn down (in a child process, so it never touches the caller's Ray
  session), the default packing beside one Ray node per host; the resident memory of every
  process the cluster started per host, guest frames excluded; workers Ray's memory monitor
  killed.
- scale: one host and then a rack of four evacuated with every migration at once against one
  at a time (total time, per-migration downtime), on an 8-host cluster of its own.
- postcopy: the downtime of a post-copy switch beside pre-copy's floor, and the fault latency
  (a page request to the page landed) beside a raw one-page round trip (`postcopy`).
- process: process vCPUs against thread vCPUs paired in each repeat: throughput, the idle
  downtime floor, the guest-observed downtime and its parts, post-copy switch downtime and
  fault latency against a raw page round trip (`process_bench`).
- density: guests writing 1000 pages/s on every host, thread and then process vCPUs: the
  listing's time, the cluster's and the guests' CPU, PSS beyond frames (`density`).

`--quick` shrinks everything so the test suite can prove the code runs; its numbers mean
nothing.
"""

from cluster.bench.bench_options import SECTIONS, BenchOptions
from cluster.bench.bench_runner import run_bench
from cluster.bench.figures import Results

__all__ = ["SECTIONS", "BenchOptions", "Results", "run_bench"]
