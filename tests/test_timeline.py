"""A migration over time: the report's `progress_history` (a sample per round and at least
every 100 ms, with the guest's own write rate), saved reports of other versions loading,
and the timeline figures of `migbed migrate --timeline`, `migbed plot` and sweeps, read
through the figure's artists, not its pixels."""

import io
import json
import time

import numpy as np
import pytest

from cluster.cli import main
from cluster.report import MigrationReport
from cluster.sweep import load_scenario, run_sweep
from cluster.timeline import timeline_figure
from nodes.errors import ConfigError
from nodes.host.specs import GuestSpec
from nodes.migration.progress import SAMPLE_FIELDS, ProgressHistory
from nodes.migration.settings import MigrationSettings
from tests.checks import frames_exact
from workloads.spec import WorkloadSpec

MiB = 1024 * 1024
PNG = b"\x89PNG\r\n\x1a\n"


# -- the sampling rule, on a clock of our own -------------------------------------------------
def test_a_sample_is_due_once_the_period_has_passed():
    h = ProgressHistory(t0=100.0, period=0.05)
    assert h.due(100.0)
    h.add(100.0, "phase", {"bytes_sent_total": 0})
    assert not h.due(100.04) and h.due(100.06)


def test_rates_are_over_the_trailing_window_and_counters_stay_cumulative():
    h = ProgressHistory(t0=0.0, period=0.05)
    for i in range(11):                                   # 1 MiB and 100 writes per 50 ms
        h.add(i * 0.05, None, {"bytes_sent_total": i * MiB, "guest_pages_written_total": i * 100})
    rows = h.to_list()
    assert list(rows[0])[:len(SAMPLE_FIELDS)] == list(SAMPLE_FIELDS)
    assert rows[0]["throughput_bytes_per_second"] is None          # no span yet
    for r in rows[2:]:
        assert r["throughput_bytes_per_second"] == pytest.approx(20 * MiB)
        assert r["guest_page_write_rate_pages_per_second"] == pytest.approx(2000)


def test_a_late_event_goes_in_time_order():
    h = ProgressHistory(t0=0.0)
    for t in (0.0, 0.1, 0.2):
        h.add(t, None, {"bytes_sent_total": 0})
    h.add(0.15, "resume", {"bytes_sent_total": 0})
    rows = h.to_list()
    assert [r["t_seconds"] for r in rows] == sorted(r["t_seconds"] for r in rows)
    assert rows[2]["event"] == "resume"


def test_the_history_stays_bounded_and_keeps_every_event():
    h = ProgressHistory(t0=0.0, period=0.01, max_samples=100)
    for i in range(1000):
        h.add(i * 0.01, "round-end" if i % 100 == 0 else None, {"bytes_sent_total": i})
    assert len(h) <= 100 and h.period > 0.01
    assert sum(1 for r in h.to_list() if r["event"] == "round-end") == 10


def test_a_long_link_wait_is_sampled_as_it_goes(monkeypatch):
    """The link's pacing wait (a slow link's 4 MiB send) calls for a sample every period,
    each told how much of the wait is left (the bytes still on the wire)."""
    import nodes.migration.progress as progress
    clock = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    h = ProgressHistory(t0=0.0, period=0.05)
    seen = []

    def sample(left):
        seen.append((clock[0], left))
        h.add(clock[0], None, {})

    def sleep(s):
        clock[0] += max(s, 1e-6)
    h.wait(0.5, sample, sleep=sleep)
    times, left = zip(*seen, strict=True)
    assert left[0] == pytest.approx(0.5) and left[-1] <= 0.05 + 1e-3
    assert max(np.diff(times)) <= 0.05 + 1e-3 and len(seen) >= 10
    assert list(left) == sorted(left, reverse=True)


# -- the history of real migrations ----------------------------------------------------------
def _migrate(tb, guest, dest, **settings):
    return tb.migrate(guest, dest, MigrationSettings(**settings))


def test_every_report_carries_its_history(in_process):
    """Slow link: each 1024-page record takes ~0.5 s on the wire, yet samples keep coming
    (the link's waits are sampled); every round ends in a sample; the pause and resume are
    there, the resume a downtime after the pause; the counters end where the report does."""
    tb = in_process(hosts=2, host_memory_bytes=64 * MiB)
    tb.create("host-0", GuestSpec("h1", 8 * MiB, workload=WorkloadSpec("hotset", 5000, seed=3)))
    time.sleep(0.1)
    r = _migrate(tb, "h1", "host-1", link_bytes_per_second=8 * MiB)
    assert r.status == "completed" and r.integrity.verified
    h = r.progress_history
    t = np.array([s["t_seconds"] for s in h])
    assert (np.diff(t) >= 0).all()
    precopy = [s for s in h if s["phase"] == "precopy"]
    gaps = np.diff([s["t_seconds"] for s in precopy])
    assert gaps.max() < 0.35, "a slow link's long sends are sampled inside"
    assert sum(1 for s in h if s["event"] == "round-end") == len(r.rounds)
    phases = [s["phase"] for s in h if s["event"] == "phase"]
    assert phases == ["setup", "precopy", "stop-and-copy", "handover", "verify", "cleanup"]
    (pause,) = [s["t_seconds"] for s in h if s["event"] == "pause"]
    (resume,) = [s["t_seconds"] for s in h if s["event"] == "resume"]
    assert resume - pause == pytest.approx(r.downtime_seconds, abs=1e-6)
    assert h[-1]["event"] == "end" and h[-1]["phase"] == "completed"
    assert h[-1]["bytes_sent_total"] == r.bytes_sent_total
    assert h[-1]["pages_sent_total"] == r.pages_sent_total
    sent = [s["bytes_sent_total"] for s in h]
    assert sent == sorted(sent)
    assert h[0]["remaining_bytes"] == r.guest_memory_bytes
    # Throughput never exceeds the link by more than a batch's rounding (the bytes of a
    # send count as they cross the emulated wire, not when handed to it).
    rates = [s["throughput_bytes_per_second"] for s in precopy
             if s["throughput_bytes_per_second"] is not None]
    assert rates and max(rates) < 1.25 * 8 * MiB
    # The guest's own writes: seen while it ran here, none while paused, unseen once gone.
    running = [s["guest_page_write_rate_pages_per_second"] for s in precopy
               if s["guest_page_write_rate_pages_per_second"] is not None]
    assert running and max(running) > 0
    at_pause = next(s for s in h if s["event"] == "pause")["guest_pages_written_total"]
    paused = [s["guest_pages_written_total"] for s in h
              if pause <= s["t_seconds"] < resume and s["event"] != "resume"]
    assert paused and set(paused) == {at_pause}
    assert all(s["guest_pages_written_total"] is None for s in h if s["t_seconds"] >= resume)
    frames_exact(tb)


def test_a_cancelled_migration_has_its_history_too(in_process):
    tb = in_process(hosts=2, host_memory_bytes=64 * MiB)
    tb.create("host-0", GuestSpec("h2", 4 * MiB, workload=WorkloadSpec("uniform", 2000)))
    r = _migrate(tb, "h2", "host-1", link_bytes_per_second=16 * MiB, cancel_after_round=0)
    assert r.status == "cancelled"
    h = r.progress_history
    assert h[-1]["phase"] == "cancelled" and not [s for s in h if s["event"] == "pause"]
    assert h[-1]["guest_pages_written_total"] is not None   # it still runs here
    frames_exact(tb)


# -- saved reports of other versions -------------------------------------------------------------
def _report_dict(in_process) -> dict:
    tb = in_process(hosts=2, host_memory_bytes=64 * MiB)
    tb.create("host-0", GuestSpec("s1", 4 * MiB, workload=WorkloadSpec("uniform", 3000)))
    return _migrate(tb, "s1", "host-1", link_bytes_per_second=32 * MiB).to_dict()


def test_reports_round_trip_and_keep_what_a_newer_version_added(in_process, tmp_path):
    d = _report_dict(in_process)
    assert MigrationReport.from_dict(d).to_dict() == d
    newer = {**d, "future_block": {"faults": 3}, "future_count": 12,
             "integrity": {**d["integrity"], "algorithm": "sha256"}}
    r = MigrationReport.from_dict(newer)
    assert r.extra["future_block"] == {"faults": 3} and r.extra["future_count"] == 12
    assert r.to_dict() == newer, "unknown keys are written back as they were"
    path = tmp_path / "newer.json"
    path.write_text(json.dumps(newer))
    assert MigrationReport.load(path).extra["future_count"] == 12


def test_an_older_report_loads_and_plots_from_its_rounds(in_process, tmp_path):
    d = _report_dict(in_process)
    older = {k: v for k, v in d.items()
             if k not in ("progress_history", "dirty_sync_count", "stop_code", "faults")}
    r = MigrationReport.from_dict(older)
    assert r.progress_history == [] and r.stop_code is None
    fig = timeline_figure([r])
    gids = [ln.get_gid() for ln in fig.axes[1].get_lines()]
    assert gids.count("round") == len(d["rounds"]) and "pause" in gids
    path = tmp_path / "older.json"
    path.write_text(json.dumps(older))
    out = tmp_path / "older.png"
    assert main(["plot", str(path), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG


def test_what_is_no_report_is_refused_in_one_line(tmp_path):
    for text, message in (("[1, 2]", "JSON object"), ('{"guest": "x"}', "no 'migration_id'"),
                          ("{nope", "not JSON")):
        path = tmp_path / "bad.json"
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            MigrationReport.load(path)


# -- the figure ---------------------------------------------------------------------------------
def test_the_timeline_figure_has_its_axes_series_and_markers(in_process):
    tb = in_process(hosts=2, host_memory_bytes=64 * MiB)
    tb.create("host-0", GuestSpec("f1", 8 * MiB, workload=WorkloadSpec("hotset", 20000)))
    time.sleep(0.1)
    xen = _migrate(tb, "f1", "host-1", link_bytes_per_second=64 * MiB)
    qemu = _migrate(tb, "f1", "host-0", policy="qemu", link_bytes_per_second=64 * MiB)
    fig = timeline_figure([xen, qemu], ["xen", "qemu"])
    rate, throughput, remaining = fig.axes[:3]
    assert rate.get_ylabel() == "guest page writes/s"
    assert throughput.get_ylabel() == "throughput (MiB/s)"
    assert remaining.get_ylabel() == "remaining (MiB)"
    assert remaining.get_xlabel() == "seconds since the migration started"
    for ax, series in ((rate, "guest-rate"), (throughput, "throughput"),
                       (remaining, "remaining")):
        lines = [ln for ln in ax.get_lines() if ln.get_gid() == series]
        assert len(lines) == 2, series                       # one per report
        colours = {ln.get_color() for ln in lines}
        assert len(colours) == 2
        for ln, report in zip(lines, (xen, qemu), strict=True):
            assert len(ln.get_xdata()) == len(report.progress_history)
        gids = [ln.get_gid() for ln in ax.get_lines()]
        assert gids.count("round") == len(xen.rounds) + len(qemu.rounds)
        assert gids.count("pause") == 2 and gids.count("resume") == 2
        spans = [p for p in ax.patches if p.get_gid() == "downtime"]
        assert len(spans) == 2
    limits = [ln for ln in throughput.get_lines() if ln.get_gid() == "link"]
    assert [ln.get_ydata()[0] for ln in limits] == [64.0, 64.0]
    legend = [t.get_text() for t in rate.get_legend().get_texts()]
    assert {"xen", "qemu", "round boundary", "pause", "resume", "downtime"} <= set(legend)


def test_an_event_or_phase_of_a_later_algorithm_shows_the_same_way(in_process):
    r = MigrationReport.from_dict(_report_dict(in_process))
    h = [dict(s) for s in r.progress_history]
    h.insert(len(h) // 2, {**h[len(h) // 2], "event": "postcopy"})
    for s in h[len(h) // 2:len(h) // 2 + 3]:
        s["phase"] = "postcopy"
    r.progress_history = h
    ax = timeline_figure([r]).axes[0]
    assert "event:postcopy" in [ln.get_gid() for ln in ax.get_lines()]
    assert "phase:postcopy" in [p.get_gid() for p in ax.patches]


# -- the commands --------------------------------------------------------------------------------
def test_migrate_draws_its_timeline_and_plot_draws_saved_reports(ray_home, unique_name,
                                                                 tmp_path, capsys):
    tb = ray_home
    guest = unique_name("tl")
    tb.create("host-0", GuestSpec(guest, 8 * MiB, workload=WorkloadSpec("uniform", 3000)))
    png, saved = tmp_path / "one.png", tmp_path / "one.json"
    try:
        assert main(["migrate", guest, "host-1", "--bandwidth", "64MiB", "--timeline",
                     str(png), "--output", str(saved)]) == 0
    finally:
        tb.destroy(guest)
    assert png.read_bytes()[:8] == PNG
    report = MigrationReport.load(saved)
    assert report.status == "completed" and report.progress_history
    capsys.readouterr()
    out = tmp_path / "both.svg"
    assert main(["plot", str(saved), str(saved), "--label", "a", "--label", "b",
                 "-o", str(out)]) == 0
    assert out.read_text().lstrip().startswith("<?xml")
    assert main(["compare", str(saved), str(saved)]) == 0
    table = capsys.readouterr().out
    assert table.count("one.json") == 2 and "completed" in table


@pytest.mark.parametrize("argv,message", [
    (["plot", "nope.json", "-o", "x.png"], "cannot read nope.json"),
    (["plot", "r.json", "-o", "x.jpg"], "ending in .png"),
    (["plot", "r.json", "-o", "/no/such/folder/x.png"], "is not a folder"),
    (["plot", "r.json", "-o", "x.png", "--label", "a", "--label", "b"], "1 report"),
    (["compare", "bad.json"], "not JSON"),
    (["migrate", "--timeline", "t.gif"], "ending in .png"),
])
def test_bad_plot_input_is_one_line(argv, message, tmp_path, monkeypatch, capsys,
                                    in_process):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.json").write_text("{")
    (tmp_path / "r.json").write_text(json.dumps(_report_dict(in_process)))
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("migbed: error:") and message in err[0], err


@pytest.mark.inprocess
def test_a_sweep_over_policies_draws_their_timelines_side_by_side(tmp_path):
    path = tmp_path / "policies.toml"
    path.write_text("""
name = "policies"
[cluster]
hosts = 2
host_memory = "64MiB"
[guest]
memory = "4MiB"
warmup = "50ms"
[workload]
pattern = "uniform"
dirty_rate = 3000
[migration]
bandwidth = "64MiB"
[axes]
policy = ["xen", "qemu"]
latency = ["0ms", "1ms"]
""")
    scenario = load_scenario(path)
    result = run_sweep(scenario, tmp_path / "out", in_process=True, progress_out=io.StringIO())
    assert result.failed_runs == 0
    png = tmp_path / "out" / "compare-policy.png"
    assert png.read_bytes()[:8] == PNG
    assert not (tmp_path / "out" / "compare-latency.png").exists(), "a quantity: no comparison"


def test_a_fault_is_an_event_and_a_stall_is_sampled_while_it_lasts(in_process):
    """A stalled link sends nothing: the samples go on, with a throughput of nothing."""
    tb = in_process(hosts=2, host_memory_bytes=64 * MiB)
    # Memory with content: a fresh guest's zero pages would make round 0 too short for a
    # round 1.
    tb.create("host-0", GuestSpec("st", 4 * MiB,
                                  workload=WorkloadSpec("uniform", 3000, fill="random")))
    r = _migrate(tb, "st", "host-1", link_bytes_per_second=32 * MiB,
                 faults=("stall-link@round1:400ms",))
    assert r.status == "completed"
    h = r.progress_history
    (fired,) = [s for s in h if (s["event"] or "").startswith("fault ")]
    assert fired["event"] == "fault stall-link@round1:0.4s" and fired["round"] == 1
    during = [s for s in h if fired["t_seconds"] < s["t_seconds"] <= fired["t_seconds"] + 0.4]
    assert len(during) >= 3 and np.diff([s["t_seconds"] for s in during]).max() < 0.35
    assert min(s["throughput_bytes_per_second"] for s in during) == 0
    line = [ln for ln in timeline_figure([r]).axes[0].get_lines()
            if ln.get_gid() == "event:fault stall-link@round1:0.4s"]
    assert len(line) == 1
