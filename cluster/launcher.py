"""Starting and stopping the Ray side: a local multi-node cluster, or an existing one.

A local cluster is Ray's own `cluster_utils.Cluster`: one Ray node per emulated host on this
machine, each offering a custom resource `migbed:<host>` so the host's actor lands on its own
node and traffic between hosts crosses node boundaries as it would between machines.

`migbed up` makes the cluster persistent: a launcher process in a session of its own starts
Ray and detached host actors, records the Ray address and its process group in a state file
(`$MIGBED_HOME/cluster.json`, default `~/.migbed`), and exits; later commands attach through
that file, and `migbed down` kills the actors and the whole process group, so no Ray process
is left behind.
"""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nodes.errors import ClusterError, ConfigError
from nodes.host.specs import HostConfig
from nodes.xen.hypervisor import DEFAULT_RESERVED_BYTES, check_guest_name
from nodes.xen.profiles import DEFAULT_PROFILE, get_profile

NAMESPACE = "migbed"
OBJECT_STORE_BYTES = 128 * 1024 * 1024
MAX_HOSTS = 64
STATE_FILE = "cluster.json"


def host_names(count: int) -> list[str]:
    """The naming scheme of hosts, written once: host-0 ... host-<N-1>."""
    return [f"host-{i}" for i in range(count)]


def state_dir() -> Path:
    return Path(os.environ.get("MIGBED_HOME") or Path.home() / ".migbed")


@dataclass(frozen=True)
class ClusterSpec:
    """A cluster to build: how many hosts, their memory, names and architecture profiles."""

    hosts: int = 3
    host_memory_bytes: int = 512 * 1024 * 1024
    page_size: int = 4096
    reserved_bytes: int = DEFAULT_RESERVED_BYTES
    dom0_memory_bytes: int | None = None
    profiles: dict[str, str] = field(default_factory=dict)   # host -> profile
    default_profile: str = DEFAULT_PROFILE
    names: tuple[str, ...] = ()
    object_store_bytes: int = OBJECT_STORE_BYTES
    address: str | None = None          # an existing Ray cluster; None: start a local one
    bind_address: str = "127.0.0.1"     # where host data channels listen ("node": node IP)
    metrics_port: int | None = 0        # host i serves /metrics on this + i; 0: free ports; None: none
    metrics_address: str = "127.0.0.1"  # where /metrics listens (--metrics-host)
    prometheus_port: int | None = None  # `migbed up`: run Prometheus there (0: a free port)
    superpages: bool = True             # guest frames in 2 MiB extents (False: a fragmented host)

    def __post_init__(self) -> None:
        if not 1 <= self.hosts <= MAX_HOSTS:
            raise ConfigError(f"--hosts must be 1..{MAX_HOSTS}, got {self.hosts}")
        for what, port in (("metrics port", self.metrics_port),
                           ("Prometheus port", self.prometheus_port)):
            if port is not None and not 0 <= port <= 65535 - (
                    self.hosts - 1 if what == "metrics port" else 0):
                raise ConfigError(f"{what} {port} is out of range for {self.hosts} hosts")
        if self.names:
            if len(self.names) != self.hosts:
                raise ConfigError(f"{len(self.names)} host names given for {self.hosts} hosts")
            for n in self.names:
                check_guest_name(n)
            if len(set(self.names)) != len(self.names):
                raise ConfigError("host names must be unique")
        get_profile(self.default_profile)
        for host, prof in self.profiles.items():
            if host not in self.host_names:
                raise ConfigError(f"--profile names {host!r}, which is not a host of this "
                                  f"cluster ({', '.join(self.host_names)})")
            get_profile(prof)

    @property
    def host_names(self) -> list[str]:
        return list(self.names) if self.names else host_names(self.hosts)

    def host_configs(self) -> list[HostConfig]:
        return [HostConfig(name=n, memory_bytes=self.host_memory_bytes,
                           page_size=self.page_size, reserved_bytes=self.reserved_bytes,
                           profile=self.profiles.get(n, self.default_profile),
                           dom0_memory_bytes=self.dom0_memory_bytes,
                           address=self.bind_address, seed=i, superpages=self.superpages,
                           metrics_port=(self.metrics_port + i if self.metrics_port
                                         else self.metrics_port),
                           metrics_address=self.metrics_address)
                for i, n in enumerate(self.host_names)]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["names"] = list(self.names)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ClusterSpec":
        d = dict(d)
        d["names"] = tuple(d.get("names", ()))
        return cls(**d)


def parse_profiles(text: str | None, names: list[str]) -> tuple[str, dict[str, str]]:
    """`x86` (all hosts) or `host-0=ia64,host-1=x86` -> (default profile, per-host map)."""
    if not text:
        return DEFAULT_PROFILE, {}
    if "=" not in text:
        get_profile(text)
        return text, {}
    per: dict[str, str] = {}
    for part in text.split(","):
        host, sep, prof = part.partition("=")
        if not sep or not host.strip() or not prof.strip():
            raise ConfigError(f"cannot read profile {part!r}; write e.g. host-0=ia64,host-1=x86")
        get_profile(prof.strip())
        per[host.strip()] = prof.strip()
    return DEFAULT_PROFILE, per


class LocalRay:
    """A Ray cluster on this machine with one node per host (Ray's cluster_utils)."""

    def __init__(self, names: list[str], object_store_bytes: int = OBJECT_STORE_BYTES,
                 persistent: bool = False):
        from ray.cluster_utils import Cluster

        from nodes.host.actor import host_resource
        common = {"num_cpus": 1, "object_store_memory": object_store_bytes}
        self.cluster = Cluster(
            initialize_head=True, shutdown_at_exit=not persistent,
            head_node_args={**common, "resources": {host_resource(names[0]): 1},
                            "include_dashboard": False})
        try:
            for name in names[1:]:
                self.cluster.add_node(**common, resources={host_resource(name): 1})
            self.cluster.wait_for_nodes()
        except Exception:
            self.cluster.shutdown()
            raise
        self.address = self.cluster.address

    def shutdown(self) -> None:
        self.cluster.shutdown()


def ray_init(address: str) -> None:
    """Connect this process to the Ray cluster at `address` (fails fast if nothing answers)."""
    import socket

    import ray
    if ray.is_initialized():
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except (OSError, ValueError):
        raise ClusterError(f"the Ray cluster at {address} does not answer; `migbed down` "
                           "cleans up, then `migbed up` starts a new one") from None
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(address=address, namespace=NAMESPACE, logging_level="ERROR",
             log_to_driver=False, configure_logging=False)


# -- the persistent cluster of `migbed up` ---------------------------------------------------
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


def up(spec: ClusterSpec, timeout_seconds: float = 120.0) -> dict:
    """Start a persistent cluster in a launcher process of its own session; returns state."""
    if read_state() is not None:
        raise ClusterError("a migbed cluster is already running; `migbed down` stops it")
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
    log = open(d / "launcher.log", "w")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen([sys.executable, "-m", "cluster.launcher", json.dumps(spec.to_dict())],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        rc = proc.wait(timeout_seconds)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise ClusterError(f"the cluster did not start within {timeout_seconds:g} s; see "
                           f"{d / 'launcher.log'}") from None
    state = read_state()
    if rc != 0 or state is None:
        tail = (d / "launcher.log").read_text().strip().splitlines()[-1:] or ["no output"]
        _kill_group(proc.pid)
        raise ClusterError(f"the cluster failed to start: {tail[0]}")
    return state


def _launch(spec_json: str) -> None:
    """The launcher process: start Ray and the detached hosts, write the state, exit."""
    from nodes.host.actor import start_host_actor
    spec = ClusterSpec.from_dict(json.loads(spec_json))
    state = {"spec": spec.to_dict(), "hosts": spec.host_names, "pgid": None,
             "started_wall": time.time()}
    if spec.address is None:
        local = LocalRay(spec.host_names, spec.object_store_bytes, persistent=True)
        state["address"] = local.address
        state["pgid"] = os.getpgid(0)
    else:
        state["address"] = spec.address
    import ray
    ray_init(state["address"])
    node_ids = _placement(spec) if spec.address else [None] * spec.hosts
    actors = [start_host_actor(c, detached=True, namespace=NAMESPACE, node_id=nid)
              for c, nid in zip(spec.host_configs(), node_ids, strict=True)]
    ray.get([a.ping.remote() for a in actors], timeout=120)
    _start_metrics(spec, actors, state)
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


def _placement(spec: ClusterSpec) -> list[str]:
    """Node ids for the hosts on an existing Ray cluster: round-robin over alive nodes."""
    import ray
    nodes = sorted((n for n in ray.nodes() if n["Alive"]), key=lambda n: n["NodeID"])
    if not nodes:
        raise ClusterError(f"the Ray cluster at {spec.address} has no alive nodes")
    return [nodes[i % len(nodes)]["NodeID"] for i in range(spec.hosts)]


def down() -> bool:
    """Stop the persistent cluster: hosts, then every Ray process it started. True if one ran."""
    state = read_state()
    if state is None:
        return False
    try:
        import ray
        ray_init(state["address"])
        for name in state["hosts"]:
            try:
                ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
            except ValueError:
                pass
        ray.shutdown()
    except Exception:  # noqa: BLE001 - the cluster may be half dead; the group kill follows
        pass
    if state.get("pgid"):
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
    _launch(sys.argv[1])
