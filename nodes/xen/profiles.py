"""Architecture profiles: the seed essay's three Xen ports (x86, ia64, ppc) and two proposals.

A profile fixes where the hypervisor's own frames sit in machine memory, how dom0 sees its
memory and where it is placed, and which memory modes unprivileged guests may use. Hosts of
different `arch` cannot exchange guests; `ia64`/`ia64-p2m` and `ppc`/`ppc-p2m` can, where the
guest's mode is allowed on both.
"""

from dataclasses import dataclass
from enum import StrEnum

from nodes.errors import ConfigError, ModeError


class Mode(StrEnum):
    """How a guest sees memory (the seed essay's three choices)."""

    PEQM = "p==m"  # physical address is the machine address, over one contiguous run
    P2M = "p2m"    # guest-aware p!=m: guest holds its own pfn->mfn table
    VP = "vp"      # virtual physical (shadow mode): the hypervisor translates

    @classmethod
    def parse(cls, text: "str | Mode") -> "Mode":
        if isinstance(text, Mode):
            return text
        key = str(text).strip().lower()
        aliases = {"p==m": cls.PEQM, "peqm": cls.PEQM, "p=m": cls.PEQM, "pm": cls.PEQM,
                   "p2m": cls.P2M, "vp": cls.VP, "shadow": cls.VP}
        if key not in aliases:
            raise ModeError(f"unknown memory mode {text!r}; use one of p2m, vp, p==m")
        return aliases[key]

    def __str__(self) -> str:
        return self.value


class Placement(StrEnum):
    """Where a profile puts dom0's frames."""

    SCATTERED = "scattered"      # any free frames, out of order (P2M)
    IDENTITY = "identity"        # machine 0 upwards, physical == machine (P==M)
    OFFSET = "offset"            # one run just above the hypervisor, physical 0 = that run's start


@dataclass(frozen=True)
class ArchProfile:
    name: str
    arch: str
    hypervisor_at: str            # "bottom" (machine 0 upwards) or "top" (end of memory)
    dom0_mode: Mode
    dom0_placement: Placement
    guest_modes: tuple[Mode, ...]
    summary: str

    def check_guest_mode(self, mode: Mode) -> None:
        if mode not in self.guest_modes:
            allowed = ", ".join(m.value for m in self.guest_modes)
            raise ModeError(
                f"profile {self.name} does not allow {mode.value} guests; allowed: {allowed}")


PROFILES: dict[str, ArchProfile] = {
    p.name: p
    for p in (
        ArchProfile(
            "x86", "x86", "bottom", Mode.P2M, Placement.SCATTERED,
            (Mode.P2M, Mode.VP, Mode.PEQM),
            "PV guests in P2M, switched to VP (shadow) only while migrating; dom0 in P2M"),
        ArchProfile(
            "ia64", "ia64", "top", Mode.PEQM, Placement.IDENTITY, (Mode.VP,),
            "dom0 P==M at machine 0 (Xen at the top of memory); guests always VP"),
        ArchProfile(
            "ia64-p2m", "ia64", "top", Mode.P2M, Placement.SCATTERED, (Mode.VP,),
            "the essay's proposal: ia64 dom0 in P2M instead of P==M; guests always VP"),
        ArchProfile(
            "ppc", "ppc", "bottom", Mode.P2M, Placement.OFFSET, (Mode.VP,),
            "Xen at machine 0 (exception vectors); dom0 at an offset with P2M tables; guests VP"),
        ArchProfile(
            "ppc-p2m", "ppc", "bottom", Mode.P2M, Placement.OFFSET, (Mode.VP, Mode.P2M),
            "the reply's idea: once dom0 has P2M tables, guests use them too (P2M or VP)"),
    )
}

DEFAULT_PROFILE = "x86"


def get_profile(name: "str | ArchProfile") -> ArchProfile:
    if isinstance(name, ArchProfile):
        return name
    if name not in PROFILES:
        raise ConfigError(f"unknown profile {name!r}; use one of {', '.join(PROFILES)}")
    return PROFILES[name]
