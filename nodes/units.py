"""Parsing and printing sizes (`64MiB`), rates (`128MiB` per second) and durations (`300ms`)."""

import re

from nodes.errors import ConfigError

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_DURATION_UNITS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "m": 60.0, "min": 60.0}
_NUMBER = r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*"


def parse_size(text: str | int, what: str = "size") -> int:
    """Bytes from `64MiB`, `1GiB`, `4096` or an int. Raises ConfigError on anything else."""
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
    """Seconds from `300ms`, `1.5s`, `2` (seconds) or a number."""
    if isinstance(text, bool):
        raise ConfigError(f"{what}: expected a duration such as 300ms, got {text!r}")
    if isinstance(text, int | float):
        return float(text)
    m = re.fullmatch(_NUMBER, str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _DURATION_UNITS:
        raise ConfigError(f"{what}: cannot read {text!r} as a duration; write e.g. 300ms or 2s")
    return float(m.group(1)) * _DURATION_UNITS[unit]


def format_bytes(n: float) -> str:
    """`67108864` -> `64.0 MiB`, for human tables only."""
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"
