"""The Trio worker's write path for plain-TCP connections: the socket first, a writer second.

Hypercorn 0.18 writes every frame (``TCPServer.protocol_send``) like this::

    async with self.send_lock:                  # Lock.acquire yields even when it is free
        with trio.CancelScope(shield=True):
            await self.stream.send_all(data)    # and send_all yields again after the write

Two passes of the scheduler per frame, whoever sends it. A chat server writes a frame per
member per message, and on the Trio worker those passes cost more than the ``send()``
itself: sending one event per frame, roomcast spent two to four times the CPU per
delivery with this path as without it (bench/README.md, "What the profiles showed").

:class:`DirectWriter` writes a frame in the caller when it can, with one ``send()`` on the
non-blocking socket, and hands the writing to a task only when it cannot:

- **Nothing is buffered**: the frame goes straight to ``socket.send``, without lock, shield
  or task switch. On loopback, and wherever the peer keeps up, nearly every frame is taken
  whole. Whatever the kernel did not take (all of it, or the tail of a partial write) is
  buffered, and one writer task is started for the connection.
- **Something is buffered**: the frame is appended behind it. The writer sends everything
  buffered in one ``send_all`` and repeats until nothing is left, then ends. So the writer
  exists only while there is a backlog, and never holds the connection's task group open
  once the connection has nothing left to write (``TCPServer.run`` waits for every task in
  it before it closes the socket).
- **More than** :data:`PENDING_LIMIT` **bytes buffered**: the sender waits until the writer
  brings it back under. A peer that stops reading blocks the tasks that write to it (its
  sender, its pings), never anyone else's; roomcast's fan-out keeps filling that member's
  bounded outbox until the hub evicts it with 4008.

What it keeps from Hypercorn's path:

- **Order, whole frames.** A frame is written or buffered in one synchronous step, so the
  frames of concurrent writers (the app's sender, the ping task, the reader answering a
  ping or a close) never interleave, and each task's frames keep the order it sent them in:
  once anything is buffered, every later frame queues behind it.
- **Shielded writes.** The writer's ``send_all`` is shielded, as Hypercorn's is. A
  ``Closed`` event first waits, shielded, until everything buffered is written; and at
  shutdown, when the connection's tasks are cancelled, the writer finishes before
  ``TCPServer.run`` closes the socket. So the close frame sent under a shield at shutdown
  (1001), or after an eviction (4008), still reaches a peer that reads.
- **Backpressure.** A sender waits for a peer that does not read: after the kernel's send
  buffer and :data:`PENDING_LIMIT` more bytes, instead of after the kernel's buffer alone.
  ``TCP_USER_TIMEOUT`` still ends such a peer, as the writer's write then fails.
- **Errors end the connection.** A failed write tells the protocol ``Closed`` (the app sees
  a disconnect), as Hypercorn's ``protocol_send`` does; later frames are dropped.

What it drops:

- **The lock, and the shield around a sender that waits.** Order comes from writing or
  buffering without a schedule point in between. A sender waiting for room can be
  cancelled, and then none of its frame is written; only bytes already accepted are
  written under a shield.
- **A pass of the scheduler per frame.** ``send`` is a cancellation point (a cancelled
  caller gets ``Cancelled`` and nothing is written, as with Trio's own socket calls) but it
  does not yield when the kernel takes the frame, like asyncio's ``transport.write``. A
  task that sends in a loop must yield on its own, and roomcast's senders do, where a
  yield does the most good: a batch sender lets passes go by before it gathers a frame
  (``connection.GATHER_PASSES``: fuller frames), a single-event sender yields when its
  outbox is empty and every ``connection.FAIR_SHARE`` events. Yielding after every write
  instead cost single-event clients about 30% of their throughput.
- **TLS** is not covered: an ``SSLStream`` keeps Hypercorn's path (it has no frame-sized
  non-blocking write; roomcast expects TLS to end at a proxy).

The internals it relies on (Hypercorn's ``protocol_send``, ``TCPServer.run`` and
``TaskGroup.spawn``; ``SocketStream.socket._sock`` being Trio's non-blocking stdlib socket)
are checked by ``tests/test_launcher.py`` (``TestHypercornInternals``,
``TestTrioInternals``). :data:`SUPPORTED` keeps Hypercorn's own path, with a warning at
startup, on a Hypercorn outside the releases those checks describe.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from importlib.metadata import version

import trio

__all__ = ["PENDING_LIMIT", "SUPPORTED", "DirectWriter", "hypercorn_version"]

#: bytes buffered for one connection beyond which its senders wait for the writer
PENDING_LIMIT = 64 * 1024
#: Hypercorn releases whose ``TCPServer.protocol_send`` this replaces (pyproject's pin)
TESTED_HYPERCORN = ((0, 17), (0, 18))


def hypercorn_version() -> str:
    return version("hypercorn")


def _hypercorn_is_tested() -> bool:
    major, minor = (int(part) for part in hypercorn_version().split(".")[:2])
    return (major, minor) in TESTED_HYPERCORN


#: whether the worker uses :class:`DirectWriter` for plain-TCP connections
SUPPORTED = _hypercorn_is_tested()


class DirectWriter:
    """Writes one plain-TCP connection's frames: directly while the kernel takes them,
    through one writer task while it does not.

    :param stream: the connection's stream; its socket is non-blocking (Trio's)
    :param spawn: starts a task in the connection's task group
    :param closed: tells the protocol that the connection is gone (called once, by the
        writer, if one of its writes fails)
    :param limit: bytes buffered beyond which :meth:`send` waits
    """

    def __init__(
        self,
        stream: trio.SocketStream,
        spawn: Callable[[Callable[[], Awaitable[None]]], None],
        closed: Callable[[], Awaitable[None]],
        *,
        limit: int = PENDING_LIMIT,
    ) -> None:
        self._stream = stream
        self._socket: socket.socket = stream.socket._sock  # type: ignore[attr-defined]
        self._spawn = spawn
        self._closed = closed
        self._limit = limit
        self._pending = bytearray()
        self._in_flight = 0  # bytes the writer is sending right now
        self._writing = False  # a writer task exists: every frame queues behind it
        self._broken = False
        self._progress = trio.lowlevel.ParkingLot()

    @property
    def buffered(self) -> int:
        """Bytes accepted by :meth:`send` and not yet taken by the kernel."""
        return len(self._pending) + self._in_flight

    async def send(self, data: bytes) -> bool:
        """Write ``data`` after everything sent before it, whole.

        Returns ``False``, writing nothing, once the connection is broken (a write failed):
        the caller then tells the protocol, as Hypercorn does when ``send_all`` fails.

        :raises trio.Cancelled: if the caller is cancelled before ``data`` is written or
            buffered (then none of it is)
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        while self._writing and self.buffered > self._limit:
            await self._progress.park()
        if self._broken:
            return False
        if self._writing:
            self._pending += data
            return True
        try:
            sent = self._socket.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._broken = True
            return False
        if sent < len(data):
            self._pending += memoryview(data)[sent:]
            self._writing = True
            self._spawn(self._write_pending)
        return True

    async def flush(self) -> None:
        """Wait until everything buffered is written, or a write failed; shielded, as
        Hypercorn's own writes are, so that a close frame still goes out at shutdown."""
        with trio.CancelScope(shield=True):
            while self._writing:
                await self._progress.park()

    async def _write_pending(self) -> None:
        try:
            while self._pending:
                data, self._pending = self._pending, bytearray()
                self._in_flight = len(data)
                try:
                    with trio.CancelScope(shield=True):
                        await self._stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self._broken = True
                    self._pending.clear()
                finally:
                    self._in_flight = 0
                    self._progress.unpark_all()
        finally:
            self._writing = False
            self._progress.unpark_all()
        if self._broken:
            await self._closed()
