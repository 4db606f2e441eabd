"""The one family of value parsers (nodes.units) the CLI, scenario files and faults share:
what each accepts, and the one-line message that says how to mend what it refuses."""

import math

import pytest

from nodes.errors import ConfigError
from nodes.units import (
    parse_bandwidth,
    parse_bandwidth_or_unlimited,
    parse_count,
    parse_fraction,
    parse_positive_size,
    parse_seconds,
)

MiB = 1 << 20

GOOD = [
    (parse_positive_size, ("64MiB", "x"), {}, 64 * MiB),
    (parse_positive_size, (4096, "x"), {}, 4096),
    (parse_bandwidth, ("128MiB", "x"), {}, 128.0 * MiB),
    (parse_bandwidth, (1.5e6, "x"), {}, 1.5e6),          # a float: not whole bytes, fine
    (parse_bandwidth_or_unlimited, ("unlimited", "x"), {}, None),
    (parse_bandwidth_or_unlimited, (" Off ", "x"), {}, None),
    (parse_bandwidth_or_unlimited, ("1GiB", "x"), {}, float(1 << 30)),
    (parse_seconds, ("300ms", "x"), {}, 0.3),
    (parse_seconds, (0, "x"), {"allow_zero": True}, 0.0),
    (parse_count, ("3", "x"), {}, 3),
    (parse_count, (7, "x", 1, 7), {}, 7),
    (parse_fraction, ("0.25", "x"), {}, 0.25),
    (parse_fraction, (1, "x"), {}, 1.0),
]


@pytest.mark.parametrize(("parse", "args", "kwargs", "want"), GOOD)
def test_parsers_accept(parse, args, kwargs, want):
    got = parse(*args, **kwargs)
    assert got == want and type(got) is type(want)


BAD = [
    (parse_positive_size, ("0", "--memory"), {}, "--memory must be positive, got '0'"),
    (parse_positive_size, ("lots", "--memory"), {}, "cannot read 'lots' as a size"),
    (parse_bandwidth, (0, "--bandwidth"), {}, "--bandwidth must be positive, got 0; write e.g. "
                                               "128MiB (per second)"),
    (parse_bandwidth, (math.inf, "--bandwidth"), {}, "must be positive"),
    (parse_bandwidth_or_unlimited, (-1.0, "[migration] bandwidth"), {},
     'must be positive, got -1.0; write e.g. 128MiB (per second) or "unlimited"'),
    (parse_bandwidth_or_unlimited, ("fast", "[migration] bandwidth"), {},
     "[migration] bandwidth: cannot read 'fast'"),
    (parse_seconds, ("0", "--timeout"), {}, "--timeout must be positive"),
    (parse_seconds, (-1, "latency"), {"allow_zero": True}, "latency must be >= 0"),
    (parse_seconds, ("soon", "--timeout"), {}, "cannot read 'soon' as a duration"),
    (parse_count, ("two", "--guests"), {}, "--guests must be a whole number, got 'two'"),
    (parse_count, (True, "repeats"), {}, "repeats must be a whole number"),
    (parse_count, (2.0, "repeats"), {}, "repeats must be a whole number"),
    (parse_count, (0, "--hosts", 1), {}, "--hosts must be >= 1, got 0"),
    (parse_count, (65, "--concurrency", 1, 64), {}, "--concurrency must be 1..64, got 65"),
    (parse_fraction, ("1.5", "--hot-share"), {}, "--hot-share must be between 0 and 1"),
    (parse_fraction, ("half", "--hot-share"), {}, "--hot-share must be a number"),
    (parse_fraction, (float("nan"), "hot_share"), {}, "between 0 and 1"),
]


@pytest.mark.parametrize(("parse", "args", "kwargs", "fragment"), BAD)
def test_parsers_refuse_in_one_line_naming_the_setting(parse, args, kwargs, fragment):
    with pytest.raises(ConfigError) as exc:
        parse(*args, **kwargs)
    assert fragment in str(exc.value) and "\n" not in str(exc.value)


def test_the_cli_and_a_scenario_refuse_a_value_alike(tmp_path, capsys):
    """The same bad bandwidth, on the command line and in a scenario file: one parser, one
    message (but the label)."""
    from cluster.cli import main
    from cluster.sweep import load_scenario
    assert main(["migrate", "--bandwidth", "0"]) == 2
    cli = capsys.readouterr().err
    path = tmp_path / "s.toml"
    path.write_text('name = "s"\n[migration]\nbandwidth = "0"\n')
    with pytest.raises(ConfigError) as exc:
        load_scenario(path)
    assert "--bandwidth must be positive, got '0'; write e.g. 128MiB (per second)" in cli
    assert "[migration] bandwidth must be positive, got '0'; write e.g. 128MiB" in str(exc.value)
