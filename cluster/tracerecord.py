"""`migbed trace record`: run an unmodified program and record which pages of its heap it
writes, every interval, into a trace file (`workloads.tracefile`).

How: the program runs with `LD_PRELOAD` = the native allocator (`cluster/native/
tracealloc.c`), which serves its heap from one region and hands this process the region and a
userfaultfd registered for write-protect async over a unix socket (SCM_RIGHTS). Every interval
this process scans the program's pagemap with PAGEMAP_SCAN (`cluster.tracetarget`): the
pages written since the last scan, protected again. A few written pages of a scan are read
through /proc/PID/mem (`ContentSampler`) for the content figures, within a CPU budget. The
allocator also serves the program's anonymous private mmaps from the region, so Python keeps
its own allocator (pymalloc's arenas are such mmaps) and its objects are traced as laid out
without the recorder.

The program's own output and exit code pass through; it dies with this process (PDEATHSIG),
and nothing is left on disk but the finished trace (written to a temporary name, renamed).
"""

import ctypes
import os
import platform
import resource
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from cluster.tracetarget import Target
from nodes.errors import ConfigError
from nodes.host.userfault import PAGE_BYTES
from workloads.tracefile import encode, make_trace
from workloads.tracestats import distinct_pages

NATIVE_DIR = Path(__file__).resolve().parent / "native"
LIBRARY = NATIVE_DIR / "libmigbedtrace.so"
LIBRARY_ENV = "MIGBED_TRACE_LIB"
HELLO_TIMEOUT_SECONDS = 10.0
# The content sampler's CPU, at most this share of the recording's time: it samples a scan
# only while within it (so every scan of a light program, one in a few of a heavy one), since
# its CPU is taken from the cores the program runs on ...
SAMPLE_BUDGET = 0.05
MAX_UNSAMPLED = 3           # ... but never more scans in a row: every phase of it is sampled
_PR_SET_PDEATHSIG = 1


class RecorderUnavailable(ConfigError):
    """The native allocator is not built, or the program cannot be traced."""


@dataclass
class RecordResult:
    exit_code: int              # the program's (128 + signal when a signal ended it)
    output: Path
    summary: str                # one line: what was recorded
    program_seconds: float      # from its start to its exit (wall clock)
    program_cpu_seconds: float  # its user + system time (its reaped children's too)
    page_writes: int = 0        # pages written, summed over the intervals
    pages_touched: int = 0      # distinct pages written
    recorder_cpu_seconds: float = 0.0   # this process's own, while it recorded


def native_library() -> Path:
    """The built allocator; RecorderUnavailable saying how to build one otherwise."""
    path = Path(os.environ.get(LIBRARY_ENV) or LIBRARY)
    if not path.is_file():
        raise RecorderUnavailable(
            f"the trace recorder's native allocator is not built ({path}): run `make setup` "
            "(it builds it with gcc, or with a C compiler from PyPI: pip install ziglang)")
    return path


def check_traceable(argv: list[str]) -> str:
    """The program's path; one line if it cannot be traced (missing, or statically linked:
    LD_PRELOAD cannot reach a static program's allocator)."""
    if not argv:
        raise ConfigError("give the program to record after `--`, e.g. -- sort big.txt")
    exe = shutil.which(argv[0])
    if exe is None:
        raise ConfigError(f"no program {argv[0]!r} (not found on PATH)")
    with open(exe, "rb") as f:
        head = f.read(1 << 16)
    if head[:4] == b"\x7fELF" and not _has_interpreter(head):
        raise RecorderUnavailable(f"{exe} is statically linked: LD_PRELOAD cannot reach its "
                                  "allocator, so its writes cannot be recorded")
    return exe


def _has_interpreter(elf: bytes) -> bool:
    """Whether an ELF (64-bit little-endian) has a PT_INTERP: it is dynamically linked."""
    if elf[4] != 2 or elf[5] != 1:
        return True                 # not ELF64 LE: let the loader decide
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        at = phoff + i * phentsize
        if at + 4 > len(elf):
            return True
        if struct.unpack_from("<I", elf, at)[0] == 3:       # PT_INTERP
            return True
    return False


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class Recording:
    """One program under the recorder: start it, take its region, scan until it ends (or the
    duration), and build the trace."""

    def __init__(self, argv: list[str], interval_seconds: float, duration_seconds: float,
                 region_bytes: int, say: Callable[[str], None]):
        self.argv, self.interval = argv, interval_seconds
        self.duration, self.region_bytes, self.say = duration_seconds, region_bytes, say
        self.times: list[float] = []
        self.pages: list[np.ndarray] = []
        self.children = 0
        self.outgrown = False
        self.exiting = False            # the program said it exits: a last scan, then ack
        self.ended = "exited"
        self.hello: tuple[int, int, int, int, int] | None = None   # an exec'd image's
        self.sampling_seconds = 0.0     # the content sampler's CPU so far
        self.unsampled = 0              # scans in a row left unsampled

    def start(self, library: Path, stdout: int | None = None) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ, LD_PRELOAD=str(library), MIGBED_TRACE_FD=str(theirs.fileno()),
                   MIGBED_TRACE_PARENT=str(os.getpid()),
                   MIGBED_TRACE_REGION=str(self.region_bytes))
        self.started = time.monotonic()
        try:
            self.proc = subprocess.Popen(self.argv, env=env, pass_fds=(theirs.fileno(),), stdout=stdout,
                                         preexec_fn=_die_with_parent)
        finally:
            theirs.close()
        self.sock = ours
        self.sock.setblocking(False)

    def take_region(self) -> tuple[int, int, int, int, int]:
        """(uffd, base, length, pid, address of its bump pointer) from the allocator's
        hello; one line if none comes."""
        deadline = time.monotonic() + HELLO_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            msg = self._next_message(0.05)
            if msg is not None:
                tag, words, fds = msg
                if tag == b"H" and fds:
                    return fds[0], words[0], words[1], words[2], words[4]
                if tag == b"E":
                    raise RecorderUnavailable(
                        "the program's allocator could not register its region for write "
                        f"tracking: {os.strerror(words[3])} (userfaultfd write-protect async "
                        "needs Linux 6.7+, and root or vm.unprivileged_userfaultfd)")
            elif self.proc.poll() is not None:
                raise RecorderUnavailable(
                    "the program ended before the recorder's allocator started in it (is it "
                    "statically linked, or setuid?): nothing recorded")
        raise RecorderUnavailable("the program's allocator never said hello: nothing recorded")

    def _next_message(self, timeout: float) -> tuple[bytes, list[int], list[int]] | None:
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return None
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.sock, 64, 2)
        except BlockingIOError:
            return None
        if not data:                    # every copy of the program's end is closed
            return None
        words = list(struct.unpack_from(f"<{(len(data) - 8) // 8}Q", data, 8)) \
            if len(data) >= 16 else []
        return data[:1], words, fds

    def _drain(self) -> int:
        """Read the allocator's messages (how many): children, the region outgrown, the
        program exiting, and a new hello when the program exec'd (a new image, a new region:
        kept in `hello`, to scan it next)."""
        n = 0
        while (msg := self._next_message(0)) is not None:
            n += 1
            tag, words, fds = msg
            if tag == b"C":
                self.children += 1
            elif tag == b"X":
                self.exiting = True
            elif tag == b"O" and not self.outgrown:
                self.outgrown = True
                self.say(f"the program outgrew the traced region ({self.region_bytes >> 20} "
                         "MiB): its allocations beyond it are not recorded; give --region")
            if tag == b"H" and fds:
                if self.hello is not None:
                    os.close(self.hello[0])
                self.hello = (fds.pop(0), words[0], words[1], words[2], words[4])
            for fd in fds:
                os.close(fd)
        return n

    def _sleep_until(self, deadline: float) -> None:
        """Sleep until `deadline`, reading the allocator's messages meanwhile; at once when
        the program says it exits (its last scan is due now: it waits for it)."""
        while (left := deadline - time.monotonic()) > 0 and not self.exiting:
            ready, _, _ = select.select([self.sock], [], [], left)
            if ready and not self._drain():
                time.sleep(max(0.0, deadline - time.monotonic()))  # its end closed: no more
                return

    def _ack(self) -> None:
        """Let the exiting program go, and see it end (its run time is measured to there)."""
        self.exiting = False
        try:
            self.sock.send(b"A")
        except OSError:
            return                          # it did not wait
        try:
            self.proc.wait(timeout=max(self.interval, 0.05))
        except subprocess.TimeoutExpired:
            pass                            # it runs on (other exit work): scanned on

    def scan_loop(self, target: Target) -> None:
        """Scan every interval until the program ends or the duration is up."""
        start = time.monotonic()
        tick = 1
        while self.proc.poll() is None:
            last = self.exiting             # it said it exits: scan at once, then let it go
            if not last:
                self._sleep_until(start + tick * self.interval)
                tick += 1
                last = self.exiting
            try:
                written = target.written()
            except OSError:
                written = None          # the program is gone, or exec'd (a hello follows)
            self._drain()
            if self.hello is not None:
                target.switch(*self.hello)
                self.hello = None
            if written is None:
                continue
            now = time.monotonic() - start
            self.times.append(now)
            self.pages.append(written)
            if self.sampling_seconds <= SAMPLE_BUDGET * now or self.unsampled >= MAX_UNSAMPLED:
                began = time.thread_time()
                target.sampler.sample(len(self.times) - 1, written)
                self.sampling_seconds += time.thread_time() - began
                self.unsampled = 0
            else:
                self.unsampled += 1
            if last:
                self._ack()
            if self.duration and now >= self.duration:
                self.ended = "duration"
                break

    def header(self, length: int, base: int) -> dict:
        return {"program": os.path.basename(self.argv[0]), "argv": list(self.argv),
                "machine": {"system": platform.system(), "release": platform.release(),
                            "arch": platform.machine(), "cpus": os.cpu_count() or 1},
                "interval_seconds": self.interval, "children": self.children,
                "page_size": PAGE_BYTES, "region_pages": length // PAGE_BYTES,
                "region_base": base,
                "duration_seconds": round(self.times[-1] if self.times else 0.0, 6),
                "ended": self.ended, "outgrew_region": self.outgrown,
                "recorded_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "recorder": "LD_PRELOAD libmigbedtrace (heap and anonymous mmaps)"}


def _write(rec: Recording, target: Target, tmp: Path, output: Path):
    """The trace, written to `tmp` and renamed to `output` (no half-written file)."""
    trace = make_trace(rec.header(target.length, target.base), rec.times, rec.pages,
                       target.samples)
    tmp.write_bytes(encode(trace))
    os.replace(tmp, output)
    return trace


def record(argv: list[str], output: Path, interval_seconds: float = 0.01,
           duration_seconds: float = 0.0, region_bytes: int = 1 << 30,
           say: Callable[[str], None] = lambda line: print(f"migbed trace: {line}",
                                                           file=sys.stderr),
           quiet: bool = False) -> RecordResult:
    """Run `argv` under the recorder and write its trace to `output` (see the module
    docstring); `duration_seconds` 0: until the program ends; `quiet`: discard its output."""
    if not 0.001 <= interval_seconds <= 10:
        raise ConfigError(f"--interval must be 1ms to 10s, got {interval_seconds}s")
    library = native_library()
    check_traceable(argv)
    output = Path(output)
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    rec = Recording(argv, interval_seconds, duration_seconds, region_bytes, say)
    cpu_before, own_before = _children_cpu_seconds(), _own_cpu_seconds()
    rec.start(library, subprocess.DEVNULL if quiet else None)
    try:
        target = Target(*rec.take_region())
        try:
            rec.scan_loop(target)
        finally:
            target.close()
            rec.sock.close()                # its exit no longer waits for a last scan
        if rec.ended == "duration":       # the trace now; the program runs on
            trace = _write(rec, target, tmp, output)
            say(f"recording stopped after {duration_seconds:g}s ({output} written); the "
                "program runs on")
        code = rec.proc.wait()
        program_seconds = time.monotonic() - rec.started
        program_cpu = _children_cpu_seconds() - cpu_before
        own_cpu = _own_cpu_seconds() - own_before
        if code < 0 and rec.ended != "duration":
            rec.ended = f"killed by {signal.Signals(-code).name}"
            say(f"the program was {rec.ended}; the trace holds what it wrote until then")
        if rec.ended != "duration":
            trace = _write(rec, target, tmp, output)
    except BaseException:
        if rec.proc.poll() is None:
            rec.proc.kill()
        rec.proc.wait()
        raise
    finally:
        tmp.unlink(missing_ok=True)
        rec.sock.close()
    line = (f"{len(rec.times)} intervals of {interval_seconds * 1e3:g} ms, "
            f"{int(trace.counts.sum())} page writes, {distinct_pages(trace)} pages "
            f"touched, {rec.children} children -> {output}")
    return RecordResult(128 - code if code < 0 else code, output, line, program_seconds,
                        program_cpu, page_writes=int(trace.counts.sum()),
                        pages_touched=distinct_pages(trace), recorder_cpu_seconds=own_cpu)


def _own_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _children_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_plain(argv: list[str]) -> tuple[float, float]:
    """The program's wall time and CPU time without the recorder (its output discarded),
    the pair of a recorded run when the recorder's cost is measured: started the same way
    (a fork that sets PDEATHSIG), so the pair differs only by the recording."""
    started, cpu = time.monotonic(), _children_cpu_seconds()
    subprocess.run(argv, stdout=subprocess.DEVNULL, check=False, preexec_fn=_die_with_parent)
    return time.monotonic() - started, _children_cpu_seconds() - cpu
