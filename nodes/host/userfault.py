"""userfaultfd(2) and the PAGEMAP_SCAN ioctl, through ctypes: the kernel's write tracking and
page faults that a process vCPU is built on.

Why by hand: the structs and ioctl numbers below are Linux's uapi (linux/userfaultfd.h,
linux/fs.h), but Debian 12's headers are 6.1 and lack WP_ASYNC (6.7) and PAGEMAP_SCAN (6.7),
and no native build is promised where migbed runs. Everything here is x86_64/aarch64 Linux.

How dirty logging works with them (see `nodes.host.dirtylog`): a uffd created in the guest's
process with `UFFD_FEATURE_WP_ASYNC` has the guest's range registered in write-protect mode;
the kernel resolves the write faults itself (nothing to read), marking each written page, and
`PAGEMAP_SCAN` on the guest's /proc/PID/pagemap with `PM_SCAN_WP_MATCHING` returns the pages
written since the last scan and protects them again: Xen's log-dirty CLEAN. Post-copy uses
MISSING (or MINOR) mode: faults are read here as `Fault`s and resolved with `copy` (or
`continue_`).

`kernel_support()` tries it all once on a small region and says what works, and why not.
"""

import ctypes
import ctypes.util
import errno
import mmap
import os
import platform
from dataclasses import dataclass
from functools import cache

import numpy as np

from nodes.errors import ConfigError

PAGE_BYTES = mmap.PAGESIZE

# -- linux/userfaultfd.h ---------------------------------------------------------------------
UFFD_API = 0xAA
UFFD_USER_MODE_ONLY = 1
FEATURE_PAGEFAULT_FLAG_WP = 1 << 0
FEATURE_MISSING_SHMEM = 1 << 5
FEATURE_MINOR_SHMEM = 1 << 10
FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
FEATURE_WP_UNPOPULATED = 1 << 13
FEATURE_WP_ASYNC = 1 << 15
# What a process vCPU asks for: async write-protect on its memfd mapping, and post-copy's
# MISSING and MINOR faults on shmem.
GUEST_FEATURES = (FEATURE_WP_ASYNC | FEATURE_WP_HUGETLBFS_SHMEM | FEATURE_WP_UNPOPULATED
                  | FEATURE_MISSING_SHMEM | FEATURE_MINOR_SHMEM)
MODE_MISSING, MODE_WP, MODE_MINOR = 1, 2, 4
EVENT_PAGEFAULT = 0x12
FAULT_WRITE, FAULT_WP, FAULT_MINOR = 1, 2, 4


def _iowr(nr: int, size: int, kind: int = UFFD_API) -> int:
    return (3 << 30) | (size << 16) | (kind << 8) | nr


def _ior(nr: int, size: int, kind: int = UFFD_API) -> int:
    return (2 << 30) | (size << 16) | (kind << 8) | nr


USERFAULTFD_IOC_NEW = (UFFD_API << 8) | 0x00          # _IO(0xAA, 0x00) on /dev/userfaultfd
UFFDIO_API = _iowr(0x3F, 24)
UFFDIO_REGISTER = _iowr(0x00, 32)
UFFDIO_UNREGISTER = _ior(0x01, 16)
UFFDIO_WAKE = _ior(0x02, 16)
UFFDIO_COPY = _iowr(0x03, 40)
UFFDIO_WRITEPROTECT = _iowr(0x06, 24)
UFFDIO_CONTINUE = _iowr(0x07, 32)
_SYS_USERFAULTFD = {"x86_64": 323, "aarch64": 282}

# -- linux/fs.h: PAGEMAP_SCAN -------------------------------------------------------------------
PAGEMAP_SCAN = _iowr(16, 96, ord("f"))
PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1
PAGE_IS_WRITTEN = 1 << 1


class _Range(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Api(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64),
                ("ioctls", ctypes.c_uint64)]


class _Register(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _Copy(ctypes.Structure):
    _fields_ = [("dst", ctypes.c_uint64), ("src", ctypes.c_uint64), ("len", ctypes.c_uint64),
                ("mode", ctypes.c_uint64), ("copy", ctypes.c_int64)]


class _WriteProtect(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", ctypes.c_uint64)]


class _Continue(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", ctypes.c_uint64), ("mapped", ctypes.c_int64)]


class _ScanArg(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
        "category_inverted", "category_mask", "category_anyof_mask", "return_mask")]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.syscall.restype = ctypes.c_long


def ioctl(fd: int, request: int, arg: "ctypes.Structure | int | None", what: str) -> int:
    """ioctl(2) with a struct (by reference) or an int; OSError naming `what` on failure.
    ctypes drops the GIL for the call, so a blocking one stalls no other thread."""
    ref = ctypes.byref(arg) if isinstance(arg, ctypes.Structure) else arg
    ret = _libc.ioctl(fd, request, ref)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


# -- the userfaultfd ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Fault:
    """A page fault read from a uffd: the page's address and what kind of access."""
    address: int
    flags: int

    @property
    def write(self) -> bool:
        return bool(self.flags & FAULT_WRITE)


class Uffd:
    """A userfaultfd: made in the process whose memory it tracks (`create`), or received from
    it over a socket (`Uffd(fd, features)`); then either side may drive it."""

    def __init__(self, fd: int, features: int, via: str = "received"):
        self.fd = fd
        self.features = features
        self.via = via

    @classmethod
    def create(cls, features: int = GUEST_FEATURES) -> "Uffd":
        """A uffd of this process, handshaken for those of `features` the kernel offers
        (`features` is what was got). Tries the syscall, then /dev/userfaultfd, then the
        syscall for user-mode faults only (what an unprivileged process may have)."""
        fd, via = _new_uffd()
        try:
            offered = _handshake(fd, 0)
        finally:
            os.close(fd)
        fd, via = _new_uffd()
        try:
            got = _handshake(fd, features & offered)
        except OSError:
            os.close(fd)
            raise
        return cls(fd, got, via)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def register(self, start: int, length: int, mode: int) -> int:
        """Register [start, start+length) for faults of `mode` (MODE_*); returns the ioctls
        the range supports (a bit per UFFDIO_* number)."""
        reg = _Register(_Range(start, length), mode, 0)
        ioctl(self.fd, UFFDIO_REGISTER, reg, f"UFFDIO_REGISTER {length} bytes")
        return reg.ioctls

    def unregister(self, start: int, length: int) -> None:
        ioctl(self.fd, UFFDIO_UNREGISTER, _Range(start, length), "UFFDIO_UNREGISTER")

    def writeprotect(self, start: int, length: int, protect: bool = True,
                     dontwake: bool = False) -> None:
        """Write-protect the range (or lift it): in WP_ASYNC mode the next write to each page
        is resolved by the kernel and marks the page written."""
        mode = (1 if protect else 0) | (2 if dontwake else 0)
        ioctl(self.fd, UFFDIO_WRITEPROTECT, _WriteProtect(_Range(start, length), mode),
              "UFFDIO_WRITEPROTECT")

    def copy(self, dst: int, src: int, length: int, dontwake: bool = False) -> int:
        """Fill missing pages at `dst` with `length` bytes from this process's `src`, and
        wake the faulting threads (unless `dontwake`); returns the bytes copied."""
        arg = _Copy(dst, src, length, 1 if dontwake else 0, 0)
        ioctl(self.fd, UFFDIO_COPY, arg, f"UFFDIO_COPY at {dst:#x}")
        return arg.copy

    def continue_(self, start: int, length: int, dontwake: bool = False) -> int:
        """Map pages already in the memfd's page cache (MINOR mode) and wake the faulters;
        pages of the range mapped already are skipped (the kernel stops at each with EEXIST,
        or EAGAIN after a part). Returns the bytes newly mapped."""
        end, mapped = start + length, 0
        while start < end:
            arg = _Continue(_Range(start, end - start), 1 if dontwake else 0, 0)
            try:
                ioctl(self.fd, UFFDIO_CONTINUE, arg, f"UFFDIO_CONTINUE at {start:#x}")
                return mapped + arg.mapped
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.EAGAIN):
                    raise
                done = max(int(arg.mapped), 0)
                mapped += done
                start += done + (PAGE_BYTES if exc.errno == errno.EEXIST else 0)
        return mapped

    def wake(self, start: int, length: int) -> None:
        ioctl(self.fd, UFFDIO_WAKE, _Range(start, length), "UFFDIO_WAKE")

    def read_faults(self, max_events: int = 64) -> list[Fault]:
        """The page faults waiting on the uffd (none if none: the fd is non-blocking)."""
        try:
            raw = os.read(self.fd, 32 * max_events)
        except BlockingIOError:
            return []
        msgs = np.frombuffer(raw, dtype=np.uint64).reshape(-1, 4)
        events = msgs[:, 0] & 0xFF
        return [Fault(int(m[2]), int(m[1])) for m in msgs[events == EVENT_PAGEFAULT]]


def _new_uffd() -> tuple[int, str]:
    flags = os.O_CLOEXEC | os.O_NONBLOCK
    nr = _SYS_USERFAULTFD.get(platform.machine())
    if nr is None:
        raise OSError(0, f"userfaultfd: unknown system call number on {platform.machine()}")
    fd = _libc.syscall(nr, flags)
    if fd >= 0:
        return fd, "userfaultfd(2)"
    first = ctypes.get_errno()
    try:
        dev = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        dev = -1
    if dev >= 0:
        try:
            fd = _libc.ioctl(dev, USERFAULTFD_IOC_NEW, flags)
        finally:
            os.close(dev)
        if fd >= 0:
            return fd, "/dev/userfaultfd"
    fd = _libc.syscall(nr, flags | UFFD_USER_MODE_ONLY)
    if fd >= 0:
        return fd, "userfaultfd(2), user-mode faults only"
    raise OSError(first, f"userfaultfd: {os.strerror(first)} (and /dev/userfaultfd and "
                  "UFFD_USER_MODE_ONLY failed too)")


def _handshake(fd: int, features: int) -> int:
    """UFFDIO_API: returns the features the kernel grants (all it offers when asked for 0)."""
    api = _Api(UFFD_API, features, 0)
    ioctl(fd, UFFDIO_API, api, "UFFDIO_API")
    return api.features


# -- PAGEMAP_SCAN -----------------------------------------------------------------------------
class PageScanner:
    """PAGEMAP_SCAN over another (or this) process's pagemap, reusing one result vector."""

    def __init__(self, pid: int | str = "self", vec_regions: int = 8192):
        self.fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        self.vec = np.zeros((vec_regions, 3), np.uint64)      # page_region: start, end, cats
        self.arg = _ScanArg()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def written(self, start: int, end: int, reset: bool) -> np.ndarray:
        """Page indices (from `start`) of the pages of [start, end) written since they were
        last protected; with `reset`, protect them again (log-dirty CLEAN; else PEEK)."""
        flags = PM_SCAN_CHECK_WPASYNC | (PM_SCAN_WP_MATCHING if reset else 0)
        regions = self.scan(start, end, flags, PAGE_IS_WRITTEN, PAGE_IS_WRITTEN)
        return expand_regions(regions, start)

    def scan(self, start: int, end: int, flags: int, category_mask: int,
             return_mask: int, inverted: int = 0, anyof: int = 0) -> np.ndarray:
        """The matching regions as (n, 2) [start, end) addresses, walking the whole range
        (a call stops when the vector fills; the next goes on from where it stopped).
        `inverted` and `anyof` are the ioctl's `category_inverted` and
        `category_anyof_mask`."""
        a = self.arg
        a.size, a.flags, a.vec, a.vec_len = ctypes.sizeof(a), flags, self.vec.ctypes.data, len(
            self.vec)
        a.max_pages, a.category_inverted, a.category_anyof_mask = 0, inverted, anyof
        a.category_mask, a.return_mask, a.end = category_mask, return_mask, end
        parts, at = [], start
        while at < end:
            a.start, a.walk_end = at, 0
            n = ioctl(self.fd, PAGEMAP_SCAN, a, "PAGEMAP_SCAN")
            parts.append(self.vec[:n, :2].copy())
            if n < len(self.vec) or a.walk_end <= at:
                break
            at = a.walk_end
        return np.concatenate(parts) if parts else np.zeros((0, 2), np.uint64)


def expand_regions(regions: np.ndarray, base: int, page_bytes: int = PAGE_BYTES) -> np.ndarray:
    """(n, 2) [start, end) address regions as sorted page indices from `base`, int64."""
    if not len(regions):
        return np.zeros(0, np.int64)
    first = (regions[:, 0].astype(np.int64) - base) // page_bytes
    counts = (regions[:, 1] - regions[:, 0]).astype(np.int64) // page_bytes
    offsets = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(first, counts) + offsets


# -- the start-up probe -------------------------------------------------------------------------
SIMULATE_ENV = "MIGBED_SIMULATE_NO_UFFD"


class KernelSupportError(ConfigError):
    """This kernel (or this process's rights) lacks what a process vCPU needs."""


@dataclass(frozen=True)
class Support:
    """What this kernel offers a process vCPU, as a probe found by trying it."""
    dirty_log: bool            # WP_ASYNC + PAGEMAP_SCAN gave exactly the pages written
    missing_shmem: bool        # post-copy faults on memfd memory (MISSING mode)
    minor_shmem: bool          # ... and MINOR mode + UFFDIO_CONTINUE
    via: str                   # how the uffd was had ("userfaultfd(2)", "/dev/userfaultfd"...)
    reason: str                # one line, why not ("" when dirty_log works)

    def require(self) -> None:
        """Raise KernelSupportError (one line) unless a process vCPU can run here."""
        if not self.dirty_log:
            raise KernelSupportError(f"--vcpu process is not available here: {self.reason}; "
                                     "--vcpu thread works")


def kernel_support() -> Support:
    """The probe's verdict, made once per process (`MIGBED_SIMULATE_NO_UFFD=<why>` in the
    environment makes it say no, with that reason, for tests of the refusal)."""
    simulated = os.environ.get(SIMULATE_ENV)
    if simulated:
        return Support(False, False, False, "", f"{simulated} (simulated by {SIMULATE_ENV})")
    return _probe()


@cache
def _probe() -> Support:
    try:
        uffd = Uffd.create()
    except OSError as exc:
        return Support(False, False, False, "", f"no userfaultfd: {exc.strerror}")
    try:
        feats = uffd.features
        post = (bool(feats & FEATURE_MISSING_SHMEM), bool(feats & FEATURE_MINOR_SHMEM))
        need = FEATURE_WP_ASYNC | FEATURE_WP_HUGETLBFS_SHMEM
        if feats & need != need:
            return Support(False, *post, uffd.via, "userfaultfd lacks write-protect async on "
                           f"shared memory (Linux 6.7+; running {platform.release()})")
        why = _try_dirty_log(uffd)
        return Support(not why, *post, uffd.via, why)
    finally:
        uffd.close()


def _try_dirty_log(uffd: Uffd, npages: int = 16) -> str:
    """Write-protect a small memfd mapping, write two pages, scan twice: "" when the scans
    say exactly those pages and then none, else why not."""
    size = npages * PAGE_BYTES
    fd = os.memfd_create("migbed-probe", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        words = np.frombuffer(mmap.mmap(fd, size, flags=mmap.MAP_SHARED), np.uint64)
    finally:
        os.close(fd)
    start = words.ctypes.data
    try:
        uffd.register(start, size, MODE_WP)
        uffd.writeprotect(start, size)
    except OSError as exc:
        return f"cannot write-protect shared memory: {exc.strerror}"
    try:
        scanner = PageScanner()
        try:
            words[[3 * PAGE_BYTES // 8, 7 * PAGE_BYTES // 8]] = 1
            first = scanner.written(start, start + size, reset=True)
            second = scanner.written(start, start + size, reset=True)
        finally:
            scanner.close()
    except OSError as exc:
        return f"PAGEMAP_SCAN failed (it needs Linux 6.7+): {exc.strerror}"
    if first.tolist() != [3, 7] or len(second):
        return f"PAGEMAP_SCAN said {first.tolist()} then {second.tolist()} for writes to [3, 7]"
    return ""
