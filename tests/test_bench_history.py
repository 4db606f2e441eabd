"""Benchmark history: `migbed bench --save` writes the figures with the machine and the
commit, and `migbed bench --compare OLD.json` prints each figure beside the old one, flagging
a change only when the new median lies outside the old min-max and the old median outside
the new one's; exit 0 unless `--fail-on-change`."""

import json
import subprocess

import pytest

from cluster.bench.compare import FigureChange, compare, load_saved
from cluster.bench.machine import commit, machine
from cluster.cli import main
from nodes.errors import ConfigError


def fig(median: float, lo: float, hi: float, unit: str = "seconds") -> dict:
    return {"unit": unit, "median": median, "min": lo, "max": hi, "samples": [lo, median, hi]}


@pytest.mark.parametrize("old,new,changed", [
    (fig(11, 10, 12), fig(21, 20, 22), True),     # apart: both medians outside the other
    (fig(11, 10, 12), fig(11.5, 11, 13), False),  # new median inside the old range
    (fig(11, 10, 12), fig(13, 10.5, 14), False),  # old median inside the wide new range
    (fig(11, 10, 12), fig(5, 4, 6), True),        # faster counts the same as slower
    (fig(1, 1, 1), fig(1, 1, 1), False),          # one repeat each, equal
])
def test_the_change_rule(old, new, changed):
    f = FigureChange("x", "seconds", old, new)
    assert f.changed is changed
    assert f.ratio == pytest.approx(new["median"] / old["median"])


def test_figures_in_one_run_only_are_listed_not_flagged():
    c = compare({"figures": {"gone": fig(1, 1, 1), "both": fig(1, 1, 1)}},
                {"figures": {"both": fig(9, 9, 9), "new": fig(2, 2, 2)}})
    assert [f.name for f in c.figures] == ["both", "new", "gone"]
    assert [f.changed for f in c.figures] == [True, None, None]
    assert [row[-1] for row in c.rows()] == ["CHANGED", "only new", "only old"]


def test_what_differed_between_the_runs_is_said():
    old = {"bench": {"commit": "a" * 40, "dirty": False, "options": {"repeats": 5},
                     "machine": {"cpus": 2, "kernel": "6.1"}}, "figures": {}}
    new = {"bench": {"commit": "b" * 40, "dirty": False, "options": {"repeats": (1,)[0]},
                     "machine": {"cpus": 2, "kernel": "6.8"}}, "figures": {}}
    assert compare(old, new).differences == [
        "commit aaaaaaaaaaaa -> bbbbbbbbbbbb", "machine kernel: 6.1 -> 6.8",
        "option repeats: 5 -> 1"]
    assert compare(old, old).differences == []


def test_the_machine_and_the_commit_are_described():
    m = machine()
    for key in ("cpus", "memory_bytes", "kernel", "socket_buffers", "python", "ray", "numpy"):
        assert m[key] is not None, key
    assert m["memory_bytes"] > 0 and set(m["socket_buffers"]) == {
        "wmem_max_bytes", "rmem_max_bytes", "tcp_wmem_bytes", "tcp_rmem_bytes"}
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert commit()["commit"] == head.stdout.strip()


QUICK = ["bench", "--quick", "--in-process", "--only", "stages"]


def test_compare_table_on_two_saved_runs(tmp_path, capsys):
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    assert main([*QUICK, "--save", str(first)]) == 0
    saved = load_saved(first)
    assert saved["bench"]["machine"]["socket_buffers"] and "commit" in saved["bench"]
    capsys.readouterr()
    assert main([*QUICK, "--compare", str(first), "--output", str(second)]) == 0
    out = capsys.readouterr().out
    table = out[out.index("against the saved run"):].splitlines()
    doc = json.loads(second.read_text())
    assert [f["name"] for f in doc["comparison"]["figures"]] == list(saved["figures"])
    for f in doc["comparison"]["figures"]:
        assert f["old"] == saved["figures"][f["name"]] and f["new"] == doc["figures"][f["name"]]
        assert f["ratio"] == pytest.approx(f["new"]["median"] / f["old"]["median"])
        assert f["changed"] == FigureChange(f["name"], f["unit"], f["old"], f["new"]).changed
        line = next(ln for ln in table if ln.startswith(f["name"] + " "))
        assert f"{f['ratio']:.3f}" in line and ("CHANGED" in line) == f["changed"], line
    assert any(ln.endswith(" changed (new median outside the old run's min-max and old "
                           "median outside the new's)") for ln in table)

    # A saved run whose figures are a thousand times the new ones: every figure changed;
    # that is exit 0, unless --fail-on-change.
    far = dict(saved, figures={k: {**f, "median": f["median"] * 1000, "min": f["min"] * 1000,
                                   "max": f["max"] * 1000}
                               for k, f in saved["figures"].items()})
    old = tmp_path / "far.json"
    old.write_text(json.dumps(far))
    capsys.readouterr()
    assert main([*QUICK, "--compare", str(old), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert all(f["changed"] for f in doc["comparison"]["figures"])
    assert main([*QUICK, "--compare", str(old), "--fail-on-change"]) == 1


@pytest.mark.parametrize("content,argv,message", [
    (None, ["--compare", "missing.json"], "cannot read --compare"),
    ("{", ["--compare", "old.json"], "is not JSON"),
    ('{"guest": "vm1"}', ["--compare", "old.json"], "not a saved bench run"),
    (None, ["--fail-on-change"], "needs a saved run"),
])
def test_bad_compare_input_is_one_line_before_anything_runs(content, argv, message, tmp_path,
                                                             monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    if content is not None:
        (tmp_path / "old.json").write_text(content)
    assert main([*QUICK, *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    with pytest.raises(ConfigError):
        load_saved(tmp_path / "missing.json")
