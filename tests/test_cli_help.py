"""Every command's `--help` works: the first thing a newcomer types never shows a traceback.

The parser is walked whole (every subcommand, recursively), and each one's help is formatted
and asked for as a user asks (`--help`, exit 0); the real `migbed` is run too, as a process.
"""

import argparse
import contextlib
import io
import subprocess
import sys

import pytest

from cluster.cli import build_parser, main
from cluster.cli.options import Parser, escape_help

MIGBED = [sys.executable, "-m", "cluster.cli"]


def _subcommands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(path, parser) of the parser and every subcommand under it, depth first."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subcommands(sub, (*path, name))


COMMANDS = [path for path, _ in _subcommands(build_parser())]


def test_the_walk_finds_every_command():
    names = {" ".join(path) for path in COMMANDS}
    assert {"", "migrate", "model", "evacuate", "soak", "create", "up", "sweep"} <= names
    assert len(COMMANDS) > 20


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "migbed")
def test_every_commands_help_formats_and_exits_0(path):
    parser = dict(_subcommands(build_parser()))[path]
    assert parser.format_help().strip()
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        with pytest.raises(SystemExit) as exc:
            main([*path, "--help"])
    assert exc.value.code == 0, err.getvalue()
    assert "usage: migbed" in out.getvalue()
    assert "Traceback" not in err.getvalue()


def test_a_bare_percent_in_any_help_cannot_crash():
    p = Parser(prog="x")
    p.add_argument("--a", help="first throttle, %")
    p.add_argument("--b", default=7, help="%(default)s %% of it, 100%")
    g = p.add_argument_group("group")
    g.add_argument("--c", help="50% hot")
    sub = p.add_subparsers(parser_class=Parser)
    sub.add_parser("s", help="a 10% command")
    text = p.format_help()
    assert "first throttle, %" in text and "7 % of it, 100%" in text and "50% hot" in text
    assert "a 10% command" in text
    assert escape_help("%(prog)s 5% %%") == "%(prog)s 5%% %%"


@pytest.mark.parametrize("args", [["--help"], ["migrate", "--help"]])
def test_the_real_migbed_help_exits_0(args):
    p = subprocess.run([*MIGBED, *args], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    assert p.stdout.startswith("usage: migbed")
