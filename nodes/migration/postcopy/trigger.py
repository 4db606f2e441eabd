"""When pre-copy gives way to post-copy: the switch rule, one input of the switch-over arbiter
(`nodes.migration.decide.switchover`).

QEMU switches when `migrate-start-postcopy` has been asked for (libvirt's migrate-postcopy,
guestperf's post_copy_iters, KubeVirt's completion timeout) and the migration thread next
looks; migbed switches on the same request (`migbed migrate-postcopy`, the host service's
`start_postcopy`), after N live rounds (`postcopy_after_rounds`, 0: pure post-copy) or once a
time has passed since the start (`postcopy_after_seconds`), and on any `Decision` whose
action is POSTCOPY (a policy of its own may decide to switch).

Where the switch stands beside the policy is the arbiter's order: what the policy said comes
first when it has converged (as QEMU completes in pre-copy when what is pending fits,
migration_iteration_run checks that before start_postcopy, there is nothing worth
post-copying); a stop on one of the policy's caps (rounds, volume) gives way to an asked-for
switch. `prefer` weighs one decision already made against the rule, by that same order.
"""

from dataclasses import dataclass

from nodes.migration.decide.policy import Decision, PrecopyStats
from nodes.migration.decide.switchover import Arbiter, Moment


@dataclass(frozen=True)
class SwitchRule:
    """What asks for the switch: a round count, a time, or the operator (`requested`)."""

    after_rounds: int | None = None
    after_seconds: float | None = None

    def due(self, stats: PrecopyStats, requested: bool = False) -> str | None:
        """Why the switch is due now, or None."""
        if requested:
            return "the operator asked for post-copy (migrate-postcopy)"
        n = self.after_rounds
        if n is not None and stats.iteration >= n:
            return ("pure post-copy (--postcopy): only the vCPU state moved first" if n == 0
                    else f"switched to post-copy after {n} live round{'s' * (n != 1)} "
                         f"(--postcopy-after {n})")
        t = self.after_seconds
        if t is not None and stats.elapsed_seconds >= t:
            return f"switched to post-copy {t:g} s after the start (--postcopy-after {t:g}s)"
        return None

    def timed_out(self, elapsed_seconds: float, requested: bool = False) -> bool:
        """Between the batches of a pass: the time (or the operator) says switch now, so
        the pass is cut short (a round count waits for the pass to end)."""
        t = self.after_seconds
        return requested or (t is not None and elapsed_seconds >= t)

    def due_after(self, rounds: int) -> bool:
        """A switch after N live rounds is due once `rounds` have ended (a mid-pass policy
        ends its chunk there, so the next pass does not begin first)."""
        return self.after_rounds is not None and rounds >= self.after_rounds


def prefer(rule: SwitchRule, decision: Decision, stats: PrecopyStats,
           requested: bool = False) -> Decision:
    """The decision the live rounds would act on, by the arbiter's order: the policy's when it
    converged (or aborts, or itself switches), else the switch when it is due, else the
    policy's."""
    return Arbiter(_Said(decision), switch=_Asked(rule, requested)).decide(
        Moment(stats, stats.elapsed_seconds))


@dataclass(frozen=True)
class _Said:
    """A policy whose answer is already known."""

    decision: Decision

    def decide(self, stats: PrecopyStats) -> Decision:
        return self.decision


@dataclass(frozen=True)
class _Asked:
    """A switch rule with the operator's request fixed, as the arbiter consults it."""

    rule: SwitchRule
    requested: bool

    def due(self, stats: PrecopyStats) -> str | None:
        return self.rule.due(stats, self.requested)

    def timed_out(self, elapsed_seconds: float) -> bool:
        return self.rule.timed_out(elapsed_seconds, self.requested)

    def due_after(self, rounds: int) -> bool:
        return self.rule.due_after(rounds)
