"""A migration's round stats count every dirtied page once, in the round it was dirtied in,
whatever the vCPU kind (the emulated log of a thread vCPU, the kernel's of a process vCPU) and
however the policy decides:

- a sync's newly marked pages are the pass under way's, else the last round's (a sync between
  two passes, the one at the pause): so the pages sent over the whole migration are the
  guest's pages plus every round's `pages_dirtied`, exactly;
- deciding between passes (xen), each round sends exactly what the one before it dirtied
  (a round CLEANs at its end, the next sends what that marked, plus what the pause's sync
  found for the final one); the final round (the guest paused) dirties nothing.

A mid-pass policy (qemu) has no per-round equality: a sync in a pass marks pages ahead of the
cursor (sent in the same pass) as well as behind it (the next pass's).
"""

import time

import pytest

from nodes.host.specs import GuestSpec
from nodes.migration.settings import MigrationSettings
from workloads.spec import WorkloadSpec

MiB = 1024 * 1024
GUEST_BYTES = 4 * MiB


def migrate_rounds(tb, vcpu: str, workload: WorkloadSpec, **settings) -> list[dict]:
    tb.create("host-0", GuestSpec("g", GUEST_BYTES, "p2m", vcpu=vcpu, workload=workload))
    time.sleep(0.2)                                  # the workload is under way
    report = tb.migrate("g", "host-1", MigrationSettings(link_bytes_per_second=16 * MiB,
                                                         **settings),
                        application_after_seconds=0.1)      # a program's: not 5 s of it
    assert report.status == "completed", report.error
    assert report.integrity.verified is True
    assert report.dirty_log == ("kernel" if vcpu == "process" else "emulated")
    return report.rounds


def check_rounds(rounds: list[dict], policy: str, page_size: int = 4096) -> None:
    final = rounds[-1]
    assert final["final"] and final["pages_dirtied"] == 0        # the guest was paused
    taken = sum(r["pages_sent"] + r["pages_skipped"] for r in rounds)
    assert taken == GUEST_BYTES // page_size + sum(r["pages_dirtied"] for r in rounds), rounds
    if policy != "qemu":
        for before, after in zip(rounds, rounds[1:], strict=False):
            assert after["pages_sent"] + after["pages_skipped"] == before["pages_dirtied"], \
                rounds


# Under qemu, a small downtime limit and a slow dirtier: a pass ends before the pending pages
# fall under the threshold, the sync then finds pages between passes (the case that read 0
# dirtied, its next round sending them); pages of random bytes make the first pass long
# enough for the guest's writes to land in it.
QEMU = {"policy": "qemu", "downtime_limit_seconds": 0.005}
CASES = [("uniform", {"policy": "xen"}, 3000), ("uniform", QEMU, 300),
         ("uniform", {"policy": "xen-legacy"}, 3000)]


@pytest.mark.parametrize("pattern,settings,rate", CASES)
def test_thread_vcpu_rounds_count_every_dirtied_page_once(in_process, pattern, settings, rate):
    tb = in_process(hosts=2, host_memory_bytes=32 * MiB)
    rounds = migrate_rounds(tb, "thread", WorkloadSpec(pattern, rate, seed=3, fill="random"),
                            max_iterations=4, **settings)
    check_rounds(rounds, settings["policy"])


@pytest.mark.uffd
@pytest.mark.parametrize("pattern,settings,rate", CASES)
def test_process_vcpu_rounds_count_every_dirtied_page_once(in_process, uffd_kernel, pattern,
                                                           settings, rate):
    tb = in_process(hosts=2, host_memory_bytes=32 * MiB)
    rounds = migrate_rounds(tb, "process", WorkloadSpec(pattern, rate, seed=3, fill="random"),
                            max_iterations=4, **settings)
    check_rounds(rounds, settings["policy"])


@pytest.mark.uffd
@pytest.mark.parametrize("settings", [{"policy": "xen"}, QEMU])
def test_a_program_guests_rounds_count_every_dirtied_page_once(in_process, uffd_kernel,
                                                               settings):
    tb = in_process(hosts=2, host_memory_bytes=32 * MiB)
    rounds = migrate_rounds(tb, "process", WorkloadSpec("kvstore", ops_per_second=3000,
                                                        seed=2),
                            max_iterations=4, **settings)
    check_rounds(rounds, settings["policy"])
