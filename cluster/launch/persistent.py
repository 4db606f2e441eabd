"""The persistent cluster of `migbed up`, and `migbed down`.

`up` starts a launcher process in a session of its own (`python -m cluster.launch.persistent`):
it starts Ray and detached host actors (`cluster.launch.launcher`), records the Ray address and
its session in a state file (`$MIGBED_HOME/cluster.json`, default `~/.migbed`), and exits;
later commands attach through that file. `down` kills the actors and every process of the
launcher's session (`cluster.launch.reaper`: the Ray workers included), so no Ray process is left
behind. A start-up that fails or runs out of time does the same before it returns; its
limit grows with the number of hosts (`startup_timeout_seconds`), and it reports each host
as it comes up (the launcher writes `launcher.progress`, `up` reads it).
"""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cluster.launch.launcher import (
    NAMESPACE,
    ClusterSpec,
    LocalRay,
    ray_init,
    start_hosts,
    startup_timeout_seconds,
)
from cluster.launch.reaper import kill_session
from nodes.errors import ClusterError

STATE_FILE = "cluster.json"
PROGRESS_FILE = "launcher.progress"


def state_dir() -> Path:
    return Path(os.environ.get("MIGBED_HOME") or Path.home() / ".migbed")


def read_state() -> dict | None:
    path = state_dir() / STATE_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ClusterError(f"cannot read {path}: {exc}; remove it or run `migbed down`") from None


def write_state(state: dict) -> None:
    d = state_dir()
    try:
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(d / STATE_FILE)
    except OSError as exc:
        raise ClusterError(f"cannot write the cluster state in {d}: {exc}; set MIGBED_HOME "
                           "to a writable folder") from None


def clear_state() -> None:
    (state_dir() / STATE_FILE).unlink(missing_ok=True)


def read_progress() -> dict:
    """What the launcher has brought up so far ({} before it says anything)."""
    try:
        return json.loads((state_dir() / PROGRESS_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _say_progress(**progress: object) -> None:
    path = state_dir() / PROGRESS_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(progress))
    tmp.replace(path)


def up(spec: ClusterSpec, timeout_seconds: float | None = None,
       on_progress: Callable[[dict], None] | None = None) -> dict:
    """Start a persistent cluster in a launcher process of its own session; returns state.
    `on_progress(p)` whenever the launcher reports more ({"stage", "hosts_up", "hosts"}).
    A start-up that fails or outlasts its limit (default `startup_timeout_seconds`) kills
    every process it started before it raises."""
    if read_state() is not None:
        raise ClusterError("a migbed cluster is already running; `migbed down` stops it")
    timeout = timeout_seconds or startup_timeout_seconds(spec.hosts)
    d = state_dir()
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ClusterError(f"cannot create {d}: {exc}; set MIGBED_HOME to a writable "
                           "folder") from None
    if spec.metrics_port is not None:       # fail here, before anything starts
        from cluster import prometheus
        prometheus.write_sd_file(d / "prometheus" / prometheus.SD_FILE_NAME, {})
        if spec.prometheus_port is not None:
            prometheus.preflight(spec.prometheus_port)
    (d / PROGRESS_FILE).unlink(missing_ok=True)
    log = open(d / "launcher.log", "w")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen([sys.executable, "-m", "cluster.launch.persistent", json.dumps(spec.to_dict()),
                             str(timeout)],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        rc = _watch(proc, time.monotonic() + timeout, on_progress)
        state = read_state()
        if rc is None:
            raise ClusterError(f"the cluster did not start within {timeout:g} s (the limit "
                               f"for {spec.hosts} hosts); everything it started is stopped; "
                               f"see {d / 'launcher.log'}")
        if rc != 0 or state is None:
            tail = (d / "launcher.log").read_text().strip().splitlines()[-1:] or ["no output"]
            raise ClusterError(f"the cluster failed to start: {tail[0]}; everything it "
                               "started is stopped")
    except BaseException:
        proc.kill()
        kill_session(proc.pid)          # the launcher's session: Ray's processes, workers too
        clear_state()
        raise
    finally:
        (d / PROGRESS_FILE).unlink(missing_ok=True)
    return state


def _watch(proc: subprocess.Popen, deadline: float,
           on_progress: Callable[[dict], None] | None) -> int | None:
    """Wait for the launcher to exit (its exit code), reporting its progress; None if it
    is still running at `deadline`. The state file is the launcher's last act: once it is
    there the cluster is up, whether or not its Ray driver has finished disconnecting."""
    last: dict = {}
    while True:
        rc = proc.poll()
        if rc is None and (state_dir() / STATE_FILE).exists():
            rc = 0
        progress = read_progress()
        if on_progress and progress and progress != last:
            on_progress(progress)
            last = progress
        if rc is not None:
            return rc
        if time.monotonic() > deadline:
            return None
        time.sleep(0.1)


def _launch(spec_json: str, timeout_seconds: str) -> None:
    """The launcher process: start Ray and the detached hosts, write the state, exit."""
    deadline = time.monotonic() + float(timeout_seconds)
    spec = ClusterSpec.from_dict(json.loads(spec_json))
    state = {"spec": spec.to_dict(), "hosts": spec.host_names, "pgid": None,
             "sid": os.getsid(0), "started_wall": time.time()}
    n = spec.hosts
    _say_progress(stage="ray", hosts_up=0, hosts=n)
    if spec.address is None:
        local = LocalRay(spec.host_names, spec.object_store_bytes, persistent=True,
                         hosts_per_node=spec.hosts_per_node,
                         on_node=lambda k, total: _say_progress(stage=f"ray node {k + 1}/"
                                                                f"{total}", hosts_up=0,
                                                                hosts=n))
        state["address"] = local.address
        state["pgid"] = os.getpgid(0)
    else:
        state["address"] = spec.address
    ray_init(state["address"])
    _say_progress(stage="hosts", hosts_up=0, hosts=n)
    actors = start_hosts(spec, detached=True, deadline=deadline,
                         on_up=lambda k, total: _say_progress(stage="hosts", hosts_up=k,
                                                              hosts=total))
    _start_metrics(spec, list(actors.values()), state)
    try:
        write_state(state)
    except ClusterError:
        if state.get("prometheus"):
            _kill_group(state["prometheus"]["pid"])
        raise


def _start_metrics(spec: ClusterSpec, actors: list, state: dict) -> None:
    """Write Prometheus's discovery file of the hosts' /metrics; start Prometheus if asked."""
    if spec.metrics_port is None:
        return
    import ray

    from cluster import prometheus
    found = ray.get([a.metrics_endpoint.remote() for a in actors], timeout=60)
    endpoints = {n: e for n, e in zip(spec.host_names, found, strict=True) if e}
    workdir = state_dir() / "prometheus"
    state["sd_file"] = str(prometheus.write_sd_file(workdir / prometheus.SD_FILE_NAME,
                                                    endpoints))
    if spec.prometheus_port is not None:
        state["prometheus"] = prometheus.start_supervised(workdir, endpoints,
                                                          spec.prometheus_port)


def down() -> bool:
    """Stop the persistent cluster: hosts, then every Ray process it started. True if one ran."""
    state = read_state()
    if state is None:
        return False
    if not state.get("pgid"):           # hosts on a Ray cluster this one did not start
        _kill_hosts(state)
    if state.get("sid"):
        kill_session(state["sid"])      # Ray's processes and its workers, however grouped
    elif state.get("pgid"):
        _kill_group(state["pgid"])
    if state.get("prometheus"):
        _kill_group(state["prometheus"]["pid"])
    if state.get("sd_file"):
        from cluster.prometheus import PrometheusError, write_sd_file
        try:
            write_sd_file(state["sd_file"], {})     # an outside Prometheus scrapes nothing now
        except PrometheusError:
            pass
    clear_state()
    return True


def _kill_hosts(state: dict) -> None:
    """Kill the hosts' detached actors (a local cluster's session kill stops them anyway)."""
    try:
        import ray
        ray_init(state["address"])
        # The hosts, and the cluster's migration scheduler (`cluster.schedclient`'s actor).
        for name in [*state["hosts"], "migbed-scheduler"]:
            try:
                ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
            except ValueError:
                pass
        ray.shutdown()
    except Exception:  # noqa: BLE001 - the cluster may be half dead; nothing more to do here
        pass


def _kill_group(pgid: int) -> None:
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


if __name__ == "__main__":
    from nodes.errors import MigbedError
    try:
        _launch(sys.argv[1], sys.argv[2])
    except MigbedError as exc:          # its last line is what `up` reports
        print(f"{exc}", flush=True)
        sys.exit(2)
