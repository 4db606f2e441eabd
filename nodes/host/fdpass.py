"""Messages with file descriptors between a host and its guest processes, over a unix socket.

Why: a guest process maps the host's machine memory (the host's memfd), and the host drives
the guest's userfaultfd (made in the guest's process, since it belongs to its memory): both
descriptors cross process boundaries, and only SCM_RIGHTS carries them. A message is a
msgpack map, length-prefixed on a stream socket (a P2M table does not fit one datagram); its
descriptors ride on the length prefix.
"""

import socket
import struct

import msgpack

from nodes.errors import MigbedError

MAX_FDS = 8
_HEADER = struct.Struct("<I")
MAX_MESSAGE_BYTES = 64 << 20


class PeerGone(MigbedError):
    """The other end of a host-guest socket closed (the process died or exited)."""


def send_message(sock: socket.socket, body: dict, fds: tuple[int, ...] | list[int] = ()) -> None:
    """Send `body` (msgpack-able: ints, strs, bytes, lists, dicts) and dup'd copies of `fds`."""
    data = msgpack.packb(body, use_bin_type=True)
    if fds:
        socket.send_fds(sock, [_HEADER.pack(len(data))], list(fds))
    else:
        sock.sendall(_HEADER.pack(len(data)))
    sock.sendall(data)


def recv_message(sock: socket.socket) -> tuple[dict, list[int]]:
    """The next message and the descriptors it carried (now this process's, to close).
    PeerGone when the other end has closed."""
    head, fds, _flags, _addr = socket.recv_fds(sock, _HEADER.size, MAX_FDS)
    try:
        if len(head) < _HEADER.size:
            head += _recv_exactly(sock, _HEADER.size - len(head))
        (length,) = _HEADER.unpack(head)
        if length > MAX_MESSAGE_BYTES:
            raise PeerGone(f"a message of {length} bytes: the peer is not a migbed process")
        return msgpack.unpackb(_recv_exactly(sock, length), raw=False), fds
    except BaseException:
        for fd in fds:
            socket.close(fd)
        raise


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    parts, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise PeerGone("the peer closed its socket")
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)
