"""What migbed shows people on a terminal, drawn with rich: the `migbed list` tables, the
line per pre-copy round of `migrate` and `demo`, the model's rounds, the bench's figures and
their comparison with a saved run, the demo's summary, the progress bar of sweeps and soaks,
and the frames of `migbed top`.

Everything here is laid out for people but stays readable for scripts and tests: on a
terminal rich adds colour and a live bar; to a pipe or a file it writes plain text (no ANSI
codes), at least 120 columns wide, and never wraps a line (`soft_wrap`).
"""

import io
import shutil
import sys
import time
from collections.abc import Iterable
from typing import IO, Any

from rich import box
from rich.console import Console, RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from nodes.migration.progress import Progress as MigrationProgress
from nodes.phase import Outcome
from nodes.units import format_bytes

MIN_WIDTH = 120          # a terminal's console is at least this wide, a wider one its width
FILE_WIDTH = 200         # to a pipe or a file: room for every table, which is never cut


def make_console(out: IO[str] | None = None) -> Console:
    """A console on `out` (default: stdout as it is now, so captured output is caught)."""
    out = out if out is not None else sys.stdout
    tty = hasattr(out, "isatty") and out.isatty()
    width = (max(MIN_WIDTH, shutil.get_terminal_size((MIN_WIDTH, 24)).columns) if tty
             else FILE_WIDTH)
    return Console(file=out, width=width, soft_wrap=True, no_color=not tty, highlight=False,
                   emoji=False, markup=False)


def show(*renderables: RenderableType, out: IO[str] | None = None) -> None:
    """Each renderable on lines of its own; to a pipe or file without the spaces rich pads
    a table's last column with."""
    console = make_console(out)
    if console.is_terminal:
        _print(console, renderables)
    else:
        console.file.write(render_text(*renderables) + "\n")
        console.file.flush()


def _print(console: Console, renderables: Iterable[RenderableType]) -> None:
    for r in renderables:      # one print each: rich would join texts on one line
        console.print(r)


def render_text(*renderables: RenderableType) -> str:
    """The renderables as plain text, for a `table()` method or a file."""
    buffer = io.StringIO()
    _print(make_console(buffer), renderables)
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines())


def _table(*columns: str, title: str | None = None) -> Table:
    """A borderless table with a ruled header; columns named with a leading '>' are numbers,
    aligned right."""
    t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True,
              title=title, title_justify="left", title_style="bold")
    for c in columns:
        right = c.startswith(">")
        t.add_column(c.lstrip(">"), justify="right" if right else "left", no_wrap=True)
    return t


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


# -- migbed list ---------------------------------------------------------------------------
def listing_tables(listing: dict) -> tuple[Table, Table]:
    """The hosts with their frames, and every guest with where its memory lies."""
    hosts = _table("HOST", "PROFILE", ">FRAMES", ">FREE", ">RESERVED", ">USED", ">DOM0",
                   "HYPERVISOR AT", "RAY NODE", "DATA PLANE")
    for h in listing["hosts"]:
        f = h["frames"]
        lo, hi = h["hypervisor_frames"]
        node = h.get("ray_node")        # absent for in-process hosts
        hosts.add_row(h["name"], h["profile"], str(f["total"]), str(f["free"]),
                      str(f["reserved"]), str(f["used"]), str(f["dom0"]), f"mfn {lo}..{hi}",
                      f"{node['node_id'][:12]} ({node['ip']})" if node else "-",
                      h.get("address", "-"))
    guests = _table("GUEST", "HOST", "MODE", ">MEMORY", "STATE", "WORKLOAD", ">WRITES",
                    "VCPU", ">PID", "MACHINE RANGE")
    for g in listing["guests"]:
        rng = g.get("machine_range")
        vcpu = (f"{g['vcpus']} {g['vcpu']}" if g.get("vcpu") else "-")
        guests.add_row(g["name"], g["host"], g["mode"], format_bytes(g["memory_bytes"]),
                       g["state"], "(toolstack)" if g["dom0"] else g.get("workload", "-"),
                       str(g.get("pages_written_total", 0)), vcpu,
                       str(g["pid"]) if g.get("pid") else "-",
                       f"mfn {rng[0]}..{rng[1]}" if rng else "scattered")
    return hosts, guests


def print_listing(listing: dict, out: IO[str] | None = None) -> None:
    hosts, guests = listing_tables(listing)
    show(hosts, Text(""), guests, out=out)


# -- a migration's rounds as they finish ------------------------------------------------------
class RoundPrinter:
    """One line per finished round, as `xl migrate` prints them; give it to
    `Testbed.migrate` as its progress callback."""

    def __init__(self, out: IO[str] | None = None, header: str | None = None):
        self.console = make_console(out if out is not None else sys.stderr)
        self.shown = 0
        self.header = header   # printed once the migration is under way, not before checks

    def __call__(self, progress: MigrationProgress) -> None:
        if self.header:
            self.console.print(Text(self.header, style="bold"))
            self.header = None
        for r in progress.rounds[self.shown:]:
            tag = ("post-copy" if r.get("postcopy") else "final" if r["final"]
                   else f"round {r['index']}")
            line = Text(f"  {tag:>8}", style="bold cyan" if r["final"] else "cyan")
            line.append(f": sent {r['pages_sent']:>7} pages, skipped {r['pages_skipped']:>6}, "
                        f"dirtied {r['pages_dirtied']:>7} in "
                        f"{r['duration_seconds'] * 1000:7.1f} ms "
                        f"({format_bytes(r['throughput_bytes_per_second'])}/s)")
            if r.get("cpu_throttle_percentage"):
                line.append(f", throttle {r['cpu_throttle_percentage']} %", style="yellow")
            if r.get("dirty_limit_throttle_seconds"):
                line.append(f", dirty-limit slept {r['dirty_limit_throttle_seconds'] * 1000:.0f}"
                            " ms", style="yellow")
            self.console.print(line)
        self.shown = len(progress.rounds)


# -- migbed model ----------------------------------------------------------------------------
def prediction_renderables(prediction: dict, heading: str) -> list[RenderableType]:
    """A model prediction (`ModelPrediction.to_dict()`): its rounds, how it stopped, totals."""
    rounds = _table(">round", ">sent", ">skipped", ">dirtied", ">time")
    for r in prediction["rounds"]:
        rounds.add_row("final" if r.get("final") else str(r["index"]),
                       f"{r['pages_sent']:.0f}", f"{r['pages_skipped']:.0f}",
                       f"{r['pages_dirtied']:.0f}", f"{r['duration_seconds'] * 1000:.1f} ms")
    p = prediction
    out = [Text(heading, style="bold"), rounds,
           Text(f"stop reason: {p['stop_reason']} (converged: {p['converged']})"),
           Text(f"total time {_ms(p['total_time_seconds'])}, downtime "
                f"{_ms(p['downtime_seconds'])}, {p['pages_sent_total']:.0f} pages sent")]
    if p.get("throttle_schedule"):
        steps = ", ".join(f"{pct} % at {t:.1f} s" for t, pct in p["throttle_schedule"])
        out.append(Text(f"auto-converge: {steps}; {p['cpu_throttle_percentage']} % at the end"))
    if p.get("dirty_limit_schedule"):
        t, us = p["dirty_limit_schedule"][-1]
        out.append(Text(f"dirty-limit: from {p['dirty_limit_schedule'][0][0]:.1f} s, the vCPU "
                        f"sleeps {us / 1000:.0f} ms per full dirty ring at the end"))
    if pc := p.get("postcopy"):
        out.append(Text(f"post-copy after {pc['switched_after_rounds']} live rounds at "
                        f"{_ms(pc['switched_at_seconds'])}: {pc['discard_pages']:.0f} pages "
                        f"missing, {pc['expected_faults']:.0f} expected faults, the last page "
                        f"after {_ms(pc['postcopy_seconds'])}"))
    return out


# -- migbed bench ------------------------------------------------------------------------------
def bench_renderables(heading: str, figures: Iterable[tuple[str, str, str, str, str]],
                      ratios: dict[str, float | None], conclusions: list[str],
                      errors: dict[str, str]) -> list[RenderableType]:
    """The bench's figures (name, median, min, max, unit; already formatted), the ratios of
    their medians, its conclusions and the sections that failed."""
    table = _table("figure", ">median", ">min", ">max", "unit")
    for row in figures:
        table.add_row(*row)
    out: list[RenderableType] = [Text(heading, style="bold"), table]
    if ratios:
        r = _table("ratio", ">value", title="ratios (of medians)")
        for name, v in ratios.items():
            r.add_row(name, "-" if v is None else f"{v:.3f}")
        out += [Text(""), r]
    if conclusions:
        out += [Text(""), *(Text(f"* {c}") for c in conclusions)]
    if errors:
        out += [Text(""), *(Text(f"! {k} failed: {v}", style="bold red")
                            for k, v in errors.items())]
    return out


def bench_comparison_renderables(heading: str, rows: Iterable[tuple[str, ...]],
                                 differences: list[str], changed: int) -> list[RenderableType]:
    """This bench run beside a saved one (`cluster.bench.compare.Comparison.rows`): each
    figure's median (min-max) then and now, their ratio, and the figures that changed."""
    table = _table("figure", "unit", ">old median (min-max)", ">new median (min-max)",
                   ">new/old", "change", title="against the saved run")
    for name, unit, old, new, ratio, flag in rows:
        table.add_row(name, unit, old, new, ratio,
                      Text(flag, style="bold yellow") if flag == "CHANGED" else flag)
    out: list[RenderableType] = [Text(heading, style="bold")]
    out += [Text(f"  differs: {d}") for d in differences]
    out += [table, Text(f"{changed} figure{'' if changed == 1 else 's'} changed (new median "
                        "outside the old run's min-max and old median outside the new's)")]
    return out


# -- migbed demo ------------------------------------------------------------------------------
def migrations_table(reports: Iterable[Any]) -> Table:
    """Every migration of a run side by side (`MigrationReport`s), with the model's downtime."""
    t = _table("guest", "route", "profile", "policy", "modes", ">rounds", ">pages", ">total",
               ">downtime", ">guest saw", ">model", "verified", title="SUMMARY")
    for r in reports:
        predicted = ((r.model.prediction if r.model else None) or {}).get("downtime_seconds")
        t.add_row(r.guest, f"{r.source}>{r.destination}", r.profile or "-", r.policy,
                  f"{r.modes['before']}/{r.modes['during']}/{r.modes['after']}",
                  str(r.live_rounds), str(r.pages_sent_total), _ms(r.total_time_seconds),
                  _ms(r.downtime_seconds), _ms(r.guest_observed_downtime_seconds),
                  _ms(predicted), str(r.integrity.verified))
    return t


def reports_table(reports: Iterable[Any], names: Iterable[str]) -> Table:
    """Saved migration reports (`MigrationReport`s) side by side, each named by its file."""
    t = _table("report", "guest", "route", "policy", "status", ">rounds", ">pages",
               ">on the wire", ">total", ">downtime", ">guest saw", "stop code", "verified",
               title="MIGRATIONS")
    for name, r in zip(names, reports, strict=True):
        t.add_row(name, r.guest, f"{r.source}>{r.destination}", r.policy, r.status,
                  str(r.live_rounds), str(r.pages_sent_total), format_bytes(r.bytes_sent_total),
                  _ms(r.total_time_seconds), _ms(r.downtime_seconds),
                  _ms(r.guest_observed_downtime_seconds), r.stop_code or "-",
                  {True: "yes", False: "MISMATCH", None: "-"}[r.integrity.verified])
    return t


# -- sweeps and soaks ---------------------------------------------------------------------------
class Steps:
    """Progress through a known number of steps on stderr. On a terminal, a live rich bar
    whose text is the latest step (steps marked `failed` are also kept above it); elsewhere a
    line `[k/n] text` every `log_every` steps and at the last, for logs and tests."""

    def __init__(self, total: int, out: IO[str] | None = None, log_every: int = 1):
        self.console = make_console(out if out is not None else sys.stderr)
        self.total, self.done, self.log_every = total, 0, max(1, log_every)
        self.live = self.console.is_terminal
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(),
                                 console=self.console, disable=not self.live)
        self.task = self.progress.add_task("", total=total)

    def __enter__(self) -> "Steps":
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def step(self, text: str, failed: bool = False, at: int | None = None) -> None:
        """One more step done (or, with `at`, this many), described by `text`."""
        self.done = self.done + 1 if at is None else at
        line = f"[{self.done}/{self.total}] {text}"
        if self.live:
            if failed:
                self.progress.console.print(Text(line, style="red"))
            self.progress.update(self.task, completed=self.done, description=text[:60])
        elif self.done % self.log_every == 0 or self.done == self.total or failed:
            self.console.print(Text(line))


# -- migbed top -----------------------------------------------------------------------------------
TOP_BAR_WIDTH = 20


def _rate(bps: float | None) -> str:
    return "-" if bps is None else f"{format_bytes(bps)}/s"


def _per_second(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def top_renderables(frame: Any, footer: str = "") -> list[RenderableType]:
    """One frame of `migbed top` (`cluster.top.TopFrame`): hosts, guests, the running
    migrations and the last ones that ended."""
    hosts_up = sum(1 for h in frame.hosts if h["up"])
    rates = (f"rates over the last {frame.interval_seconds:.1f} s" if frame.interval_seconds
             else "rates from the next refresh on")
    heading = Text(f"migbed top  {time.strftime('%H:%M:%S', time.localtime(frame.wall))}  "
                   f"{hosts_up}/{len(frame.hosts)} hosts up, "
                   f"{len({g['name'] for g in frame.guests})} guests, "
                   f"{len(frame.running)} migration{'' if len(frame.running) == 1 else 's'} "
                   f"running ({rates})", style="bold")
    out: list[RenderableType] = [heading, _top_hosts(frame), _top_guests(frame),
                                 _top_running(frame), _top_recent(frame)]
    if footer:
        out.append(Text(footer, style="dim"))
    return out


def _top_hosts(frame: Any) -> Table:
    t = _table("HOST", "PROFILE", ">USED", ">FREE", ">FRAMES", ">GUESTS", ">OUT", ">IN",
               title="HOSTS")
    for h in frame.hosts:
        if not h["up"]:
            t.add_row(h["name"], Text("unreachable", style="bold red"), *["-"] * 6)
            continue
        t.add_row(h["name"], h["profile"], str(h["frames_used"]), str(h["frames_free"]),
                  str(h["frames_total"]), str(h["guests"]), str(h["migrations_out"]),
                  str(h["migrations_in"]))
    return t


def _top_guests(frame: Any) -> Table:
    t = _table("GUEST", "HOST", "MODE", "STATE", ">MEMORY", "WORKLOAD", ">APP OPS/S",
               ">WRITES/S", title="GUESTS")
    for g in frame.guests:
        state = g["state"] + (" (migrating)" if g["migrating"] else "")
        t.add_row(g["name"], g["host"], g["mode"], state, format_bytes(g["memory_bytes"]),
                  g["workload"] or "-", _per_second(g.get("app_ops_per_second")),
                  _per_second(g["writes_per_second"]))
    return t


def _top_running(frame: Any) -> Table:
    extra = frame.optional_columns
    t = _table("GUEST", "ROUTE", "POLICY", "PHASE", ">ROUND", "TO SEND", ">LEFT",
               ">THROUGHPUT", ">OF LINK", ">DIRTY/S", ">EXP. DOWNTIME", ">ELAPSED",
               *(f">{head}" for _, head in extra), title="MIGRATIONS RUNNING")
    for m in frame.running:
        total, left = m.get("guest_memory_bytes"), m["remaining_bytes"]
        bar: RenderableType = "-"
        if total:
            bar = ProgressBar(total=total, completed=max(0, total - left),
                              width=TOP_BAR_WIDTH)
        link = m.get("link_bytes_per_second")
        t.add_row(m["guest"], f"{m['source']} > {m['destination'] or '?'}", m["policy"],
                  m["status"], str(m["round"]), bar,
                  format_bytes(left) + (f" ({left / total:.0%})" if total else ""),
                  _rate(m["throughput_bytes_per_second"]),
                  "unlimited" if not link else _rate(link),
                  _per_second(m.get("dirty_rate_pages_per_second")),
                  _ms(m.get("expected_downtime_seconds")), f"{m['elapsed_seconds']:.1f} s",
                  *(str(m.get(k, "-")) for k, _ in extra))
    if not frame.running:
        t.add_row("(none)", *[""] * (11 + len(extra)))
    return t


def _top_recent(frame: Any) -> Table:
    t = _table("GUEST", "ROUTE", "POLICY", "STATUS", ">ROUNDS", ">TOTAL", ">DOWNTIME",
               ">GUEST SAW", "VERIFIED", "ENDED", title="LAST MIGRATIONS")
    for r in frame.recent:
        ok = r["status"] == Outcome.COMPLETED
        status = Text(r["status"], style="green" if ok else "bold red")
        verdict = {True: "verified", False: "MISMATCH", None: "-"}[r["verified"]]
        t.add_row(r["guest"], f"{r['source'] or '?'} > {r['destination'] or '?'}",
                  r["policy"] or "-", status,
                  "-" if r["live_rounds"] is None else str(r["live_rounds"]),
                  _ms(r["total_time_seconds"]), _ms(r["downtime_seconds"]),
                  _ms(r["guest_observed_downtime_seconds"]), verdict,
                  time.strftime("%H:%M:%S", time.localtime(r["ended_wall"])))
    if not frame.recent:
        t.add_row("(none yet)", *[""] * 9)
    return t
