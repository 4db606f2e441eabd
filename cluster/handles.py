"""Handles on hosts: the same calls whether a host is a Ray actor or an object in this process.

The migration driver and the testbed speak to hosts only through these, so the whole
control plane runs in one process in fast tests (`LocalHost`) and across Ray nodes in the
cluster (`RayHost`).
"""

import concurrent.futures
from typing import Any


class Pending:
    """A call in flight: `done()` and `result(timeout)`."""

    def __init__(self, future: Any, getter):
        self._future = future
        self._get = getter

    def done(self) -> bool:
        return self._get(self._future, 0.0, probe=True)

    def wait(self, timeout: float) -> bool:
        """Up to `timeout` seconds for the call to end, returning as soon as it does."""
        return self._get(self._future, timeout, probe=True)

    def result(self, timeout: float | None = None) -> Any:
        return self._get(self._future, timeout, probe=False)


class LocalHost:
    """A HostService in this process; async calls run on a thread."""

    _pool = concurrent.futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="host")

    def __init__(self, service: Any):
        self.service = service
        self.name = service.name

    def call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        self.service.check_alive()
        return getattr(self.service, method)(*args)

    def call_async(self, method: str, *args: Any) -> Pending:
        self.service.check_alive()
        fut = self._pool.submit(getattr(self.service, method), *args)

        def get(f, timeout, probe):
            if probe:
                concurrent.futures.wait([f], timeout=timeout)
                return f.done()
            result = f.result(timeout)
            self.service.check_alive()      # a host killed meanwhile answers nothing
            return result
        return Pending(fut, get)

    def kill(self) -> None:
        """The host dies (fault injection): sockets shut, guests stop, calls fail."""
        self.service.kill()


DEFAULT_CALL_TIMEOUT_SECONDS = 120.0


class RayHost:
    """A Host actor. Errors raised inside the actor come back as their own class; a call
    never blocks forever (a dead or hung host is a ClusterError after the timeout)."""

    def __init__(self, name: str, actor: Any):
        self.name = name
        self.actor = actor

    def call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        import ray
        return _unwrap(lambda: ray.get(getattr(self.actor, method).remote(*args),
                                       timeout=timeout or DEFAULT_CALL_TIMEOUT_SECONDS),
                       self.name)

    def kill(self, timeout: float = 30.0) -> None:
        """The host dies (fault injection): its actor process exits at once, as a node lost,
        and this returns once Ray reports it dead (or `timeout` passed). (`ray.kill` alone
        only asks: a migration thread of the dying process could still finish a hand-over.)"""
        import time

        import ray
        self.actor.die.remote()          # the process exits at once: nothing of it runs on
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                try:
                    ray.get(self.actor.ping.remote(), timeout=1.0)
                except ray.exceptions.RayActorError:
                    return
                except ray.exceptions.GetTimeoutError:
                    continue
                time.sleep(0.005)
        finally:
            ray.kill(self.actor, no_restart=True)

    def call_async(self, method: str, *args: Any) -> Pending:
        import ray
        ref = getattr(self.actor, method).remote(*args)

        def get(r, timeout, probe):
            if probe:
                ready, _ = ray.wait([r], timeout=timeout)
                return bool(ready)
            return _unwrap(lambda: ray.get(r, timeout=timeout), self.name)
        return Pending(ref, get)


def _unwrap(fn, host: str):
    """Re-raise a migbed error from inside an actor as itself, not as a RayTaskError; a dead
    or unresponsive host as a ClusterError that names it."""
    import ray.exceptions

    from nodes.errors import ClusterError
    try:
        return fn()
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, Exception):
            raise cause from None
        raise
    except ray.exceptions.GetTimeoutError:
        raise ClusterError(f"host {host} did not answer in time") from None
    except ray.exceptions.RayActorError as exc:
        raise ClusterError(f"host {host} is gone: {type(exc).__name__}") from None
