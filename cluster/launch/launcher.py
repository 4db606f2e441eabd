"""Starting the Ray side: a local cluster on this machine, or hosts on an existing one.

A local cluster is Ray's own `cluster_utils.Cluster` on this machine: its nodes each offer a
custom resource `migbed:<host>` for every host placed there (`cluster.launch.placement`: by default
all on one node, `hosts_per_node` to a node when asked), so each host's actor, a process of
its own, lands on its node. On an existing Ray cluster the hosts are pinned to the nodes the
placement picks by node id, and their data channels listen on their node's IP. The
persistent cluster of `migbed up` is `cluster.launch.persistent`.
"""

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from cluster.fairshare import Topology
from cluster.launch import placement as place
from nodes.errors import ClusterError, ConfigError
from nodes.host.specs import HostConfig
from nodes.xen.hypervisor import DEFAULT_RESERVED_BYTES, check_guest_name
from nodes.xen.profiles import DEFAULT_PROFILE, get_profile

NAMESPACE = "migbed"
OBJECT_STORE_BYTES = 128 * 1024 * 1024
MAX_HOSTS = 64
STARTUP_BASE_SECONDS = 60.0         # Ray's own start, with room for a loaded machine
STARTUP_PER_HOST_SECONDS = 4.0      # each host: a worker process to start, under load


def startup_timeout_seconds(hosts: int) -> float:
    """How long a start-up of `hosts` hosts may take before it is given up (and cleaned)."""
    return STARTUP_BASE_SECONDS + STARTUP_PER_HOST_SECONDS * hosts


def host_names(count: int) -> list[str]:
    """The naming scheme of hosts, written once: host-0 ... host-<N-1>."""
    return [f"host-{i}" for i in range(count)]


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
    hosts_per_node: int | None = None   # None: local, all on one node; remote, round robin
    placement: dict[str, str] = field(default_factory=dict)  # host -> node (with address)
    data_ports: tuple[int, int] | None = None   # migrations listen in this range (None: any)
    # Racks and their links (`cluster.fairshare`): hosts in `racks` racks (None: no racks),
    # each host's own link and each rack's uplink in bytes/s (None: unlimited).
    racks: int | None = None
    host_link_bytes_per_second: float | None = None
    uplink_bytes_per_second: float | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.hosts <= MAX_HOSTS:
            raise ConfigError(f"--hosts must be 1..{MAX_HOSTS}, got {self.hosts}")
        if self.hosts_per_node is not None and not 1 <= self.hosts_per_node <= MAX_HOSTS:
            raise ConfigError(f"--hosts-per-node must be 1..{MAX_HOSTS}, got "
                              f"{self.hosts_per_node}")
        if self.placement and self.address is None:
            raise ConfigError("--placement places hosts on the nodes of an existing Ray "
                              "cluster: give its --address too")
        for host in self.placement:
            if host not in self.host_names:
                raise ConfigError(f"--placement names {host!r}, which is not a host of this "
                                  f"cluster ({', '.join(self.host_names)})")
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
        self.topology()           # racks and links checked here, before anything starts
        for host, prof in self.profiles.items():
            if host not in self.host_names:
                raise ConfigError(f"--profile names {host!r}, which is not a host of this "
                                  f"cluster ({', '.join(self.host_names)})")
            get_profile(prof)

    @property
    def host_names(self) -> list[str]:
        return list(self.names) if self.names else host_names(self.hosts)

    def topology(self) -> Topology:
        """The racks and links the scheduler allocates rates over."""
        if self.racks is None:
            return Topology.striped(self.host_names, 1, self.host_link_bytes_per_second,
                                    None) if self.host_link_bytes_per_second else Topology()
        return Topology.striped(self.host_names, self.racks, self.host_link_bytes_per_second,
                                self.uplink_bytes_per_second)

    def host_configs(self) -> list[HostConfig]:
        return [HostConfig(name=n, memory_bytes=self.host_memory_bytes,
                           page_size=self.page_size, reserved_bytes=self.reserved_bytes,
                           profile=self.profiles.get(n, self.default_profile),
                           dom0_memory_bytes=self.dom0_memory_bytes,
                           address=self.bind_address, seed=i, superpages=self.superpages,
                           metrics_port=(self.metrics_port + i if self.metrics_port
                                         else self.metrics_port),
                           metrics_address=self.metrics_address,
                           data_ports=tuple(self.data_ports) if self.data_ports else None)
                for i, n in enumerate(self.host_names)]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["names"] = list(self.names)
        d["placement"] = dict(self.placement)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ClusterSpec":
        d = dict(d)
        d["names"] = tuple(d.get("names", ()))
        d["placement"] = dict(d.get("placement") or {})
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
    """A Ray cluster on this machine (Ray's cluster_utils), its hosts packed onto nodes
    `hosts_per_node` at a time (None: all on one node)."""

    def __init__(self, names: list[str], object_store_bytes: int = OBJECT_STORE_BYTES,
                 persistent: bool = False, hosts_per_node: int | None = None,
                 on_node: Callable[[int, int], None] | None = None):
        from ray.cluster_utils import Cluster

        from nodes.host.actor import host_resource
        self.groups = place.local_groups(names, hosts_per_node)
        # No autoscaler monitor (a local cluster never scales) and no log monitor (no
        # driver here takes workers' logs): two Python processes fewer, which cut the head's
        # start from 3.7 to 2.4 s on 2 cores and 8 hosts up from 5.9-7.0 to 5.7-5.8 s.
        common = {"num_cpus": 1, "object_store_memory": object_store_bytes,
                  "no_monitor": True, "include_log_monitor": False}

        def resources(group: list[str]) -> dict:
            return {host_resource(n): 1 for n in group}
        self.cluster = Cluster(
            initialize_head=True, shutdown_at_exit=not persistent,
            head_node_args={**common, "resources": resources(self.groups[0]),
                            "include_dashboard": False})
        try:
            for k, group in enumerate(self.groups[1:], start=1):
                if on_node:
                    on_node(k, len(self.groups))
                self.cluster.add_node(**common, resources=resources(group))
            self.cluster.wait_for_nodes()
        except BaseException:
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
    _cluster_messages_to_stderr()


def _cluster_messages_to_stderr() -> None:
    """Ray prints the cluster's own warnings (the raylet's "N worker processes have been
    started", ...) to the driver's stdout, even without log_to_driver: where `--json` writes
    its document. They go to stderr instead, beside migbed's own messages."""
    from ray._private import worker as ray_worker
    printer = getattr(ray_worker, "print_to_stdstream", None)
    if printer is None or getattr(printer, "migbed_stderr", False):
        return

    def to_stderr(data: dict, ignore_prefix: bool) -> None:
        printer({**data, "is_err": True}, ignore_prefix)
    to_stderr.migbed_stderr = True
    ray_worker.print_to_stdstream = to_stderr


def start_hosts(spec: ClusterSpec, *, detached: bool, deadline: float,
                on_up: Callable[[int, int], None] | None = None) -> dict:
    """Start every host's actor (on the node the placement picks: by resource on a local
    cluster, by node id on an existing one) and wait, until `deadline` (time.monotonic),
    for each to answer; `on_up(k, n)` after each. Returns {name: actor}."""
    import ray

    from nodes.host.actor import start_host_actor
    nodes = remote_placement(spec) if spec.address else {}
    actors = {c.name: start_host_actor(c, detached=detached, namespace=NAMESPACE,
                                       node_id=nodes[c.name].node_id if nodes else None)
              for c in spec.host_configs()}
    try:
        _wait_answering(list(actors.values()), deadline, on_up)
    except BaseException:
        for a in actors.values():       # detached ones would outlive this process
            ray.kill(a, no_restart=True)
        raise
    return actors


def _wait_answering(actors: list, deadline: float,
                    on_up: Callable[[int, int], None] | None) -> None:
    import ray
    pending = [a.ping.remote() for a in actors]
    up_count = 0
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ClusterError(f"{len(pending)} of {len(actors)} hosts did not answer in time")
        ready, pending = ray.wait(pending, num_returns=1, timeout=min(left, 1.0))
        ray.get(ready)                  # a host that failed to start raises here
        if ready:
            up_count += len(ready)
            if on_up:
                on_up(up_count, len(actors))


def remote_placement(spec: ClusterSpec) -> dict[str, place.RayNode]:
    """host -> alive node of the existing Ray cluster (`cluster.launch.placement.spread`)."""
    import ray
    nodes = [place.RayNode.from_ray(n) for n in ray.nodes() if n["Alive"]]
    if not nodes:
        raise ClusterError(f"the Ray cluster at {spec.address} has no alive nodes")
    return place.spread(spec.host_names, nodes, spec.hosts_per_node, spec.placement)
