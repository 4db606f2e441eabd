"""The seed's Xen ports as host profiles: dom0, the hypervisor's place, allowed modes, and
migrations between hosts of each profile (in-process hosts, real TCP streams)."""

import numpy as np
import pytest

from nodes.errors import ConfigError, DomainStateError, MigrationError, ModeError
from nodes.host.specs import GuestSpec
from nodes.migration.settings import MigrationSettings
from nodes.xen.hypervisor import DOM0_NAME, Hypervisor
from nodes.xen.profiles import PROFILES, Mode
from workloads.spec import WorkloadSpec

MiB = 1024 * 1024
EXPECTED = {   # profile: (hypervisor at, dom0 mode, dom0 placement check, guest modes)
    "x86": ("bottom", "p2m", "scattered", {"p2m", "vp", "p==m"}),
    "ia64": ("top", "p==m", "identity", {"vp"}),
    "ia64-p2m": ("top", "p2m", "scattered", {"vp"}),
    "ppc": ("bottom", "p2m", "offset", {"vp"}),
    "ppc-p2m": ("bottom", "p2m", "offset", {"vp", "p2m"}),
}


@pytest.mark.parametrize("profile", list(PROFILES))
def test_dom0_and_reserved_region(profile):
    at, dom0_mode, placement, modes = EXPECTED[profile]
    hv = Hypervisor("h", 64 * MiB, profile=profile)
    reserved = hv.allocator.reserved
    if at == "bottom":
        assert reserved.start == 0
    else:
        assert reserved.stop == hv.memory.nframes
    dom0 = hv.domain(DOM0_NAME)
    assert dom0.mode.value == dom0_mode and dom0.is_dom0
    assert not np.isin(dom0.p2m, np.arange(reserved.start, reserved.stop)).any()
    if placement == "identity":      # ia64: physical 0 is machine 0
        assert dom0.p2m[0] == 0 and np.all(np.diff(dom0.p2m) == 1)
        assert dom0.describe()["machine_range"] == [0, dom0.npages - 1]
    elif placement == "offset":      # ppc: one run just above Xen at machine 0
        assert dom0.p2m[0] == reserved.stop and np.all(np.diff(dom0.p2m) == 1)
    else:                            # drawn from the top of memory, not a run at Xen's edge
        assert not (np.all(np.diff(dom0.p2m) == 1) and dom0.p2m[0] in (0, reserved.stop))
    assert {m.value for m in hv.profile.guest_modes} == modes
    c = hv.frame_counts()
    assert c["used"] == dom0.npages and c["free"] + c["used"] + c["reserved"] == c["total"]
    for m in Mode:
        if m.value in modes:
            hv.create_domain(f"g-{m.name.lower()}", 4 * MiB, m)
        else:
            with pytest.raises(ModeError, match="allowed: " + ", ".join(
                    x.value for x in hv.profile.guest_modes)):
                hv.create_domain("refused", 4 * MiB, m)
    assert "refused" not in hv.domains


def test_dom0_cannot_be_destroyed_paused_or_squeezed():
    hv = Hypervisor("h", 64 * MiB, dom0_memory_bytes=8 * MiB)
    for op in (hv.destroy_domain, hv.pause, hv.unpause):
        with pytest.raises(DomainStateError, match="dom0"):
            op(DOM0_NAME)
    free = hv.frame_counts()["free"] * 4096
    with pytest.raises(Exception, match="dom0's memory is not given up"):
        hv.create_domain("big", free + 4096)
    with pytest.raises(ConfigError, match="dom0 needs"):
        Hypervisor("h", 16 * MiB, dom0_memory_bytes=16 * MiB)


@pytest.mark.parametrize("profile,mode", [(p, m) for p, e in EXPECTED.items()
                                          for m in sorted(e[3]) if m != "p==m"])
def test_migration_within_profile(in_process, profile, mode):
    tb = in_process(hosts=2, default_profile=profile, host_memory_bytes=64 * MiB)
    tb.create("host-0", GuestSpec("g", 4 * MiB, mode,
                                  workload=WorkloadSpec("uniform", 5000, seed=1)))
    report = tb.migrate("g", "host-1", MigrationSettings(link_bytes_per_second=256 * MiB))
    assert report.status == "completed", report.error
    assert report.integrity.verified is True
    assert report.profile == profile
    assert report.modes == {"before": mode, "during": "vp", "after": mode}
    assert tb.where("g") == "host-1"
    assert tb.host("host-1").call("page_table_problem", "g") is None
    for h in ("host-0", "host-1"):
        c = tb.host(h).call("frame_counts")
        frames = tb.host(h).call("guest_frames")
        assert c["used"] == sum(frames.values()), "frame accounting exact, dom0 included"


def test_cross_architecture_migration_is_refused(in_process):
    tb = in_process(hosts=2, profiles={"host-0": "ia64", "host-1": "ppc"},
                    host_memory_bytes=64 * MiB)
    tb.create("host-0", GuestSpec("g", 4 * MiB, "vp"))
    free = tb.host("host-1").call("frame_counts")["free"]
    with pytest.raises(ModeError, match="architecture"):
        tb.migrate("g", "host-1")
    assert tb.host("host-1").call("frame_counts")["free"] == free
    assert tb.where("g") == "host-0"


def test_mixed_variants_of_one_arch(in_process):
    """ia64 <-> ia64-p2m works for VP guests; ppc-p2m -> ppc refuses a P2M guest."""
    tb = in_process(hosts=4, profiles={"host-0": "ia64", "host-1": "ia64-p2m",
                                       "host-2": "ppc-p2m", "host-3": "ppc"},
                    host_memory_bytes=64 * MiB)
    tb.create("host-0", GuestSpec("v", 4 * MiB, "vp"))
    assert tb.migrate("v", "host-1").status == "completed"
    tb.create("host-2", GuestSpec("p", 4 * MiB, "p2m"))
    with pytest.raises(ModeError, match="does not allow p2m"):
        tb.migrate("p", "host-3")
    assert tb.where("p") == "host-2"
    with pytest.raises(MigrationError):
        tb.migrate("p", "host-2")
