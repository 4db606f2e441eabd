"""The pre-copy policies, statistics in, a typed decision out, as libxenguest's pluggable
precopy policy; the first input of the switch-over arbiter (`nodes.migration.decide.switchover`), which
weighs a policy's answer against the post-copy switch, the timeouts and the adaptive rate.

A policy is consulted before every live round, round 0 included (the qemu policy also after
every chunk of sending), with what the sender knows at that moment (`PrecopyStats`), and
answers a `Decision`: CONTINUE (send the dirty pages
live), STOP_AND_COPY (pause the guest and send the rest) or ABORT, with a human reason and,
when it stops, a machine-readable `StopCode` that the report carries. POSTCOPY (switch to
post-copy) and THROTTLE (continue with the guest's vCPU slowed) have their place in the
vocabulary for the algorithms that use them. Three policies are built in:

- `xen`: today's libxenguest (`simple_precopy_policy`): at most 5 live rounds, stop and copy
  once fewer than 50 pages are dirty.
- `xen-legacy`: `xc_domain_save` of Xen 2.0 to 4.4: at most 29 live rounds, stop when the
  last round sent (and skipped) fewer than 50 pages or more than 3x the guest's memory has
  gone; pages dirtied again during a round are skipped until the next one.
- `qemu`: QEMU's migration thread: decided after every chunk of sending, mid-pass too;
  switch over when the pending bytes fit the bandwidth measured over 100 ms windows x the
  downtime limit (default 300 ms; the threshold is 0 until the first window closes); at
  most 30 passes, as guestperf's default.

Register your own with `register_policy`: a factory taking keyword settings and returning a
`PrecopyPolicy` whose `decide(stats)` returns a `Decision`.
"""

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from nodes.errors import ConfigError


class Action(StrEnum):
    CONTINUE = "continue"
    STOP_AND_COPY = "stop-and-copy"
    ABORT = "abort"
    POSTCOPY = "postcopy"          # switch to post-copy: the guest runs on the destination
    THROTTLE = "throttle"          # go on with the guest's vCPU slowed to `Decision.throttle`


class StopCode(StrEnum):
    """Why pre-copy stopped, machine-readably (the report's `stop_code`)."""

    DIRTY_THRESHOLD = "dirty-threshold"            # xen: fewer than 50 pages dirty
    LAST_ROUND_THRESHOLD = "last-round-threshold"  # xen-legacy: the last round sent < 50
    FITS_DOWNTIME = "fits-downtime"                # qemu: pending fits bandwidth x limit
    MAX_ITERATIONS = "max-iterations"              # the live round cap
    MAX_FACTOR = "max-factor"                      # xen-legacy: 3x the guest's memory sent
    # The operators' aids (`nodes.migration.decide.convergence`): a timeout that gave up (the
    # migration is cancelled), paused the guest to finish, or switched to post-copy; and
    # xen-legacy's adaptive rate reaching its cap without gain.
    COMPLETION_TIMEOUT = "completion-timeout"
    NO_PROGRESS = "no-progress"
    PAUSED = "paused"
    POSTCOPY = "postcopy"
    RATE_CAP = "rate-cap"
    # Stall detection (`nodes.migration.decide.stall`): no new low of the remaining bytes for
    # a while, so the switch came at a local minimum of them (KubeVirt's VEP 248).
    STALL_MINIMUM = "stall-minimum"

    @property
    def converged(self) -> bool:
        """Stopped on the policy's own target, not on one of its caps or an operator's."""
        return self not in (StopCode.MAX_ITERATIONS, StopCode.MAX_FACTOR,
                            StopCode.COMPLETION_TIMEOUT, StopCode.NO_PROGRESS,
                            StopCode.PAUSED, StopCode.POSTCOPY, StopCode.RATE_CAP,
                            StopCode.STALL_MINIMUM)


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str = ""
    stop_code: StopCode | None = None
    throttle: float | None = None      # THROTTLE: the share of the vCPU's time taken, 0..0.99

    @classmethod
    def go_on(cls) -> "Decision":
        return _CONTINUE

    @classmethod
    def stop(cls, code: StopCode, reason: str) -> "Decision":
        return cls(Action.STOP_AND_COPY, reason, code)

    @classmethod
    def abort(cls, reason: str) -> "Decision":
        return cls(Action.ABORT, reason)


_CONTINUE = Decision(Action.CONTINUE)


@dataclass(frozen=True)
class PrecopyStats:
    """What the sender knows before a round. `iteration` counts the live rounds already done."""

    iteration: int
    dirty_count: int                 # pages the next round would send
    total_written: int               # pages sent so far, all rounds
    guest_pages: int
    page_size: int
    last_round_pages_sent: int = 0
    last_round_pages_skipped: int = 0
    last_round_seconds: float = 0.0
    measured_bytes_per_second: float | None = None   # throughput of the last round
    nominal_bytes_per_second: float | None = None    # min(link speed, rate limit); None: no limit
    elapsed_seconds: float = 0.0

    @property
    def pending_bytes(self) -> int:
        return self.dirty_count * self.page_size

    @property
    def bandwidth_bytes_per_second(self) -> float | None:
        """Measured throughput once a round has run, else the nominal one (None: unlimited)."""
        if self.measured_bytes_per_second:
            return self.measured_bytes_per_second
        return self.nominal_bytes_per_second


class PrecopyPolicy:
    """Base class. `skip_redirtied`: skip pages dirtied again during the current round.
    `mid_pass`: decided after every chunk of sending (QemuPolicy's protocol), not only
    before each pass."""

    name = "base"
    skip_redirtied = False
    mid_pass = False
    max_iterations = 30

    def decide(self, stats: PrecopyStats) -> Decision:
        raise NotImplementedError

    def _capped(self, stats: PrecopyStats) -> Decision:
        if stats.iteration >= self.max_iterations:
            return Decision.stop(StopCode.MAX_ITERATIONS,
                                 f"live round cap ({self.max_iterations}) reached")
        return Decision.go_on()


class XenPolicy(PrecopyPolicy):
    name = "xen"

    def __init__(self, max_iterations: int = 5, target_dirty_pages: int = 50, **_: object):
        self.max_iterations = max_iterations
        self.target_dirty_pages = target_dirty_pages

    def decide(self, stats: PrecopyStats) -> Decision:
        if stats.dirty_count < self.target_dirty_pages:
            return Decision.stop(StopCode.DIRTY_THRESHOLD,
                                 f"fewer than {self.target_dirty_pages} dirty pages")
        return self._capped(stats)


class XenLegacyPolicy(PrecopyPolicy):
    name = "xen-legacy"
    skip_redirtied = True

    def __init__(self, max_iterations: int = 29, target_dirty_pages: int = 50,
                 max_factor: float = 3.0, **_: object):
        self.max_iterations = max_iterations
        self.target_dirty_pages = target_dirty_pages
        self.max_factor = max_factor

    def decide(self, stats: PrecopyStats) -> Decision:
        if stats.iteration == 0:
            if stats.dirty_count < self.target_dirty_pages:
                return Decision.stop(StopCode.DIRTY_THRESHOLD,
                                     f"fewer than {self.target_dirty_pages} pages")
            return Decision.go_on()
        last = stats.last_round_pages_sent + stats.last_round_pages_skipped
        if last < self.target_dirty_pages:
            return Decision.stop(StopCode.LAST_ROUND_THRESHOLD,
                                 f"last round sent fewer than {self.target_dirty_pages} pages")
        if stats.total_written > self.max_factor * stats.guest_pages:
            return Decision.stop(StopCode.MAX_FACTOR,
                                 f"sent more than {self.max_factor:g}x the guest's memory")
        return self._capped(stats)


class QemuPolicy(PrecopyPolicy):
    """QEMU's migration thread (migration.c), decision by decision.

    The sender sends in chunks (at most `CHUNK_SECONDS`, or until the rate limit's budget
    for the current window is spent) and asks after every chunk, in the middle of a pass as
    much as between passes. Bandwidth is measured over windows of at least `WINDOW_SECONDS`
    (`window_closed`, QEMU's migration_update_counters): the threshold is that bandwidth x
    the downtime limit, and 0 until the first window closes, so nothing stops before data
    has flowed. After a chunk: when the pending estimate (pages marked, not yet sent) drops
    below the threshold the sender syncs the bitmap (`wants_exact`), and `decide` completes
    when what is pending (exact if synced) is below it, or nothing is pending at all.
    expected-downtime starts at the limit and becomes dirty bytes at the last sync /
    bandwidth once a sync period has given a dirty rate and a window moved over 10000 bytes.
    """

    name = "qemu"
    mid_pass = True
    WINDOW_SECONDS = 0.1          # BUFFER_DELAY
    CHUNK_SECONDS = 0.05          # MAX_WAIT of ram_save_iterate

    def __init__(self, downtime_limit_seconds: float = 0.3, max_iterations: int = 30,
                 fixed_downtime_seconds: float = 0.0, **_: object):
        if downtime_limit_seconds <= 0:
            raise ConfigError("downtime limit must be positive")
        self.downtime_limit_seconds = downtime_limit_seconds
        self.max_iterations = max_iterations
        # The part of downtime no page transfer can shrink (hand-over, resume): subtracted
        # from the budget only when asked (Cloud Hypervisor #8899); QEMU subtracts nothing.
        self.fixed_downtime_seconds = fixed_downtime_seconds
        self.threshold_bytes = 0.0
        self.bandwidth_bytes_per_second: float | None = None
        # QEMU 8.2's avail-switchover-bandwidth: what the threshold and the expected downtime
        # use instead of the measured bandwidth (None: the measured one).
        self.switchover_bytes_per_second: float | None = None
        self.expected_downtime_seconds = downtime_limit_seconds
        self.window_start: float | None = None
        self.window_bytes = 0

    @property
    def budget_seconds(self) -> float:
        return max(0.0, self.downtime_limit_seconds - self.fixed_downtime_seconds)

    def start(self, now: float, bytes_sent: int) -> None:
        """Setup is done: the first window opens."""
        self.window_start, self.window_bytes = now, bytes_sent

    def window_closed(self, now: float, bytes_sent: int, dirty_bytes_last_sync: int,
                      dirty_rate_known: bool) -> bool:
        """After a chunk: if the window is at least WINDOW_SECONDS old, measure it, set the
        threshold (and the expected downtime) and open the next one."""
        if self.window_start is None:
            self.start(now, bytes_sent)
            return False
        spent = now - self.window_start
        if spent < self.WINDOW_SECONDS:
            return False
        transferred = bytes_sent - self.window_bytes
        self.bandwidth_bytes_per_second = transferred / spent
        bandwidth = self.switchover_bytes_per_second or self.bandwidth_bytes_per_second
        self.threshold_bytes = bandwidth * self.budget_seconds
        if dirty_rate_known and transferred > 10000 and bandwidth > 0:
            self.expected_downtime_seconds = dirty_bytes_last_sync / bandwidth
        self.window_start, self.window_bytes = now, bytes_sent
        return True

    def set_budget(self, downtime_limit_seconds: float | None,
                   switchover_bytes_per_second: float | None) -> None:
        """The switch-over arbiter's budget input (`nodes.migration.decide.downtimesteps`):
        the downtime limit in force (None: keep it) and the switch-over bandwidth (None: the
        measured one). Once a window has closed the threshold follows at once, so a stop
        reports the limit it was decided on."""
        if downtime_limit_seconds is not None:
            self.downtime_limit_seconds = downtime_limit_seconds
        self.switchover_bytes_per_second = switchover_bytes_per_second
        if self.bandwidth_bytes_per_second is not None:    # 0 until the first window
            bandwidth = switchover_bytes_per_second or self.bandwidth_bytes_per_second
            self.threshold_bytes = bandwidth * self.budget_seconds

    def wants_exact(self, estimate_bytes: int) -> bool:
        """Sync the bitmap now? Only when the estimate is already below the threshold."""
        return estimate_bytes < self.threshold_bytes

    def decide(self, stats: PrecopyStats) -> Decision:
        pending = stats.pending_bytes
        if pending == 0 or pending < self.threshold_bytes:
            return Decision.stop(StopCode.FITS_DOWNTIME,
                                 f"pending bytes fit bandwidth x downtime limit "
                                 f"({self.downtime_limit_seconds * 1000:g} ms)")
        return self._capped(stats)


POLICIES: dict[str, Callable[..., PrecopyPolicy]] = {
    "xen": XenPolicy,
    "xen-legacy": XenLegacyPolicy,
    "qemu": QemuPolicy,
}
BUILTIN_POLICIES = tuple(POLICIES)      # what the docs list; tests register more at run time


def register_policy(name: str, factory: Callable[..., PrecopyPolicy]) -> None:
    """Make a policy selectable by name. `factory(**settings)` must return a PrecopyPolicy."""
    POLICIES[name] = factory


def make_policy(name: str, **settings: object) -> PrecopyPolicy:
    """A policy by name; `settings` are passed on (e.g. downtime_limit_seconds)."""
    if name not in POLICIES:
        raise ConfigError(f"unknown policy {name!r}; use one of {', '.join(POLICIES)}")
    return POLICIES[name](**settings)


def policy_for(name: str, *, downtime_limit_seconds: float,
               fixed_downtime_seconds: float = 0.0, max_iterations: int | None = None,
               **settings: object) -> PrecopyPolicy:
    """The policy a migration runs with these settings: the one way the sender and the
    analytic model both build it. `fixed_downtime_seconds` is subtracted from the qemu
    policy's budget (0 unless the migration asks for it, as QEMU subtracts nothing); further
    `settings` go to the policy's factory as they are."""
    extra: dict = {"downtime_limit_seconds": downtime_limit_seconds,
                   "fixed_downtime_seconds": fixed_downtime_seconds, **settings}
    if max_iterations is not None:
        extra["max_iterations"] = max_iterations
    return make_policy(name, **extra)
