"""Running the bench: the sections of the options, on one testbed, each failure recorded
while the other sections still run."""

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from cluster.bench.bench_options import BenchOptions
from cluster.bench.density import bench_density
from cluster.bench.dirtying import bench_dirtying, bench_stages
from cluster.bench.downtime import bench_downtime
from cluster.bench.figures import Results
from cluster.bench.postcopy_bench import bench_postcopy
from cluster.bench.process_bench import bench_process
from cluster.bench.scale import bench_scale
from cluster.bench.startup import bench_startup
from cluster.bench.throughput import bench_throughput
from cluster.bench.wire_bench import bench_wire

if TYPE_CHECKING:
    from cluster.testbed import Testbed

# section -> what measures it; those in _ON_TESTBED take the testbed first
_SECTIONS: dict[str, Callable] = {
    "throughput": bench_throughput, "downtime": bench_downtime, "dirtying": bench_dirtying,
    "stages": bench_stages, "wire": bench_wire, "startup": bench_startup,
    "scale": bench_scale, "postcopy": bench_postcopy, "process": bench_process,
    "density": bench_density}
_ON_TESTBED = ("throughput", "downtime", "wire", "postcopy", "process", "density")


def run_bench(opts: BenchOptions, testbed: "Testbed | None" = None,
              say: Callable[[str], None] | None = None) -> Results:
    """Measure the sections of `opts`. `testbed`: an existing testbed to use (it needs room
    for the guests); None starts one (`opts.hosts` hosts, local Ray unless in_process) and
    closes it afterwards. A section that fails is recorded in `errors`, the others run."""
    from cluster.launch.launcher import ClusterSpec
    from cluster.testbed import Testbed
    say = say or (lambda text: print(text, file=sys.stderr, flush=True))
    res = Results(opts)
    needs_cluster = any(s in opts.sections for s in _ON_TESTBED)
    own = None
    if testbed is None and needs_cluster:
        # By default the last host has a Ray node of its own: the Ray-object baseline of the
        # throughput section moves objects between two nodes' object stores, as across
        # machines, not within one node's shared memory.
        spec = ClusterSpec(hosts=opts.hosts, host_memory_bytes=opts.host_memory_bytes,
                           superpages=opts.superpages,
                           hosts_per_node=opts.hosts_per_node or max(1, opts.hosts - 1))
        say(f"bench: starting {'an in-process' if opts.in_process else 'a local Ray'} "
            f"cluster of {opts.hosts} hosts")
        own = testbed = Testbed.in_process(spec) if opts.in_process else Testbed.local(spec)
    # The testbed's sections first; then the testbed goes, so the sections that start
    # clusters of their own (startup, scale) do not share the cores with its idle Ray
    # processes and hosts (measured: 8 hosts up in 9.0-10.0 s beside it, 5.9-6.0 s alone).
    on_testbed = [s for s in opts.sections if s in _ON_TESTBED]
    alone = [s for s in opts.sections if s not in _ON_TESTBED]
    try:
        for section in on_testbed:
            _run_section(section, res, say, testbed, opts)
    finally:
        if own is not None:
            own.close()
    for section in alone:
        _run_section(section, res, say, None, opts)
    return res


def _run_section(section: str, res: Results, say: Callable[[str], None],
                 testbed: "Testbed | None", opts: BenchOptions) -> None:
    """One section; a failure is recorded in `res.errors` and the others still run."""
    say(f"bench: {section}")
    try:
        run = _SECTIONS[section]
        if section in _ON_TESTBED:
            run(testbed, opts, res, say)
        else:
            run(opts, res, say)
    except Exception as exc:  # noqa: BLE001 - recorded; the other sections still run
        res.errors[section] = f"{type(exc).__name__}: {exc}"
        say(f"bench: {section} failed: {exc}")
