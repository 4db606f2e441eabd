"""Where each emulated host runs: which Ray node its actor is pinned to.

A Ray node is a machine; an emulated host is an actor (a process) on it. On this machine a
local cluster packs several hosts onto one Ray node, because a node costs far more than a
host (its raylet, GCS, dashboard and agents; the README's "Scale" section has the figures).
On an existing Ray cluster (`--address`) the hosts spread over its alive nodes, round robin,
or as `--placement host-0=NODE,...` says, NODE being a node id (or a unique prefix of one)
or a node's IP when only one node has it.

The plans here are pure functions of names and node descriptions, so they are tested
without Ray; `cluster.launch.launcher` applies them.
"""

from dataclasses import dataclass

from nodes.errors import ConfigError

MIN_NODE_ID_PREFIX = 6          # characters of a node id that may name it


@dataclass(frozen=True)
class RayNode:
    """An alive Ray node, as `ray.nodes()` describes it: the part placement needs."""

    node_id: str
    ip: str

    @classmethod
    def from_ray(cls, entry: dict) -> "RayNode":
        return cls(entry["NodeID"], entry["NodeManagerAddress"])


def local_groups(names: list[str], hosts_per_node: int | None) -> list[list[str]]:
    """The hosts of each node of a local cluster, in order: `hosts_per_node` to a node (the
    last may hold fewer); None puts every host on one node."""
    per = hosts_per_node or max(1, len(names))
    return [names[i:i + per] for i in range(0, len(names), per)]


def parse_placement(text: str | None, names: list[str]) -> dict[str, str]:
    """`host-0=NODE,host-1=NODE` -> {host: NODE}; every host named must be of the cluster."""
    if not text:
        return {}
    out: dict[str, str] = {}
    for part in text.split(","):
        host, sep, node = (s.strip() for s in part.partition("="))
        if not sep or not host or not node:
            raise ConfigError(f"cannot read placement {part!r}; write e.g. "
                              "host-0=NODE_ID,host-1=10.0.0.5 (`ray list nodes` shows them)")
        if host not in names:
            raise ConfigError(f"--placement names {host!r}, which is not a host of this "
                              f"cluster ({', '.join(names)})")
        if host in out:
            raise ConfigError(f"--placement places {host} twice")
        out[host] = node
    return out


def resolve_node(ref: str, nodes: list[RayNode]) -> RayNode:
    """The one alive node `ref` names: a node id, a unique prefix of one, or a unique IP."""
    exact = [n for n in nodes if n.node_id == ref]
    if exact:
        return exact[0]
    by_ip = [n for n in nodes if n.ip == ref]
    if len(by_ip) == 1:
        return by_ip[0]
    by_prefix = ([n for n in nodes if n.node_id.startswith(ref)]
                 if len(ref) >= MIN_NODE_ID_PREFIX else [])
    if len(by_prefix) == 1:
        return by_prefix[0]
    known = ", ".join(f"{n.node_id[:12]} ({n.ip})" for n in nodes)
    if len(by_ip) > 1 or len(by_prefix) > 1:
        raise ConfigError(f"--placement node {ref!r} names several Ray nodes; give more of "
                          f"the node id. Alive nodes: {known}")
    raise ConfigError(f"--placement node {ref!r} is no alive Ray node (give a node id, at "
                      f"least {MIN_NODE_ID_PREFIX} characters of one, or an IP). Alive "
                      f"nodes: {known}")


def spread(names: list[str], nodes: list[RayNode], hosts_per_node: int | None = None,
           placement: dict[str, str] | None = None) -> dict[str, RayNode]:
    """host -> node on an existing cluster. Hosts `placement` names go where it says; the
    others go round robin over the nodes (sorted by IP, then id, so a plan is repeatable),
    or `hosts_per_node` to a node in that order when it is given."""
    if not nodes:
        raise ConfigError("the Ray cluster has no alive node to place hosts on")
    nodes = sorted(nodes, key=lambda n: (n.ip, n.node_id))
    placement = placement or {}
    out = {h: resolve_node(ref, nodes) for h, ref in placement.items()}
    rest = [h for h in names if h not in out]
    if hosts_per_node:
        needed = -(-len(rest) // hosts_per_node)
        if needed > len(nodes):
            raise ConfigError(f"{len(rest)} hosts at --hosts-per-node {hosts_per_node} need "
                              f"{needed} Ray nodes; the cluster has {len(nodes)}: raise "
                              "--hosts-per-node or add nodes")
        out.update({h: nodes[i // hosts_per_node] for i, h in enumerate(rest)})
    else:
        out.update({h: nodes[i % len(nodes)] for i, h in enumerate(rest)})
    return {h: out[h] for h in names}
