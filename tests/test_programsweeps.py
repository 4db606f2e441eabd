"""The program sweeps of issue 23 (`scenarios/programs-vs-algorithms.toml`,
`scenarios/kvstore-skew.toml`) run small: the scenarios as shipped, shrunk to a few points of
small guests, end to end through `migbed sweep`; every run completes with its program's
invariants held and its brownout and blackout in the CSV."""

import csv
import tomllib
from pathlib import Path

import pytest
import tomli_w

import cluster.driver
from cluster.cli import main

SCENARIOS = Path(__file__).parent.parent / "scenarios"


def shrunk(tmp_path: Path, name: str, axes: dict) -> Path:
    doc = tomllib.loads((SCENARIOS / f"{name}.toml").read_text())
    doc["guest"].update(memory="4MiB", warmup="300ms")
    doc["cluster"]["host_memory"] = "64MiB"
    doc["migration"]["bandwidth"] = "64MiB"
    doc["axes"] = axes
    doc["plot"]["rounds_point"] = 0
    path = tmp_path / f"{name}.toml"
    path.write_text(tomli_w.dumps(doc))
    return path


@pytest.mark.uffd
@pytest.mark.parametrize("name,axes", [
    ("programs-vs-algorithms", {"pattern": ["kvstore"],
                                "aid": ["auto-converge", "post-copy"]}),
    ("kvstore-skew", {"zipf": [0.5, 1.2]}),
])
def test_the_program_sweeps_run_small(tmp_path, monkeypatch, uffd_kernel, name, axes):
    monkeypatch.setattr(cluster.driver, "AFTER_SECONDS", 0.2)    # the brownout's span, short
    out = tmp_path / "out"
    assert main(["sweep", str(shrunk(tmp_path, name, axes)), "--in-process",
                 "--output", str(out)]) == 0
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert len(rows) == len(next(iter(axes.values()))) * (
        len(list(axes.values())[1]) if len(axes) > 1 else 1)
    for r in rows:
        assert r["status"] == "completed" and r["verified"] == "True", r["error"]
        assert r["app_invariants_ok"] == "True"
        assert float(r["blackout_seconds"]) > 0
        assert float(r["app_ops_per_second_before"]) > 0
        rate = r["measured_dirty_rate_pages_per_second"]    # none: no round after round 0
        assert rate == "" or float(rate) > 0
