"""`migbed bench`: how close migbed runs to this machine's limits, each figure against a
baseline measured in the same run on the same machine.

Sections (each figure is the median of repeats, with min and max), one module each:

- throughput: an idle guest migrated over an unlimited link, against the raw data path (the
  same bytes pushed between the same two host actors over migbed's own transport: a
  `nodes.migration.channel` TCP connection and a `LinkSender`, without encoding or page
  lookups), an in-process memory copy, and Ray's object store as the alternative data plane
  (`baselines`: the code that runs inside the host actors).
- downtime: the floor migbed adds to every downtime (idle guest) and with a ~50-page final
  round.
- dirtying: page writes per second one vCPU sustains per pattern in P2M mode and in VP mode
  with log-dirty on (CLEANed every round interval, as during a migration).
- stages: the pipeline's stages one at a time on one 4 MiB record, to show which is slowest.
- startup: seconds to bring up N hosts on a fresh local Ray cluster (in a child process, so
  it never touches the caller's Ray session) and the resident memory of its Ray processes.
- scale: one host's guests evacuated to the others concurrently (from threads; `migrate`
  blocks) against the same migrations one at a time.
- postcopy: the downtime of a post-copy switch beside pre-copy's floor, and the fault latency
  (a page request to the page landed) beside a raw one-page round trip (`postcopy`).

`--quick` shrinks everything so the test suite can prove the code runs; its numbers mean
nothing.
"""

from cluster.bench.options import SECTIONS, BenchOptions
from cluster.bench.results import Results
from cluster.bench.runner import run_bench

__all__ = ["SECTIONS", "BenchOptions", "Results", "run_bench"]
