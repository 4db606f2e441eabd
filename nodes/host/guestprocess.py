"""A guest's process vCPU, from its host's side: launch it, pause and resume it, stop it.

Why a process: a thread vCPU writes through Python for every batch under the host's locks, and
the hypervisor can only learn what it wrote by being told. A process maps the guest's frames
of the host's memfd and stores into them natively; the kernel write-protects them and logs
what was written (`nodes.host.kerneldirty`), as shadow page tables do for a real hypervisor.
The guest's side is `nodes.host.guestmain`.

Guests are forked by a zygote, one per host process, started on first use: a Python that has
imported numpy and the workloads once, so guests share those pages (their memory beyond their
frames is mostly the pages they dirty themselves). The zygote and every guest exit when their
host's end of their socket closes: a host killed by any signal, or by Ray from any thread,
leaves nothing behind (PR_SET_PDEATHSIG would fire when the *thread* that forked exits).
"""

import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from nodes.errors import ConfigError, MigbedError
from nodes.host.fdpass import recv_message, send_message
from nodes.host.guestcontrol import Command, ControlPage, State
from nodes.host.guestmain import frame_runs
from nodes.host.userfault import KernelSupportError, Uffd, kernel_support
from nodes.xen.domain import Domain
from nodes.xen.memory import MachineMemory
from nodes.xen.profiles import Mode
from workloads.spec import WorkloadSpec

OWN_MAPPINGS = 2048     # mappings a guest process holds beside its frames (Python, numpy...)
PAUSE_TIMEOUT_SECONDS = 1.0
ZYGOTE_TIMEOUT_SECONDS = 30.0


class GuestProcessError(MigbedError):
    """A guest process could not start, or stopped answering its host."""


class Zygote:
    """The process guests are forked from (see the module docstring)."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair()
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [root, *filter(None, [os.environ.get("PYTHONPATH")])]),
            # A vCPU is one CPU: a program's BLAS call (matmul) runs on its vCPU's thread
            # alone, not on a pool of its own (measured: 1.3 ms a block threaded on a busy
            # machine, 0.14 ms on one thread).
            OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            # -OO: no docstrings (measured: the zygote's heap 1.9 MiB smaller, and every
            # guest shares it); a guest runs no assert and reads no docstring.
            [sys.executable, "-OO", "-m", "nodes.host.guestmain", "--zygote",
             str(theirs.fileno())],
            pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL)
        theirs.close()
        ours.settimeout(ZYGOTE_TIMEOUT_SECONDS)     # its start imports numpy: seconds at worst
        self.sock = ours
        self.lock = threading.Lock()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def fork(self, guest_end: socket.socket) -> int:
        """A new guest process holding `guest_end`; its pid."""
        with self.lock:
            try:
                send_message(self.sock, {"op": "fork"}, [guest_end.fileno()])
                reply, _ = recv_message(self.sock)
            except (OSError, MigbedError) as exc:
                self.close()                       # half a conversation: start afresh
                raise GuestProcessError(f"the guest zygote did not answer: {exc}") from None
        return int(reply["pid"])

    def close(self) -> None:
        """Close its socket (it exits on that) and reap it; its guests live on."""
        self.sock.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


_zygote: Zygote | None = None
_zygote_lock = threading.Lock()


def zygote() -> Zygote:
    """This process's zygote, started (or restarted) on demand."""
    global _zygote
    with _zygote_lock:
        if _zygote is None or not _zygote.alive:
            _zygote = Zygote()
        return _zygote


def guest_layout(dom: Domain) -> tuple[bytes | None, np.ndarray]:
    """How the guest maps its frames, by its mode: (its own P2M table for a P2M guest to
    coalesce itself, else None; the runs (pfn, mfn, frames) it will map)."""
    if dom.mode is Mode.PEQM:
        return None, np.array([[0, int(dom.p2m[0]), dom.npages]], np.int64)
    if dom.mode is Mode.P2M:
        table = dom.guest_p2m if dom.guest_p2m is not None else dom.p2m
        return np.ascontiguousarray(table, np.int64).tobytes(), frame_runs(table)
    return None, frame_runs(dom.p2m)          # VP: the hypervisor builds the mapping


def check_map_count(name: str, runs: int) -> None:
    """Refuse (one line) a guest whose frames need more mappings than a process may hold."""
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            limit = int(f.read())
    except (OSError, ValueError):
        return
    if runs > limit - OWN_MAPPINGS:
        raise ConfigError(
            f"{name}: its frames lie in {runs} runs, one mapping each, and a process may hold "
            f"{limit} (vm.max_map_count) less ~{OWN_MAPPINGS} of its own; give the host "
            "superpages, the guest less memory, or raise vm.max_map_count")


class GuestProcess:
    """One running guest process; `launch` makes it."""

    def __init__(self, name: str, pid: int, sock: socket.socket, ctl: ControlPage, uffd: Uffd,
                 reply: dict, npages: int, page_size: int):
        self.name, self.pid, self.sock, self.ctl, self.uffd = name, pid, sock, ctl, uffd
        self.base = int(reply["base"])           # the guest's address of its pfn 0
        self.runs = int(reply["runs"])
        self.map_seconds = float(reply["map_seconds"])
        self.npages, self.page_size = npages, page_size
        self.map_starts = np.zeros(1, np.int64)  # the first pfn of each of its mappings
        self.pidfd = os.pidfd_open(pid)

    @classmethod
    def launch(cls, memory: MachineMemory, dom: Domain, spec: WorkloadSpec, *,
               vcpus: int = 1, states: list[dict | None] | None = None, parked: bool = False,
               track_writes: bool = False, max_batch_pages: int = 256,
               tick_seconds: float = 0.001, timeout_seconds: float = 10.0,
               missing: np.ndarray | None = None) -> "GuestProcess":
        """Start `dom`'s process, `vcpus` vCPUs running `spec` (from `states`, one per vCPU,
        if given) on its frames of `memory`; returns once it has mapped them and handed over
        its uffd. `parked`: its vCPUs park at once, until `resume` (given states by `start`).
        `missing` (one bool per pfn): a guest resumed by a post-copy switch, whose uffd then
        has those pages registered for faults (`guestmain.register_postcopy`) for a
        `nodes.host.faultreader.FaultReader` to resolve, and no dirty logging."""
        support = kernel_support()
        support.require()
        if missing is not None and not (support.missing_shmem and support.minor_shmem):
            raise KernelSupportError("a process guest cannot be resumed by post-copy here: "
                                     "userfaultfd lacks MISSING/MINOR faults on shared memory")
        if memory.fd is None:
            raise ConfigError("a process vCPU needs machine memory in a memfd (Linux)")
        p2m, runs = guest_layout(dom)
        check_map_count(dom.name, len(runs))
        ctl = ControlPage.create(dom.npages, track_writes)
        if parked:
            ctl.set_command(Command.PAUSE)
        setup = {"name": dom.name, "npages": dom.npages, "data_pages": dom.data_pages,
                 "pfn_base": dom.pfn_base, "page_size": memory.page_size,
                 "p2m": p2m, "runs": None if p2m is not None else runs.tobytes(),
                 "track_writes": track_writes, "workload": asdict(spec),
                 "states": list(states) if states is not None else [None] * vcpus,
                 "max_batch_pages": max_batch_pages,
                 "tick_seconds": tick_seconds,
                 "missing": None if missing is None else np.packbits(missing).tobytes()}
        sock, reply, fds = cls._fork(dom.name, setup, [memory.fd, ctl.fd], timeout_seconds,
                                     ctl)
        uffd = Uffd(fds[0], int(reply["features"]), str(reply["via"]))
        gp = cls(dom.name, int(reply["pid"]), sock, ctl, uffd, reply, dom.npages,
                 memory.page_size)
        gp.map_starts = runs[:, 0].copy()        # a uffd range may not cross a mapping
        return gp

    @staticmethod
    def _fork(name: str, setup: dict, fds: list[int], timeout_seconds: float,
              ctl: ControlPage) -> tuple[socket.socket, dict, list[int]]:
        ours, theirs = socket.socketpair()
        try:
            zygote().fork(theirs)
            theirs.close()
            ours.settimeout(timeout_seconds)
            send_message(ours, setup, fds)
            reply, got = recv_message(ours)
            if "error" in reply:
                raise GuestProcessError(f"{name}: its process failed: {reply['error']}")
            ours.settimeout(None)
        except BaseException:
            ours.close()
            theirs.close()
            ctl.close()
            raise
        return ours, reply, got

    def start(self, states: list[dict | None],
              timeout_seconds: float = PAUSE_TIMEOUT_SECONDS) -> None:
        """A parked guest's vCPUs get their states (a migration's vCPU context), through
        the control page: they take them as they wake at `resume`, before any runs."""
        state = self.ctl.wait_state({State.PAUSED, State.FAILED, State.EXITED},
                                    timeout_seconds)
        if state is not State.PAUSED or not self.ctl.wait_context(timeout_seconds):
            raise GuestProcessError(f"{self.name}: its vCPUs are {state.name.lower()}, not "
                                    "parked for their context")
        self.ctl.give_context(states)

    # -- control ----------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.pidfd >= 0 and not select.select([self.pidfd], [], [], 0)[0]

    def wait_running(self, timeout_seconds: float = PAUSE_TIMEOUT_SECONDS) -> None:
        state = self.ctl.wait_state({State.RUNNING, State.FAILED, State.EXITED},
                                    timeout_seconds)
        if state is not State.RUNNING:
            raise GuestProcessError(f"{self.name}: its process is {state.name.lower()}")

    def pause(self, timeout_seconds: float = PAUSE_TIMEOUT_SECONDS) -> float:
        """Park the vCPU at its next batch boundary; returns how long that took (s)."""
        t0 = time.perf_counter()
        self.ctl.set_command(Command.PAUSE)
        state = self.ctl.wait_state({State.PAUSED, State.FAILED, State.EXITED}, timeout_seconds)
        if state is not State.PAUSED:
            raise GuestProcessError(f"{self.name}: did not pause within {timeout_seconds} s "
                                    f"(it is {state.name.lower()})")
        return time.perf_counter() - t0

    def resume(self) -> None:
        self.ctl.set_command(Command.RUN)

    def arm_postcopy(self, missing: np.ndarray,
                     timeout_seconds: float = PAUSE_TIMEOUT_SECONDS) -> None:
        """A parked guest (a migration's destination) at a post-copy switch: its range is
        armed for faults where `missing` (one bool per pfn) is set, by the process itself
        (`guestmain._serve_host`), as `launch(missing=...)` arms a new one."""
        if self.ctl.state is not State.PAUSED:
            raise GuestProcessError(f"{self.name}: armed for post-copy while "
                                    f"{self.ctl.state.name.lower()}, not parked")
        try:
            self.sock.settimeout(timeout_seconds)
            send_message(self.sock, {"op": "postcopy",
                                     "missing": np.packbits(missing).tobytes()})
            reply, _ = recv_message(self.sock)
        except (OSError, MigbedError) as exc:
            raise GuestProcessError(f"{self.name}: its process did not arm for post-copy: "
                                    f"{exc}") from None
        finally:
            if self.sock.fileno() >= 0:
                self.sock.settimeout(None)
        if "error" in reply:
            raise GuestProcessError(f"{self.name}: arming for post-copy: {reply['error']}")

    def written_pages(self) -> np.ndarray:
        """The pages the workload wrote since the last call (launched with track_writes);
        take them while paused."""
        return self.ctl.take_written()

    def stop(self, timeout_seconds: float = 2.0) -> None:
        """Ask the vCPU to exit, close everything, and kill the process if it lingers."""
        if self.pidfd < 0:
            return
        self.ctl.set_command(Command.EXIT)
        self.sock.close()                        # the guest's watcher exits on this too
        if select.select([self.pidfd], [], [], timeout_seconds)[0] == []:
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            select.select([self.pidfd], [], [], timeout_seconds)
        os.close(self.pidfd)
        self.pidfd = -1
        self.uffd.close()
        self.ctl.close()

    def __enter__(self) -> "GuestProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- measures -------------------------------------------------------------------------
    def memory_bytes(self) -> dict[str, int]:
        """The process's memory from /proc (smaps_rollup): `pss_bytes` in all,
        `pss_shmem_bytes` (its frames and control page), and `pss_own_bytes`, the rest:
        what the guest costs beyond its frames."""
        out = {}
        with open(f"/proc/{self.pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("Pss", "Pss_Shmem", "Rss"):
                    out[key] = int(rest.split()[0]) * 1024
        return {"rss_bytes": out["Rss"], "pss_bytes": out["Pss"],
                "pss_shmem_bytes": out["Pss_Shmem"],
                "pss_own_bytes": out["Pss"] - out["Pss_Shmem"]}
