"""The measurements row of migbed's dashboard (issue 25): the dirty rates `migbed dirtyrate`
measured of each guest, by mode (QEMU's calc-dirty-rate: page-sampling, dirty-bitmap,
dirty-ring), beside the guest's true rate over the same window, so each mode's bias shows.
`build.py` adds it after the process vCPUs row."""

from grafana_foundation_sdk.builders.dashboard import Dashboard
from panelkit import HG, Panels, query, top


def measurements_row(d: Dashboard, p: Panels) -> Dashboard:
    """The measurements row."""
    return (
        d
        .with_row(p.row("Measurements"))
        .with_panel(p.ts(
            "Measured dirty rate beside the true rate", "The last dirty rate `migbed "
            "dirtyrate` measured of each guest, by mode, and the guest's true rate over the "
            "same window (its own counters: distinct pages written, for dirty-ring page "
            "writes; a program guest's, page-sampling's only: the pages the kernel's log saw). page-sampling undercounts a small hot set; "
            "a longer window reports a lower rate.", "short",
            [query(top(f"max by (guest, mode) (migbed_guest_dirty_rate_measured_pages_per_"
                       f"second{{{HG}}})"), "{{guest}} {{mode}}", "A"),
             query(top(f"max by (guest, mode) (migbed_guest_dirty_rate_true_pages_per_second"
                       f"{{{HG}}})"), "{{guest}} true ({{mode}} window)", "B")], width=24))
    )
