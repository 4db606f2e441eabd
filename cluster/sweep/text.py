"""How a sweep writes values for people and for its CSV: axis values canonically
(`show`), points as a person reads them (`point_text`: sizes in MiB, times in ms)."""

from nodes.units import format_bytes

_TIME_AXES = ("latency", "downtime_limit", "busy_seconds", "quiet_seconds", "dirty_limit_period",
              "completion_timeout", "progress_timeout")


def show(v: object) -> str:
    """An axis value as the CSV and the run files hold it: None is `unlimited`."""
    if v is None:
        return "unlimited"
    return f"{v:g}" if isinstance(v, float) else str(v)


def point_text(point: dict) -> str:
    """Axis values as a person reads them: sizes in MiB, times in ms."""
    return ", ".join(f"{k}={human(k, v)}" for k, v in point.items()) or "(single point)"


def human(axis: str, value: object) -> str:
    """One axis value for people: `64.0MiB`, `128.0MiB/s`, `300ms`, `0.05`."""
    if isinstance(value, str) and value != "unlimited":
        try:                                  # already shown canonically (an `axes` dict)
            value = float(value)
        except ValueError:
            return value
    if value is None or value == "unlimited":
        return "unlimited"
    if axis == "guest_memory":
        return format_bytes(value).replace(" ", "")
    if axis in ("bandwidth", "rate_limit", "postcopy_bandwidth"):
        return format_bytes(value).replace(" ", "") + "/s"
    if axis in _TIME_AXES:
        return f"{value * 1000:g}ms"
    if axis == "dirty_limit":                       # MB of 10^6 bytes, as QEMU's MB/s
        return f"{value / 1e6:g}MB/s"
    return f"{value:g}" if isinstance(value, float) else str(value)


def ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1000:.1f} ms"


def count(v: float | None) -> str:
    """A number of pages or rounds, or `-` where there is none."""
    return "-" if v is None else f"{v:.0f}"
