"""WorkloadSpec: what a guest's vCPU does to its memory, as a frozen, JSON-round-trippable spec.

Rates are page writes per second (page reads for `scan`, which writes nothing);
`rate_pages_per_second == 0` means as fast as the vCPU can.
"""

import base64
import json
from dataclasses import asdict, dataclass, fields

from nodes.errors import ConfigError
from workloads.content import COUNTER_BYTES, check_fill
from workloads.tracefile import read_trace_bytes

PROGRAMS = ("kvstore", "stream", "sort", "matmul")    # programs: `workloads.program`
PATTERNS = ("idle", "uniform", "hotset", "sequential", "phased", "scan")
# Workloads that replay a recording rather than follow a pattern (tests that run every
# pattern over a bare spec leave them out: a replay needs its trace).
REPLAYS = ("trace",)
WORKLOADS = PATTERNS + PROGRAMS + REPLAYS
MAX_WRITE_BYTES = 1 << 16        # the largest page size a host may have
MAX_TRACE_BYTES = 6 << 20        # a trace's bytes cross in GUEST_INFO (bounded on the wire)


@dataclass(frozen=True)
class WorkloadSpec:
    pattern: str = "idle"
    rate_pages_per_second: float = 0.0   # 0: as fast as it can ("max")
    seed: int = 0
    # hotset: a writable working set of `hot_fraction` of the pages gets `hot_share` of writes
    hot_fraction: float = 0.1
    hot_share: float = 0.9
    # phased: `busy_seconds` at the rate, then `quiet_seconds` at rate x `quiet_rate_fraction`
    busy_seconds: float = 1.0
    quiet_seconds: float = 1.0
    quiet_rate_fraction: float = 0.0
    # How many bytes of a page each write rewrites (8: the counter alone; the page size:
    # all of it, as guestperf's stress does), and what memory holds before the workload
    # starts (`workloads.content.FILLS`).
    write_bytes: int = 8
    fill: str = "zero"
    # The programs (`PROGRAMS`, `workloads.program`): their operations per second (0: as
    # fast as the vCPU runs); kvstore's client: Zipf skew of its keys, share of gets, bytes
    # per value and how many keys (0: as many as fill half its memory).
    ops_per_second: float = 0.0
    zipf: float = 0.99
    get_ratio: float = 0.9
    value_size: int = 256
    keys: int = 0
    # trace: replay a recorded program's writes (`workloads.tracereplay`): `trace` names the
    # file or shipped trace, `trace_bytes` are its bytes (read when the spec is made, so they
    # travel with it to hosts that lack the file), played at `trace_speed`, looping or not.
    trace: str = ""
    trace_speed: float = 1.0
    trace_loop: bool = False
    trace_bytes: bytes = b""

    def __post_init__(self) -> None:
        if self.pattern not in WORKLOADS:
            raise ConfigError(
                f"unknown workload {self.pattern!r}; use one of {', '.join(WORKLOADS)}")
        if not self.rate_pages_per_second >= 0:
            raise ConfigError(
                f"dirty rate must be >= 0 page writes per second (0 or 'max': as fast as it "
                f"can), got {self.rate_pages_per_second}")
        if not 0 < self.hot_fraction <= 1:
            raise ConfigError(f"hot_fraction must be in (0, 1], got {self.hot_fraction}")
        if not 0 <= self.hot_share <= 1:
            raise ConfigError(f"hot_share must be in [0, 1], got {self.hot_share}")
        if not (self.busy_seconds > 0 and self.quiet_seconds >= 0):
            raise ConfigError("phased workload needs busy_seconds > 0 and quiet_seconds >= 0")
        if not 0 <= self.quiet_rate_fraction <= 1:
            raise ConfigError("quiet_rate_fraction must be in [0, 1]")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed!r}")
        if (isinstance(self.write_bytes, bool) or not isinstance(self.write_bytes, int)
                or not COUNTER_BYTES <= self.write_bytes <= MAX_WRITE_BYTES):
            raise ConfigError(f"write bytes must be a whole number from {COUNTER_BYTES} (the "
                              f"page's counter alone) to the page size, got "
                              f"{self.write_bytes!r}")
        check_fill(self.fill)
        self._check_program()
        self._check_trace()

    def _check_program(self) -> None:
        """A program's dirtying comes from what it computes: the pattern knobs are refused."""
        if not self.ops_per_second >= 0 or self.ops_per_second == float("inf"):
            raise ConfigError(f"ops per second must be a finite number >= 0 (0 or 'max': as "
                              f"fast as it runs), got {self.ops_per_second}")
        if not 0 <= self.zipf <= 10:
            raise ConfigError(f"zipf skew must be in [0, 10] (0: uniform keys), got {self.zipf}")
        if not 0 <= self.get_ratio <= 1:
            raise ConfigError(f"get ratio must be in [0, 1], got {self.get_ratio}")
        if (isinstance(self.value_size, bool) or not isinstance(self.value_size, int)
                or not 8 <= self.value_size <= MAX_WRITE_BYTES):
            raise ConfigError(f"value size must be a whole number of bytes from 8 to "
                              f"{MAX_WRITE_BYTES}, got {self.value_size!r}")
        if isinstance(self.keys, bool) or not isinstance(self.keys, int) or self.keys < 0:
            raise ConfigError(f"keys must be a whole number >= 0 (0: as many as fill half "
                              f"the memory), got {self.keys!r}")
        if self.pattern not in PROGRAMS:
            return
        given = [flag for flag, value, default in (
            ("--dirty-rate", self.rate_pages_per_second, 0.0),
            ("--hot-fraction", self.hot_fraction, 0.1), ("--hot-share", self.hot_share, 0.9),
            ("--write-bytes", self.write_bytes, 8), ("--fill", self.fill, "zero"))
            if value != default]
        if given:
            raise ConfigError(f"{self.pattern} is a program: its dirtying comes from what it "
                              f"computes, so it takes no {', '.join(given)} (give "
                              f"--ops-per-second and its own options)")

    @property
    def is_program(self) -> bool:
        return self.pattern in PROGRAMS

    def _check_trace(self) -> None:
        """A trace workload's bytes: from its file where the file is (a sweep's `replace`
        may have named another), else the ones it came with (a host on another node)."""
        if isinstance(self.trace_bytes, str):          # from JSON: base64
            object.__setattr__(self, "trace_bytes", base64.b64decode(self.trace_bytes))
        if self.pattern != "trace":
            if self.trace or self.trace_bytes:
                raise ConfigError("--trace is for --workload trace")
            return
        if not (self.trace_speed > 0 and self.trace_speed < 1e6):
            raise ConfigError(f"trace speed must be > 0 (1: as recorded), got "
                              f"{self.trace_speed}")
        if self.trace:
            try:
                object.__setattr__(self, "trace_bytes", read_trace_bytes(self.trace))
            except ConfigError:
                if not self.trace_bytes:
                    raise
        elif not self.trace_bytes:
            raise ConfigError("--workload trace needs --trace FILE or NAME (`migbed trace "
                              "list`)")
        if len(self.trace_bytes) > MAX_TRACE_BYTES:
            raise ConfigError(f"trace {self.trace!r} is {len(self.trace_bytes)} bytes; a "
                              f"replayed trace may be at most {MAX_TRACE_BYTES} (it travels "
                              "with the guest): record a shorter one (--duration)")

    @property
    def unlimited(self) -> bool:
        if self.pattern in PROGRAMS:
            return self.ops_per_second == 0
        return self.rate_pages_per_second == 0 and self.pattern != "idle"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "WorkloadSpec":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown workload settings: {', '.join(sorted(unknown))}")
        return cls(**data)

    def to_json(self) -> str:
        d = self.to_dict()
        d["trace_bytes"] = base64.b64encode(self.trace_bytes).decode()
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "WorkloadSpec":
        return cls.from_dict(json.loads(text))


def parse_rate(text: "str | float | int") -> float:
    """`20000`, `2.5e4` or `max` (= 0, as fast as it can) page writes per second."""
    if isinstance(text, str) and text.strip().lower() in ("max", "unlimited"):
        return 0.0
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ConfigError(
            f"cannot read dirty rate {text!r}: give page writes per second, e.g. 20000, "
            "or 'max'") from None
    if not value >= 0 or value == float("inf"):
        raise ConfigError(f"dirty rate must be a finite number >= 0, got {text!r}")
    return value
