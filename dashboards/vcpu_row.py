"""The process vCPUs row of migbed's dashboard (issue 22): what runs each guest (threads of
its host or a guest process), the pages the kernel's dirty log reports process guests wrote,
and the post-copy fault latency by fault path (the Xen model's emulated faults, or a process
guest's real userfaultfd ones). `build.py` adds it after the post-copy row."""

from grafana_foundation_sdk.builders import table
from grafana_foundation_sdk.builders.dashboard import Dashboard
from grafana_foundation_sdk.models.prometheus import PromQueryFormat
from panelkit import HG, H, Panels, query, top, with_queries

FAULT_LATENCY = "migbed_migration_postcopy_fault_latency_seconds"


def process_vcpus_row(d: Dashboard, p: Panels) -> Dashboard:
    """The process vCPUs row."""
    return (
        d
        .with_row(p.row("Process vCPUs"))
        .with_panel(p.ts(
            "Guests by vCPU kind", "Guests whose vCPUs are threads of their host (thread) "
            "and guests that are processes of their own (process, `--vcpu process`).",
            "short", [query(f"count by (kind) (migbed_guest_vcpus{{{HG}}})", "{{kind}}")],
            stacked=True))
        .with_panel(with_queries(
            p._common(table.Panel(), "vCPUs of each guest", "Every guest, its host, its "
                      "vCPUs' kind and their number now.", 12, 8).unit("short"),
            [query(f"migbed_guest_vcpus{{{HG}}}", instant=True, fmt=PromQueryFormat.TABLE)]))
        .with_panel(p.ts(
            "Pages the kernel logged written", "Pages per second the kernel's dirty log "
            "(userfaultfd write-protect and PAGEMAP_SCAN) reported each process guest wrote, "
            "over a migration's CLEANs: its shadow faults.", "short",
            [query(top(f"sum by (guest) (rate(migbed_guest_kernel_written_pages_total{{{HG}}}"
                       "[$__rate_interval]))"), "{{guest}}")]))
        .with_panel(p.ts(
            "Fault latency by path (5m)", "Request to landed of the pages post-copy guests "
            "asked for in the last five minutes, by fault path: the Xen model's (emulated) "
            "or a process guest's userfaultfd (uffd).", "s",
            [query(f"histogram_quantile({q}, sum by (le, fault_path) (rate({FAULT_LATENCY}"
                   f"_bucket{{{H}}}[5m])))", f"{{{{fault_path}}}} p{round(q * 100)}", ref)
             for q, ref in ((0.5, "A"), (0.99, "B"))]))
    )
