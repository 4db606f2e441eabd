"""The Host as a Ray actor: a process of its own, pinned to its Ray node by a custom
resource (a local cluster, where several hosts share a node) or by node id (an existing
cluster, `cluster.launch.placement`).

This is the only place in `nodes` that imports Ray. The actor is threaded, so control calls
(list, progress, cancel, metrics) are served while a migration runs on another thread of the
same host, as a real toolstack does.
"""

import os

import ray

from nodes.host.service import HostService
from nodes.host.specs import HostConfig

MAX_CONCURRENT_CALLS = 64


def host_resource(name: str) -> str:
    """The custom resource that only the Ray node of host `name` offers."""
    return f"migbed:{name}"


class Host(HostService):
    """HostService whose data channels listen on this node's IP when asked to ("node")."""

    def __init__(self, config: dict):
        config = dict(config)
        if config.get("address") == "node":
            config["address"] = ray.util.get_node_ip_address()
        super().__init__(HostConfig.from_dict(config))

    def die(self) -> None:
        """Fault injection: the host's process exits at once, as a machine losing power:
        no thread of it (a receiver mid hand-over included) runs another instruction."""
        os._exit(1)

    def node_id(self) -> str:
        """The Ray node this host runs on (several hosts may share one)."""
        return ray.get_runtime_context().get_node_id()

    def describe(self) -> dict:
        """The host, with the Ray node it runs on and its process (`migbed list`)."""
        d = super().describe()
        d["ray_node"] = {"node_id": self.node_id(), "ip": ray.util.get_node_ip_address(),
                         "pid": os.getpid()}
        return d


HostActor = ray.remote(Host)


def start_host_actor(config: HostConfig, *, detached: bool, namespace: str,
                     node_id: str | None = None):
    """Start the Host actor for `config` on its own node (by resource, or by node id)."""
    opts: dict = {"name": config.name, "namespace": namespace, "num_cpus": 0,
                  "max_concurrency": MAX_CONCURRENT_CALLS, "max_restarts": 0}
    if detached:
        opts["lifetime"] = "detached"
    if node_id is None:
        opts["resources"] = {host_resource(config.name): 1}
    else:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=False)
    return HostActor.options(**opts).remote(config.to_dict())
