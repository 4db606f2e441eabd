"""`migbed top`: what a host shows of itself in one call (its recent migrations both ways, in
a bounded list), the frame built from two snapshots, `top --once` as a separate process
against a real Ray cluster with a migration running, and `top` driven in a real terminal
(tmux): start it, read the screen while a migration runs, press q."""

import os
import subprocess
import sys
import threading
import time
import uuid

import pytest

from cluster.console import render_text, top_renderables
from cluster.top import build_frame, take_snapshots
from nodes.host.overview import RecentMigrations
from nodes.host.specs import GuestSpec
from nodes.migration.results import SourceResult
from nodes.migration.settings import MigrationSettings
from tests.checks import frames_exact
from tests.conftest import require_binary
from workloads.spec import WorkloadSpec

MiB = 1024 * 1024
MIGBED = [sys.executable, "-m", "cluster.cli"]
SCREEN_WAIT_SECONDS = 90       # bounds only: how long a loaded machine may take to draw


class Background:
    """A migration running on a thread until `stop()` cancels it (or it ends)."""

    def __init__(self, tb, guest: str, dest: str, settings: MigrationSettings):
        self.stop_asked = threading.Event()
        self.report = None
        self.thread = threading.Thread(target=self._run, args=(tb, guest, dest, settings))
        self.thread.start()

    def _run(self, tb, guest, dest, settings):
        self.report = tb.migrate(guest, dest, settings, should_cancel=self.stop_asked.is_set)

    def stop(self):
        self.stop_asked.set()
        self.thread.join(120)
        assert not self.thread.is_alive()
        return self.report


def wait_running(host, guest: str, timeout: float = SCREEN_WAIT_SECONDS) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = [m for m in host.call("snapshot")["outgoing"] if m["guest"] == guest]
        if running and running[0]["status"] == "precopy":
            return running[0]
        time.sleep(0.05)
    raise AssertionError(f"{guest} never showed as migrating on {host.name}")


SECTIONS = ("HOSTS", "GUESTS", "MIGRATIONS RUNNING", "LAST MIGRATIONS")


def section(text: str, title: str) -> list[str]:
    """The lines of one of a frame's tables (from its title line to the next one's)."""
    out, inside = [], False
    for line in text.splitlines():
        if line.strip() in SECTIONS:
            inside = line.strip() == title
        elif inside:
            out.append(line)
    assert out, f"no {title} in {text}"
    return out


def slow(**kw) -> MigrationSettings:
    """A link slow enough that the migration runs until it is cancelled: Xen's policy with a
    round cap it never reaches (its own 5 rounds of 8 s each were once over before a loaded
    machine's `top` had drawn a frame)."""
    kw.setdefault("max_iterations", 10_000)
    return MigrationSettings(link_bytes_per_second=2 * MiB, **kw)


# -- a host's own view --------------------------------------------------------------------------
def test_recent_migrations_are_bounded_per_side():
    recent = RecentMigrations(keep=3)
    for i in range(10):
        recent.source_ended("h0", f"m{i}", "g", MigrationSettings(), SourceResult(
            status="completed"))
    assert [e["migration_id"] for e in recent.list()] == ["m7", "m8", "m9"]


def test_the_frame_pairs_both_sides_and_takes_rates_from_two_snapshots(in_process, unique_name):
    tb = in_process(hosts=3)
    busy, done = unique_name("busy"), unique_name("done")
    tb.create("host-0", GuestSpec(busy, 8 * MiB, workload=WorkloadSpec("uniform", 2000)))
    tb.create("host-1", GuestSpec(done, 4 * MiB))
    finished = tb.migrate(done, "host-2")
    assert finished.status == "completed"
    bg = Background(tb, busy, "host-2", slow())
    try:
        wait_running(tb.host("host-0"), busy)
        before = take_snapshots(tb)
        time.sleep(0.3)
        frame = build_frame(before, take_snapshots(tb))
    finally:
        report = bg.stop()
    assert report.status == "cancelled"
    (m,) = frame.running
    assert (m["guest"], m["source"], m["destination"]) == (busy, "host-0", "host-2")
    assert m["status"] == "precopy" and m["guest_memory_bytes"] == 8 * MiB
    assert 0 < m["remaining_bytes"] <= 8 * MiB and m["link_bytes_per_second"] == 2 * MiB
    hosts = {h["name"]: h for h in frame.hosts}
    assert hosts["host-0"]["migrations_out"] == 1 and hosts["host-2"]["migrations_in"] == 1
    g = next(g for g in frame.guests if g["name"] == busy and g["host"] == "host-0")
    assert g["writes_per_second"] > 0
    (r,) = [r for r in frame.recent if r["migration_id"] == finished.migration_id]
    assert (r["source"], r["destination"], r["status"]) == ("host-1", "host-2", "completed")
    assert r["downtime_seconds"] == pytest.approx(finished.downtime_seconds)
    assert r["guest_observed_downtime_seconds"] is not None and r["verified"] is True
    text = render_text(*top_renderables(frame))
    for heading in ("HOSTS", "GUESTS", "MIGRATIONS RUNNING", "LAST MIGRATIONS"):
        assert heading in text
    assert f"{busy}  host-0 > host-2" in text and "verified" in text
    after = build_frame(None, take_snapshots(tb))
    assert any(r["guest"] == busy and r["status"] == "cancelled" for r in after.recent)
    frames_exact(tb)


def test_a_dead_host_is_shown_unreachable(in_process):
    tb = in_process(hosts=2)
    tb.host("host-1").kill()
    frame = build_frame(None, take_snapshots(tb))
    assert [h["up"] for h in frame.hosts] == [True, False]
    assert "unreachable" in render_text(*top_renderables(frame))


# -- as a user runs it ----------------------------------------------------------------------------
def _env() -> dict:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    return env


def test_top_once_against_a_real_cluster_with_a_migration_running(ray_home, unique_name):
    tb = ray_home
    guest, idle = unique_name("top"), unique_name("idle")
    tb.create("host-0", GuestSpec(guest, 16 * MiB, workload=WorkloadSpec("hotset", 5000)))
    tb.create("host-1", GuestSpec(idle, 4 * MiB))
    try:
        done = tb.migrate(idle, "host-2")
        bg = Background(tb, guest, "host-1", slow())
        try:
            wait_running(tb.host("host-0"), guest)
            p = subprocess.run([*MIGBED, "top", "--once"], capture_output=True, text=True,
                               env=_env(), timeout=180)
        finally:
            report = bg.stop()
        assert p.returncode == 0, p.stderr
        line = next(ln for ln in section(p.stdout, "MIGRATIONS RUNNING")
                    if ln.startswith(guest))
        assert "host-0 > host-1" in line and "precopy" in line and "2.0 MiB/s" in line
        row = next(ln for ln in section(p.stdout, "GUESTS") if ln.startswith(guest)).split()
        assert row[1] == "host-0" and row[-1] != "-", "its page writes per second"
        assert any(ln.startswith(idle) and "completed" in ln and "verified" in ln
                   for ln in section(p.stdout, "LAST MIGRATIONS")), p.stdout
        assert report.status == "cancelled"
        # A separate `top` started later still shows how it went: the hosts keep it.
        p = subprocess.run([*MIGBED, "top", "--once"], capture_output=True, text=True,
                           env=_env(), timeout=180)
        assert any(ln.startswith(guest) and "cancelled" in ln
                   for ln in section(p.stdout, "LAST MIGRATIONS")), p.stdout
        assert done.status == "completed"
    finally:
        for g in (guest, idle):
            tb.destroy(g)
    frames_exact(tb)


def test_top_in_a_real_terminal_quits_on_q(ray_home, unique_name, tmp_path):
    tmux = require_binary("tmux")
    tb = ray_home
    guest = unique_name("tty")
    tb.create("host-1", GuestSpec(guest, 16 * MiB, workload=WorkloadSpec("uniform", 3000)))
    server = f"migbed-test-{uuid.uuid4().hex[:8]}"     # a tmux server of our own
    exit_file = tmp_path / "exit-code"
    command = (f"env -u RAY_ADDRESS MIGBED_HOME={os.environ['MIGBED_HOME']} "
               f"{sys.executable} -m cluster.cli top --interval 0.5; "
               f"echo $? > {exit_file}; sleep 60")

    def screen() -> str:
        return subprocess.run([tmux, "-L", server, "capture-pane", "-p", "-t", "top"],
                              capture_output=True, text=True, timeout=30).stdout
    try:
        bg = Background(tb, guest, "host-2", slow())
        try:
            wait_running(tb.host("host-1"), guest)
            subprocess.run([tmux, "-L", server, "-f", "/dev/null", "new-session", "-d",
                            "-s", "top", "-x", "220", "-y", "60", command], check=True,
                           timeout=30, env=_env())
            deadline = time.monotonic() + SCREEN_WAIT_SECONDS
            while not any(ln.startswith(guest) and "precopy" in ln
                          for ln in screen().splitlines()):
                assert time.monotonic() < deadline, screen()
                time.sleep(0.2)
            text = screen()
            assert "q or Ctrl-C quits" in text and "host-1 > host-2" in text
            subprocess.run([tmux, "-L", server, "send-keys", "-t", "top", "q"], check=True,
                           timeout=30)
            deadline = time.monotonic() + SCREEN_WAIT_SECONDS
            while not exit_file.exists() or not exit_file.read_text().strip():
                assert time.monotonic() < deadline, "q did not end `migbed top`"
                time.sleep(0.1)
            assert exit_file.read_text().strip() == "0"
        finally:
            bg.stop()
    finally:
        subprocess.run([tmux, "-L", server, "kill-server"], capture_output=True, timeout=30)
        tb.destroy(guest)
    frames_exact(tb)


@pytest.mark.parametrize("argv,message", [
    (["top"], "no migbed cluster is running; start one with `migbed up`"),
    (["top", "--once"], "no migbed cluster is running"),
    (["top", "--interval", "10ms"], "at least 100ms"),
    (["top", "--interval", "soon"], "--interval"),
])
def test_top_bad_input_is_one_line(argv, message, tmp_path):
    env = dict(_env(), MIGBED_HOME=str(tmp_path))
    p = subprocess.run([*MIGBED, *argv], capture_output=True, text=True, env=env, timeout=120)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("migbed: error: ")
    assert message in lines[0] and "Traceback" not in p.stderr
