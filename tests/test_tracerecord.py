"""`migbed trace record` on real programs: the pages a program is known to write are the
trace's, its output and exit code pass through, a crash or a kill leaves nothing behind, a
static program or a missing native build is refused in one line; and a replaying guest's
position in its trace survives a migration."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from cluster.cli import main
from cluster.tracerecord import LIBRARY_ENV, RecorderUnavailable, check_traceable, record
from nodes.host.specs import GuestSpec
from nodes.migration.settings import MigrationSettings
from workloads.spec import WorkloadSpec
from workloads.tracefile import encode, load_trace, make_trace

MiB = 1 << 20

# Allocates 64 pages with the C library's malloc (the preloaded one), writes the even ones,
# reads the odd ones (a read is no write), says where they are, and exits with 5 (or is
# killed by SIGSEGV).
KNOWN = textwrap.dedent("""
    import ctypes, os, signal, sys
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    p = libc.malloc(65 * 4096)
    base = (p + 4095) // 4096 * 4096
    for i in range(0, 64, 2):
        ctypes.memset(base + i * 4096, 7, 100)
    assert all(ctypes.string_at(base + i * 4096, 8) == bytes(8) for i in range(1, 64, 2))
    print(base, flush=True)
    if sys.argv[1] == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    sys.exit(5)
""")


@pytest.fixture
def recorder(uffd_kernel):
    """The native allocator (`make setup` builds it); under CI its absence fails."""
    from cluster.tracerecord import native_library
    try:
        return native_library()
    except RecorderUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))


def known_pages(tmp_path: Path, mode: str, capfd) -> tuple[object, list[int], list[int]]:
    script = tmp_path / "known.py"
    script.write_text(KNOWN)
    result = record([sys.executable, str(script), mode], tmp_path / "k.mbtrace")
    address = int(capfd.readouterr().out.split()[-1])
    trace = load_trace(str(tmp_path / "k.mbtrace"))
    first = (address - trace.header["region_base"]) // 4096
    return result, [first + i for i in range(0, 64, 2)], [first + i for i in range(1, 64, 2)]


@pytest.mark.uffd
def test_the_trace_holds_exactly_the_pages_a_program_wrote(recorder, tmp_path, capfd):
    result, even, odd = known_pages(tmp_path, "exit", capfd)
    assert result.exit_code == 5, "the program's exit code passes through"
    trace = load_trace(str(tmp_path / "k.mbtrace"))
    seen = set(trace.pages.tolist())
    assert set(even) <= seen, "every page it wrote is in the trace (the last scan at exit)"
    assert not set(odd) & seen, "no page it left alone is"
    assert trace.header["ended"] == "exited" and trace.header["argv"][0] == sys.executable
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.mbtrace", "known.py"]


# Maps 16 anonymous pages (as pymalloc takes its arenas), writes pages 0-3, unmaps them, maps
# them again: the same pages, zero again; writes page 8 and says where the mapping is.
MAPS = textwrap.dedent("""
    import ctypes, mmap
    libc = ctypes.CDLL(None)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    flags, prot = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, mmap.PROT_READ | mmap.PROT_WRITE
    a = libc.mmap(None, 16 * 4096, prot, flags, -1, 0)
    for i in range(4):
        ctypes.memset(a + i * 4096, 9, 4096)
    assert libc.munmap(a, 16 * 4096) == 0
    b = libc.mmap(None, 16 * 4096, prot, flags, -1, 0)
    assert ctypes.string_at(b, 4 * 4096) == bytes(4 * 4096), "a new mapping is zero"
    ctypes.memset(b + 8 * 4096, 1, 10)
    print(a, b, flush=True)
""")


@pytest.mark.uffd
def test_anonymous_mappings_are_traced_and_reused_zeroed(recorder, tmp_path, capfd):
    """Python keeps pymalloc under the recorder: its arenas (anonymous private mmaps) come
    from the traced region, a munmapped one is zero when mapped again. (Pages 0-3 are in
    the trace only if a scan came between their writes and the new mapping: not asserted.)"""
    script = tmp_path / "maps.py"
    script.write_text(MAPS)
    result = record([sys.executable, str(script)], tmp_path / "m.mbtrace")
    assert result.exit_code == 0
    a, b = (int(x) for x in capfd.readouterr().out.split()[-2:])
    trace = load_trace(str(tmp_path / "m.mbtrace"))
    first = (a - trace.header["region_base"]) // 4096
    assert 0 <= first < trace.header["region_pages"], "the mapping is in the traced region"
    assert a == b, "an unmapped span is reused"
    seen = set(trace.pages.tolist())
    assert first + 8 in seen
    assert not {first + i for i in (4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15)} & seen


@pytest.mark.uffd
def test_a_crashing_program_leaves_its_trace_and_nothing_else(recorder, tmp_path, capfd):
    result, even, _ = known_pages(tmp_path, "crash", capfd)
    assert result.exit_code == 128 + signal.SIGSEGV
    trace = load_trace(str(tmp_path / "k.mbtrace"))
    assert trace.header["ended"] == "killed by SIGSEGV"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.mbtrace", "known.py"]


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


@pytest.mark.uffd
def test_killing_the_recorder_kills_the_program_and_leaves_no_file(recorder, tmp_path):
    rec = subprocess.Popen([sys.executable, "-m", "cluster.cli", "trace", "record", "-o",
                            str(tmp_path / "t.mbtrace"), "--", sys.executable, "-c",
                            "import time; time.sleep(60)"])
    deadline = time.monotonic() + 20
    while not (kids := _children(rec.pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert kids, "the program started"
    rec.send_signal(signal.SIGKILL)
    rec.wait()
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{k}").exists() for k in kids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(Path(f"/proc/{k}").exists() for k in kids), "the program died with it"
    assert list(tmp_path.iterdir()) == []


def test_a_static_program_and_a_missing_build_are_refused_in_one_line(tmp_path, monkeypatch,
                                                                      capsys):
    static = tmp_path / "static"
    elf = bytearray(64)
    elf[:6] = b"\x7fELF\x02\x01"
    static.write_bytes(bytes(elf))                  # ELF64, no program headers: no PT_INTERP
    static.chmod(0o755)
    with pytest.raises(RecorderUnavailable, match="statically linked") as exc:
        check_traceable([str(static)])
    assert "\n" not in str(exc.value)
    monkeypatch.setenv(LIBRARY_ENV, str(tmp_path / "none.so"))
    assert main(["trace", "record", "-o", str(tmp_path / "x"), "--", "true"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "make setup" in err


@pytest.mark.parametrize("vcpu,vcpus", [
    ("thread", 1), pytest.param("process", 1, marks=pytest.mark.uffd),
    pytest.param("process", 2, marks=pytest.mark.uffd)])
def test_a_replay_continues_where_it_stopped_after_a_migration(in_process, request, vcpu,
                                                                vcpus):
    """A trace of 120 intervals of 40 distinct pages (1.2 s): migrated part way, the guest
    has written exactly the trace's page writes once it is over, no interval twice (with
    two vCPUs, each its own share, its position in its own context)."""
    if vcpu == "process":
        request.getfixturevalue("uffd_kernel")
    rng = np.random.default_rng(3)
    per = [rng.choice(600, 40, replace=False) for _ in range(120)]
    head = {"program": "t", "argv": ["t"], "machine": {}, "interval_seconds": 0.01,
            "children": 0, "page_size": 4096, "region_pages": 600, "duration_seconds": 1.2,
            "ended": "exited", "recorded_at": "now"}
    data = encode(make_trace(head, [0.01 * (i + 1) for i in range(120)], per))
    tb = in_process(hosts=2, host_memory_bytes=64 * MiB)
    tb.create("host-0", GuestSpec("r", 0, workload=WorkloadSpec(
        "trace", trace_bytes=data), vcpu=vcpu, vcpus=vcpus))
    time.sleep(0.15)
    report = tb.migrate("r", "host-1", MigrationSettings(link_bytes_per_second=64 * MiB))
    assert report.status.value == "completed"
    dst = tb.host("host-1")
    deadline = time.monotonic() + 20
    while dst.call("guest_status", "r")["pages_written_total"] < 120 * 40 \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.1)
    assert dst.call("guest_status", "r")["pages_written_total"] == 120 * 40
    tb.destroy("r")


@pytest.mark.uffd
def test_a_program_that_outgrows_the_region_is_told_in_one_line(recorder, tmp_path, capfd):
    lines = []
    result = record([sys.executable, "-c", "b = bytearray(8 << 20); b[-1] = 1"],
                    tmp_path / "o.mbtrace", region_bytes=2 << 20, say=lines.append)
    assert result.exit_code == 0, "its allocations beyond the region still succeed"
    assert len(lines) == 1 and "outgrew" in lines[0] and "--region" in lines[0]
    assert load_trace(str(tmp_path / "o.mbtrace")).header["outgrew_region"] is True
