"""migbed sweep: scenario files (round trip, bad input), a small sweep end to end with its CSV
and plots, and the model block every migration report carries."""

import csv
import json
from pathlib import Path

import pytest

from cluster import model
from cluster.cli import main
from cluster.sweep import Scenario, load_scenario
from nodes.errors import ConfigError
from nodes.host.specs import GuestSpec
from nodes.migration.settings import MigrationSettings
from workloads.spec import WorkloadSpec

MiB = 1024 * 1024
READY = sorted((Path(__file__).parent.parent / "scenarios").glob("*.toml"))
PNG = b"\x89PNG\r\n\x1a\n"

EVERY_KNOB = """
name = "every-knob"
description = "one of each"
repeats = 2
seed = 4

[cluster]
hosts = 3
host_memory = "256MiB"

[guest]
memory = "16MiB"
mode = "vp"
warmup = "150ms"

[workload]
pattern = "phased"
dirty_rate = 3000
busy_seconds = "500ms"
quiet_seconds = 1
quiet_rate_fraction = 0.25

[migration]
policy = "qemu"
bandwidth = "unlimited"
rate_limit = "32MiB"
latency = "1ms"
downtime_limit = "200ms"
max_iterations = 7
timeout = "45s"
verify = false

[axes]
guest_memory = ["8MiB", 16777216]
mode = ["p2m", "vp"]
pattern = ["uniform", "hotset"]
dirty_rate = [1000, "max"]
hot_fraction = [0.05, 0.2]
hot_share = [0.5]
policy = ["xen", "xen-legacy"]
bandwidth = ["64MiB", "unlimited"]
rate_limit = ["unlimited", "16MiB"]
latency = ["0ms", "2ms"]
downtime_limit = ["300ms"]
max_iterations = [3]

[plot]
x = "dirty_rate"
rounds_point = 5
"""


def test_ready_scenarios_load_and_round_trip():
    assert len(READY) >= 3
    for path in READY:
        sc = load_scenario(path)
        assert Scenario.from_toml(sc.to_toml()) == sc, path
        assert Scenario.from_dict(json.loads(json.dumps(sc.to_dict()))) == sc, path
        assert len(sc.points()) == sc.point_count > 1


def test_every_knob_parses_to_base_units_and_round_trips():
    sc = Scenario.from_toml(EVERY_KNOB)
    axes = dict(sc.axes)
    assert axes["guest_memory"] == (8 * MiB, 16 * MiB)
    assert axes["dirty_rate"] == (1000.0, 0.0)            # max: as fast as it can
    assert axes["bandwidth"] == (64.0 * MiB, None)         # unlimited
    assert axes["latency"] == (0.0, 0.002)
    assert sc.migration.rate_limit_bytes_per_second == 32 * MiB
    assert sc.migration.link_bytes_per_second is None and sc.migration.verify is False
    assert sc.workload.busy_seconds == 0.5 and sc.warmup_seconds == 0.15
    assert sc.point_count == 2 ** 9
    assert Scenario.from_toml(sc.to_toml()) == sc
    assert Scenario.from_dict(json.loads(json.dumps(sc.to_dict()))) == sc
    spec, settings = sc.specs(sc.points()[5], repeat=1)
    assert spec.workload.seed == 5 and settings.max_iterations == 3


BAD = [
    ('name = "x"\nbogus = 1\n', "unknown key 'bogus' in the scenario"),
    ('name = "x"\n[axes]\nwarp = [1]\n', "unknown axis 'warp'"),
    ('name = "x"\n[migration]\nbandwidth = "fast"\n', "[migration] bandwidth: cannot read 'fast'"),
    ('name = "x"\n[migration]\nspeed = 1\n', "unknown key 'speed' in [migration]"),
    ('name = "x"\n[axes]\npolicy = ["xen", "nope"]\n', "point 1 (policy = nope): unknown policy"),
    ('name = "x"\n[axes]\ndirty_rate = []\n', "non-empty list"),
    ('name = "x"\n[axes]\ndirty_rate = 5\n', "non-empty list"),
    ('name = "x"\n[axes]\ndirty_rate = [1]\n[plot]\nx = "bandwidth"\n', "not one of the axes"),
    ('name = "x"\n[guest\n', "not valid TOML"),
    ('description = "no name"\n', "needs a name"),
    ('name = "x"\n[workload]\nseed = 3\n', "unknown key 'seed' in [workload]"),
    ('name = "x"\n[axes]\ndirty_rate = [-5]\n', "dirty rate"),
    ('name = "x"\n[workload]\nhot_fraction = 2.0\n', "hot_fraction"),
    ('name = "x"\nrepeats = 0\n', "repeats must be >= 1"),
    ('name = "../evil"\n', "scenario name"),
    ('name = "x"\n[cluster]\nhosts = 1\n', "at least 2 hosts"),
    ('name = "x"\n[guest]\nmemory = "-4MiB"\n', "[guest] memory"),
    ('name = "x"\n[axes]\nlatency = ["soon"]\n', "[axes] latency"),
    ('name = "x"\n[plot]\nrounds_point = 3\n', "rounds_point"),
]


@pytest.mark.parametrize(("text", "fragment"), BAD)
def test_bad_scenario_is_one_clear_line(tmp_path, text, fragment):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_scenario(path)
    message = str(exc.value)
    assert fragment in message and str(path) in message
    assert "\n" not in message


def test_cli_bad_scenario_exits_2_with_one_line(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text('name = "x"\n[axes]\nbandwidth = ["fast"]\n')
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("migbed: error:") and "fast" in err[0]
    assert main(["sweep", str(tmp_path / "missing.toml")]) == 2
    assert "cannot read scenario" in capsys.readouterr().err


SMALL = """
name = "small"
description = "two dirty rates, and a guest too big for its host"
repeats = 1
seed = 9

[cluster]
hosts = 2
host_memory = "64MiB"

[guest]
warmup = "100ms"

[workload]
pattern = "uniform"

[migration]
bandwidth = "64MiB"

[axes]
guest_memory = ["4MiB", "1GiB"]
dirty_rate = [500, 4000]

[plot]
x = "dirty_rate"
rounds_point = 1
"""


@pytest.mark.inprocess
def test_small_sweep_end_to_end(tmp_path, capsys):
    path = tmp_path / "small.toml"
    path.write_text(SMALL)
    out = tmp_path / "out"
    assert main(["sweep", str(path), "--in-process", "--output", str(out)]) == 1  # failed runs
    captured = capsys.readouterr()
    assert "agreement" in captured.out and "[" in captured.err        # table, progress bar

    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [(r["point"], r["status"]) for r in rows] == [
        ("0", "completed"), ("1", "completed"), ("2", "failed"), ("3", "failed")]
    for r in rows[:2]:
        assert r["verified"] == "True" and float(r["predicted_pages_sent_total"]) > 0
        assert float(r["pages_sent_ratio"]) > 0 and r["model_error"] == ""
    assert all("1.0 GiB" in r["error"] for r in rows[2:]), rows[2]["error"]   # never dropped

    for name in ("downtime.png", "total_time.png", "pages_sent.png", "bytes_sent.png",
                 "rounds.png"):
        assert (out / name).read_bytes()[:8] == PNG, name
    runs = sorted((out / "runs").glob("*.json"))
    assert len(runs) == 4
    doc = json.loads(runs[0].read_text())
    assert doc["scenario"]["name"] == "small" and doc["report"]["status"] == "completed"
    assert doc["model"]["prediction"]["rounds"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed_runs"] == 2 and len(summary["agreement"]) == 4
    assert "runs failed" in (out / "summary.txt").read_text()
    assert Scenario.from_toml((out / "scenario.toml").read_text()) == load_scenario(path)


def test_every_report_has_a_model_block(in_process):
    tb = in_process(hosts=2, host_memory_bytes=64 * MiB)
    tb.create("host-0", GuestSpec("m1", 8 * MiB, workload=WorkloadSpec("uniform", 2000)))
    r = tb.migrate("m1", "host-1", MigrationSettings(link_bytes_per_second=64 * MiB))
    assert r.status == "completed"
    block = r.model
    assert block["error"] is None and block["bandwidth_bytes_per_second"] > 0
    assert block["prediction"]["policy"] == "xen" and block["prediction"]["rounds"]
    assert block["comparison"]["pages_sent_ratio"] > 0
    assert block["nominal"]["prediction"]["bandwidth_bytes_per_second"] == 64 * MiB
    json.dumps(r.to_dict())

    # A workload at 'max' gives the model no rate: the error is stored, the migration is fine.
    tb.create("host-0", GuestSpec("m2", 4 * MiB, workload=WorkloadSpec("uniform", 0)))
    r = tb.migrate("m2", "host-1")
    assert r.status == "completed" and r.integrity.verified
    assert "unlimited rate" in r.model["error"] and r.model["nominal"] is None


def test_a_model_error_never_breaks_a_migration(in_process, monkeypatch):
    def broken(**_):
        raise RuntimeError("model exploded")
    monkeypatch.setattr(model, "predict", broken)
    tb = in_process(hosts=2, host_memory_bytes=64 * MiB)
    tb.create("host-0", GuestSpec("m3", 4 * MiB))
    r = tb.migrate("m3", "host-1", MigrationSettings(link_bytes_per_second=128 * MiB))
    assert r.status == "completed" and r.integrity.verified
    assert r.model["error"] == "RuntimeError: model exploded"


def test_scenario_faults_are_injected_and_round_trip(tmp_path):
    """A `faults` list in a scenario file reaches every run's MigrationSettings."""
    path = tmp_path / "faulty.toml"
    path.write_text('name = "faulty"\nfaults = ["stall-link@round1:50ms"]\n'
                    '[guest]\nmemory = "4MiB"\n[axes]\ndirty_rate = [1000]\n')
    sc = load_scenario(path)
    assert [f.kind for f in sc.migration.faults] == ["stall-link"]
    assert Scenario.from_dict(json.loads(json.dumps(sc.to_dict()))) == sc
    path.write_text('name = "bad"\nfaults = ["melt-cpu@round0"]\n')
    with pytest.raises(ConfigError, match=r"faulty.toml: faults\[0\]: unknown fault"):
        load_scenario(path)


def test_a_rounds_disagreement_is_explained_by_how_pre_copy_stopped():
    """lambda >= 1 explains a disagreement only when pre-copy ended on the policy's cap; a
    hot set smaller than the threshold converges whatever lambda says (the hot-set
    scenario's first point, measured: 2 live rounds against 3 predicted, both on 'fewer
    than 50 dirty pages')."""
    from cluster.sweep.agreement import Stops, _stop_reason
    threshold = Stops(("fewer than 50 dirty pages",), ("dirty-threshold",))
    why = _stop_reason(threshold, threshold, "xen", 2, 3, lam=1.55)
    assert "one round apart" in why and "no convergence" not in why
    capped = Stops(("live round cap (5) reached",), ("max-iterations",))
    assert "no convergence" in _stop_reason(capped, capped, "xen", 5, 5, lam=1.55)
    assert "stopped on" in _stop_reason(threshold, capped, "xen", 3, 5, lam=0.5)


def test_stopping_on_a_cap_is_read_from_the_stop_code_not_the_reason_text():
    """The cap test looks at the machine-readable stop code: a reason that happens to say
    'cap' is no cap, a cap is one whatever its text says, and runs whose reports carry no
    stop code yet count on the model's."""
    from cluster.sweep.agreement import Stops, _stop_reason
    worded_like_a_cap = Stops(("under the cap of 50 dirty pages",), ("dirty-threshold",))
    assert not worded_like_a_cap.on_cap
    assert "no convergence" not in _stop_reason(worded_like_a_cap, worded_like_a_cap, "xen",
                                                2, 3, lam=1.55)
    factor = Stops(("sent more than 3x the guest's memory",), ("max-factor",))
    assert factor.on_cap and Stops(("whatever",), ("max-iterations",)).on_cap
    no_code = Stops(("live round cap (5) reached",))
    assert not no_code.on_cap
    assert "no convergence" in _stop_reason(no_code, factor, "xen-legacy", 5, 5, lam=2.0)


def test_sweep_rows_carry_the_stop_codes(in_process, tmp_path):
    """Every completed run's row holds the model's stop code beside its stop reason (and the
    report's, once reports carry one), the values of nodes.migration.decide.policy.StopCode."""
    from cluster.sweep import run_sweep
    from nodes.migration.decide.policy import StopCode
    sc = Scenario.from_toml('name = "codes"\n[guest]\nmemory = "4MiB"\nwarmup = "50ms"\n'
                            '[workload]\npattern = "uniform"\n[migration]\n'
                            'bandwidth = "64MiB"\n[axes]\ndirty_rate = [500]\n')
    tb = in_process(hosts=2, host_memory_bytes=64 * MiB)
    result = run_sweep(sc, tmp_path / "out", testbed=tb, plots=False)
    (row,) = result.rows
    assert row["status"] == "completed"
    assert row["predicted_stop_code"] in {c.value for c in StopCode}
    assert row["stop_code"] in {None, *(c.value for c in StopCode)}
    assert "predicted_stop_code" in (tmp_path / "out" / "sweep.csv").read_text().splitlines()[0]
