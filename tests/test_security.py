"""Hostile input: stray and hostile connections to a receiving host, where sockets listen,
what the data plane never does with wire bytes, and bad command lines refused in one line."""

import ast
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hst

from cluster import cli
from cluster.launch.launcher import ClusterSpec
from nodes.host.service import HostService
from nodes.host.specs import GuestSpec, HostConfig
from nodes.migration.guestinfo import GuestInfo
from nodes.migration.settings import MigrationSettings
from nodes.migration.wire import records
from nodes.migration.wire.channel import TOKEN_BYTES, Ticket
from nodes.migration.wire.records import RecordType as RT

pytestmark = pytest.mark.inprocess

MiB = 1024 * 1024
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def hosts():
    src = HostService(HostConfig(name="src", memory_bytes=64 * MiB, metrics_port=None))
    dst = HostService(HostConfig(name="dst", memory_bytes=64 * MiB, metrics_port=None))
    src.create_guest(GuestSpec("g", 4 * MiB))
    yield src, dst
    src.shutdown()
    dst.shutdown()


def hostile_stream(info: GuestInfo, fill: int = 0xAB) -> bytes:
    """A well-formed stream that writes `fill` into every data page of the guest (no END;
    the page tables follow the data pages)."""
    pages = info.data_pages
    parts = [records.encode_image_header(), records.encode_domain_header("vp", 12),
             records.encode_record(RT.GUEST_INFO, info.to_dict()),
             records.encode_record(RT.P2M_FRAMES,
                              {"mfns": np.zeros(info.pages, "<u8").tobytes()}),
             records.encode_record(RT.STATIC_DATA_END)]
    for i in range(0, pages, records.MAX_BATCH_PAGES):
        pfns = np.arange(i, min(pages, i + records.MAX_BATCH_PAGES))
        data = np.full((len(pfns), 4096), fill, dtype=np.uint8)
        parts += [bytes(b) for b in records.encode_page_data(
            pfns, np.zeros(len(pfns), np.uint8), data)]
    return b"".join(parts)


def send(ticket: Ticket, payload: bytes) -> None:
    with socket.create_connection((ticket.address, ticket.port), timeout=5) as s:
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            s.recv(1 << 16)
        except OSError:
            pass


def test_stray_connection_without_the_token_writes_nothing(hosts):
    src, dst = hosts
    before = dst.frame_counts()
    info = src.guest_info("g", "mig-1")
    s = MigrationSettings(timeout_seconds=5)
    ticket = dst.prepare_incoming(info, s)
    recv = dst.incoming["mig-1"]
    frames = recv.dom.p2m.copy()
    payload = hostile_stream(info)
    good = bytes.fromhex(ticket.token)
    for token in (bytes(TOKEN_BYTES), good[::-1], good[:8]):    # wrong, reversed, short
        send(ticket, token + payload)
    assert recv.landing.pages_received == 0 and recv.status == "waiting"
    assert not dst.hv.memory.frames[frames].any(), "a stray wrote into reserved frames"
    # The real source still gets through, and the guest arrives intact.
    r = src.migrate_out("g", ticket, s)
    assert r.status == "completed"
    assert dst.incoming_report("mig-1", 5).status == "completed"
    assert dst.guest_digest("g") == r.source_digest
    dst.destroy_guest("g")
    assert dst.frame_counts() == before


def test_the_payload_would_write_with_the_token(hosts):
    """The control: the same bytes behind the right token do reach guest memory."""
    src, dst = hosts
    before = dst.frame_counts()
    info = src.guest_info("g", "mig-2")
    ticket = dst.prepare_incoming(info, MigrationSettings(timeout_seconds=2))
    recv = dst.incoming["mig-2"]
    send(ticket, bytes.fromhex(ticket.token) + hostile_stream(info))
    assert recv.wait(5) and recv.status == "failed"           # no END: refused in the end
    assert recv.landing.pages_received == info.data_pages
    dst.abandon_incoming("mig-2")
    assert dst.frame_counts() == before, "frames freed after the failed restore"


def test_too_many_strays_fail_the_migration_and_free_its_frames(hosts):
    src, dst = hosts
    before = dst.frame_counts()
    info = src.guest_info("g", "mig-3")
    ticket = dst.prepare_incoming(info, MigrationSettings(timeout_seconds=5))
    recv = dst.incoming["mig-3"]
    for _ in range(4):
        send(ticket, b"\0" * TOKEN_BYTES + b"junk")
    assert recv.wait(5) and recv.status == "failed" and "token" in recv.error
    dst.abandon_incoming("mig-3")
    assert dst.frame_counts() == before


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(hst.binary(max_size=2048))
def test_hostile_peer_with_the_token_gets_a_clean_refusal(hosts, data):
    """Any bytes from a peer that holds the token: the restore fails cleanly and frees
    every frame; the host keeps serving."""
    src, dst = hosts
    before = dst.frame_counts()
    mid = f"fz-{time.monotonic_ns()}"
    info = src.guest_info("g", mid)
    ticket = dst.prepare_incoming(info, MigrationSettings(timeout_seconds=2))
    recv = dst.incoming[mid]
    head = records.encode_image_header() + records.encode_domain_header("vp", 12)
    send(ticket, bytes.fromhex(ticket.token) + head + data)
    assert recv.wait(5) and recv.status == "failed" and recv.error
    dst.abandon_incoming(mid)
    assert dst.frame_counts() == before
    assert dst.ping() == "dst"


def test_sockets_bind_loopback_by_default(in_process):
    assert HostConfig().address == "127.0.0.1"
    assert HostConfig().metrics_address == "127.0.0.1"
    spec = ClusterSpec()
    assert spec.bind_address == "127.0.0.1" and spec.metrics_address == "127.0.0.1"
    assert all(c.address == "127.0.0.1" and c.metrics_address == "127.0.0.1"
               for c in spec.host_configs())
    tb = in_process(hosts=2, host_memory_bytes=64 * MiB)
    tb.create("host-0", GuestSpec("b", 4 * MiB))
    dst = tb.host("host-1").service
    ticket = dst.prepare_incoming(tb.host("host-0").call("guest_info", "b", "bind-1"),
                                  MigrationSettings(timeout_seconds=2))
    assert ticket.address == "127.0.0.1"
    assert dst.incoming["bind-1"].listener.sock.getsockname()[0] == "127.0.0.1"
    dst.abandon_incoming("bind-1")
    for h in tb.hosts.values():
        svc = h.service
        assert svc.metrics.endpoint.startswith("127.0.0.1:")
        assert svc.metrics._server.server_address[0] == "127.0.0.1"


def test_nothing_from_the_wire_is_unpickled_or_evaluated():
    """The data plane's modules import no deserialiser that runs code, and call no eval."""
    banned_modules = {"pickle", "cPickle", "cloudpickle", "marshal", "shelve", "dill"}
    banned_calls = {"eval", "exec", "compile", "__import__"}
    for path in sorted((ROOT / "nodes").rglob("*.py")):
        name = str(path.relative_to(ROOT))
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                        else [node.module or ""])
                assert not {m.split(".")[0] for m in mods} & banned_modules, (name, mods)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in banned_calls, (name, node.func.id)
    assert any("ext_hook=no_ext" in p.read_text()
               for p in (ROOT / "nodes" / "migration").rglob("*.py"))


# -- the CLI: every bad input is one line on stderr and exit 2 -----------------------------
BAD_CLI = [
    (["migrate", "--fault", "explode@setup"], "unknown fault"),
    (["migrate", "--fault", "stall-link@round0"], "needs a duration"),
    (["migrate", "--fault", "slow-link@round0"], "needs a bandwidth"),
    (["migrate", "--fault", "slow-link@handover:1MiB"], "cannot happen at"),
    (["migrate", "--fault", "refuse-memory@round1"], "cannot happen at"),
    (["migrate", "--fault", "stall-link@round1:90min"], "longer than"),
    (["migrate", "--fault", "stall-link@round1:-2s"], "cannot read"),
    (["migrate", "--fault", "slow-link@round1:0"], "must be positive"),
    (["migrate", "--fault", "cut-link@setup:5s"], "takes no argument"),
    (["migrate", "--fault", "kill-source@roundX"], "round0"),
    (["migrate", "--fault", "kill-source"], "KIND@STAGE"),
    (["migrate", "--timeout", "0"], "must be positive"),
    (["migrate", "--timeout", "soon"], "cannot read"),
    (["fault"], "required"),
    (["fault", "explode"], "invalid choice"),
    (["fault", "kill"], "required"),
    (["fault", "kill", "host-0"], "no migbed cluster is running"),
    (["evacuate"], "required"),
    (["evacuate", "host-0", "--concurrency", "0"], ">= 1"),
    (["evacuate", "host-0", "--concurrency", "2000"], "1..1024"),
    (["evacuate", "host-0", "--concurrency", "two"], "whole number"),
    (["evacuate", "host-0", "--bandwidth", "0"], "must be positive"),
    (["evacuate", "host-0"], "no migbed cluster is running"),
    (["soak", "--migrations", "0"], ">= 1"),
    (["soak", "--migrations", "many"], "whole number"),
    (["soak", "--migrations", "2000000"], "1..1000000"),
    (["soak", "--guests", "0"], ">= 1"),
    (["soak", "--guests", "100"], "1..64"),
    (["soak", "--guest-memory", "5000"], "multiple of the page size"),
    (["soak", "--guest-memory", "lots"], "cannot read"),
    (["soak", "--guests", "20", "--guest-memory", "16MiB"], "raise --host-memory"),
    (["soak", "--hosts", "1"], "at least 2 hosts"),
    (["soak", "--hosts", "65"], "--hosts must be"),
    (["soak", "--output", "/nonexistent/dir/out.json"], "not a writable folder"),
    (["soak", "--output", "/"], "is a directory"),
    (["soak", "--workload", "chaos"], "invalid choice"),
    (["soak", "--dirty-rate", "-5"], "dirty rate"),
    (["soak", "--warmup-migrations", "-1"], ">= 0"),
    (["soak", "--host-memory", "0"], "must be positive"),
    (["soak", "--profile", "sparc"], "unknown profile"),
]


@pytest.mark.parametrize("args,message", BAD_CLI, ids=[" ".join(a) for a, _ in BAD_CLI])
def test_bad_cli_input_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.setenv("MIGBED_HOME", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    rc = cli.main(args)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, (rc, err)
    assert len(lines) == 1 and lines[0].startswith("migbed: error: "), err
    assert message in lines[0], lines[0]


def test_count_of_distinct_bad_inputs_the_cli_refuses():
    """For the closing note: the CLI's bad inputs tested here and in test_cli.py."""
    from tests.test_cli import BAD_WITHOUT_CLUSTER
    distinct = {tuple(a) for a, _ in BAD_CLI} | {tuple(a) for a, _ in BAD_WITHOUT_CLUSTER}
    assert len(distinct) == len(BAD_CLI) + len(BAD_WITHOUT_CLUSTER) >= 60
