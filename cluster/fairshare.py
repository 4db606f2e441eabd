"""The cluster's network as links with capacities, and the max-min fair rates of the
migrations crossing them.

A host has a link of its own (its NIC, `host_link`), one way out and one way in. Hosts may
stand in racks: traffic between two racks also crosses the source rack's uplink out and the
destination rack's uplink in (`uplink`), shared by every migration crossing it at the time,
so concurrent cross-rack migrations contend as they would in a data centre. Without racks a
migration crosses its source's link out and its destination's link in.

The allocator is progressive filling (max-min fairness, as TCP flows on a bottleneck tend
to): every migration's rate grows at the same pace until a link it crosses is full or it
reaches its own cap (`--bandwidth`, `--rate-limit`); those are frozen, the others go on.
The scheduler runs it whenever a migration starts or ends and each sender paces itself at
its rate (`nodes.host.pacedrates`): no two processes share a pacer, so it holds between
processes on one machine and between machines alike.
"""

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from nodes.errors import ConfigError
from nodes.units import parse_bandwidth

UNLIMITED = float("inf")
_BITS = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKMGT]?)(?:bit(?:/s|ps)?|bps)\s*$")
_BIT_SCALE = {"": 1, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def parse_link_rate(value: str, what: str) -> float:
    """A link's speed in bytes/s: as networks say it (`10Gbit`, `1Gbit/s`, `100Mbps`,
    decimal prefixes, bits) or as migbed's bandwidths do (`32MiB`, per second)."""
    m = _BITS.match(value) if isinstance(value, str) else None
    if m is None:
        try:
            return parse_bandwidth(value, what)
        except ConfigError:
            raise ConfigError(f"{what}: cannot read {value!r} as a link's speed; write e.g. "
                              "10Gbit, 100Mbps or 64MiB (bytes a second)") from None
    rate = float(m.group(1)) * _BIT_SCALE[m.group(2)] / 8
    if not rate > 0:
        raise ConfigError(f"{what} must be a positive rate, got {value!r}")
    return rate


@dataclass(frozen=True)
class Topology:
    """Which rack each host stands in, and the links' speeds (bytes/s; None: unlimited)."""

    racks: Mapping[str, int] = field(default_factory=dict)     # host -> rack number
    host_link_bytes_per_second: float | None = None
    uplink_bytes_per_second: float | None = None

    @classmethod
    def striped(cls, hosts: Sequence[str], racks: int, host_link: float | None = None,
                uplink: float | None = None) -> "Topology":
        """`hosts` in `racks` racks, consecutive hosts together (host-0..3 in rack 0 of 4
        racks of 16 hosts), so a rack is a block of names, as in a data centre's rows."""
        if isinstance(racks, bool) or not isinstance(racks, int) or racks < 1:
            raise ConfigError(f"racks must be a whole number >= 1, got {racks!r}")
        if racks > max(1, len(hosts)):
            raise ConfigError(f"{racks} racks for {len(hosts)} hosts: a rack needs a host")
        for name, rate in (("--host-link", host_link), ("--uplink", uplink)):
            if rate is not None and not rate > 0:
                raise ConfigError(f"{name} must be a positive rate, got {rate!r}")
        per = -(-len(hosts) // racks) if hosts else 1
        return cls({h: i // per for i, h in enumerate(hosts)}, host_link, uplink)

    def rack_of(self, host: str) -> int | None:
        return self.racks.get(host)

    def hosts_in(self, rack: int) -> list[str]:
        return [h for h, r in self.racks.items() if r == rack]

    def links(self, source: str, destination: str) -> list[str]:
        """The links a migration from `source` to `destination` crosses, by name."""
        out = [f"{source}/out", f"{destination}/in"]
        a, b = self.rack_of(source), self.rack_of(destination)
        if a is not None and b is not None and a != b:
            out[1:1] = [f"rack-{a}/up", f"rack-{b}/down"]
        return out

    def capacity(self, link: str) -> float:
        if link.startswith("rack-"):
            rate = self.uplink_bytes_per_second
        else:
            rate = self.host_link_bytes_per_second
        return UNLIMITED if rate is None else float(rate)

    def to_dict(self) -> dict:
        return {"racks": dict(self.racks), "host_link_bytes_per_second":
                self.host_link_bytes_per_second,
                "uplink_bytes_per_second": self.uplink_bytes_per_second}

    @classmethod
    def from_dict(cls, d: Mapping | None) -> "Topology":
        d = d or {}
        return cls(dict(d.get("racks") or {}), d.get("host_link_bytes_per_second"),
                   d.get("uplink_bytes_per_second"))


def max_min_rates(flows: Mapping[str, tuple[Sequence[str], float]],
                  capacity) -> dict[str, float]:
    """Max-min fair rates: `flows` is id -> (the links it crosses, its own cap; inf for
    none), `capacity(link)` a link's bytes/s (inf for unlimited). A flow that no link and no
    cap bounds gets inf (it runs as fast as the machine lets it)."""
    rates = dict.fromkeys(flows, 0.0)
    active = set(flows)
    left = {ln: capacity(ln) for f in flows.values() for ln in f[0]}
    while active:
        users: dict[str, int] = {}
        for fid in active:
            for ln in flows[fid][0]:
                users[ln] = users.get(ln, 0) + 1
        # The step every active flow can still take: the tightest link's equal share, or
        # the nearest own cap.
        step = min([left[ln] / n for ln, n in users.items()]
                   + [flows[f][1] - rates[f] for f in active])
        if step == UNLIMITED:
            for fid in active:
                rates[fid] = UNLIMITED
            break
        for fid in active:
            rates[fid] += step
        for ln, n in users.items():
            left[ln] -= step * n
        full = {ln for ln in users if left[ln] <= 1e-9 * max(1.0, capacity(ln))}
        done = {f for f in active if rates[f] >= flows[f][1] - 1e-9 * max(1.0, flows[f][1])
                or full.intersection(flows[f][0])}
        active -= done
    return rates
