"""The exceptions migbed raises. Each says what was wrong and, where it can, how to mend it.

The CLI turns any `MigbedError` into one line on stderr and exit code 2; the API lets them
propagate so callers can catch the specific class.
"""


class MigbedError(Exception):
    """Base class of every error migbed raises on purpose."""


class ConfigError(MigbedError, ValueError):
    """A size, rate, name, mode or other setting is malformed or out of range."""


class OutOfFramesError(MigbedError):
    """A host has too few free machine frames for the request."""

    def __init__(self, message: str, needed_frames: int = 0, free_frames: int = 0):
        super().__init__(message)
        self.needed_frames = needed_frames
        self.free_frames = free_frames


class NoSuchDomainError(MigbedError, LookupError):
    """No domain (guest) of that name exists."""


class DomainExistsError(MigbedError):
    """A domain of that name already exists."""


class ModeError(MigbedError):
    """The memory mode is unknown, not allowed on this host, or impossible for this guest."""


class AccessViolation(MigbedError):
    """A guest touched a physical frame outside its memory; the hypervisor refused it."""


class DomainStateError(MigbedError):
    """The operation does not fit the domain's state (paused, dom0, migrating...)."""


class GuestPaused(DomainStateError):
    """The guest is paused; its vCPU must wait (raised to the vCPU, not to users)."""


class StreamError(MigbedError):
    """A migration stream is corrupt, truncated, of an unknown version or otherwise invalid."""


class MigrationError(MigbedError):
    """A migration could not start or did not complete."""


class MigrationCancelled(MigrationError):
    """A migration was cancelled by its operator before the hand-over."""


class MigrationTimedOut(MigrationCancelled):
    """An operator's timeout gave up on a migration that would not finish
    (`--completion-timeout`, `--progress-timeout`); `stop_code` says which."""

    def __init__(self, message: str, stop_code: str):
        super().__init__(message)
        self.stop_code = stop_code


class MigrationStillRunning(MigrationError):
    """A host was asked for the result of a migration that has not ended yet."""


class ConnectionLost(MigrationError):
    """The peer host or the link went away mid-migration, without an ABORT: the connection
    was reset or closed, or nothing crossed it within the timeout."""


class StreamTruncated(StreamError, ConnectionLost):
    """The stream ended inside a header or a record: the peer closed it mid-way."""


class PeerAborted(StreamError):
    """The peer gave up and said why (an ABORT record)."""

    def __init__(self, reason: str):
        super().__init__(f"peer aborted: {reason}")
        self.reason = reason


class GuestLost(MigrationError):
    """After a post-copy switch a host died (or the destination gave up): neither host has
    the whole guest any more, so it is gone. Raised to a vCPU waiting on a page that will
    never come, and to callers of a post-copy migration that cannot complete."""


class PostcopyPaused(MigrationError):
    """After a post-copy switch the link broke and did not come back within the timeout: the
    migration is paused (the guest runs on the destination, its missing pages wait) until
    `migbed migrate-recover` says the link is back."""


class NoSuchHostError(MigbedError, LookupError):
    """No host of that name is in the cluster."""


class ClusterError(MigbedError):
    """The cluster is not running, cannot be reached, or cannot be started."""


def describe_failure(exc: BaseException, peer: str) -> str:
    """One line for why a migration's side failed: migbed's own message, a connection to
    `peer` ("the source", "the destination") that failed, or the exception's type and text."""
    if isinstance(exc, MigbedError):
        return str(exc)
    if isinstance(exc, OSError):
        return f"connection to {peer} failed: {exc.strerror or exc}"
    return f"{type(exc).__name__}: {exc}"
