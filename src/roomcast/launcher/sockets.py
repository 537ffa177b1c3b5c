"""What the master sets up before any worker starts: listening sockets and the fd limit
(and the send timeout, which plain Hypercorn's workers set on each accepted socket)."""

from __future__ import annotations

import resource
import socket
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from asyncio.trsock import TransportSocket

    from trio.socket import SocketType

__all__ = ["bind_socket", "raise_open_file_limit", "set_send_timeout"]

#: what to raise the soft limit to when the hard limit is "unlimited" (Linux's nr_open)
UNLIMITED_FALLBACK = 1 << 20
MAX_PORT = 65535


def bind_socket(address: str, send_timeout: float, backlog: int) -> socket.socket:
    """A listening TCP socket with ``TCP_USER_TIMEOUT`` (where the platform has it), bound
    to ``HOST:PORT`` or ``[IPV6]:PORT``, or taken over from ``fd://N`` (socket activation).

    Accepted sockets inherit the option on Linux, so sent data left unacknowledged for
    ``send_timeout`` seconds makes the kernel abort the connection: the only way to end
    a peer that never reads while Hypercorn's Trio worker shields the write to it.

    :raises ValueError: if ``address`` is neither ``HOST:PORT`` nor ``fd://N``
    :raises OSError: if the address cannot be bound (in use, not local, no permission)
    """
    if address.startswith("fd://"):
        fd = address.removeprefix("fd://")
        if not fd.isdigit():
            raise ValueError(f"bind {address!r}: expected HOST:PORT or fd://N")
        sock = socket.socket(fileno=int(fd))
        host, port = "", 0
    else:
        host, port = _host_and_port(address)
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        set_send_timeout(sock, send_timeout)
        if host:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def set_send_timeout(sock: socket.socket | TransportSocket | SocketType, seconds: float) -> None:
    """Have the kernel abort ``sock``'s connection once data it sent has gone unacknowledged
    for ``seconds`` (``TCP_USER_TIMEOUT``; nothing where the platform lacks it). Set on a
    listening socket, its accepted sockets inherit it on Linux."""
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(seconds * 1000))


def _host_and_port(address: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPV6]:PORT`` split (an empty host is every IPv4 address).

    :raises ValueError: if there is no port, or it is not a TCP port number
    """
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"bind {address!r}: expected HOST:PORT or fd://N")
    port = int(port_text)
    if port > MAX_PORT:
        raise ValueError(f"bind {address!r}: port {port} is not in 0-{MAX_PORT}")
    return host.strip("[]") or "0.0.0.0", port


def raise_open_file_limit() -> tuple[int, int]:
    """Raise this process's soft ``RLIMIT_NOFILE`` to its hard limit (workers inherit it).

    Every connection is a descriptor; the usual soft limit of 1,024 is a default for
    interactive shells, not a choice made for a server. Returns ``(before, after)``.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = UNLIMITED_FALLBACK if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft, soft
        return soft, target
    return soft, soft
