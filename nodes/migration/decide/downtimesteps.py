"""Downtime that adapts while a migration runs, an input of the switch-over arbiter
(`nodes.migration.decide.switchover`, its `budget` rule): the downtime limit in force steps up
as OpenStack's libvirt driver raises it (`live_migration_downtime`, `_steps`, `_delay`) and
as KubeVirt's VEP 291 ramps it (150 ms to 1050 ms), and the switch-over decision may use an
operator's bandwidth instead of the measured one (QEMU 8.2's avail-switchover-bandwidth).

Why it is an input and not a policy: the qemu policy keeps its one rule (pending bytes below
bandwidth x limit: complete); what changes is the limit and the bandwidth that rule reads,
set before every decision, so a stepped stop is the policy's own `fits-downtime`, with the
limit in force in its reason.

`START..END/STEPS` gives STEPS + 1 limits, both ends included, evenly spaced (OpenStack's
linear steps); the limit in force is step `elapsed // delay`, the last one held. The delay is
absolute (`30s`) or per GiB of guest memory (`75s/GiB`, OpenStack's default), as
`--completion-timeout` reads it.
"""

import re
from dataclasses import dataclass
from typing import Any, Protocol

from nodes.errors import ConfigError
from nodes.units import parse_count, parse_seconds

GIB = 1 << 30
PRESETS = {"vep291": "150ms..1050ms/6"}     # KubeVirt VEP 291: 150 ms up to 1050 ms, 150 a step
DEFAULT_DELAY_PER_GIB_SECONDS = 75.0        # OpenStack's live_migration_downtime_delay
_FORM = re.compile(r"^\s*([^./][^/]*?)\s*\.\.\s*([^/]+?)\s*/\s*(\S+)\s*$")
_HOW = "write START..END/STEPS, e.g. 150ms..1050ms/5, or the preset vep291"


def parse_downtime_steps(value: Any, what: str) -> str:
    """The steps as written canonically (`150ms..1050ms/5`, or a preset's name), checked."""
    if not isinstance(value, str):
        raise ConfigError(f"{what} must be text ({_HOW}), got {value!r}")
    text = value.strip().lower()
    if text in PRESETS:
        return text
    start, end, steps = _parts(text, what)
    return f"{start * 1000:g}ms..{end * 1000:g}ms/{steps}"


def _parts(text: str, what: str) -> tuple[float, float, int]:
    m = _FORM.match(text)
    if m is None:
        raise ConfigError(f"{what}: cannot read {text!r}; {_HOW}")
    start, end = parse_seconds(m[1], what), parse_seconds(m[2], what)
    steps = parse_count(m[3], f"{what} STEPS", 1, 1000)
    if end < start:
        raise ConfigError(f"{what}: the limit steps up, so END ({m[2]}) must not be below "
                          f"START ({m[1]})")
    return start, end, steps


def step_limits(text: str) -> tuple[float, ...]:
    """The STEPS + 1 limits of canonical steps (`parse_downtime_steps`), in seconds."""
    start, end, steps = _parts(PRESETS.get(text, text), "downtime steps")
    return tuple(round(start + (end - start) * i / steps, 9) for i in range(steps + 1))


def step_delay_seconds(absolute: float | None, per_gib: float | None,
                       guest_bytes: int) -> float:
    """The time each limit holds before the next: absolute, per GiB, else OpenStack's 75 s
    per GiB of guest memory."""
    if absolute is not None:
        return absolute
    per = DEFAULT_DELAY_PER_GIB_SECONDS if per_gib is None else per_gib
    return per * guest_bytes / GIB


@dataclass(frozen=True)
class DowntimeSteps:
    """The limits and how long each holds; `limit_at(elapsed)` is the one in force."""

    limits: tuple[float, ...]
    delay_seconds: float

    def limit_at(self, elapsed_seconds: float) -> float:
        if self.delay_seconds <= 0:
            return self.limits[-1]
        return self.limits[min(len(self.limits) - 1,
                               max(0, int(elapsed_seconds // self.delay_seconds)))]


class BudgetedPolicy(Protocol):
    """The qemu policy as the budget sets it (`QemuPolicy.set_budget`)."""

    def set_budget(self, downtime_limit_seconds: float | None,
                   switchover_bytes_per_second: float | None) -> None: ...


@dataclass(frozen=True)
class SwitchoverBudget:
    """The arbiter's budget input: the stepped limit (None: the fixed one) and the
    switch-over bandwidth (None: the measured one), from `t0` on the decisions' clock."""

    steps: DowntimeSteps | None
    bandwidth_bytes_per_second: float | None
    t0: float = 0.0

    def limit_at(self, now: float) -> float | None:
        return None if self.steps is None else self.steps.limit_at(now - self.t0)

    def apply(self, policy: BudgetedPolicy, now: float) -> None:
        policy.set_budget(self.limit_at(now), self.bandwidth_bytes_per_second)


def budget_of(settings: Any, guest_bytes: int, t0: float) -> SwitchoverBudget | None:
    """The budget a migration's settings ask for (`downtime_steps`, its delay,
    `switchover_bandwidth_bytes_per_second`), None when neither: the one way the sender and
    the model build it."""
    text = settings.downtime_steps
    bandwidth = settings.switchover_bandwidth_bytes_per_second
    if text is None and bandwidth is None:
        return None
    steps = None
    if text is not None:
        steps = DowntimeSteps(step_limits(text), step_delay_seconds(
            settings.downtime_step_delay_seconds,
            settings.downtime_step_delay_per_gib_seconds, guest_bytes))
    return SwitchoverBudget(steps, bandwidth, t0)
