"""When pre-copy gives way to post-copy: the switch, decided beside the pre-copy policy.

QEMU switches when `migrate-start-postcopy` has been asked for (libvirt's migrate-postcopy,
guestperf's post_copy_iters, KubeVirt's completion timeout) and the migration thread next
looks; migbed switches on the same request (`migbed migrate-postcopy`, the host service's
`start_postcopy`), after N live rounds (`postcopy_after_rounds`, 0: pure post-copy) or once a
time has passed since the start (`postcopy_after_seconds`), and on any `Decision` whose
action is POSTCOPY (a policy of its own may decide to switch).

What the policy said comes first when it has converged: as QEMU completes in pre-copy when
what is pending fits (migration_iteration_run checks that before start_postcopy), there is
nothing worth post-copying. A stop on one of the policy's caps (rounds, volume) gives way to
an asked-for switch. The analytic model (`cluster.model.postcopy`) decides with `prefer` too.
"""

from dataclasses import dataclass

from nodes.migration.policy import Action, Decision, PrecopyStats, StopCode


@dataclass(frozen=True)
class SwitchRule:
    """What asks for the switch: a round count, a time, or the operator (`requested`)."""

    after_rounds: int | None = None
    after_seconds: float | None = None

    def due(self, stats: PrecopyStats, requested: bool) -> str | None:
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

    def timed_out(self, elapsed_seconds: float, requested: bool) -> bool:
        """Between the batches of a pass: the time (or the operator) says switch now, so
        the pass is cut short (a round count waits for the pass to end)."""
        t = self.after_seconds
        return requested or (t is not None and elapsed_seconds >= t)


def prefer(rule: SwitchRule, decision: Decision, stats: PrecopyStats,
           requested: bool = False) -> Decision:
    """The decision the live rounds act on: the policy's when it converged (or aborts, or
    itself switches), else the switch when it is due, else the policy's."""
    if decision.action in (Action.ABORT, Action.POSTCOPY):
        return decision
    if decision.action is Action.STOP_AND_COPY and decision.stop_code is not None \
            and decision.stop_code.converged:
        return decision
    why = rule.due(stats, requested)
    if why is None:
        return decision
    return Decision(Action.POSTCOPY, why, StopCode.POSTCOPY)
