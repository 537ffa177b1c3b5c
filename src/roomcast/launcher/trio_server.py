"""The Trio worker's serving loop: Hypercorn's, with every connection contained.

Hypercorn 0.18's Trio worker (``hypercorn.trio.run.worker_serve``) runs all connections in
one nursery under ``trio.serve_listeners``. An exception that escapes one connection's
``TCPServer`` escapes that nursery too and ends the worker, with every room and connection
in it. One does escape, for bytes any client can send: an upgrade request followed, in the
same TCP write, by anything at all makes Hypercorn's h11 layer raise ``LocalProtocolError``
(pgjones/hypercorn#225). The asyncio worker survives the same bytes only because asyncio
logs a failed connection task instead of propagating it.

:func:`serve` is that loop again, built from Hypercorn's own parts (``Lifespan``,
``TCPServer``, ``WorkerContext``) with four changes, each where it belongs:

- **Containment.** Each connection runs in a :class:`ContainedTCPServer`, which catches
  whatever ``Exception`` Hypercorn's connection handling raises (``except*``, so
  cancellation still propagates), logs one line with the peer's address, and ends that
  connection only; ``TCPServer.run``'s own ``finally`` has already closed its socket, and
  its app task was cancelled with the connection's nursery. Once Hypercorn fixes #225 the
  catch simply stops firing: nothing here depends on the bug, only on the fact that a
  connection's failure is that connection's business.
- **Prompt release.** Hypercorn's WebSocket ping task sleeps ``websocket_ping_interval``
  (20 s) between pings and notices that its stream closed only when it wakes; until then
  the connection's nursery, socket and memory stay alive. Each connection here gets a
  :class:`ConnectionContext` whose ``sleep`` also ends when the peer is gone, so a
  connection ended by a close frame, FIN or RST releases everything at once.
- **Direct writes.** Hypercorn writes every frame under a lock and a shield, passing
  through the scheduler twice; :class:`ContainedTCPServer` writes plain-TCP frames through
  a :class:`~.trio_write.DirectWriter` (straight to the socket when nothing is queued, the
  rest through one writer task), which keeps their order, bounds and shields. See
  :mod:`.trio_write` for the argument.
- **Accepting at the fd limit.** ``trio.serve_listeners`` answers ``EMFILE`` by logging a
  traceback and retrying every 0.1 s, for as long as the limit lasts. :class:`AcceptGate`
  logs once, then waits until one of this worker's connections closes (or a second
  passes) before it accepts again: new clients wait in the listen backlog meanwhile, and
  are served as soon as a descriptor is free.

The internals this relies on (``TCPServer``'s constructor, ``run``, ``protocol_send`` and
``_read_data``, the ping loop's ``context.sleep``) are checked by
``tests/test_launcher.py::TestHypercornInternals``, and ``pyproject.toml`` pins Hypercorn
below the next minor release.
"""

from __future__ import annotations

import errno
import math
import socket
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config, Sockets
from hypercorn.events import Closed, Event, RawData
from hypercorn.logging import Logger
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.statsd import StatsdLogger
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer
from hypercorn.trio.worker_context import EventWrapper, TrioSingleTask, WorkerContext
from hypercorn.typing import AppWrapper, ConnectionState, LifespanState
from hypercorn.utils import repr_socket_addr

from . import trio_write
from .sockets import set_send_timeout
from .trio_write import DirectWriter

__all__ = [
    "AcceptGate",
    "ConnectionContext",
    "ContainedTCPServer",
    "ServedTCPServer",
    "WatchedLifespan",
    "serve",
]

#: errors of accept() that mean "out of resources", not "this listener is broken"
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
#: how long accepting pauses at the fd limit if none of this worker's connections closes
ACCEPT_RETRY = 1.0
#: at most one "still at the fd limit" line per this many seconds
LIMIT_LOG_INTERVAL = 60.0

Listener = trio.SocketListener | trio.SSLListener[trio.SocketStream]
Stream = trio.SocketStream | trio.SSLStream[trio.SocketStream]


class WatchedLifespan(Lifespan):
    """Hypercorn's lifespan, which also remembers a failed startup: its own
    ``wait_for_startup`` returns either way, and the error reaches the worker only when
    the lifespan task ends, after the worker could have said it was serving."""

    failed = False

    async def asgi_send(self, message: Any) -> None:
        if message["type"] == "lifespan.startup.failed":
            self.failed = True
        await super().asgi_send(message)


class ConnectionContext:
    """The worker's :class:`WorkerContext` as one connection sees it.

    The same ``terminate``/``terminated`` events and request count, with one difference:
    :meth:`sleep` ends early once :meth:`peer_gone` is called. Hypercorn's only sleeper on
    a connection is the WebSocket ping loop, which checks whether its stream closed after
    each sleep, so waking it is what lets the connection's nursery, and its socket, go.
    """

    event_class = EventWrapper
    single_task_class = TrioSingleTask

    def __init__(self, worker: WorkerContext) -> None:
        self._worker = worker
        #: set once the peer is gone; made by the first sleep (most connections never sleep)
        self._gone: trio.Event | None = None
        self._peer_gone = False
        self.terminate = worker.terminate
        self.terminated = worker.terminated

    @property
    def max_requests(self) -> int | None:
        return self._worker.max_requests

    @property
    def requests(self) -> int:
        return self._worker.requests

    async def mark_request(self) -> None:
        await self._worker.mark_request()

    def peer_gone(self) -> None:
        """The connection's read side ended (close, FIN, RST): stop every sleep."""
        self._peer_gone = True
        if self._gone is not None:
            self._gone.set()

    async def sleep(self, wait: float) -> None:
        if self._gone is None:
            self._gone = trio.Event()
            if self._peer_gone:
                self._gone.set()
        with trio.move_on_after(wait):
            await self._gone.wait()

    @staticmethod
    def time() -> float:
        return trio.current_time()


class ContainedTCPServer(TCPServer):
    """Hypercorn's connection handler, whose failures end only its own connection, and
    whose plain-TCP writes go through a :class:`~.trio_write.DirectWriter`."""

    context: ConnectionContext  # type: ignore[assignment]  # duck-typed like WorkerContext

    def __init__(
        self,
        app: AppWrapper,
        config: Config,
        context: ConnectionContext,
        state: LifespanState,
        stream: Stream,
    ) -> None:
        super().__init__(app, config, context, state, stream)  # type: ignore[arg-type]  # see _handle
        self.writer: DirectWriter | None = None
        if trio_write.SUPPORTED and isinstance(stream, trio.SocketStream):
            self.writer = DirectWriter(stream, self._spawn, self._peer_closed)

    async def protocol_send(self, event: Event) -> None:
        if self.writer is None:
            await super().protocol_send(event)
        elif isinstance(event, RawData):
            if not await self.writer.send(event.data):
                await self.protocol.handle(Closed())
        else:
            if isinstance(event, Closed):
                await self.writer.flush()  # the last frames (a close frame) before the socket
            await super().protocol_send(event)

    def _spawn(self, task: Callable[[], Awaitable[None]]) -> None:
        self._task_group.spawn(task)

    async def _peer_closed(self) -> None:
        await self.protocol.handle(Closed())

    async def run(self) -> None:
        peer = _peer(self.stream)  # before the socket closes
        try:
            await super().run()
        except* Exception as group:
            await self.config.log.warning(
                f"connection from {peer} ended by a server error: {_describe(group)}"
            )

    async def _read_data(self) -> None:
        try:
            if self.writer is not None and self.config.read_timeout is None:
                await self._read_untimed()
            else:
                await super()._read_data()
        finally:
            self.context.peer_gone()

    async def _read_untimed(self) -> None:
        """Hypercorn's read loop for a plain-TCP connection without a read timeout.

        Hypercorn's own opens ``trio.fail_after(read_timeout or inf)`` around every read,
        a cancel scope that lives as long as the wait (1.1 KB per idle connection), and
        reads through ``SocketStream.receive_some``, whose frames and error translation
        wait too: here the connection waits in :func:`trio.lowlevel.wait_readable` alone.
        The same outcomes: data to the protocol, then ``Closed`` at end of file, on a
        failed read or once the stream is closed under it.
        """
        sock: socket.socket = self.stream.socket._sock
        while (data := await _receive(sock)) is not None:
            await self.protocol.handle(RawData(data))
            if not data:
                break
        await self.protocol.handle(Closed())


class ServedTCPServer(ContainedTCPServer):
    """:class:`ContainedTCPServer` as Hypercorn's own Trio worker builds a connection
    handler (``partial(TCPServer, app, config, context, state)(stream)``, with the
    worker's context): what :func:`.hardening.install` puts in its place, so plain
    ``hypercorn --worker-class trio`` contains each connection as the launcher does.

    ``send_timeout`` sets ``TCP_USER_TIMEOUT`` on the accepted socket, which the launcher
    sets on its listening sockets instead: plain Hypercorn binds them itself.
    """

    def __init__(
        self,
        app: AppWrapper,
        config: Config,
        context: WorkerContext,
        state: LifespanState,
        stream: Stream,
        *,
        send_timeout: float,
    ) -> None:
        super().__init__(app, config, ConnectionContext(context), state, stream)
        set_send_timeout(_socket(stream), send_timeout)


class AcceptGate:
    """Pauses accepting while the process is out of file descriptors.

    Each pause lasts until one of the worker's connections closes (which frees a
    descriptor) or :data:`ACCEPT_RETRY` passes (something else may have freed one). The
    first pause is logged at once; later ones at most every :data:`LIMIT_LOG_INTERVAL`
    seconds, with how many there were.
    """

    def __init__(self, log: Logger) -> None:
        self._log = log
        self._closed = trio.Event()
        self._pauses = 0
        self._logged_at = -math.inf

    def connection_closed(self) -> None:
        self._closed.set()
        self._closed = trio.Event()

    async def pause(self, error: OSError) -> None:
        self._pauses += 1
        now = trio.current_time()
        if now - self._logged_at >= LIMIT_LOG_INTERVAL:
            await self._log.error(
                f"cannot accept connections: {error.strerror or error} ({self._pauses} "
                "times); new clients wait until a connection closes"
            )
            self._logged_at = now
            self._pauses = 0
        with trio.move_on_after(ACCEPT_RETRY):
            await self._closed.wait()


async def serve(
    app: AppWrapper,
    config: Config,
    *,
    sockets: Sockets | None = None,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the app's lifespan, serve ``sockets`` (or ``config``'s binds) until
    ``shutdown_trigger`` returns, then shut down as Hypercorn does: stop accepting, give
    open connections ``graceful_timeout`` seconds, cancel the rest, end the lifespan.

    ``task_status.started`` gets the served addresses (``http://host:port``).
    """
    config.set_statsd_logger_class(StatsdLogger)
    if not trio_write.SUPPORTED:
        await config.log.warning(
            f"writing with Hypercorn {trio_write.hypercorn_version()}'s own (slower) write "
            "path: roomcast's is tested with Hypercorn 0.17 and 0.18"
        )
    lifespan_state: LifespanState = {}
    lifespan = WatchedLifespan(app, config, lifespan_state)
    context = WorkerContext(config.max_requests)
    gate = AcceptGate(config.log)

    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        if lifespan.failed:
            await trio.sleep_forever()  # until the lifespan task's error cancels us
        listeners, binds = await _open_listeners(config, sockets)
        handler = partial(_handle, app, config, context, lifespan_state, gate)

        async with trio.open_nursery() as connections:
            task_status.started(binds)
            async with trio.open_nursery() as acceptors:
                for listener in listeners:
                    acceptors.start_soon(_accept_loop, listener, handler, connections, gate)
                await _first_of(context.terminate.wait, *filter(None, [shutdown_trigger]))
                acceptors.cancel_scope.cancel()
            await context.terminated.set()
            connections.cancel_scope.deadline = trio.current_time() + config.graceful_timeout

        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()


async def _handle(
    app: AppWrapper,
    config: Config,
    context: WorkerContext,
    lifespan_state: LifespanState,
    gate: AcceptGate,
    stream: Stream,
) -> None:
    state = ConnectionState(lifespan_state.copy())
    try:
        await ContainedTCPServer(app, config, ConnectionContext(context), state, stream)
    finally:
        gate.connection_closed()


async def _accept_loop(
    listener: Listener,
    handler: Callable[[Stream], Awaitable[None]],
    connections: trio.Nursery,
    gate: AcceptGate,
) -> None:
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:
            if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                raise
            await gate.pause(exc)
        else:
            connections.start_soon(handler, stream)


async def _open_listeners(
    config: Config, sockets: Sockets | None
) -> tuple[list[Listener], list[str]]:
    if sockets is None:
        sockets = config.create_sockets()
        for sock in [*sockets.secure_sockets, *sockets.insecure_sockets]:
            sock.listen(config.backlog)
    if sockets.quic_sockets:
        raise ValueError("roomcast serves HTTP/1.1 and HTTP/2 over TCP; remove quic_bind")
    ssl_context = config.create_ssl_context()
    listeners: list[Listener] = []
    binds = []
    for scheme, group in (("https", sockets.secure_sockets), ("http", sockets.insecure_sockets)):
        for sock in group:
            listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
            if scheme == "https":
                assert ssl_context is not None
                listeners.append(trio.SSLListener(listener, ssl_context, https_compatible=True))
            else:
                listeners.append(listener)
            bind = f"{scheme}://{repr_socket_addr(sock.family, sock.getsockname())}"
            binds.append(bind)
            await config.log.info(f"Running on {bind} (CTRL + C to quit)")
    return listeners, binds


async def _first_of(*waits: Callable[[], Awaitable[Any]]) -> None:
    """Return as soon as any of ``waits`` returns."""
    async with trio.open_nursery() as nursery:

        async def wait_then_cancel(wait: Callable[[], Awaitable[Any]]) -> None:
            await wait()
            nursery.cancel_scope.cancel()

        for wait in waits:
            nursery.start_soon(wait_then_cancel, wait)


async def _receive(sock: socket.socket) -> bytes | None:
    """The next bytes read from non-blocking ``sock`` (``b""`` at end of file), or None
    once reading fails or the socket is closed; a checkpoint either way, as Trio's reads
    are (a peer that floods still lets the other connections run)."""
    await trio.lowlevel.checkpoint_if_cancelled()
    while True:
        try:
            data = sock.recv(MAX_RECV)
        except BlockingIOError:
            pass
        except OSError:  # reset, or closed under us (EBADF)
            return None
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return data
        try:
            await trio.lowlevel.wait_readable(sock)
        except (trio.ClosedResourceError, OSError):
            return None


def _socket(stream: Stream) -> trio.socket.SocketType:
    return stream.transport_stream.socket if isinstance(stream, trio.SSLStream) else stream.socket


def _peer(stream: Stream) -> str:
    sock = _socket(stream)
    try:
        host, port, *_ = sock.getpeername()
    except (OSError, ValueError):
        return "a peer that is gone"
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def _describe(group: BaseExceptionGroup[Exception]) -> str:
    errors = []
    for exc in _leaves(group):
        errors.append(f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}")
    return "; ".join(errors)


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]
