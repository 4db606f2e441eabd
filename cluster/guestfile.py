"""Booting many guests in one command: `migbed create --from FILE.toml`.

The file holds `[[guest]]` tables, one guest each, whose keys are `create`'s own (its
options with underscores, or their scenario keys, both from the field table
`cluster.fieldtable`): `name`, `host`, `memory`, `mode`, `dma`, `vcpu`, `vcpus`, `workload`
(or `pattern`), `dirty_rate`, `seed`, `hot_fraction`, `fill`, ...; and `[[template]]` tables,
`count` guests alike named `name` with `{i}` in it (default `vm{i}`), spread round robin over
`hosts` (default every host of the cluster) and given `seed` + i, so their workloads differ.

Every guest is checked before any boots (names unique in the file and the cluster, hosts
known, values read by the field table's readers); then they boot a host's guests one after
another and the hosts all at once, so 128 guests on 32 hosts take four rounds, not 128 calls.
"""

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from cluster.fieldtable import GUEST_FIELDS, WORKLOAD_FIELDS
from cluster.inputfile import read_toml
from nodes.errors import ConfigError, DomainExistsError
from nodes.host.specs import GuestSpec
from nodes.migration.fields import Field
from nodes.xen.hypervisor import check_guest_name
from workloads.spec import WorkloadSpec

MAX_GUESTS = 100_000
MAX_FILE_BYTES = 4 * 1024 * 1024
GUEST_ROWS = [f for f in GUEST_FIELDS if f.name != "warmup_seconds"]


def _keys() -> dict[str, Field]:
    """Every key a guest table may have -> its row: the flag's name with underscores and
    the scenario key (`--dirty-rate`, dirty_rate; `--workload`, workload and pattern)."""
    out: dict[str, Field] = {}
    for row in (*GUEST_ROWS, *WORKLOAD_FIELDS):
        names = [row.toml, row.name, *(a.lstrip("-").replace("-", "_") for a in (
            row.flag, *row.aliases) if a)]
        if row.name == "guest_memory_bytes":
            names.append("memory")
        for n in names:
            if n:
                out[n] = row
    return out


KEYS = _keys()


def guest_spec(table: dict, where: str) -> GuestSpec:
    """One guest's spec from its table's keys (`name` and the field table's keys)."""
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key in ("name", "host"):
            continue
        row = KEYS.get(key)
        if row is None:
            raise ConfigError(f"{where}: unknown key {key!r}; keys: name, host, "
                              f"{', '.join(sorted(set(KEYS)))}")
        if row.name in values:
            raise ConfigError(f"{where}: {key!r} given twice (under two names)")
        values[row.name] = row.read(value, f"{where}: {key}")
    name = table.get("name")
    if not isinstance(name, str):
        raise ConfigError(f"{where}: every guest needs a name (name = \"vm1\")")
    check_guest_name(name)
    wl = {r.name: values.pop(r.name) for r in WORKLOAD_FIELDS if r.name in values}
    memory = values.pop("guest_memory_bytes", None)
    if memory is None:
        raise ConfigError(f"{where}: {name} needs a memory size (memory = \"64MiB\")")
    return GuestSpec(name=name, memory_bytes=memory, workload=WorkloadSpec(**wl), **values)


def read_guest_file(path: str | Path, hosts: Iterable[str]) -> list[tuple[str, GuestSpec]]:
    """(host, spec) for every guest of the file, checked; one-line ConfigError otherwise."""
    hosts = list(hosts)
    path = Path(path)
    data = read_toml(path, "a guest file", MAX_FILE_BYTES)
    unknown = set(data) - {"guest", "template"}
    if unknown:
        raise ConfigError(f"{path}: unknown table {sorted(unknown)[0]!r}; a guest file has "
                          "[[guest]] and [[template]] tables")
    out: list[tuple[str, GuestSpec]] = []
    for i, table in enumerate(_tables(data, "guest", path)):
        where = f"{path} [[guest]] #{i + 1}"
        out.append((_host(table.get("host"), hosts, where), guest_spec(table, where)))
    for i, table in enumerate(_tables(data, "template", path)):
        out.extend(_expand(dict(table), hosts, f"{path} [[template]] #{i + 1}", len(out)))
    names = [s.name for _, s in out]
    dup = next((n for n, c in _counts(names).items() if c > 1), None)
    if dup:
        raise ConfigError(f"{path}: two guests are named {dup!r}")
    if not out:
        raise ConfigError(f"{path} names no guest ([[guest]] or [[template]] with a count)")
    return out


def _counts(names: list[str]) -> dict[str, int]:
    c: dict[str, int] = {}
    for n in names:
        c[n] = c.get(n, 0) + 1
    return c


def _tables(data: dict, key: str, path: Path) -> list[dict]:
    tables = data.get(key, [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"{path}: write [[{key}]] tables (an array of tables)")
    return tables


def _host(host: Any, hosts: list[str], where: str) -> str:
    if not isinstance(host, str) or host not in hosts:
        raise ConfigError(f"{where}: host {host!r} is not a host of the cluster "
                          f"({', '.join(hosts)})")
    return host


def _expand(table: dict, hosts: list[str], where: str,
            so_far: int) -> list[tuple[str, GuestSpec]]:
    count = table.pop("count", None)
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_GUESTS \
            - so_far:
        raise ConfigError(f"{where}: count must be a whole number 1..{MAX_GUESTS - so_far}, "
                          f"got {count!r}")
    pattern = table.pop("name", "vm{i}")
    if not isinstance(pattern, str) or "{i}" not in pattern:
        raise ConfigError(f"{where}: name must hold {{i}} (e.g. \"web{{i}}\"), got {pattern!r}")
    spread = table.pop("hosts", hosts)
    if not isinstance(spread, list) or not spread:
        raise ConfigError(f"{where}: hosts must be a list of hosts, e.g. [\"host-0\"]")
    spread = [_host(h, hosts, where) for h in spread]
    if "host" in table:
        raise ConfigError(f"{where}: a template spreads over hosts = [...], not host")
    seed = table.pop("seed", 0)
    out = []
    for i in range(count):
        spec = guest_spec({**table, "name": pattern.replace("{i}", str(i)),
                           "seed": seed + i if isinstance(seed, int) else seed}, where)
        out.append((spread[i % len(spread)], spec))
    return out


def create_many(tb, guests: list[tuple[str, GuestSpec]],
                on_created: Callable[[str, dict], None] | None = None) -> list[dict]:
    """Boot `guests` ((host, spec) pairs): refused before any boots if a name is taken;
    each host's one after another, the hosts at once. Returns what each create answered."""
    taken = {g["name"] for g in tb.guests()} & {s.name for _, s in guests}
    if taken:
        raise DomainExistsError(f"a guest named {sorted(taken)[0]!r} already exists in the "
                                "cluster")
    per_host: dict[str, list[GuestSpec]] = {}
    for host, spec in guests:
        per_host.setdefault(host, []).append(spec)
    created: list[dict] = []
    rounds = max(len(v) for v in per_host.values())
    for k in range(rounds):
        batch = [(h, specs[k]) for h, specs in per_host.items() if k < len(specs)]
        pending = [(h, tb.host(h).call_async("create_guest", spec)) for h, spec in batch]
        for h, p in pending:
            d = p.result(120.0)
            created.append(d)
            if on_created is not None:
                on_created(h, d)
    return created
