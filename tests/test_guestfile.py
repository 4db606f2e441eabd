"""`migbed create --from FILE.toml`: [[guest]] tables with create's own keys, [[template]]
tables spread over hosts, every guest checked before any boots."""

import pytest

from cluster.guestfile import create_many, read_guest_file
from nodes.errors import ConfigError, DomainExistsError

MiB = 1024 * 1024
HOSTS = ["host-0", "host-1", "host-2"]


def _write(tmp_path, text):
    p = tmp_path / "guests.toml"
    p.write_text(text)
    return p


def test_guest_and_template_tables(tmp_path):
    p = _write(tmp_path, """
[[guest]]
name = "web"
host = "host-1"
memory = "8MiB"
workload = "hotset"
dirty_rate = 2000
hot_fraction = 0.2
vcpus = 1

[[template]]
count = 4
name = "vm{i}"
hosts = ["host-0", "host-2"]
memory = "4MiB"
pattern = "uniform"
dirty_rate = "500"
seed = 10
""")
    guests = read_guest_file(p, HOSTS)
    assert [(h, s.name) for h, s in guests] == [
        ("host-1", "web"), ("host-0", "vm0"), ("host-2", "vm1"), ("host-0", "vm2"),
        ("host-2", "vm3")]
    web = guests[0][1]
    assert web.memory_bytes == 8 * MiB and web.workload.pattern == "hotset"
    assert web.workload.rate_pages_per_second == 2000 and web.workload.hot_fraction == 0.2
    assert [s.workload.seed for _, s in guests[1:]] == [10, 11, 12, 13]


@pytest.mark.parametrize("text, message", [
    ('[[guest]]\nname = "a"\nhost = "host-0"\nmemory = "4MiB"\nbogus = 1', "unknown key"),
    ('[[guest]]\nname = "a"\nhost = "host-9"\nmemory = "4MiB"', "not a host"),
    ('[[guest]]\nname = "a"\nhost = "host-0"', "needs a memory"),
    ('[[guest]]\nname = "a"\nhost = "host-0"\nmemory = "4MiB"\n'
     '[[guest]]\nname = "a"\nhost = "host-1"\nmemory = "4MiB"', "two guests"),
    ('[[template]]\ncount = 0\nmemory = "4MiB"', "count"),
    ('[[template]]\ncount = 2\nname = "x"\nmemory = "4MiB"', "{i}"),
    ('[[guest]]\nname = "a"\nhost = "host-0"\nmemory = "4MiB"\nworkload = "no"', "workload"),
    ("[[guest]\n", "not TOML"),
    ("[other]\n", "unknown table"),
])
def test_bad_files_are_one_line(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message) as exc:
        read_guest_file(_write(tmp_path, text), HOSTS)
    assert "\n" not in str(exc.value)


@pytest.mark.inprocess
def test_create_many_boots_them_all(in_process, tmp_path):
    tb = in_process(hosts=3, host_memory_bytes=64 * MiB)
    p = _write(tmp_path, '[[template]]\ncount = 7\nname = "t{i}"\nmemory = "2MiB"\n')
    created = create_many(tb, read_guest_file(p, tb.hosts))
    assert sorted(d["name"] for d in created) == sorted(f"t{i}" for i in range(7))
    assert sorted(g["host"] for g in tb.guests()).count("host-0") == 3
    with pytest.raises(DomainExistsError):
        create_many(tb, read_guest_file(p, tb.hosts))
    assert len(tb.guests()) == 7, "refused before any booted"
