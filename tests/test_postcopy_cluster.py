"""Post-copy as a user reaches it: its metrics scraped from real endpoints, the CLI (options,
`migrate-postcopy`, `migrate-recover`, bad input), sweeps, the analytic model, and the scan
workload on its own."""

import json
import threading
import time
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster.model import predict
from cluster.sweep.scenario import Scenario
from nodes.host.specs import GuestSpec
from nodes.migration.settings import MigrationSettings
from nodes.xen.hypervisor import Hypervisor
from nodes.xen.profiles import Mode
from workloads.patterns import make_workload
from workloads.spec import WorkloadSpec

MiB = 1024 * 1024


def scrape(tb, host: str) -> dict:
    """(name, labels as a sorted tuple) -> value, from the host's real /metrics endpoint."""
    endpoint = tb.metrics_endpoints()[host]
    with urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return sum(v for (n, lab), v in samples.items()
               if n == name and all(dict(lab).get(k) == x for k, x in labels.items()))


# -- metrics ---------------------------------------------------------------------------------
def test_postcopy_metrics_agree_with_the_report(in_process):
    tb = in_process(hosts=2, host_memory_bytes=64 * MiB)
    tb.create("host-0", GuestSpec("m", 8 * MiB, workload=WorkloadSpec("uniform", 20000)))
    time.sleep(0.05)
    r = tb.migrate("m", "host-1", MigrationSettings(
        link_bytes_per_second=64 * MiB, postcopy_after_rounds=1,
        postcopy_bandwidth_bytes_per_second=8 * MiB))
    assert r.status == "completed" and r.postcopy_requests > 0
    src, dst = scrape(tb, "host-0"), scrape(tb, "host-1")
    h0, h1 = {"host": "host-0"}, {"host": "host-1"}
    b = r.postcopy
    assert value(src, "migbed_migration_postcopy_switches_total", **h0) == 1
    assert value(src, "migbed_migration_postcopy_requests_total", **h0) == r.postcopy_requests
    assert value(src, "migbed_migration_postcopy_sent_pages_total", reason="requested") == \
        b["pages_requested"]
    assert value(src, "migbed_migration_postcopy_sent_pages_total", reason="pushed") == \
        b["pages_pushed"]
    for stage in ("precopy", "downtime", "postcopy"):
        assert value(src, "migbed_migration_stage_sent_bytes_total", stage=stage) == \
            getattr(r, f"{stage}_bytes")
    assert value(src, "migbed_migration_postcopy_paused", **h0) == 0
    assert value(dst, "migbed_migration_postcopy_blocktime_seconds_total", **h1) == \
        pytest.approx(b["blocktime_seconds"])
    assert value(dst, "migbed_migration_postcopy_faults_total", **h1) == b["faults"]
    assert value(dst, "migbed_migration_postcopy_fault_latency_seconds_count", **h1) == \
        sum(b["fault_latency_seconds"].values())
    assert value(dst, "migbed_migration_postcopy_fault_latency_seconds_sum", **h1) == \
        pytest.approx(b["fault_latency_mean_seconds"] * sum(b["fault_latency_seconds"].values()))
    le = {lab for (n, lab), _ in dst.items()
          if n == "migbed_migration_postcopy_fault_latency_seconds_bucket"}
    assert len(le) == 25, "log2 buckets from 1 us to 8.4 s, and +Inf"
    assert value(src, "migbed_migration_phase_duration_seconds_count", phase="postcopy") == 1


def test_a_paused_postcopy_shows_as_paused_while_it_waits(in_process):
    tb = in_process(hosts=2, host_memory_bytes=64 * MiB)
    tb.create("host-0", GuestSpec("p", 4 * MiB, workload=WorkloadSpec("uniform", 5000)))
    r = tb.migrate("p", "host-1", MigrationSettings(
        link_bytes_per_second=64 * MiB, timeout_seconds=0.5, postcopy_after_rounds=0,
        postcopy_bandwidth_bytes_per_second=2 * MiB, faults=("cut-link@postcopy",)))
    assert r.status == "postcopy-paused"
    src, dst = scrape(tb, "host-0"), scrape(tb, "host-1")
    assert value(src, "migbed_migration_postcopy_paused", host="host-0") == 1
    assert value(dst, "migbed_migration_postcopy_missing_pages", guest="p") > 0
    assert value(src, "migbed_migrations_in_progress", direction="outgoing") == 1
    assert tb.recover("p").status == "completed"
    assert value(scrape(tb, "host-0"), "migbed_migration_postcopy_paused") == 0


# -- the CLI ---------------------------------------------------------------------------------
@pytest.fixture
def attached(in_process, monkeypatch):
    from cluster.testbed import Testbed
    tb = in_process(hosts=2, host_memory_bytes=64 * MiB)
    monkeypatch.setattr(Testbed, "attach", classmethod(lambda cls: tb))
    return tb


def test_cli_postcopy_then_recover(attached, capsys):
    """`migrate --postcopy`, a cut link: exit 1 with the paused status; `migrate-recover`
    brings it home, exit 0."""
    from cluster import cli
    tb = attached
    tb.create("host-0", GuestSpec("vm1", 4 * MiB, workload=WorkloadSpec("uniform", 5000)))
    rc = cli.main(["migrate", "vm1", "host-1", "--postcopy", "--postcopy-bandwidth", "4MiB",
                   "--fault", "cut-link@postcopy", "--timeout", "500ms", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 1 and report["status"] == "postcopy-paused" and not report["guest_lost"]
    assert cli.main(["migrate-recover", "nope"]) == 2
    assert "no post-copy migration of nope is paused" in capsys.readouterr().err
    rc = cli.main(["migrate-recover", "vm1", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["status"] == "completed" and report["integrity"]["verified"]
    assert report["postcopy"]["recoveries"] == 1 and tb.where("vm1") == "host-1"


def test_cli_migrate_postcopy_switches_a_running_migration(attached, capsys):
    from cluster import cli
    tb = attached
    tb.create("host-0", GuestSpec("vm2", 8 * MiB, workload=WorkloadSpec("uniform", 0)))
    out: dict = {}
    mover = threading.Thread(target=lambda: out.update(rc=cli.main([
        "migrate", "vm2", "host-1", "--postcopy-allowed", "--policy", "xen-legacy",
        "--bandwidth", "16MiB", "--json"])))
    mover.start()
    deadline = time.monotonic() + 10
    while not tb.host("host-0").call("migration_of", "vm2"):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert cli.main(["migrate-postcopy", "vm2"]) == 0
    mover.join(30)
    printed = capsys.readouterr().out
    assert out["rc"] == 0 and "vm2: asked" in printed
    report = json.loads(printed[printed.index("{"):])
    assert report["stop_code"] == "postcopy" and "operator" in report["stop_reason"]


@pytest.mark.parametrize("argv,message", [
    (["migrate", "--postcopy", "--postcopy-after", "1"], "not both"),
    (["migrate", "--postcopy-after", "1.5"], "a duration with its unit"),
    (["migrate", "--postcopy-after", "-2"], "cannot read"),
    (["migrate", "--postcopy-bandwidth", "fast"], "cannot read 'fast'"),
    (["migrate", "--postcopy-bandwidth", "8MiB"], "--postcopy-allowed"),
    (["migrate", "--fault", "delay-restore@postcopy:1s"], "cannot happen at postcopy"),
    (["migrate-postcopy", "vm1"], "no migbed cluster is running"),
    (["migrate-recover", "vm1"], "no migbed cluster is running"),
])
def test_bad_postcopy_input_is_one_line_and_exit_2(argv, message, capsys, tmp_path,
                                                   monkeypatch):
    from cluster import cli
    monkeypatch.setenv("MIGBED_HOME", str(tmp_path))
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("migbed: error: ") and message in err[0], err


def test_cli_options_build_the_settings():
    from cluster.cli import build_parser
    from cluster.cli.options import settings_from
    p = build_parser()
    s = settings_from(p.parse_args(["migrate", "--postcopy-after", "500ms",
                                    "--postcopy-bandwidth", "64MiB"]))
    assert s.postcopy_after_seconds == 0.5 and s.postcopy_after_rounds is None
    assert s.postcopy_allowed and s.postcopy_bandwidth_bytes_per_second == 64 * MiB
    s = settings_from(p.parse_args(["migrate", "--postcopy"]))
    assert s.postcopy_after_rounds == 0
    s = settings_from(p.parse_args(["migrate", "--postcopy-after", "3"]))
    assert s.postcopy_after_rounds == 3
    assert not settings_from(p.parse_args(["migrate"])).postcopy_allowed


def test_cli_model_predicts_postcopy(capsys):
    from cluster import cli
    assert cli.main(["model", "--guest-memory", "16MiB", "--workload", "uniform",
                     "--dirty-rate", "20000", "--bandwidth", "64MiB", "--postcopy-after", "1",
                     "--json"]) == 0
    pred = json.loads(capsys.readouterr().out)
    assert pred["stop_code"] == "postcopy" and pred["live_rounds"] == 1
    assert pred["postcopy"]["expected_faults"] > 0 and pred["rounds"][-1]["postcopy"]


# -- sweeps ----------------------------------------------------------------------------------
@pytest.mark.inprocess
def test_postcopy_knobs_in_scenarios(tmp_path):
    from cluster.sweep import run_sweep
    sc = Scenario.from_toml('''
        name = "pc"
        [cluster]
        hosts = 2
        host_memory = "64MiB"
        [guest]
        memory = "4MiB"
        warmup = "50ms"
        [workload]
        pattern = "uniform"
        dirty_rate = 5000
        [migration]
        bandwidth = "64MiB"
        [axes]
        postcopy_after = ["off", 1, 0]
        [plot]
        x = "postcopy_after"
    ''')
    assert dict(sc.axes)["postcopy_after"] == ("off", 1, 0)
    assert Scenario.from_toml(sc.to_toml()) == sc
    assert [sc.specs(p)[1].postcopy_after_rounds for p in sc.points()] == [None, 1, 0]
    result = run_sweep(sc, tmp_path / "out", in_process=True, plots=True)
    assert (tmp_path / "out" / "faults.png").stat().st_size > 0, "faults beside the model's"
    rows = result.rows
    assert [r["status"] for r in rows] == ["completed"] * 3
    assert [r["switched_to_postcopy"] for r in rows] == [False, True, True]
    assert rows[2]["predicted_expected_faults"] is not None
    with pytest.raises(Exception, match="post-copy bandwidth"):
        Scenario.from_toml('name = "x"\n[axes]\npostcopy_bandwidth = ["1MiB"]\n')


# -- the model -------------------------------------------------------------------------------
def _predict(pattern="uniform", rate=20000.0, **kw):
    kw.setdefault("link_bytes_per_second", 64 * MiB)
    return predict(guest_memory_bytes=16 * MiB, workload=WorkloadSpec(pattern, rate), **kw)


def test_model_pure_postcopy_sends_every_page_once_after_the_switch():
    p = _predict("idle", 0, postcopy_after_rounds=0)
    pc = p.postcopy
    assert p.live_rounds == 0 and p.stop_code == "postcopy"
    assert pc.discard_pages == p.pages_sent_total == 4096 and pc.expected_faults == 0
    assert p.downtime_seconds < 0.001 and p.total_time_seconds == pytest.approx(
        p.downtime_seconds + pc.postcopy_seconds)


def test_model_faults_follow_the_dirty_rate_and_the_push():
    faults = [_predict(rate=r, postcopy_after_rounds=0,
                       postcopy_bandwidth_bytes_per_second=16 * MiB).postcopy.expected_faults
              for r in (1000, 5000, 20000)]
    assert faults[0] < faults[1] < faults[2]
    slow, fast = (_predict(postcopy_after_rounds=0, postcopy_bandwidth_bytes_per_second=b)
                  .postcopy.expected_faults for b in (4 * MiB, 64 * MiB))
    assert slow > fast
    hot = _predict("hotset", postcopy_after_rounds=0).postcopy.expected_faults
    assert hot < _predict(postcopy_after_rounds=0).postcopy.expected_faults, \
        "a hot set is touched in fewer distinct pages"


def test_model_hybrid_keeps_the_downtime_at_the_switch_when_precopy_cannot_converge():
    pre = _predict(rate=40000, link_bytes_per_second=16 * MiB)
    hybrid = _predict(rate=40000, link_bytes_per_second=16 * MiB, postcopy_after_rounds=1)
    assert pre.stop_code == "max-iterations" and hybrid.live_rounds == 1
    assert hybrid.downtime_seconds < pre.downtime_seconds / 10
    assert hybrid.pages_sent_total < pre.pages_sent_total


def test_model_sweeps_fault_a_batch_when_the_push_outruns_them():
    seq = _predict("sequential", 2000, postcopy_after_rounds=0).postcopy.expected_faults
    scan = _predict("scan", 2000, postcopy_after_rounds=0).postcopy.expected_faults
    assert 1 <= seq < 10 and scan == seq
    assert _predict("scan", 2000, postcopy_after_rounds=1).stop_code == "dirty-threshold", \
        "a reader dirties nothing: pre-copy converges, as QEMU would complete"


def test_model_switch_after_a_time_cuts_the_pass():
    p = _predict(link_bytes_per_second=8 * MiB, postcopy_after_seconds=0.3)
    assert p.stop_code == "postcopy" and p.live_rounds == 1
    assert p.postcopy.switched_at_seconds >= 0.3 and p.rounds[0].pages_sent < 4096
    assert p.postcopy.discard_pages > 4096 - p.rounds[0].pages_sent


# -- the scan workload -----------------------------------------------------------------------
def test_scan_reads_in_order_and_writes_nothing():
    hv = Hypervisor("h", 16 * MiB)
    dom = hv.create_domain("g", 1 * MiB, Mode.VP)
    seen = []
    dom.present = np.ones(dom.npages, dtype=bool)
    dom.present[:] = False
    dom.on_missing = lambda pfns: (seen.append(pfns.tolist()), dom.present.__setitem__(pfns, True))
    wl = make_workload(WorkloadSpec("scan", 0), dom.data_pages)
    assert wl.write(dom, 0.0, 100) == 100 and seen == [list(range(100))]
    wl.write(dom, 0.01, 200)
    assert seen[1] == list(range(100, dom.data_pages)), "in order, the present ones skipped"
    assert wl.pages_written_total == 0 and wl.progress_pages == 300
    assert not hv.memory.words[dom.p2m[: dom.data_pages], 0].any()
    again = make_workload(WorkloadSpec("scan", 0), dom.data_pages, state=wl.get_state())
    assert again.progress_pages == 300 and again.position == wl.position


def test_recovering_when_the_destination_is_gone_frees_the_source(in_process):
    """A paused post-copy whose destination dies meanwhile cannot complete: recover says the
    guest is lost and the source frees its stale copy."""
    from checks import frames_exact

    from nodes.errors import MigrationError
    tb = in_process(hosts=2, host_memory_bytes=64 * MiB)
    tb.create("host-0", GuestSpec("x", 4 * MiB, workload=WorkloadSpec("uniform", 5000)))
    r = tb.migrate("x", "host-1", MigrationSettings(
        link_bytes_per_second=64 * MiB, timeout_seconds=0.5, postcopy_after_rounds=0,
        postcopy_bandwidth_bytes_per_second=2 * MiB, faults=("cut-link@postcopy",)))
    assert r.status == "postcopy-paused"
    tb.kill("host-1")
    with pytest.raises(MigrationError, match="the guest is lost"):
        tb.recover("x")
    assert "x--migratedaway" not in tb.host("host-0").call("guest_frames")
    assert tb.host("host-0").call("paused_migrations") == []
    frames_exact(tb)
