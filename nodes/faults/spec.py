"""Faults a user injects into a migration: what breaks (the kind) and when (the stage).

A fault is a frozen `FaultSpec`; `MigrationSettings.faults` carries a tuple of them, so they
travel with the settings to both hosts and round-trip through JSON and TOML. Written as text
(the CLI's `--fault`) a fault is `KIND@STAGE[:ARG]`, e.g. `stall-link@round1:2s`,
`slow-link@round0:1MiB` (per second), `kill-destination@stop-and-copy`.

Stages are the phases of a migration (`nodes.phase`), in the order a migration passes them
(each fault fires at most once):

- `setup`: the data channel is open, no page has moved;
- `roundN` (precopy, live round N; `precopy` alone is round 0): the round has sent its first
  batch (the destination holds some pages);
- `stop-and-copy`: the guest is paused and its last pages are sent, before the vCPU context
  and END (the hand-over has not begun);
- `handover`: the source has given PERMISSION_TO_GO; the guest belongs to the destination
  from here on;
- `postcopy`: after a post-copy switch, once the push has sent its first batch: the guest
  runs on the destination with pages still missing (only the source has them).

Where each kind acts (the injection seams):

- on the source's link (`nodes.faults.at_source.SourceFaults`, called by the sender's phases
  and wired into `nodes.migration.send.link.LinkSender`): `stall-link` (nothing crosses for a time), `cut-link` (the
  connection goes down), `slow-link` (the link's speed drops for the rest of the migration),
  `corrupt-record` (the next record's body is garbage), `truncate-stream` (half of the next
  record, then the connection closes);
- on the destination (`nodes.faults.at_destination.DestinationFaults`): `refuse-memory` (prepare fails as if the host
  had no free frames) and `delay-restore` (the restore stalls before READY at stop-and-copy,
  or before the resume after the hand-over);
- by the control plane (`cluster.settle.FaultControl`): `kill-destination`, `kill-source`.
  The sender stops at the fault's stage and shows it in its progress; the driver kills the
  host (a Ray actor killed, or an in-process host stopped with its sockets shut) and lets the
  sender go on, into whatever a dead peer does to it.

What a user may expect of each (the promise tested in tests/test_faults.py): any fault
before the hand-over leaves the guest running on its source in its own mode with its memory
intact, and the destination with none of its frames; after the hand-over the guest runs on
the destination. A host that dies takes its own guests with it, and the report says so.
After a post-copy switch (`postcopy`) a link fault pauses the migration until the link is
back (by itself within the timeout, else `migrate-recover`; a cut link stays down until
then), and a host that dies loses the guest (neither host has all of it).
"""

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from enum import StrEnum

from nodes.errors import ConfigError
from nodes.phase import Phase
from nodes.units import format_bytes, parse_count, parse_duration, parse_size

MAX_FAULT_SECONDS = 3600.0     # a stall or delay longer than an hour is a typo, not a test


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
    CUT_CHANNEL = "cut-channel"


# Where faults can fire: the phases of a migration (`nodes.phase`), precopy by round.
ALL_STAGES = (Phase.SETUP, Phase.PRECOPY, Phase.STOP_AND_COPY, Phase.HANDOVER, Phase.POSTCOPY)
_BEFORE_HANDOVER = (Phase.SETUP, Phase.PRECOPY, Phase.STOP_AND_COPY)
_ON_THE_WIRE = (*_BEFORE_HANDOVER, Phase.POSTCOPY)   # link faults a post-copy recovers from
_STAGES_TEXT = "setup, round<N> (precopy), stop-and-copy, handover or postcopy"

# kind -> (stages where it means something, its argument: None, "duration" or "bandwidth",
#          one line for `migbed fault list`)
KINDS: dict[FaultKind, tuple[tuple[Phase, ...], str | None, str]] = {
    FaultKind.KILL_DESTINATION: (ALL_STAGES, None, "the destination host dies"),
    FaultKind.KILL_SOURCE: (ALL_STAGES, None, "the source host dies (its guests die with it)"),
    FaultKind.STALL_LINK: (ALL_STAGES, "duration",
                           "nothing crosses the link for ARG (e.g. 2s)"),
    FaultKind.CUT_LINK: (ALL_STAGES, None, "the link goes down for good"),
    FaultKind.SLOW_LINK: (_ON_THE_WIRE, "bandwidth",
                          "the link's speed drops to ARG per second (e.g. 1MiB)"),
    FaultKind.CORRUPT_RECORD: (_ON_THE_WIRE, None, "the next record arrives as garbage"),
    FaultKind.TRUNCATE_STREAM: (_ON_THE_WIRE, None,
                                "half of the next record, then the connection closes"),
    FaultKind.REFUSE_MEMORY: ((Phase.SETUP,), None,
                              "the destination refuses to reserve the guest's frames"),
    FaultKind.CUT_CHANNEL: (_BEFORE_HANDOVER, "channel",
                            "multifd channel ARG's connection goes down (e.g. 0)"),
    FaultKind.DELAY_RESTORE: ((Phase.STOP_AND_COPY, Phase.HANDOVER), "duration",
                              "the destination's restore stalls for ARG (before READY at "
                              "stop-and-copy, before the resume after the hand-over)"),
}
HOST_KILLS = (FaultKind.KILL_DESTINATION, FaultKind.KILL_SOURCE)
SOURCE_KINDS = HOST_KILLS + (FaultKind.STALL_LINK, FaultKind.CUT_LINK, FaultKind.SLOW_LINK,
                             FaultKind.CORRUPT_RECORD, FaultKind.TRUNCATE_STREAM,
                             FaultKind.CUT_CHANNEL)
DESTINATION_KINDS = (FaultKind.REFUSE_MEMORY, FaultKind.DELAY_RESTORE)


def _parse_kind(text: str) -> FaultKind:
    try:
        return FaultKind(text)
    except ValueError:
        raise ConfigError(f"unknown fault {text!r}; use one of "
                          f"{', '.join(k.value for k in FaultKind)}") from None


def _parse_stage(text: str) -> tuple[Phase, int]:
    """`setup`, `round3` (or `precopy`: round 0), `stop-and-copy`, `handover` -> (stage,
    round)."""
    if text.startswith("round"):
        digits = text[len("round"):]
        if not digits.isdigit() or len(digits) > 4:
            raise ConfigError(f"cannot read fault stage {text!r}; a round is written round0, "
                              "round1, ...")
        return Phase.PRECOPY, int(digits)
    if text not in ALL_STAGES:
        raise ConfigError(f"unknown fault stage {text!r}; use {_STAGES_TEXT}")
    return Phase(text), 0


@dataclass(frozen=True)
class FaultSpec:
    """One fault: `kind` at `stage` (and, for stage "precopy", live round `round`).

    `duration_seconds` is the length of a stall-link or delay-restore;
    `bandwidth_bytes_per_second` the link speed a slow-link drops to.
    """

    kind: str
    stage: str = Phase.SETUP.value
    round: int = 0
    duration_seconds: float | None = None
    bandwidth_bytes_per_second: float | None = None
    channel: int | None = None           # cut-channel: which multifd channel

    def __post_init__(self) -> None:
        kind = _parse_kind(self.kind) if isinstance(self.kind, str) else FaultKind(self.kind)
        if not isinstance(self.stage, str):
            raise ConfigError(f"fault stage must be text, got {self.stage!r}")
        if self.stage not in ALL_STAGES:
            raise ConfigError(f"unknown fault stage {self.stage!r}; use "
                              f"{', '.join(s.value for s in ALL_STAGES)}")
        stage = Phase(self.stage)
        object.__setattr__(self, "kind", kind.value)
        object.__setattr__(self, "stage", stage.value)
        if isinstance(self.round, bool) or not isinstance(self.round, int) or self.round < 0:
            raise ConfigError(f"fault round must be a whole number >= 0, got {self.round!r}")
        if stage is not Phase.PRECOPY and self.round:
            raise ConfigError(f"a round number only goes with stage precopy, not {stage.value}")
        stages, arg, _ = KINDS[kind]
        if stage not in stages:
            raise ConfigError(
                f"{kind.value} cannot happen at {stage.value}: it acts at "
                f"{', '.join(_stage_text(s) for s in stages)}")
        if (self.channel is None) != (arg != "channel") or (self.channel is not None and (
                isinstance(self.channel, bool) or not isinstance(self.channel, int)
                or self.channel < 0)):
            raise ConfigError(f"{kind.value} takes a multifd channel number (e.g. "
                              f"{kind.value}@{self.stage_text}:0)" if arg == "channel" else
                              f"{kind.value} takes no channel")
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
        return f"round{self.round}" if self.stage == Phase.PRECOPY.value else self.stage

    def matches(self, stage: Phase, round_index: int = 0) -> bool:
        return self.stage == stage.value and (stage is not Phase.PRECOPY
                                              or self.round == round_index)

    def to_text(self) -> str:
        """The CLI form, `KIND@STAGE[:ARG]`; `parse_fault` reads it back."""
        text = f"{self.kind}@{self.stage_text}"
        if self.duration_seconds is not None:
            text += f":{self.duration_seconds:g}s"
        if self.bandwidth_bytes_per_second is not None:
            text += f":{int(self.bandwidth_bytes_per_second)}"
        if self.channel is not None:
            text += f":{self.channel}"
        return text

    def describe(self) -> str:
        text = f"{self.kind}@{self.stage_text}"
        if self.duration_seconds is not None:
            text += f" for {self.duration_seconds:g} s"
        if self.bandwidth_bytes_per_second is not None:
            text += f" to {format_bytes(self.bandwidth_bytes_per_second)}/s"
        if self.channel is not None:
            text += f" (channel {self.channel})"
        return text

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "FaultSpec":
        if not isinstance(data, dict):
            raise ConfigError(f"a fault is a table of kind, stage, ..., not {data!r}")
        known = {"kind", "stage", "round", "duration_seconds", "bandwidth_bytes_per_second",
                 "channel"}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown fault settings: {', '.join(sorted(unknown))}")
        if "kind" not in data:
            raise ConfigError("a fault needs a kind")
        return cls(**data)


def _stage_text(stage: Phase) -> str:
    return "round<N>" if stage is Phase.PRECOPY else stage.value


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
    elif wants == "channel" and sep:
        kw["channel"] = parse_count(arg.strip(), f"{kind.value} channel")
    return FaultSpec(**kw)


def faults_from_toml(items: object) -> tuple[FaultSpec, ...]:
    """The `faults` of a scenario file: a list whose items are either the CLI's text form or
    a table, e.g.

        faults = ["stall-link@round1:2s"]
        [[faults]]
        kind = "slow-link"
        stage = "round0"          # or stage = "precopy" with round = 0
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
             "bandwidth_bytes_per_second", "channel"}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r}; known: {', '.join(sorted(known))}")
    if not isinstance(d.get("kind"), str):
        raise ConfigError("a fault needs kind = \"...\" (see `migbed fault list`)")
    stage_text = d.get("stage", Phase.SETUP.value)
    if not isinstance(stage_text, str):
        raise ConfigError(f"stage must be text, got {stage_text!r}")
    if stage_text == Phase.PRECOPY.value and "round" in d:
        stage, rnd = Phase.PRECOPY, d["round"]
    else:
        stage, rnd = _parse_stage(stage_text)
        if "round" in d:
            raise ConfigError("give the round either as stage = \"round2\" or as "
                              "stage = \"precopy\" with round = 2")
    kw: dict = {"kind": d["kind"], "stage": stage.value, "round": rnd}
    duration = d.get("duration", d.get("duration_seconds"))
    if duration is not None:
        kw["duration_seconds"] = parse_duration(duration, "fault duration")
    bandwidth = d.get("bandwidth", d.get("bandwidth_bytes_per_second"))
    if bandwidth is not None:
        kw["bandwidth_bytes_per_second"] = (float(bandwidth) if isinstance(bandwidth, float)
                                            else float(parse_size(bandwidth, "fault bandwidth")))
    if "channel" in d:
        kw["channel"] = parse_count(d["channel"], "fault channel")
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
    lines = ["KIND               STAGES                                          ARG        WHAT"]
    for kind, (stages, arg, what) in KINDS.items():
        st = ",".join(_stage_text(s) for s in stages)
        lines.append(f"{kind.value:<18} {st:<47} {arg or '-':<10} {what}")
    lines.append("")
    lines.append("write a fault as KIND@STAGE[:ARG], e.g. --fault stall-link@round1:2s, "
                 "--fault kill-destination@stop-and-copy, --fault slow-link@round0:1MiB")
    return "\n".join(lines)
