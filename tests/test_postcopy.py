"""Post-copy and hybrid migration end to end between in-process hosts (real TCP, real vCPU
threads): the switch, the destination running the guest with pages missing, requests and
the push, and the promises every migration keeps: memory verified, no write lost or
duplicated, the guest where it should be, no frame leaked.
"""

import json
import threading
import time
from dataclasses import replace

import pytest
from checks import frames_exact, wait_progress

from cluster.demo import sequential_edge_ok
from nodes.errors import ConfigError, MigrationError
from nodes.host.specs import GuestSpec
from nodes.migration.settings import MigrationSettings
from workloads.spec import PATTERNS, WorkloadSpec

MiB = 1024 * 1024
LINK = 64 * MiB


@pytest.fixture
def pair(in_process):
    return in_process(hosts=2, host_memory_bytes=64 * MiB)


def workload(pattern: str, rate: float = 20000) -> WorkloadSpec:
    return WorkloadSpec(pattern, 0 if pattern == "idle" else rate, seed=3, hot_fraction=0.1,
                        busy_seconds=0.05, quiet_seconds=0.05)


def postcopy(after: int | None = 0, **kw) -> MigrationSettings:
    kw.setdefault("link_bytes_per_second", LINK)
    kw.setdefault("timeout_seconds", 5.0)
    return MigrationSettings(postcopy_after_rounds=after, **kw)


def counters_hold(host, guest: str, pattern: str) -> None:
    """The counter check: every write the vCPU made is in memory, once (a scan: none)."""
    host.call("pause_guest", guest)
    try:
        counters = host.call("guest_counters", guest)
        status = host.call("guest_status", guest)
    finally:
        host.call("unpause_guest", guest)
    assert int(counters.sum()) == status["pages_written_total"], "a write lost or repeated"
    if pattern == "sequential":
        assert sequential_edge_ok(counters)
    if pattern == "scan":
        assert int(counters.sum()) == 0 and status["progress_pages_total"] > 0


def switched_promises(r, tb, pattern: str) -> None:
    assert r.status == "completed", (r.error, r.notes)
    assert r.stop_code == "postcopy" and r.integrity.verified is True
    assert r.modes == {"before": "p2m", "during": "vp", "postcopy": "vp", "after": "p2m"}
    assert r.precopy_bytes + r.downtime_bytes + r.postcopy_bytes == r.bytes_sent_total
    assert r.postcopy_bytes > 0 and r.downtime_seconds is not None
    b = r.postcopy
    assert b["pages_applied"] == b["discard_pages"], "every missing page landed"
    assert b["pages_applied_more_than_once"] == 0 and b["duplicates_dropped"] == 0
    assert b["pages_requested"] + b["pages_pushed"] == b["discard_pages"], "each page once"
    assert r.postcopy_requests == b["pages_requested"] + b["requests_already_sent"]
    assert r.rounds[-1]["final"] and r.rounds[-1]["postcopy"]
    assert r.rounds[-1]["pages_sent"] == b["discard_pages"]
    assert sum(b["fault_latency_seconds"].values()) <= r.postcopy_requests
    dst = tb.host("host-1")
    status = dst.call("guest_status", "g")
    assert status["mode"] == "p2m" and status["state"] == "running" and not status["migrating"]
    assert dst.call("page_table_problem", "g") is None
    if pattern != "idle":
        wait_progress(dst, "g")
        counters_hold(dst, "g", pattern)
    frames_exact(tb)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_pure_postcopy_of_every_workload(pair, pattern):
    """Only the vCPU state moves before the guest runs on the destination; every page
    arrives after, once, by request or by the push."""
    tb = pair
    # A scan writes nothing, so its pages would stay zero and the push (zero pages cost it
    # no bandwidth) would land them all before the guest reads one: give it content.
    spec = workload(pattern)
    if pattern == "scan":
        spec = replace(spec, fill="random")
    tb.create("host-0", GuestSpec("g", 4 * MiB, workload=spec))
    time.sleep(0.05)
    r = tb.migrate("g", "host-1", postcopy(0, postcopy_bandwidth_bytes_per_second=16 * MiB))
    switched_promises(r, tb, pattern)
    assert r.live_rounds == 0 and r.postcopy["discard_pages"] == 1024
    assert r.precopy_bytes < 64 * 1024, "no page moved before the switch"
    if pattern in ("uniform", "hotset", "sequential", "scan"):
        assert r.postcopy_requests > 0 and r.postcopy["faults"] > 0


@pytest.mark.parametrize("policy", ["xen-legacy", "qemu"])
@pytest.mark.parametrize("rounds", [0, 1, 5])
def test_hybrid_after_n_rounds(pair, rounds, policy):
    """guestperf's post_copy_iters: exactly N live rounds, then the switch (a policy that
    decides mid-pass ends its chunk at the N-th pass's end); a guest that outruns the link,
    so pre-copy alone would not converge first. Its writes all go to a quarter of its pages,
    so five rounds send at most 1024 + 4 x 256 pages, under xen-legacy's 3x max factor
    however fast the guest writes (a uniform guest could reach it by round 4)."""
    tb = pair
    tb.create("host-0", GuestSpec("g", 4 * MiB, workload=WorkloadSpec(
        "hotset", 0, seed=2, hot_fraction=0.25, hot_share=1.0, fill="random")))
    time.sleep(0.05)
    r = tb.migrate("g", "host-1", postcopy(rounds, link_bytes_per_second=16 * MiB,
                                           policy=policy, downtime_limit_seconds=0.01))
    switched_promises(r, tb, "hotset")
    assert r.live_rounds == rounds
    assert f"after {rounds} live round" in r.stop_reason or (rounds == 0 and "pure" in
                                                              r.stop_reason)
    if rounds:
        assert r.postcopy["switched_at_seconds"] > 0
        assert r.postcopy["discard_pages"] <= 1024


def test_xbzrle_in_the_live_rounds_never_after_the_switch(pair):
    """As QEMU's: deltas while the guest runs on its source; after the switch every page goes
    whole (the destination refuses a delta then, so a completed migration proves it)."""
    tb = pair
    tb.create("host-0", GuestSpec("g", 4 * MiB, workload=workload("hotset")))
    time.sleep(0.05)
    r = tb.migrate("g", "host-1", postcopy(3, xbzrle_cache_bytes=4 * MiB,
                                           link_bytes_per_second=16 * MiB))
    switched_promises(r, tb, "hotset")
    assert r.live_rounds == 3 and r.xbzrle["pages"] > 0, r.xbzrle
    last = r.rounds[-1]
    assert last["normal_pages"] + last["zero_pages"] == last["pages_sent"]


def test_write_heavy_and_read_only_workloads(pair):
    """A guest writing as fast as it can and one only reading (`scan`), both by hybrid."""
    tb = pair
    for pattern in ("uniform", "scan"):
        tb.create("host-0", GuestSpec("g", 4 * MiB,
                                      workload=WorkloadSpec(pattern, 0, fill="random")))
        time.sleep(0.05)
        r = tb.migrate("g", "host-1", postcopy(0, postcopy_bandwidth_bytes_per_second=8 * MiB))
        switched_promises(r, tb, pattern)
        rates = r.postcopy["guest_pages_per_second"]
        # Each window measured; what the guest wrote in each depends on how the kernel ran
        # its vCPU then, so only the whole is held nonzero.
        assert None not in (rates["before"], rates["during"], rates["after"])
        assert rates["before"] + rates["during"] + rates["after"] > 0
        tb.destroy("g")


def test_a_switch_after_a_time(pair):
    tb = pair
    tb.create("host-0", GuestSpec("g", 8 * MiB, workload=WorkloadSpec("uniform", 0, seed=4)))
    time.sleep(0.05)
    r = tb.migrate("g", "host-1", MigrationSettings(
        link_bytes_per_second=16 * MiB, postcopy_after_seconds=0.2, timeout_seconds=5))
    assert r.status == "completed" and r.integrity.verified and r.stop_code == "postcopy"
    assert "0.2 s after the start" in r.stop_reason
    assert r.postcopy["switched_at_seconds"] >= 0.2     # not before it was asked for


def test_the_operator_asks_for_the_switch(pair):
    """QEMU's migrate-start-postcopy on a running migration that allows post-copy."""
    tb = pair
    tb.create("host-0", GuestSpec("g", 8 * MiB, workload=WorkloadSpec("uniform", 0, seed=5)))
    time.sleep(0.05)
    out: dict = {}
    settings = MigrationSettings(policy="xen-legacy", link_bytes_per_second=16 * MiB,
                                 postcopy_allowed=True, timeout_seconds=5)
    mover = threading.Thread(target=lambda: out.update(r=tb.migrate("g", "host-1", settings)))
    mover.start()
    src = tb.host("host-0")
    deadline = time.monotonic() + 10
    while not src.call("migration_of", "g"):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert "asked" in tb.start_postcopy("g")
    mover.join(30)
    r = out["r"]
    assert r.status == "completed" and r.integrity.verified
    assert r.stop_code == "postcopy" and "operator" in r.stop_reason
    counters_hold(tb.host("host-1"), "g", "uniform")


def test_the_switch_is_refused_without_postcopy_allowed(pair):
    tb = pair
    tb.create("host-0", GuestSpec("g", 8 * MiB, workload=WorkloadSpec("uniform", 0, seed=6)))
    out: dict = {}
    mover = threading.Thread(target=lambda: out.update(r=tb.migrate("g", "host-1",
        MigrationSettings(link_bytes_per_second=16 * MiB))))
    mover.start()
    src = tb.host("host-0")
    deadline = time.monotonic() + 10
    while not src.call("migration_of", "g"):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.raises(MigrationError, match="--postcopy-allowed"):
        tb.start_postcopy("g")
    mover.join(30)
    assert out["r"].status == "completed" and out["r"].postcopy is None
    with pytest.raises(MigrationError, match="no migration of g is running"):
        tb.start_postcopy("g")


def test_precopy_that_converges_first_completes_as_precopy(pair):
    """Post-copy allowed, the switch asked for after 3 rounds, but the policy stops on its
    own target before: as QEMU, it completes in pre-copy."""
    tb = pair
    tb.create("host-0", GuestSpec("g", 4 * MiB))
    r = tb.migrate("g", "host-1", postcopy(3))
    assert r.status == "completed" and r.stop_code == "dirty-threshold" and r.postcopy is None
    assert "postcopy" not in r.modes and r.postcopy_bytes == 0
    assert r.precopy_bytes + r.downtime_bytes == r.bytes_sent_total


def test_the_push_keeps_to_its_bandwidth(pair):
    """--postcopy-bandwidth limits the background push only: its pages cannot have gone
    faster than the limit (the pacer's bound, no timing luck), requested ones may."""
    tb = pair
    tb.create("host-0", GuestSpec("g", 4 * MiB, workload=WorkloadSpec("idle", fill="random")))
    limit = 8 * MiB
    r = tb.migrate("g", "host-1", postcopy(0, postcopy_bandwidth_bytes_per_second=limit))
    assert r.status == "completed" and r.integrity.verified
    pushed_bytes = r.postcopy["pages_pushed"] * 4096
    one_record = 64 * 4104
    assert r.phase_seconds["postcopy"] >= (pushed_bytes - one_record) / limit


def test_a_faulting_batch_asks_for_all_its_missing_pages_at_once(pair):
    """Each fault is one wait and one request record for every missing page of the vCPU's
    batch; each page counts as one request."""
    tb = pair
    tb.create("host-0", GuestSpec("g", 4 * MiB, workload=WorkloadSpec("uniform", 40000)))
    time.sleep(0.05)
    r = tb.migrate("g", "host-1", postcopy(0, postcopy_bandwidth_bytes_per_second=4 * MiB))
    b = r.postcopy
    assert r.status == "completed" and b["faults"] > 0
    assert b["faults"] < r.postcopy_requests, "batches of several pages, one fault each"
    assert sum(b["fault_latency_seconds"].values()) == b["pages_requested"] or \
        b["requests_already_sent"] > 0


def test_report_round_trips_and_prints_postcopy(pair):
    from cluster.report import MigrationReport
    tb = pair
    tb.create("host-0", GuestSpec("g", 4 * MiB, workload=WorkloadSpec("hotset", 10000,
                                                                      fill="random")))
    r = tb.migrate("g", "host-1", postcopy(1))
    assert MigrationReport.from_dict(json.loads(r.to_json())).to_dict() == r.to_dict()
    text = r.table()
    assert "post-copy: switched at" in text and "vp (post-copy, on the destination)" in text
    assert r.model["prediction"]["postcopy"]["expected_faults"] >= 0
    assert r.model["comparison"]["faults_ratio"] is not None or r.postcopy_requests == 0


@pytest.mark.parametrize("kw,message", [
    ({"postcopy_after_rounds": 1, "postcopy_after_seconds": 1.0}, "not both"),
    ({"postcopy_after_rounds": -1}, ">= 0"),
    ({"postcopy_after_seconds": -0.5}, ">= 0"),
    ({"postcopy_bandwidth_bytes_per_second": 1e6}, "--postcopy-allowed"),
    ({"postcopy_allowed": True, "postcopy_bandwidth_bytes_per_second": 0}, "positive"),
    ({"postcopy_allowed": True, "multifd_channels": 2}, "multifd channels and post-copy"),
    ({"on_timeout": "postcopy", "completion_timeout_seconds": 1.0, "multifd_channels": 2},
     "multifd channels and post-copy"),
])
def test_bad_postcopy_settings_are_refused(kw, message):
    with pytest.raises(ConfigError, match=message):
        MigrationSettings(**kw)


def test_postcopy_settings_round_trip_and_imply_allowed():
    s = MigrationSettings(postcopy_after_seconds=1.5, postcopy_bandwidth_bytes_per_second=1e6)
    assert s.postcopy_allowed and s.postcopy_planned
    assert MigrationSettings.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert not MigrationSettings().postcopy_allowed


def test_a_policy_may_decide_to_switch(pair):
    """A policy of its own returns POSTCOPY (as a completion timeout would): the live rounds
    take the switch; a migration that does not allow post-copy fails cleanly instead, its
    guest on its source."""
    from nodes.migration.decide.policy import (
        POLICIES,
        Action,
        Decision,
        StopCode,
        XenPolicy,
        register_policy,
    )

    class GiveUp(XenPolicy):
        name = "give-up"

        def decide(self, stats):
            if stats.iteration >= 2:
                return Decision(Action.POSTCOPY, "pre-copy is not converging", StopCode.POSTCOPY)
            return Decision.go_on()

    register_policy("give-up", GiveUp)
    try:
        tb = pair
        tb.create("host-0", GuestSpec("g", 4 * MiB, workload=WorkloadSpec("uniform", 0)))
        time.sleep(0.05)
        r = tb.migrate("g", "host-1", MigrationSettings(policy="give-up", postcopy_allowed=True,
                                                        link_bytes_per_second=LINK))
        assert r.status == "completed" and r.integrity.verified and r.live_rounds == 2
        assert r.stop_code == "postcopy" and r.stop_reason == "pre-copy is not converging"
        r = tb.migrate("g", "host-0", MigrationSettings(policy="give-up",
                                                        link_bytes_per_second=LINK))
        assert r.status == "failed" and "--postcopy-allowed" in r.error
        assert r.guest_host == "host-1" and tb.where("g") == "host-1"
        counters_hold(tb.host("host-1"), "g", "uniform")
        frames_exact(tb)
    finally:
        POLICIES.pop("give-up", None)
