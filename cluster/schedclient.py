"""Reaching the cluster's one migration scheduler (`cluster.scheduler`), and running a
migration through it.

In a persistent cluster the scheduler is a named, detached Ray actor (`migbed-scheduler`),
made by the first command that needs it and found by every later one, so every `migrate`,
`evacuate` and `drain` of that cluster shares one queue and one set of limits. A local or
in-process testbed holds its own in its process. `scheduled` is how a migration runs: queue,
wait the turn (Ctrl-C cancels it while it waits: its guest stays), run the ordinary
`run_migration` under the scheduler's id (so the rates the scheduler sets reach its sender),
and finish; the report carries the entry (`schedule`: wait, start, end, links, rates).
"""

from collections.abc import Callable
from typing import Any

from cluster.driver import migrate_once, with_application
from cluster.fairshare import Topology
from cluster.report import MigrationReport
from cluster.scheduler import CANCELLED, MigrationScheduler
from nodes.errors import ClusterError, MigbedError, MigrationCancelled
from nodes.migration.progress import Progress
from nodes.migration.settings import MigrationSettings

ACTOR_NAME = "migbed-scheduler"
ACTOR_CONCURRENCY = 512      # waits in the queue are calls in flight: one thread each,
                             # with room beside a drain's 256 waiting (`evacuate.MAX_WAITING`)
WAIT_STEP_SECONDS = 0.5


class QueuedMigrationCancelled(MigrationCancelled):
    """A queued migration was cancelled before it started; its guest did not move."""


class SchedulerHandle:
    """The same calls on a scheduler in this process or on the cluster's actor."""

    def __init__(self, target: Any, remote: bool):
        self.target = target
        self.remote = remote

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if not self.remote:
            return getattr(self.target, method)(*args, **kwargs)
        import ray
        try:
            return ray.get(getattr(self.target, method).remote(*args, **kwargs), timeout=60)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, Exception):
                raise cause from None
            raise
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
            raise ClusterError(f"the cluster's migration scheduler does not answer "
                               f"({type(exc).__name__})") from None


def local_scheduler(hosts: dict, topology: Topology | None = None) -> SchedulerHandle:
    """A scheduler in this process that tells the testbed's `hosts` their senders' rates."""
    def push(source: str, mid: str, rate: float | None) -> None:
        h = hosts.get(source)
        if h is None:
            return
        if hasattr(h, "actor"):
            h.call_async("set_migration_rate", mid, rate)   # fire and forget
        else:
            h.call("set_migration_rate", mid, rate)
    return SchedulerHandle(MigrationScheduler(topology, push=push), remote=False)


class RemoteScheduler(MigrationScheduler):
    """The scheduler as the cluster's actor: it reaches the host actors by name."""

    def __init__(self, topology: dict | None = None, namespace: str = "migbed"):
        super().__init__(Topology.from_dict(topology), push=self._push)
        self._namespace = namespace
        self._actors: dict[str, Any] = {}

    def _push(self, source: str, mid: str, rate: float | None) -> None:
        import ray
        actor = self._actors.get(source)
        if actor is None:
            actor = self._actors[source] = ray.get_actor(source, namespace=self._namespace)
        actor.set_migration_rate.remote(mid, rate)

    def forget_host(self, name: str) -> None:
        self._actors.pop(name, None)

    def ping(self) -> str:
        return ACTOR_NAME


def cluster_scheduler(topology: Topology, namespace: str) -> SchedulerHandle:
    """The persistent cluster's scheduler actor, started by the first caller."""
    import ray
    actor_class = ray.remote(RemoteScheduler)
    actor = actor_class.options(name=ACTOR_NAME, namespace=namespace, lifetime="detached",
                                get_if_exists=True, num_cpus=0,
                                max_concurrency=ACTOR_CONCURRENCY, max_restarts=0
                                ).remote(topology.to_dict(), namespace)
    return SchedulerHandle(actor, remote=True)


def wait_turn(sched: SchedulerHandle, mid: str) -> dict:
    """Wait until the migration starts (or was cancelled); Ctrl-C cancels it if queued."""
    try:
        while True:
            entry = sched.call("wait_turn", mid, WAIT_STEP_SECONDS)
            if entry["state"] != "queued":
                return entry
    except KeyboardInterrupt:
        entry = sched.call("cancel", mid)
        if entry["state"] != CANCELLED:
            sched.call("finish", mid, "cancelled")
        raise


def scheduled(sched: SchedulerHandle, src, dst, guest: str, settings: MigrationSettings,
              group: str | None = None,
              on_progress: Callable[[Progress], None] | None = None,
              should_cancel: Callable[[], bool] | None = None,
              on_queued: Callable[[str], None] | None = None,
              application_after_seconds: float | None = None) -> MigrationReport:
    """Run one migration through the scheduler (see the module docstring); `on_queued(id)`
    if it has to wait; a program guest's application block as `run_migration` reads it. A
    migration cancelled while queued raises QueuedMigrationCancelled:
    nothing moved."""
    src.call("check_migratable", guest)      # a guest that cannot move is not queued
    mid = submit(sched, src, dst, guest, settings, group)
    if on_queued is not None and sched.call("wait_turn", mid, 0.0)["state"] == "queued":
        on_queued(mid)                        # it waits: say how to cancel it
    return run_submitted(sched, mid, src, dst, guest, settings, on_progress, should_cancel,
                         application_after_seconds=application_after_seconds)


def submit(sched: SchedulerHandle, src, dst, guest: str, settings: MigrationSettings,
           group: str | None = None) -> str:
    """Queue the migration; its id (run it with `run_submitted`)."""
    return sched.call("submit", guest, src.name, dst.name, group,
                      settings.link_bytes_per_second, settings.rate_limit_bytes_per_second)


def run_submitted(sched: SchedulerHandle, mid: str, src, dst, guest: str,
                  settings: MigrationSettings,
                  on_progress: Callable[[Progress], None] | None = None,
                  should_cancel: Callable[[], bool] | None = None,
                  on_start: Callable[[dict], None] | None = None,
                  application_after_seconds: float | None = None) -> MigrationReport:
    """Wait for the queued migration `mid`'s turn (`on_start(entry)` when it comes), run
    it, finish it; its report. The slot is freed at the migration's end, before a program
    guest's application block is read (`application_after_seconds` later)."""
    entry = wait_turn(sched, mid)
    if entry["state"] == CANCELLED:
        raise QueuedMigrationCancelled(f"the migration of {guest} ({mid}) was cancelled "
                                       f"while queued; {guest} stays on {src.name}")
    if on_start is not None:
        on_start(entry)
    status = "failed"
    try:
        ran = migrate_once(src, dst, guest, settings, on_progress=on_progress,
                           migration_id=mid, should_cancel=should_cancel)
        status = str(ran.report.status)
    except MigbedError:
        status = "refused"
        raise
    finally:
        entry = sched.call("finish", mid, status)
    report = with_application(ran, src, dst, application_after_seconds)
    report.schedule = entry
    return report
