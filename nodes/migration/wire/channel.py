"""The data channel of a migration: one TCP connection from the source host to the
destination host, opened only for a migration the destination was told to expect.

The destination listens on its own address (127.0.0.1 unless the cluster says otherwise) on
an ephemeral port and hands the source a ticket: address, port and a random per-migration
token. The first bytes the source sends are the token; a connection that does not present it
is closed before a single byte reaches guest memory.
"""

import errno
import hmac
import secrets
import socket
from dataclasses import asdict, dataclass

from nodes.errors import MigrationError

TOKEN_BYTES = 16


@dataclass(frozen=True)
class Ticket:
    migration_id: str
    address: str
    port: int
    token: str   # hex
    host: str = ""   # the destination host's name, as the control plane knows it

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Ticket":
        return cls(**d)


def _listen(address: str, ports: tuple[int, int] | None) -> socket.socket:
    """A server socket on `address`: on a free port (None), or on the first free one of the
    inclusive range `ports` (what a firewall between machines lets through), from a random
    start so concurrent migrations rarely race for one."""
    if ports is None:
        return socket.create_server((address, 0))
    low, high = ports
    span = high - low + 1
    start = secrets.randbelow(span)
    for i in range(span):
        try:
            return socket.create_server((address, low + (start + i) % span))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
    raise OSError(errno.EADDRINUSE, f"every data port of {low}-{high} is in use")


class Listener:
    """A listening socket for one incoming migration."""

    def __init__(self, address: str, migration_id: str,
                 ports: tuple[int, int] | None = None):
        self.sock = _listen(address, ports)
        self.token = secrets.token_bytes(TOKEN_BYTES)
        host, port = self.sock.getsockname()[:2]
        self.ticket = Ticket(migration_id, host, port, self.token.hex())

    def accept(self, timeout: float, attempts: int = 4) -> socket.socket:
        """The first connection that presents the token; strays are closed and ignored."""
        self.sock.settimeout(timeout)
        for _ in range(attempts):
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                raise MigrationError(f"no source connected within {timeout:g} s") from None
            admitted = self._admit(conn, timeout)
            if admitted is not None:
                return admitted
        raise MigrationError("too many connections without the migration's token")

    def accept_once(self, timeout: float) -> socket.socket | None:
        """One connection within `timeout` that presents the token; None if none came or it
        did not (a post-copy destination waiting for its source to reconnect polls this)."""
        self.sock.settimeout(timeout)
        try:
            conn, _ = self.sock.accept()
        except TimeoutError:
            return None
        return self._admit(conn, timeout)

    def _admit(self, conn: socket.socket, timeout: float) -> socket.socket | None:
        """`conn` if it presents the token within `timeout`; otherwise it is closed."""
        conn.settimeout(timeout)
        try:
            got = _recv_exact(conn, TOKEN_BYTES)
        except OSError:
            got = b""
        if got and hmac.compare_digest(got, self.token):
            _tune(conn)
            return conn
        conn.close()
        return None

    def close(self) -> None:
        shut_down(self.sock)    # wakes a thread blocked in accept()
        self.sock.close()


def shut_down(sock: socket.socket) -> None:
    """Shut both ways, which wakes a thread blocked on the socket; one already gone (closed,
    or never connected) is no error."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def connect(ticket: Ticket, timeout: float) -> socket.socket:
    try:
        sock = socket.create_connection((ticket.address, ticket.port), timeout=timeout)
    except OSError as exc:
        raise MigrationError(f"cannot reach the destination at {ticket.address}:{ticket.port}: "
                             f"{exc}") from None
    _tune(sock)
    sock.sendall(bytes.fromhex(ticket.token))
    return sock


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
        except OSError:
            pass


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)
