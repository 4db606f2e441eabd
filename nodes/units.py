"""Reading and printing the values people write: sizes (`64MiB`), bandwidths (`128MiB` per
second), durations (`300ms`), counts and fractions.

One family of parsers for the CLI, scenario files and fault specs alike, so a value means the
same and is refused with the same one-line message wherever it is written. Each takes the
value (text, or a number from a TOML file) and a `what` label naming where it came from
(`--bandwidth`, `[migration] latency`), and raises `ConfigError` saying how to mend it.
A leaf module: it imports nothing of migbed but `nodes.errors`.
"""

import math
import re
from dataclasses import fields

from nodes.errors import ConfigError

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_DURATION_UNITS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "m": 60.0, "min": 60.0}
_NUMBER = r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*"
_UNLIMITED = ("unlimited", "none", "off")


def parse_size(text: str | int, what: str = "size") -> int:
    """Bytes from `64MiB`, `1GiB`, `4096` or an int, unchecked in range. Raises ConfigError
    on anything else."""
    if isinstance(text, bool):
        raise ConfigError(f"{what}: expected a size such as 64MiB, got {text!r}")
    if isinstance(text, int):
        return text
    m = re.fullmatch(_NUMBER, str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _SIZE_UNITS:
        raise ConfigError(
            f"{what}: cannot read {text!r} as a size; write e.g. 64MiB, 1GiB or plain bytes")
    value = float(m.group(1)) * _SIZE_UNITS[unit]
    if value != int(value):
        raise ConfigError(f"{what}: {text!r} is not a whole number of bytes")
    return int(value)


def parse_duration(text: str | float | int, what: str = "duration") -> float:
    """Seconds from `300ms`, `1.5s`, `2` (seconds) or a number, unchecked in range."""
    if isinstance(text, bool):
        raise ConfigError(f"{what}: expected a duration such as 300ms, got {text!r}")
    if isinstance(text, int | float):
        return float(text)
    m = re.fullmatch(_NUMBER, str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _DURATION_UNITS:
        raise ConfigError(f"{what}: cannot read {text!r} as a duration; write e.g. 300ms or 2s")
    return float(m.group(1)) * _DURATION_UNITS[unit]


def parse_positive_size(value: str | int, what: str) -> int:
    """A size in bytes that must be more than nothing (guest memory, page size)."""
    n = parse_size(value, what)
    if n <= 0:
        raise ConfigError(f"{what} must be positive, got {value!r}")
    return n


def parse_bandwidth(value: str | int | float, what: str) -> float:
    """Bytes per second from a size (`128MiB` means 128 MiB per second) or a number; a
    bandwidth need not be whole bytes, so floats pass as they are."""
    return _bandwidth(value, what, "write e.g. 128MiB (per second)")


def parse_bandwidth_or_unlimited(value: str | int | float, what: str) -> float | None:
    """`parse_bandwidth`, or None for `unlimited` (also `none`, `off`)."""
    if isinstance(value, str) and value.strip().lower() in _UNLIMITED:
        return None
    return _bandwidth(value, what, 'write e.g. 128MiB (per second) or "unlimited"')


def _bandwidth(value: str | int | float, what: str, hint: str) -> float:
    if isinstance(value, float):
        n = value if math.isfinite(value) else -1.0
    else:
        n = parse_size(value, what)
    if not n > 0:
        raise ConfigError(f"{what} must be positive, got {value!r}; {hint}")
    return float(n)


def parse_seconds(value: str | int | float, what: str, *, allow_zero: bool = False) -> float:
    """A duration in seconds that must be positive, or with `allow_zero` at least 0 (a
    latency, a warm-up)."""
    s = parse_duration(value, what)
    if not (s > 0 or (allow_zero and s == 0)) or math.isinf(s):
        raise ConfigError(f"{what} must be {'>= 0' if allow_zero else 'positive'} (e.g. "
                          f"300ms or 2s), got {value!r}")
    return s


def parse_completion_timeout(value: str | int | float,
                             what: str) -> tuple[float | None, float | None]:
    """A completion timeout: absolute (`30s`) -> (30.0, None), or per GiB of guest memory
    as KubeVirt's completionTimeoutPerGiB (`10s/GiB`) -> (None, 10.0)."""
    if isinstance(value, str) and "/" in value:
        amount, _, per = value.partition("/")
        if per.strip().lower() != "gib":
            raise ConfigError(f"{what}: cannot read {value!r}; write e.g. 30s, or 10s/GiB per "
                              "GiB of guest memory")
        return None, parse_seconds(amount, what)
    return parse_seconds(value, what), None


def parse_count(value: str | int, what: str, minimum: int = 0,
                maximum: int | None = None) -> int:
    """A whole number of things (hosts, repeats, rounds) from `minimum` to `maximum`."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(f"{what} must be a whole number, got {value!r}")
    try:
        n = int(value)
    except ValueError:
        raise ConfigError(f"{what} must be a whole number, got {value!r}") from None
    if n < minimum:
        raise ConfigError(f"{what} must be >= {minimum}, got {n}")
    if maximum is not None and n > maximum:
        raise ConfigError(f"{what} must be {minimum}..{maximum}, got {n}")
    return n


def parse_port_range(value: str, what: str) -> tuple[int, int]:
    """An inclusive range of TCP ports, `LOW-HIGH` (or one port), each 1..65535."""
    low, sep, high = str(value).partition("-")
    try:
        lo = parse_count(low.strip(), what, 1, 65535)
        hi = parse_count(high.strip(), what, 1, 65535) if sep else lo
    except ConfigError:
        raise ConfigError(f"{what} must be ports LOW-HIGH within 1-65535, e.g. 47000-47999, "
                          f"got {value!r}") from None
    if hi < lo:
        raise ConfigError(f"{what} must be LOW-HIGH with LOW <= HIGH, got {value!r}")
    return lo, hi


def parse_rounds_or_duration(value: str | int, what: str) -> tuple[int | None, float | None]:
    """(rounds, None) from a bare whole number (`5`: after 5 live rounds), (None, seconds)
    from a duration with its unit (`1.5s`, `500ms`: that long since the start); a number
    without a unit that is not whole is refused, as it could mean either."""
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected a number of rounds or a duration, got {value!r}")
    if isinstance(value, int):
        return parse_count(value, what), None
    text = str(value).strip()
    if re.fullmatch(r"[0-9]+", text):
        return parse_count(text, what), None
    m = re.fullmatch(_NUMBER, text)
    if not m or not m.group(2):
        raise ConfigError(f"{what}: cannot read {value!r}; write a whole number of live "
                          "rounds (e.g. 5) or a duration with its unit (e.g. 1.5s or 500ms)")
    return None, parse_seconds(text, what, allow_zero=True)


def parse_fraction(value: str | int | float, what: str) -> float:
    """A share from 0 to 1 (a hot set's size, the writes that hit it)."""
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be a number between 0 and 1, got {value!r}")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a number between 0 and 1, got {value!r}") from None
    if not 0 <= x <= 1:
        raise ConfigError(f"{what} must be between 0 and 1, got {value!r}")
    return x


def format_bytes(n: float) -> str:
    """`67108864` -> `64.0 MiB`, for human tables only."""
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def from_fields(cls, data: dict):
    """The dataclass `cls` from `data`; ConfigError names any key `cls` has no field for
    (a setting misspelt in a scenario or an API call is an error, not silently dropped)."""
    unknown = set(data) - {f.name for f in fields(cls)}
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} settings: {', '.join(sorted(unknown))}")
    return cls(**data)
