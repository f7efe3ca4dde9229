"""What the kernel knows about a client socket that asyncio does not tell us.

The write deadline in ``connection_limits`` must tell a client that reads
slowly from one that reads nothing, and must free a stalled peer's send queue
at once; asyncio's transports expose neither, so these few Linux socket
queries (``SIOCOUTQ``, ``TCP_INFO``, ``SO_LINGER``) live here, each with a
fallback where the platform lacks it.
"""

from __future__ import annotations

import asyncio
import fcntl
import socket
import struct
import termios
from typing import Any, cast

_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST and frees the send queue at once
_OUTQ = getattr(termios, "TIOCOUTQ", None)  # Linux: bytes in a socket's send queue the peer has not acknowledged
_INT = struct.Struct("i")
_TCP_INFO = getattr(socket, "TCP_INFO", None)
_BYTES_ACKED, _BYTES_ACKED_AT = struct.Struct("=Q"), 120  # struct tcp_info: __u64 tcpi_bytes_acked (Linux >= 4.1)


def abort_with_reset(tr: asyncio.BaseTransport) -> None:
    """Close now, with a reset: nothing more is sent, and the kernel frees what the peer left unread."""
    sock = tr.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except (OSError, AttributeError, TypeError, ValueError):  # pragma: no cover - odd transports
            pass
    cast(asyncio.Transport, tr).abort()


def kernel_unsent(sock: Any) -> int:
    """Bytes in the socket's send queue the client has not acknowledged (Linux SIOCOUTQ; 0 where unknown)."""
    fd = sock.fileno() if sock is not None and _OUTQ is not None else -1
    if fd < 0:
        return 0
    try:
        return int(_INT.unpack(fcntl.ioctl(fd, cast(int, _OUTQ), b"\0\0\0\0"))[0])  # fd >= 0: _OUTQ is set
    except OSError:  # pragma: no cover - not a TCP socket
        return 0


def bytes_taken(tr: asyncio.BaseTransport) -> int:
    """A count that grows whenever the client takes bytes of ours: TCP's ``bytes_acked`` (Linux >= 4.1).

    Acknowledged bytes move as soon as the client reads. What is still buffered is
    a coarse signal: the kernel wakes a writer only once a third of its
    (multi-megabyte, autotuned) send queue has drained, so a client reading
    slowly but steadily would look stalled; and the answer's writer may add to it.
    Without TCP_INFO: minus the bytes still buffered, in the transport and the kernel.
    """
    sock = tr.get_extra_info("socket")
    if sock is not None and _TCP_INFO is not None:
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 256)
        except OSError:  # pragma: no cover - not a TCP socket
            info = b""
        if len(info) >= _BYTES_ACKED.size + _BYTES_ACKED_AT:
            return int(_BYTES_ACKED.unpack_from(info, _BYTES_ACKED_AT)[0])
    return -(tr.get_write_buffer_size() + kernel_unsent(sock))  # type: ignore[attr-defined]
