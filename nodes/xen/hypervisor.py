"""The hypervisor of one host: machine memory, the frame allocator, dom0 and the guests.

Pure Python + numpy, no Ray: the Ray actor in `nodes.host.service` wraps one of these. Every
operation that changes frames holds `self.lock`; per-guest memory access holds the guest's
own lock (see `nodes.xen.domain`).
"""

import re
import threading

import numpy as np

from nodes.errors import (
    ConfigError,
    DomainExistsError,
    DomainStateError,
    ModeError,
    NoSuchDomainError,
    OutOfFramesError,
)
from nodes.units import format_bytes
from nodes.xen import pagetable
from nodes.xen.allocator import FrameAllocator
from nodes.xen.digest import digest, page_hashes
from nodes.xen.domain import Domain, DomainState
from nodes.xen.logdirty import LogDirtyStats, ShadowOp
from nodes.xen.memory import MachineMemory
from nodes.xen.profiles import DEFAULT_PROFILE, Mode, Placement, get_profile

DOM0_NAME = "Domain-0"
DEFAULT_RESERVED_BYTES = 4 * 1024 * 1024
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_guest_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or "--" in name:
        raise ConfigError(
            f"bad guest name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting "
            "with a letter or digit, without '--'")
    return name


def default_dom0_bytes(host_bytes: int, page_size: int) -> int:
    """A small share of the host: 1/32 of it, at least 1 MiB, in whole pages."""
    want = max(host_bytes // 32, 1024 * 1024)
    return max(page_size * 2, want // page_size * page_size)


class Hypervisor:
    def __init__(self, name: str = "host-0", memory_bytes: int = 256 * 1024 * 1024,
                 page_size: int = 4096, reserved_bytes: int = DEFAULT_RESERVED_BYTES,
                 profile: str = DEFAULT_PROFILE, dom0_memory_bytes: int | None = None,
                 seed: int = 0, superpages: bool = True):
        self.name = name
        self.profile = get_profile(profile)
        if reserved_bytes <= 0 or reserved_bytes % page_size:
            raise ConfigError(
                f"hypervisor reserve must be a positive multiple of the page size "
                f"({page_size} B), got {reserved_bytes} B")
        if memory_bytes <= reserved_bytes:
            raise ConfigError(
                f"host memory ({format_bytes(memory_bytes)}) must be larger than the "
                f"hypervisor's reserve ({format_bytes(reserved_bytes)})")
        self.memory = MachineMemory(memory_bytes, page_size)
        self.page_size = page_size
        self.allocator = FrameAllocator(self.memory.nframes, reserved_bytes // page_size,
                                        self.profile.hypervisor_at, seed, superpages)
        self.lock = threading.RLock()
        self.domains: dict[str, Domain] = {}
        self._next_domid = 1
        if dom0_memory_bytes is None:
            dom0_memory_bytes = default_dom0_bytes(memory_bytes, page_size)
        self._boot_dom0(dom0_memory_bytes)

    # -- dom0 ----------------------------------------------------------------------------
    def _boot_dom0(self, memory_bytes: int) -> None:
        npages = self._pages_for(memory_bytes, "dom0 memory")
        free = self.allocator.free_frames
        if npages >= free:
            raise ConfigError(
                f"dom0 needs {format_bytes(memory_bytes)} but the host has only "
                f"{format_bytes(free * self.page_size)} beside the hypervisor; give the host "
                "more memory or dom0 less")
        placement = self.profile.dom0_placement
        if placement is Placement.SCATTERED:
            p2m = self.allocator.alloc_scattered(npages, 0)
        else:
            start = 0 if placement is Placement.IDENTITY else None
            base = self.allocator.alloc_contiguous(npages, 0, start=start)
            p2m = np.arange(base, base + npages, dtype=np.int64)
        mode = self.profile.dom0_mode
        self._install(Domain(0, DOM0_NAME, mode, p2m, self.memory, is_dom0=True,
                             pfn_base=int(p2m[0]) if mode is Mode.PEQM else 0,
                             has_page_tables=mode is not Mode.PEQM))

    # -- creation and destruction --------------------------------------------------------------
    def _pages_for(self, memory_bytes: int, what: str = "guest memory") -> int:
        if not isinstance(memory_bytes, int) or isinstance(memory_bytes, bool):
            raise ConfigError(f"{what} must be a whole number of bytes, got {memory_bytes!r}")
        if memory_bytes <= 0:
            raise ConfigError(f"{what} must be positive, got {memory_bytes} B")
        if memory_bytes % self.page_size:
            raise ConfigError(
                f"{what} ({memory_bytes} B) is not a multiple of the page size "
                f"({self.page_size} B)")
        return memory_bytes // self.page_size

    def _install(self, dom: Domain) -> Domain:
        if dom.mode is not Mode.PEQM and dom.state is not DomainState.INCOMING:
            tables = pagetable.build(dom.p2m, self.memory.page_shift,
                                     self.memory.words_per_page)
            self.memory.words[dom.p2m[dom.pt_pfns]] = tables
        self.allocator.set_m2p(dom.p2m, dom.domid, np.arange(dom.npages, dtype=np.int64)
                               + dom.pfn_base)
        self.domains[dom.name] = dom
        return dom

    def check_room(self, memory_bytes: int) -> int:
        """Pages for `memory_bytes`, or OutOfFramesError if the free frames cannot hold it."""
        npages = self._pages_for(memory_bytes)
        free = self.allocator.free_frames
        if npages > free:
            raise OutOfFramesError(
                f"{self.name} has {format_bytes(free * self.page_size)} free "
                f"({free} frames), the guest needs {format_bytes(memory_bytes)}; dom0's "
                "memory is not given up for guests", needed_frames=npages, free_frames=free)
        return npages

    def create_domain(self, name: str, memory_bytes: int, mode: "str | Mode" = Mode.P2M,
                      dma: bool = False) -> Domain:
        check_guest_name(name)
        mode = Mode.parse(mode)
        with self.lock:
            if name in self.domains or name == DOM0_NAME:
                raise DomainExistsError(f"a domain named {name!r} already exists on {self.name}")
            self.profile.check_guest_mode(mode)
            if dma and mode is Mode.VP:
                raise ModeError(
                    f"{name} has a DMA device and cannot run in VP (shadow) mode: a device "
                    "needs machine addresses and a VP guest knows only physical ones")
            npages = self.check_room(memory_bytes)
            if mode is not Mode.PEQM and npages < 2:
                raise ConfigError(f"a {mode.value} guest needs at least 2 pages (one for its "
                                  "page table)")
            domid = self._next_domid
            if mode is Mode.PEQM:
                base = self.allocator.alloc_contiguous(npages, domid)
                p2m = np.arange(base, base + npages, dtype=np.int64)
                dom = Domain(domid, name, mode, p2m, self.memory, dma=dma, pfn_base=base,
                             has_page_tables=False)
            else:
                p2m = self.allocator.alloc_scattered(npages, domid)
                dom = Domain(domid, name, mode, p2m, self.memory, dma=dma)
            self._next_domid += 1
            return self._install(dom)

    def create_incoming(self, name: str, npages: int, mode: Mode) -> Domain:
        """Reserve frames for a guest arriving by migration; it stays INCOMING until resumed."""
        with self.lock:
            if name in self.domains:
                raise DomainExistsError(f"a domain named {name!r} already exists on {self.name}")
            self.profile.check_guest_mode(mode)
            self.check_room(npages * self.page_size)
            domid = self._next_domid
            self._next_domid += 1
            p2m = self.allocator.alloc_scattered(npages, domid)
            dom = Domain(domid, name, mode, p2m, self.memory, state=DomainState.INCOMING)
            dom.running.clear()
            return self._install(dom)

    def destroy_domain(self, name: str, *, force: bool = False) -> None:
        """Destroy a guest and return every frame it held to the free pool, zeroed (punched out
        of the host's memfd, with the free frames around them: see `FrameAllocator.free`)."""
        with self.lock:
            dom = self.domain(name)
            if dom.is_dom0:
                raise DomainStateError("dom0 cannot be destroyed: it runs the host's toolstack")
            if dom.migrating and not force:
                raise DomainStateError(f"{name} is migrating; cancel the migration first")
            with dom.lock:
                dom.state = DomainState.PAUSED
                dom.running.clear()
                del self.domains[name]
                if self.memory.fd is None:
                    self.memory.scrub(dom.p2m)
                starts, lengths = self.allocator.free(dom.p2m)
                if self.memory.fd is not None:
                    self.memory.discard(starts, lengths)

    def rename_domain(self, old: str, new: str) -> None:
        with self.lock:
            dom = self.domain(old)
            if new in self.domains:
                raise DomainExistsError(f"a domain named {new!r} already exists on {self.name}")
            del self.domains[old]
            dom.name = new
            self.domains[new] = dom

    # -- lookup and listing ------------------------------------------------------------------
    def domain(self, name: str) -> Domain:
        try:
            return self.domains[name]
        except KeyError:
            raise NoSuchDomainError(f"no guest named {name!r} on {self.name}") from None

    def guest(self, name: str) -> Domain:
        """A domain that is not dom0 (dom0 cannot be paused, destroyed or migrated)."""
        dom = self.domain(name)
        if dom.is_dom0:
            raise DomainStateError(
                "dom0 cannot be paused, destroyed or migrated: it runs the host's toolstack")
        return dom

    def list_domains(self) -> list[dict]:
        with self.lock:
            return [d.describe() for d in sorted(self.domains.values(), key=lambda d: d.domid)]

    def frame_counts(self) -> dict[str, int]:
        with self.lock:
            counts = self.allocator.counts()
            counts["dom0"] = self.domains[DOM0_NAME].npages
            return counts

    def describe(self) -> dict:
        return {"name": self.name, "profile": self.profile.name, "arch": self.profile.arch,
                "page_size": self.page_size, "memory_bytes": self.memory.total_bytes,
                "hypervisor_frames": [self.allocator.reserved.start,
                                      self.allocator.reserved.stop - 1],
                "frames": self.frame_counts()}

    # -- guest control -----------------------------------------------------------------------
    def pause(self, name: str) -> None:
        dom = self.guest(name)
        with dom.lock:
            if dom.state is DomainState.RUNNING:
                dom.state = DomainState.PAUSED
                dom.running.clear()
                if dom.vcpu_control is not None:       # vCPUs of their own: parked now
                    dom.vcpu_control.pause()

    def unpause(self, name: str) -> None:
        dom = self.guest(name)
        with dom.lock:
            if dom.state is DomainState.INCOMING:
                raise DomainStateError(f"{name} is still arriving by migration")
            dom.state = DomainState.RUNNING
            dom.running.set()
            if dom.vcpu_control is not None:
                dom.vcpu_control.unpause()

    def set_mode(self, name: str, mode: "str | Mode") -> None:
        """Switch a live guest between P2M and VP, under its lock so no write is lost."""
        mode = Mode.parse(mode)
        dom = self.domain(name)
        with dom.lock:
            if dom.mode is mode:
                return
            if Mode.PEQM in (dom.mode, mode):
                raise ModeError(f"{name}: a P==M guest is tied to its machine frames and "
                                "cannot change mode")
            if mode is Mode.VP and dom.dma:
                raise ModeError(f"{name} has a DMA device and cannot enter VP (shadow) mode: "
                                "the device needs machine addresses")
            if mode is Mode.P2M:
                dom.guest_p2m = dom.p2m.copy()
                dom.logdirty.disable()
            else:
                dom.guest_p2m = None
            dom.mode = mode

    def shadow_op(self, name: str, op: ShadowOp) -> tuple[np.ndarray | None, LogDirtyStats]:
        """Xen's log-dirty shadow operations: OFF, ENABLE_LOGDIRTY, CLEAN, PEEK."""
        dom = self.domain(name)
        with dom.lock:
            ld = dom.logdirty
            if op is ShadowOp.ENABLE_LOGDIRTY:
                if dom.mode is not Mode.VP:
                    raise ModeError(f"{name}: log-dirty needs shadow (VP) mode, the guest is "
                                    f"in {dom.mode.value}")
                ld.enable()
                return None, ld.stats()
            if op is ShadowOp.OFF:
                ld.disable()
                return None, ld.stats()
            if not ld.enabled:
                raise DomainStateError(f"{name}: log-dirty is not enabled")
            return ld.clean() if op is ShadowOp.CLEAN else ld.peek()

    # -- integrity ---------------------------------------------------------------------------
    def canonical_tables(self, dom: Domain) -> np.ndarray:
        return pagetable.canonicalise(dom.page_tables(), dom.domid, self.allocator.owner,
                                      self.allocator.pfn, self.memory.page_shift)

    def canonical_hashes(self, name: str) -> np.ndarray:
        """Per-pfn page hashes with page tables in canonical (pfn) form."""
        dom = self.domain(name)
        with dom.lock:
            # Frames that are holes hash as zero pages unread (reading would allocate them).
            held = np.flatnonzero(~self.memory.holes(dom.p2m))
            hashes = np.full(dom.npages, page_hashes(np.zeros((1, self.page_size), np.uint8))[0])
            for i, pages, _ in self.memory.pieces(dom.p2m[held]):
                hashes[held[i:i + len(pages)]] = page_hashes(pages)
            if len(dom.pt_pfns):
                hashes[dom.pt_pfns] = page_hashes(self.canonical_tables(dom))
            return hashes

    def canonical_digest(self, name: str) -> str:
        """Digest independent of machine placement: equal on any host holding the same guest."""
        return digest(self.canonical_hashes(name))

    def check_page_tables(self, name: str) -> str | None:
        dom = self.domain(name)
        if not len(dom.pt_pfns):
            return None
        with dom.lock:
            return pagetable.check(dom.page_tables(), dom.p2m, self.memory.page_shift)
