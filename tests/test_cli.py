"""The CLI as a user runs it: `migbed up`, create, list, migrate, destroy, down, and bad input.

Each command runs as its own process against a persistent cluster whose state lives in a
temporary MIGBED_HOME, so it never touches a user's own cluster.
"""

import json
import os
import subprocess
import sys

import pytest
from checks import processes_with_env

MIGBED = [sys.executable, "-m", "cluster.cli"]


def run(*args: str, home, check_rc: int | None = 0, timeout: float = 180):
    env = dict(os.environ, MIGBED_HOME=str(home))
    env.pop("RAY_ADDRESS", None)
    p = subprocess.run([*MIGBED, *args], capture_output=True, text=True, env=env,
                       timeout=timeout)
    if check_rc is not None:
        assert p.returncode == check_rc, (args, p.returncode, p.stdout, p.stderr)
    return p


def one_line_error(p) -> str:
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert len(lines) == 1 and lines[0].startswith("migbed: error: "), p.stderr
    assert "Traceback" not in p.stderr
    return lines[0]


BAD_WITHOUT_CLUSTER = [
    (["up", "--hosts", "0"], "--hosts must be >= 1"),
    (["up", "--host-memory", "lots"], "cannot read 'lots' as a size"),
    (["up", "--profile", "sparc"], "unknown profile"),
    (["up", "--profile", "host-7=ia64"], "not a host of this cluster"),
    (["up", "--profile", "host-0"], "unknown profile"),
    (["migrate", "--bandwidth", "0"], "must be positive"),
    (["migrate", "--rate-limit", "-1MiB"], "rate-limit"),
    (["migrate", "--downtime-limit", "0"], "must be positive"),
    (["migrate", "--latency", "-5ms"], "latency"),
    (["migrate", "--policy", "vmware"], "invalid choice"),
    (["migrate", "--vcpu", "thread", "--workload", "kvstore"], "runs on process vCPUs only"),
    (["migrate", "--workload", "stream", "--vcpu", "process", "--fill", "text"],
     "is a program"),
    (["migrate", "--workload", "chaos"], "invalid choice"),
    (["migrate", "--dirty-rate", "fast"], "dirty rate"),
    (["migrate", "--guest-memory", "5000"], "multiple of the page size"),
    (["migrate", "--mode", "hvm"], "unknown memory mode"),
    (["migrate", "--hosts", "1"], "at least 2 hosts"),
    (["migrate", "vm1"], "give both GUEST and DEST_HOST"),
    (["model", "--workload", "uniform", "--dirty-rate", "max"], "needs a dirty rate"),
    (["model", "--dirty-rate", "100"], "needs a bandwidth"),
    (["create", "host-0", "x", "--memory", "0"], "must be positive"),
    (["frobnicate"], "invalid choice"),
    (["list"], "no migbed cluster is running; start one with `migbed up`"),
    (["destroy", "vm1"], "no migbed cluster is running"),
]


@pytest.mark.parametrize("args,message", BAD_WITHOUT_CLUSTER)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    line = one_line_error(run(*args, home=tmp_path, check_rc=None))
    assert message in line


def test_model_command(tmp_path):
    p = run("model", "--guest-memory", "64MiB", "--workload", "uniform", "--dirty-rate",
            "20000", "--bandwidth", "128MiB", "--json", home=tmp_path)
    pred = json.loads(p.stdout)
    assert pred["rounds"][-1]["final"] and pred["stop_reason"]


@pytest.mark.ray
def test_one_shot_migrate(tmp_path):
    p = run("migrate", "--guest-memory", "16MiB", "--workload", "hotset", "--dirty-rate",
            "5000", "--bandwidth", "128MiB", "--json", home=tmp_path)
    report = json.loads(p.stdout)
    assert report["status"] == "completed" and report["integrity"]["verified"] is True
    assert report["source"] == "host-0" and report["destination"] == "host-1"
    assert "round 0" in p.stderr, "a live progress line per round"


@pytest.mark.ray
def test_cancel_exit_code(tmp_path):
    p = run("migrate", "--guest-memory", "8MiB", "--workload", "uniform", "--bandwidth",
            "8MiB", "--cancel-after-round", "0", home=tmp_path, check_rc=1)
    assert "[cancelled]" in p.stdout


@pytest.mark.ray
def test_persistent_cluster_session(tmp_path):
    home = tmp_path
    up = run("up", "--hosts", "3", "--host-memory", "256MiB", home=home)
    assert "3 hosts" in up.stdout
    state = json.loads((home / "cluster.json").read_text())
    try:
        assert "already running" in one_line_error(run("up", home=home, check_rc=None))
        run("create", "host-0", "vm1", "--memory", "16MiB", "--workload", "uniform",
            "--dirty-rate", "5000", home=home)
        run("create", "host-1", "pm", "--memory", "8MiB", "--mode", "p==m", "--dma", home=home)
        run("create", "host-2", "shadow", "--memory", "8MiB", "--mode", "vp", home=home)
        listing = run("list", home=home).stdout
        for text in ("vm1", "pm", "shadow", "Domain-0", "host-2", "mfn"):
            assert text in listing
        data = json.loads(run("list", "--json", home=home).stdout)
        for h in data["hosts"]:
            f = h["frames"]
            assert f["free"] + f["used"] + f["reserved"] == f["total"]
        # one Ray node holds the three hosts, each a process of its own
        assert len({h["ray_node"]["node_id"] for h in data["hosts"]}) == 1
        assert len({h["ray_node"]["pid"] for h in data["hosts"]}) == 3
        bad = [
            (["create", "host-0", "vm1", "--memory", "16MiB"], "already exists"),
            (["create", "host-0", "huge", "--memory", "10GiB"], "free"),
            (["create", "host-9", "x", "--memory", "4MiB"], "no host named"),
            (["create", "host-0", "d", "--memory", "4MiB", "--mode", "vp", "--dma"], "DMA"),
            (["migrate", "pm", "host-0"], "P==M"),
            (["migrate", "vm1", "host-0"], "already runs"),
            (["migrate", "nope", "host-1"], "no guest named"),
            (["destroy", "Domain-0"], "no guest named"),
        ]
        for args, message in bad:
            assert message in one_line_error(run(*args, home=home, check_rc=None)), args
        p = run("migrate", "vm1", "host-2", "--bandwidth", "256MiB", "--json", home=home)
        report = json.loads(p.stdout)
        assert report["status"] == "completed" and report["integrity"]["verified"]
        assert "host-2" in [g["host"] for g in json.loads(run("list", "--json", home=home)
                                                          .stdout)["guests"]
                            if g["name"] == "vm1"]
        run("pause", "shadow", home=home)
        run("unpause", "shadow", home=home)
        for g in ("vm1", "pm", "shadow"):
            run("destroy", g, home=home)
        data = json.loads(run("list", "--json", home=home).stdout)
        assert [g["name"] for g in data["guests"]] == ["Domain-0"] * 3
    finally:
        down = run("down", home=home, check_rc=None)
    assert down.returncode == 0 and "stopped" in down.stdout
    assert not (home / "cluster.json").exists()
    assert not processes_with_env("MIGBED_HOME", str(home)), "a Ray process is left"
    assert state["sid"]
    assert "no migbed cluster" in run("down", home=home).stdout


def test_down_cleans_a_dead_cluster(tmp_path):
    """A state file whose processes are gone: `down` still cleans up (like `mn -c`)."""
    (tmp_path / "cluster.json").write_text(json.dumps(
        {"address": "127.0.0.1:1", "hosts": ["host-0"], "pgid": None}))
    p = run("down", home=tmp_path, check_rc=0, timeout=120)
    assert "stopped" in p.stdout and not (tmp_path / "cluster.json").exists()


def test_model_command_honours_max_iterations(capsys):
    """`migbed model --max-iterations N` caps the predicted live rounds as it caps a real
    migration's (it used to be ignored)."""
    from cluster.cli import main
    args = ["model", "--guest-memory", "16MiB", "--workload", "uniform", "--dirty-rate",
            "100000", "--bandwidth", "64MiB", "--json"]
    assert main(args) == 0
    uncapped = json.loads(capsys.readouterr().out)
    assert uncapped["live_rounds"] == 5 and uncapped["stop_code"] == "max-iterations"
    assert main([*args, "--max-iterations", "2"]) == 0
    capped = json.loads(capsys.readouterr().out)
    assert capped["live_rounds"] == 2 and capped["stop_code"] == "max-iterations"
    assert "cap (2)" in capped["stop_reason"]


def test_model_command_prints_its_rounds_as_a_table(capsys):
    from cluster.cli import main
    assert main(["model", "--guest-memory", "16MiB", "--workload", "uniform", "--dirty-rate",
                 "2000", "--bandwidth", "64MiB"]) == 0
    out = capsys.readouterr().out
    assert "\x1b[" not in out, "no ANSI codes when not printing to a terminal"
    lines = out.splitlines()
    assert lines[0].startswith("model: policy xen, guest 16.0 MiB, workload uniform")
    final = next(ln for ln in lines if ln.split()[:1] == ["final"])
    assert final.split()[-1] == "ms"
    assert "stop reason: fewer than 50 dirty pages (converged: True)" in lines
    assert any(ln.startswith("total time ") for ln in lines)
