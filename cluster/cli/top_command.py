"""`migbed top`: the running cluster, live, as `xl top` shows a Xen host: hosts, guests, the
migrations running and the last ones that ended (`cluster.top`), redrawn every `--interval`.
`q` or Ctrl-C leaves; `--once` prints one frame (two samples a second apart) and exits."""

import argparse
import os
import select
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from cluster.cli.options import Commands, arg
from nodes.units import parse_seconds

DEFAULT_INTERVAL_SECONDS = 1.0
MIN_INTERVAL_SECONDS = 0.1
QUIT_KEYS = ("q", "Q")


def _interval(text: str) -> float:
    from nodes.errors import ConfigError
    seconds = parse_seconds(text, "--interval")
    if seconds < MIN_INTERVAL_SECONDS:
        raise ConfigError(f"--interval must be at least {MIN_INTERVAL_SECONDS * 1000:.0f}ms "
                          f"(each refresh asks every host), got {text!r}")
    return seconds


def cmd_top(args: argparse.Namespace) -> int:
    from cluster.console import show, top_renderables
    from cluster.testbed import Testbed
    from cluster.top import sample_frame
    tb = Testbed.attach()
    if args.once:
        show(*top_renderables(sample_frame(tb)))
        return 0
    try:
        _live(tb, args.interval)
    except KeyboardInterrupt:
        pass                              # Ctrl-C is one of the two ways out
    return 0


def _live(tb, interval: float) -> None:
    from rich.console import Group
    from rich.live import Live

    from cluster.console import make_console, top_renderables
    from cluster.top import build_frame, take_snapshots
    console = make_console()
    footer = f"refreshed every {interval:g} s; q or Ctrl-C quits"
    before = None
    with _keys() as quit_within, Live(console=console, screen=console.is_terminal,
                                      auto_refresh=False, transient=False) as live:
        while True:
            start = time.monotonic()
            after = take_snapshots(tb)
            live.update(Group(*top_renderables(build_frame(before, after), footer)),
                        refresh=True)
            before = after
            if quit_within(max(0.0, interval - (time.monotonic() - start))):
                return


@contextmanager
def _keys() -> Iterator:
    """A function `quit_within(seconds)`: waits up to `seconds`, True once `q` is pressed.
    On a terminal, keys are read one by one (cbreak: Ctrl-C still interrupts); otherwise
    there is nothing to read and it only waits."""
    stdin = sys.stdin
    if stdin is None or not stdin.isatty():
        yield lambda seconds: time.sleep(seconds) or False
        return
    import termios
    import tty
    fd = stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)

    def quit_within(seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([fd], [], [], left)
            if ready and _quit_pressed(fd):
                return True
        return False
    try:
        yield quit_within
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _quit_pressed(fd: int) -> bool:
    """The keys typed since the last look: a `q` among them (or the terminal gone)."""
    data = os.read(fd, 32)
    return not data or any(chr(b) in QUIT_KEYS for b in data)


def register(sub: Commands) -> None:
    s = sub.add_parser("top", help="the running cluster, live: hosts, guests, migrations "
                       "running and the last ones (q or Ctrl-C quits)")
    s.add_argument("--interval", type=arg(_interval), default=DEFAULT_INTERVAL_SECONDS,
                   metavar="SECONDS",
                   help=f"seconds between refreshes, e.g. 500ms (default "
                        f"{DEFAULT_INTERVAL_SECONDS:g}s)")
    s.add_argument("--once", action="store_true",
                   help="sample twice a second apart, print one frame and exit (for scripts)")
    s.set_defaults(func=cmd_top)
