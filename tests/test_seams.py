"""The typed values where components meet keep the plain shapes they replaced: an `Outcome`
is its old string (in JSON, metric labels and comparisons), and a report read from JSON
writes back the same JSON."""

import json
import time

from cluster.report import MigrationReport
from cluster.reportparts import (
    ConvergenceBlock,
    ModelBlock,
    MultifdBlock,
    PostcopyBlock,
    XbzrleBlock,
)
from nodes.host.specs import GuestSpec
from nodes.migration.settings import MigrationSettings
from nodes.phase import ENDED, Outcome, PausedEnd
from workloads.spec import WorkloadSpec

MiB = 1 << 20


def test_outcome_values_are_the_strings_they_replaced():
    assert {o.name: o.value for o in Outcome} == {
        "COMPLETED": "completed", "FAILED": "failed", "CANCELLED": "cancelled",
        "PAUSED": "postcopy-paused", "UNKNOWN": "unknown", "WAITING": "waiting",
        "RECEIVING": "receiving", "READY": "ready"}
    assert {p.value for p in PausedEnd} == {"completed", "resume", "lost"}
    assert ENDED == ("completed", "failed", "cancelled")


def test_an_outcome_is_its_string_in_json_comparisons_and_text():
    assert Outcome.COMPLETED == "completed" and "failed" == Outcome.FAILED
    assert json.dumps({"status": Outcome.PAUSED}) == '{"status": "postcopy-paused"}'
    assert f"{Outcome.CANCELLED}" == "cancelled" and str(Outcome.READY) == "ready"
    assert {"completed": 1}[Outcome.COMPLETED] == 1     # a dict keyed by the old strings
    assert Outcome("unknown") is Outcome.UNKNOWN


# -- the report, composed of typed parts --------------------------------------------------------
def _migrate(tb, name: str, dst: str, **settings):
    tb.create("host-0" if dst == "host-1" else "host-1", GuestSpec(
        name, 4 * MiB, workload=WorkloadSpec("hotset", 20000, seed=3, hot_fraction=0.1)))
    time.sleep(0.05)
    return tb.migrate(name, dst, MigrationSettings(timeout_seconds=5.0, **settings))


def _round_trips(report: MigrationReport) -> None:
    text = report.to_json()
    again = MigrationReport.from_dict(json.loads(text))
    assert again.to_json() == text, "JSON -> Report -> JSON is the same text, key order included"
    assert again == report or again.to_dict() == report.to_dict()


def test_a_real_report_round_trips_through_its_typed_parts(in_process):
    tb = in_process(hosts=2, host_memory_bytes=64 * MiB)
    r = _migrate(tb, "p", "host-1", postcopy_after_rounds=1, auto_converge=True,
                 xbzrle_cache_bytes=4 * MiB, link_bytes_per_second=16 * MiB)
    assert r.status == Outcome.COMPLETED, r.table()
    assert isinstance(r.postcopy, PostcopyBlock) and isinstance(r.xbzrle, XbzrleBlock)
    assert isinstance(r.convergence, ConvergenceBlock) and isinstance(r.model, ModelBlock)
    _round_trips(r)
    m = _migrate(tb, "m", "host-0", multifd_channels=2, multifd_compression="zlib",
                 link_bytes_per_second=32 * MiB)
    assert isinstance(m.multifd, MultifdBlock) and m.multifd.channels == 2
    _round_trips(m)


def test_a_block_reads_as_the_json_object_it_is_written_as():
    d = {"switched_at_seconds": 0.5, "faults": 3, "future_key": [1]}
    b = PostcopyBlock.from_dict(d)
    assert b.faults == b["faults"] == b.get("faults") == 3 and "faults" in b
    assert b["future_key"] == [1] and b.get("nowhere", 7) == 7 and "nowhere" not in b
    out = b.to_dict()
    assert out["future_key"] == [1] and out["recoveries"] == 0     # older: defaults
    assert list(out)[:2] == ["switched_at_seconds", "downtime_qemu_seconds"]
    assert PostcopyBlock.from_dict(None) is None
