"""Faults a user injects into a migration: what breaks (the kind) and when (the stage).

A fault is a frozen `FaultSpec`; `MigrationSettings.faults` carries a tuple of them, so they
travel with the settings to both hosts and round-trip through JSON and TOML. Written as text
(the CLI's `--fault`) a fault is `KIND@STAGE[:ARG]`, e.g. `stall-link@round1:2s`,
`slow-link@round0:1MiB` (per second), `kill-destination@stop-and-copy`.

Stages, in the order a migration passes them (each fault fires at most once):

- `setup`: the data channel is open, no page has moved;
- `roundN`: live round N has sent its first batch (the destination holds some pages);
- `stop-and-copy`: the guest is paused and its last pages are sent, before the vCPU context
  and END (the hand-over has not begun);
- `after-handover`: the source has given PERMISSION_TO_GO; the guest belongs to the
  destination from here on.

Where each kind acts (the injection seams):

- on the source's link (`SourceFaults`, wired into `nodes.migration.Sender` and
  `nodes.link.LinkSender`): `stall-link` (nothing crosses for a time), `cut-link` (the
  connection goes down), `slow-link` (the link's speed drops for the rest of the migration),
  `corrupt-record` (the next record's body is garbage), `truncate-stream` (half of the next
  record, then the connection closes);
- on the destination (`DestinationFaults`): `refuse-memory` (prepare fails as if the host
  had no free frames) and `delay-restore` (the restore stalls before READY at stop-and-copy,
  or before the resume after the hand-over);
- by the control plane (`cluster.faults.FaultControl`): `kill-destination`, `kill-source`.
  The sender stops at the fault's stage and shows it in its progress; the driver kills the
  host (a Ray actor killed, or an in-process host stopped with its sockets shut) and lets the
  sender go on, into whatever a dead peer does to it.

What a user may expect of each (the promise tested in tests/test_faults.py): any fault
before the hand-over leaves the guest running on its source in its own mode with its memory
intact, and the destination with none of its frames; after the hand-over the guest runs on
the destination. A host that dies takes its own guests with it, and the report says so.
"""

import select
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from enum import StrEnum

from nodes.errors import (
    ConfigError,
    MigrationCancelled,
    MigrationError,
    OutOfFramesError,
    StreamError,
)
from nodes.units import format_bytes, parse_duration, parse_size

MAX_FAULT_SECONDS = 3600.0     # a stall or delay longer than an hour is a typo, not a test
PEER_CHECK_SECONDS = 0.02      # how often a stalled sender looks whether its peer gave up


class FaultKind(StrEnum):
    KILL_DESTINATION = "kill-destination"
    KILL_SOURCE = "kill-source"
    STALL_LINK = "stall-link"
    CUT_LINK = "cut-link"
    SLOW_LINK = "slow-link"
    CORRUPT_RECORD = "corrupt-record"
    TRUNCATE_STREAM = "truncate-stream"
    REFUSE_MEMORY = "refuse-memory"
    DELAY_RESTORE = "delay-restore"


class Stage(StrEnum):
    SETUP = "setup"
    ROUND = "round"
    STOP_AND_COPY = "stop-and-copy"
    AFTER_HANDOVER = "after-handover"


ALL_STAGES = tuple(Stage)
_BEFORE_HANDOVER = (Stage.SETUP, Stage.ROUND, Stage.STOP_AND_COPY)

# kind -> (stages where it means something, its argument: None, "duration" or "bandwidth",
#          one line for `migbed fault list`)
KINDS: dict[FaultKind, tuple[tuple[Stage, ...], str | None, str]] = {
    FaultKind.KILL_DESTINATION: (ALL_STAGES, None, "the destination host dies"),
    FaultKind.KILL_SOURCE: (ALL_STAGES, None, "the source host dies (its guests die with it)"),
    FaultKind.STALL_LINK: (ALL_STAGES, "duration",
                           "nothing crosses the link for ARG (e.g. 2s)"),
    FaultKind.CUT_LINK: (ALL_STAGES, None, "the link goes down for good"),
    FaultKind.SLOW_LINK: (_BEFORE_HANDOVER, "bandwidth",
                          "the link's speed drops to ARG per second (e.g. 1MiB)"),
    FaultKind.CORRUPT_RECORD: (_BEFORE_HANDOVER, None, "the next record arrives as garbage"),
    FaultKind.TRUNCATE_STREAM: (_BEFORE_HANDOVER, None,
                                "half of the next record, then the connection closes"),
    FaultKind.REFUSE_MEMORY: ((Stage.SETUP,), None,
                              "the destination refuses to reserve the guest's frames"),
    FaultKind.DELAY_RESTORE: ((Stage.STOP_AND_COPY, Stage.AFTER_HANDOVER), "duration",
                              "the destination's restore stalls for ARG (before READY at "
                              "stop-and-copy, before the resume after the hand-over)"),
}
HOST_KILLS = (FaultKind.KILL_DESTINATION, FaultKind.KILL_SOURCE)
SOURCE_KINDS = HOST_KILLS + (FaultKind.STALL_LINK, FaultKind.CUT_LINK, FaultKind.SLOW_LINK,
                             FaultKind.CORRUPT_RECORD, FaultKind.TRUNCATE_STREAM)
DESTINATION_KINDS = (FaultKind.REFUSE_MEMORY, FaultKind.DELAY_RESTORE)


def _parse_kind(text: str) -> FaultKind:
    try:
        return FaultKind(text)
    except ValueError:
        raise ConfigError(f"unknown fault {text!r}; use one of "
                          f"{', '.join(k.value for k in FaultKind)}") from None


def _parse_stage(text: str) -> tuple[Stage, int]:
    """`setup`, `round3`, `stop-and-copy`, `after-handover` -> (stage, round)."""
    if text.startswith("round"):
        digits = text[len("round"):]
        if not digits.isdigit() or len(digits) > 4:
            raise ConfigError(f"cannot read fault stage {text!r}; a round is written round0, "
                              "round1, ...")
        return Stage.ROUND, int(digits)
    try:
        return Stage(text), 0
    except ValueError:
        raise ConfigError(f"unknown fault stage {text!r}; use setup, round<N>, stop-and-copy "
                          "or after-handover") from None


@dataclass(frozen=True)
class FaultSpec:
    """One fault: `kind` at `stage` (and, for stage "round", live round `round`).

    `duration_seconds` is the length of a stall-link or delay-restore;
    `bandwidth_bytes_per_second` the link speed a slow-link drops to.
    """

    kind: str
    stage: str = Stage.SETUP.value
    round: int = 0
    duration_seconds: float | None = None
    bandwidth_bytes_per_second: float | None = None

    def __post_init__(self) -> None:
        kind = _parse_kind(self.kind) if isinstance(self.kind, str) else FaultKind(self.kind)
        if not isinstance(self.stage, str):
            raise ConfigError(f"fault stage must be text, got {self.stage!r}")
        try:
            stage = Stage(self.stage)
        except ValueError:
            raise ConfigError(f"unknown fault stage {self.stage!r}; use "
                              f"{', '.join(s.value for s in Stage)}") from None
        object.__setattr__(self, "kind", kind.value)
        object.__setattr__(self, "stage", stage.value)
        if isinstance(self.round, bool) or not isinstance(self.round, int) or self.round < 0:
            raise ConfigError(f"fault round must be a whole number >= 0, got {self.round!r}")
        if stage is not Stage.ROUND and self.round:
            raise ConfigError(f"a round number only goes with stage round, not {stage.value}")
        stages, arg, _ = KINDS[kind]
        if stage not in stages:
            raise ConfigError(
                f"{kind.value} cannot happen at {stage.value}: it acts at "
                f"{', '.join(_stage_text(s) for s in stages)}")
        for name, needed in (("duration_seconds", arg == "duration"),
                             ("bandwidth_bytes_per_second", arg == "bandwidth")):
            value = getattr(self, name)
            if not needed:
                if value is not None:
                    raise ConfigError(f"{kind.value} takes no {name.split('_')[0]}")
                continue
            if value is None:
                raise ConfigError(f"{kind.value} needs a {name.split('_')[0]}: write "
                                  f"{kind.value}@{self.stage_text}:"
                                  f"{'2s' if arg == 'duration' else '1MiB'}")
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ConfigError(f"{kind.value}: {name.split('_')[0]} must be positive, "
                                  f"got {value!r}")
            if arg == "duration" and value > MAX_FAULT_SECONDS:
                raise ConfigError(f"{kind.value}: {value:g} s is longer than the "
                                  f"{MAX_FAULT_SECONDS:g} s a fault may last")
            object.__setattr__(self, name, float(value))

    @property
    def stage_text(self) -> str:
        return f"round{self.round}" if self.stage == Stage.ROUND.value else self.stage

    def matches(self, stage: Stage, round_index: int = 0) -> bool:
        return self.stage == stage.value and (stage is not Stage.ROUND
                                              or self.round == round_index)

    def to_text(self) -> str:
        """The CLI form, `KIND@STAGE[:ARG]`; `parse_fault` reads it back."""
        text = f"{self.kind}@{self.stage_text}"
        if self.duration_seconds is not None:
            text += f":{self.duration_seconds:g}s"
        if self.bandwidth_bytes_per_second is not None:
            text += f":{int(self.bandwidth_bytes_per_second)}"
        return text

    def describe(self) -> str:
        text = f"{self.kind}@{self.stage_text}"
        if self.duration_seconds is not None:
            text += f" for {self.duration_seconds:g} s"
        if self.bandwidth_bytes_per_second is not None:
            text += f" to {format_bytes(self.bandwidth_bytes_per_second)}/s"
        return text

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "FaultSpec":
        if not isinstance(data, dict):
            raise ConfigError(f"a fault is a table of kind, stage, ..., not {data!r}")
        known = {"kind", "stage", "round", "duration_seconds", "bandwidth_bytes_per_second"}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown fault settings: {', '.join(sorted(unknown))}")
        if "kind" not in data:
            raise ConfigError("a fault needs a kind")
        return cls(**data)


def _stage_text(stage: Stage) -> str:
    return "round<N>" if stage is Stage.ROUND else stage.value


def parse_fault(text: str) -> FaultSpec:
    """`KIND@STAGE[:ARG]` -> FaultSpec; ConfigError with a one-line reason otherwise."""
    if not isinstance(text, str) or len(text) > 200:
        raise ConfigError(f"cannot read fault {text!r}")
    head, sep, arg = text.strip().partition(":")
    kind_text, at, stage_text = head.partition("@")
    if not at or not kind_text or not stage_text:
        raise ConfigError(f"cannot read fault {text!r}; write KIND@STAGE[:ARG], e.g. "
                          "stall-link@round1:2s (see `migbed fault list`)")
    kind = _parse_kind(kind_text.strip())
    stage, rnd = _parse_stage(stage_text.strip())
    _, wants, _ = KINDS[kind]
    kw: dict = {"kind": kind.value, "stage": stage.value, "round": rnd}
    if sep and not arg.strip():
        raise ConfigError(f"fault {text!r} has an empty argument after ':'")
    if sep and wants is None:
        raise ConfigError(f"{kind.value} takes no argument, got {arg!r}")
    if wants == "duration" and sep:
        kw["duration_seconds"] = parse_duration(arg.strip(), f"{kind.value} duration")
    elif wants == "bandwidth" and sep:
        kw["bandwidth_bytes_per_second"] = float(parse_size(arg.strip(),
                                                            f"{kind.value} bandwidth"))
    return FaultSpec(**kw)


def faults_from_toml(items: object) -> tuple[FaultSpec, ...]:
    """The `faults` of a scenario file: a list whose items are either the CLI's text form or
    a table, e.g.

        faults = ["stall-link@round1:2s"]
        [[faults]]
        kind = "slow-link"
        stage = "round0"          # or stage = "round" with round = 0
        bandwidth = "1MiB"        # per second; `duration = "2s"` for stall-link, delay-restore
    """
    if items is None:
        return ()
    if not isinstance(items, list | tuple):
        raise ConfigError(f"faults must be a list of faults, got {items!r}")
    out = []
    for i, item in enumerate(items):
        where = f"faults[{i}]"
        if isinstance(item, FaultSpec):
            out.append(item)
            continue
        if isinstance(item, str):
            out.append(_located(where, parse_fault, item))
            continue
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: a fault is text (kind@stage:arg) or a table")
        out.append(_located(where, _fault_from_table, item))
    return tuple(out)


def _located(where: str, fn, arg):
    try:
        return fn(arg)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _fault_from_table(d: dict) -> FaultSpec:
    known = {"kind", "stage", "round", "duration", "bandwidth", "duration_seconds",
             "bandwidth_bytes_per_second"}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r}; known: {', '.join(sorted(known))}")
    if not isinstance(d.get("kind"), str):
        raise ConfigError("a fault needs kind = \"...\" (see `migbed fault list`)")
    stage_text = d.get("stage", Stage.SETUP.value)
    if not isinstance(stage_text, str):
        raise ConfigError(f"stage must be text, got {stage_text!r}")
    if stage_text == "round":
        if "round" not in d:
            raise ConfigError("stage = \"round\" needs round = N")
        stage, rnd = Stage.ROUND, d["round"]
    else:
        stage, rnd = _parse_stage(stage_text)
        if "round" in d:
            raise ConfigError("give the round either as stage = \"round2\" or as "
                              "stage = \"round\" with round = 2")
    kw: dict = {"kind": d["kind"], "stage": stage.value, "round": rnd}
    duration = d.get("duration", d.get("duration_seconds"))
    if duration is not None:
        kw["duration_seconds"] = parse_duration(duration, "fault duration")
    bandwidth = d.get("bandwidth", d.get("bandwidth_bytes_per_second"))
    if bandwidth is not None:
        kw["bandwidth_bytes_per_second"] = (float(bandwidth) if isinstance(bandwidth, float)
                                            else float(parse_size(bandwidth, "fault bandwidth")))
    return FaultSpec(**kw)


def as_faults(value: Iterable) -> tuple[FaultSpec, ...]:
    """`MigrationSettings.faults` from what a caller gave: specs, dicts (JSON) or text."""
    if isinstance(value, str | bytes | dict) or not isinstance(value, Iterable):
        raise ConfigError(f"faults must be a list of faults, got {value!r}")
    out = []
    for item in value:
        if isinstance(item, FaultSpec):
            out.append(item)
        elif isinstance(item, dict):
            out.append(FaultSpec.from_dict(item))
        elif isinstance(item, str):
            out.append(parse_fault(item))
        else:
            raise ConfigError(f"cannot read fault {item!r}")
    return tuple(out)


def fault_list_text() -> str:
    """What `migbed fault list` prints: every kind, its stages and its argument."""
    lines = ["KIND               STAGES                                        ARG        WHAT"]
    for kind, (stages, arg, what) in KINDS.items():
        st = ",".join(_stage_text(s) for s in stages)
        lines.append(f"{kind.value:<18} {st:<45} {arg or '-':<10} {what}")
    lines.append("")
    lines.append("write a fault as KIND@STAGE[:ARG], e.g. --fault stall-link@round1:2s, "
                 "--fault kill-destination@stop-and-copy, --fault slow-link@round0:1MiB")
    return "\n".join(lines)


# -- counting: what a host's /metrics says of faults ------------------------------------------
class FaultStats:
    """Per host: faults injected here, and migrations whose connection was lost under them
    (the peer host or the link went away without an ABORT)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.injected: Counter = Counter()         # (kind, stage) -> count
        self.connection_lost: Counter = Counter()  # role ("source", "destination") -> count

    def count_injected(self, fault: FaultSpec) -> None:
        with self.lock:
            self.injected[(fault.kind, fault.stage)] += 1

    def count_connection_lost(self, role: str) -> None:
        with self.lock:
            self.connection_lost[role] += 1


class FaultCollector:
    """A prometheus_client custom collector for one host's `FaultStats`."""

    def __init__(self, host: str, stats: FaultStats):
        self.host = host
        self.stats = stats

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator:
        from prometheus_client.metrics_core import CounterMetricFamily
        injected = CounterMetricFamily(
            "migbed_faults_injected", "Faults injected on this host, by kind and stage.",
            labels=["host", "kind", "stage"])
        lost = CounterMetricFamily(
            "migbed_migration_connection_lost", "Migrations whose peer host or link vanished "
            "without an ABORT, as this host saw it, by this host's role.",
            labels=["host", "role"])
        with self.stats.lock:
            for (kind, stage), n in sorted(self.stats.injected.items()):
                injected.add_metric([self.host, kind, stage], n)
            for role in ("source", "destination"):
                lost.add_metric([self.host, role], self.stats.connection_lost[role])
        yield injected
        yield lost


def is_connection_loss(exc: BaseException) -> bool:
    """The peer or the link went away mid-migration (as opposed to a refused stream)."""
    if isinstance(exc, OSError):
        return True
    return isinstance(exc, StreamError) and "truncated" in str(exc)


# -- the source's seam ------------------------------------------------------------------------
class SourceFaults:
    """The faults a sender carries out (link faults) or waits at (host kills).

    `at(stage, round)` is called by the sender at every injection point; a fault fires once.
    """

    def __init__(self, faults: Iterable[FaultSpec], progress, cancel: threading.Event,
                 timeout_seconds: float, stats: FaultStats | None = None):
        self.pending = [f for f in faults if FaultKind(f.kind) in SOURCE_KINDS]
        self.progress = progress
        self.cancel = cancel
        self.timeout = timeout_seconds
        self.stats = stats
        self.fired: list[dict] = []
        self.sock: socket.socket | None = None
        self.link = None
        self._released: set[int] = set()
        self._wake = threading.Condition()
        self._killed = False

    @property
    def armed(self) -> bool:
        return bool(self.pending)

    def attach(self, sock: socket.socket, link) -> None:
        self.sock = sock
        self.link = link

    def at(self, stage: Stage, round_index: int = 0) -> None:
        if not self.pending:
            return
        for f in [f for f in self.pending if f.matches(stage, round_index)]:
            self.pending.remove(f)
            index = len(self.fired)
            self.fired.append({**f.to_dict(), "text": f.to_text(), "fired": True,
                               "side": "source"})
            if self.stats is not None:
                self.stats.count_injected(f)
            self._fire(f, index, stage)

    def _fire(self, f: FaultSpec, index: int, stage: Stage) -> None:
        kind = FaultKind(f.kind)
        if kind in HOST_KILLS:
            self._wait_for_control_plane(f, index)
        elif kind is FaultKind.STALL_LINK:
            self._stall(f.duration_seconds or 0.0, watch_peer=stage is not Stage.AFTER_HANDOVER)
        elif kind is FaultKind.CUT_LINK:
            self._cut()
        elif kind is FaultKind.SLOW_LINK:
            self.link.set_link_rate(f.bandwidth_bytes_per_second)
        elif kind is FaultKind.CORRUPT_RECORD:
            self.link.tamper = self._corrupt_next
        elif kind is FaultKind.TRUNCATE_STREAM:
            self.link.tamper = self._truncate_next

    # -- host kills: the control plane does them ----------------------------------------
    def _wait_for_control_plane(self, f: FaultSpec, index: int) -> None:
        """Stop here, show the fault in the progress, and wait until the driver has killed
        the host (`release`) or this host is killed itself. Bounded by the timeout."""
        self.progress.fault = {**f.to_dict(), "index": index, "text": f.to_text()}
        try:
            with self._wake:
                ok = self._wake.wait_for(lambda: index in self._released or self._killed,
                                         self.timeout)
        finally:
            self.progress.fault = None
        if not ok:
            raise MigrationError(f"fault {f.to_text()} was not carried out by the control "
                                 f"plane within {self.timeout:g} s (run the migration through "
                                 "migbed's driver to kill hosts)")

    def release(self, index: int) -> None:
        with self._wake:
            self._released.add(index)
            self._wake.notify_all()

    def kill(self) -> None:
        """This (in-process) host died: its connections drop, nothing waits any more."""
        with self._wake:
            self._killed = True
            self._wake.notify_all()
        self._cut()

    # -- link faults -------------------------------------------------------------------------
    def _stall(self, seconds: float, watch_peer: bool) -> None:
        """Send nothing for `seconds`. Ends early, with an error, if the operator cancels
        or the destination gives up on the stalled stream (its timeout) and says so."""
        deadline = _now() + seconds
        while (left := deadline - _now()) > 0 and not self._killed:
            if self.cancel.is_set():
                raise MigrationCancelled("migration cancelled by the operator during a "
                                         "link stall")
            step = min(left, PEER_CHECK_SECONDS)
            if watch_peer and self.sock is not None:
                if self._peer_spoke(step):
                    raise MigrationError(f"the destination gave up during a {seconds:g} s "
                                         "link stall (its timeout is shorter than the stall)")
            else:
                self.cancel.wait(step)

    def _peer_spoke(self, wait: float) -> bool:
        try:
            readable, _, _ = select.select([self.sock], [], [], wait)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def _cut(self) -> None:
        if self.sock is None:
            return
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _corrupt_next(self, buffers: list) -> list:
        """The next record with its body overwritten by 0xc1, a byte msgpack never uses:
        the receiver must refuse it."""
        self.link.tamper = None
        data = bytearray(b"".join(bytes(b) for b in buffers))
        end = min(len(data), 16)
        data[8:end] = b"\xc1" * (end - 8)
        return [bytes(data)]

    def _truncate_next(self, buffers: list) -> list:
        """Half of the next record on the wire, then the connection goes down."""
        self.link.tamper = None
        data = b"".join(bytes(b) for b in buffers)
        self.link.send([data[:len(data) // 2]])
        self.link.flush(self.timeout)
        self._cut()
        raise MigrationError(f"stream truncated after {len(data) // 2} of the "
                             f"{len(data)} bytes of a record (injected fault)")


# -- the destination's seam -------------------------------------------------------------------
class DestinationFaults:
    """refuse-memory at prepare; delay-restore before READY or before the resume."""

    def __init__(self, faults: Iterable[FaultSpec], stats: FaultStats | None = None):
        self.faults = [f for f in faults if FaultKind(f.kind) in DESTINATION_KINDS]
        self.stats = stats
        self.fired: list[dict] = []
        self._interrupt = threading.Event()

    def _take(self, kind: FaultKind, stage: Stage) -> FaultSpec | None:
        for f in self.faults:
            if f.kind == kind.value and f.matches(stage):
                self.faults.remove(f)
                self.fired.append({**f.to_dict(), "text": f.to_text(), "fired": True,
                                   "side": "destination"})
                if self.stats is not None:
                    self.stats.count_injected(f)
                return f
        return None

    def check_memory(self, host: str, guest: str, pages: int) -> None:
        if self._take(FaultKind.REFUSE_MEMORY, Stage.SETUP) is not None:
            raise OutOfFramesError(f"{host} refuses memory for {guest} ({pages} frames): "
                                   "injected fault refuse-memory@setup", needed_frames=pages)

    def delay(self, stage: Stage) -> None:
        f = self._take(FaultKind.DELAY_RESTORE, stage)
        if f is not None and self._interrupt.wait(f.duration_seconds):
            raise MigrationError(f"restore abandoned during an injected "
                                 f"{f.duration_seconds:g} s delay")

    def interrupt(self) -> None:
        self._interrupt.set()


def _now() -> float:
    return time.monotonic()
