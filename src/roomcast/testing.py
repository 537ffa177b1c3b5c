"""An in-process test client for applications built on roomcast.

It drives an ASGI app through direct ASGI calls (no sockets, no threads, no subprocess)
on whichever anyio backend runs the test, trio or asyncio, so an application's hooks and
settings can be tested in a few lines with pytest's anyio plugin::

    import pytest
    from roomcast import Settings, create_app
    from roomcast.testing import open_test_client

    @pytest.mark.anyio
    async def test_a_message_reaches_the_room() -> None:
        async with open_test_client(create_app(Settings(rate_limit=0))) as client:
            async with client.connect("/ws") as ws:
                await ws.join("lobby")
                ack = await ws.send_message("hello", room="lobby")
                message = await ws.receive_event()  # the echo: Message(seq=ack.seq, ...)

:func:`open_test_client` runs the app's lifespan (startup before the block, shutdown after
it) as a server would, and every task it starts for the app (the lifespan, one per
WebSocket) runs in its own task group, so none outlives the block. Every wait for the app
is bounded (5 s by default): a test that expects an event the app never sends fails with
:class:`ReceiveTimeout` saying what it waited for, instead of hanging.

An exception the app raises reaches the test: from the HTTP request that raised it, or
from the next read of the WebSocket whose handler raised it (or the end of its block).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from itertools import count
from typing import Any, Final, NamedTuple, NoReturn
from urllib.parse import unquote, urlencode

import anyio
import orjson
from anyio.abc import TaskGroup

from .app import create_app
from .asgi import ASGIApp, Message
from .client.connection import JoinRefused
from .client.events import Ack, Error, Event, HistoryGap, Left, Welcome, parse_event
from .client.room import MessageRefused
from .protocol import BATCH_SUBPROTOCOL, CloseCode
from .settings import Settings

__all__ = [
    "DEFAULT_TIMEOUT",
    "Close",
    "CommandRefused",
    "HandshakeRejected",
    "JoinRefused",
    "LifespanFailed",
    "MessageRefused",
    "ReceiveTimeout",
    "TestClient",
    "TestResponse",
    "TestWebSocket",
    "WebSocketClosed",
    "open_test_client",
]

#: seconds any wait for the app may take before it fails with :class:`ReceiveTimeout`
DEFAULT_TIMEOUT: Final = 5.0
#: the client address requests come from unless a test names one (``scope["client"]``)
DEFAULT_CLIENT: Final = ("127.0.0.1", 50000)
SERVER: Final = ("testserver", 80)

#: request headers: a mapping, or pairs when a name repeats; names are sent lower-case
Headers = Mapping[str, str] | Iterable[tuple[str, str]]


# -- errors ---------------------------------------------------------------------------------


class LifespanFailed(RuntimeError):
    """The app's lifespan startup or shutdown failed (a bad setting, Redis unreachable):
    ``phase`` is ``"startup"`` or ``"shutdown"``, the message is what the app said."""

    def __init__(self, phase: str, message: str) -> None:
        super().__init__(f"lifespan {phase} failed: {message}")
        self.phase = phase


class ReceiveTimeout(TimeoutError):
    """The app did not answer in time; the message says what the test waited for."""


class HandshakeRejected(Exception):
    """The app refused the WebSocket handshake before accepting it: a server answers with
    HTTP ``status`` (403 for a plain refusal, such as a foreign ``Origin``; 503 when the
    server is full) and never upgrades."""

    def __init__(self, status: int, body: bytes = b"") -> None:
        super().__init__(f"handshake rejected with HTTP {status}")
        self.status = status
        self.body = body


class WebSocketClosed(Exception):
    """The connection is closed: by the app (``code`` and ``reason`` of its close frame),
    or by the test. Raised by every read once the frames before the close are read."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"closed {code}" + (f": {reason}" if reason else ""))
        self.code = code
        self.reason = reason


class CommandRefused(Exception):
    """The app answered a v2 command (``leave``) with an ``error`` event."""

    def __init__(self, error: Error) -> None:
        super().__init__(f"{error.code}: {error.message}")
        self.error = error


class Close(NamedTuple):
    """A close frame the app sent: ``assert await ws.wait_closed() == (4400, "...")``."""

    code: int
    reason: str


# -- HTTP -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TestResponse:
    """An HTTP response of the app, whole."""

    __test__ = False  # not a pytest test class

    status_code: int
    #: header names lower-case; a name sent more than once has its values joined by ", "
    headers: dict[str, str]
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode()

    def json(self) -> Any:
        """The body as JSON.

        :raises orjson.JSONDecodeError: if it is not JSON
        """
        return orjson.loads(self.content)


@dataclass(eq=False)
class _Exchange:
    """One HTTP request as a server sees it: the body to hand the app, the response the
    app sends back."""

    body: bytes
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    content: bytearray = field(default_factory=bytearray)
    complete: anyio.Event = field(default_factory=anyio.Event)
    body_sent: bool = False

    async def receive(self) -> Message:
        """The request body first, then (as a server does once the response is out)
        ``http.disconnect``."""
        if not self.body_sent:
            self.body_sent = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await self.complete.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = int(message["status"])
            self.headers = _header_dict(message.get("headers", []))
        elif message["type"] == "http.response.body":
            self.content += message.get("body", b"")
            if not message.get("more_body", False):
                self.complete.set()

    def response(self, what: str) -> TestResponse:
        if self.status is None or not self.complete.is_set():
            raise RuntimeError(f"{what}: the app returned without a complete response")
        return TestResponse(self.status, self.headers, bytes(self.content))


def _header_dict(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in raw:
        key, text = name.decode("latin-1").lower(), value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return headers


# -- WebSocket: the server's side -----------------------------------------------------------


class _WebSocketTransport:
    """What a server does for one WebSocket: the app's ``receive`` and ``send``, and the
    task that runs the app's handler.

    The test's frames reach the app through an unbounded stream (a test's send never
    waits); the app's messages reach the test through one bounded by ``max_buffer``,
    so a test that stops reading makes the app's ``send`` wait as a full socket would.
    Once either side has closed, the app's next ``receive`` (after what was already sent
    to it) is ``websocket.disconnect``, and its ``send`` raises :class:`OSError`.
    """

    def __init__(self, scope: Message, max_buffer: float, grace: float) -> None:
        self.scope = scope
        #: seconds the handler has to end once the test disconnects, before it is cancelled
        self.grace = grace
        self.to_app, self._app_inbox = anyio.create_memory_object_stream[Message](math.inf)
        self._app_outbox, self.from_app = anyio.create_memory_object_stream[Message](max_buffer)
        self.cancel_scope = anyio.CancelScope()
        self.finished = anyio.Event()
        self.app_error: Exception | None = None
        self._disconnect_code: int = CloseCode.NORMAL
        self._ended = False
        self.to_app.send_nowait({"type": "websocket.connect"})

    async def run(self, app: ASGIApp) -> None:
        """Run the app's handler; an exception it raises is kept for the test."""
        with self.cancel_scope:
            try:
                async with self._app_outbox:
                    await app(self.scope, self.receive, self.send)
            except Exception as exc:  # the test reads it from the connection
                self.app_error = exc
            finally:
                self.finished.set()

    async def receive(self) -> Message:
        try:
            return await self._app_inbox.receive()
        except anyio.EndOfStream:
            return {"type": "websocket.disconnect", "code": self._disconnect_code}

    async def send(self, message: Message) -> None:
        if self._ended:
            raise OSError("the WebSocket is closed")
        try:
            # at once when there is room, as a socket write the kernel takes: a close
            # frame sent as its handler is cancelled must not be lost at a checkpoint
            self._app_outbox.send_nowait(message)
        except anyio.WouldBlock:
            await self._deliver(message)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            raise OSError("the client has disconnected") from None
        if message["type"] == "websocket.close":
            # only once the close frame is out: hearing the end first, the app could
            # cancel the write of its close code
            self.end(int(message.get("code", CloseCode.NORMAL)))

    async def _deliver(self, message: Message) -> None:
        """Wait for the test to read (a full socket buffer)."""
        try:
            await self._app_outbox.send(message)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            raise OSError("the client has disconnected") from None

    def end(self, code: int) -> None:
        """No more frames from the test: the app reads what was sent, then a disconnect
        with ``code``."""
        if not self._ended:
            self._ended = True
            self._disconnect_code = code
            self.to_app.close()

    async def disconnect(self, code: int) -> None:
        """The test goes away: tell the app, drop what it sends from now on, and give its
        handler :attr:`grace` seconds to end before cancelling it, as a server would.

        :raises ReceiveTimeout: if the handler outlived the disconnect by the grace
        """
        if not self._ended:
            self.to_app.send_nowait({"type": "websocket.disconnect", "code": code})
            self.end(code)
        self.from_app.close()
        with anyio.move_on_after(self.grace, shield=True):
            await self.finished.wait()
        if not self.finished.is_set():
            self.cancel_scope.cancel()
            path, grace = self.scope["path"], self.grace
            raise ReceiveTimeout(f"{path}: the app's handler did not end within {grace:g} s")


# -- WebSocket: the test's side -------------------------------------------------------------


class TestWebSocket:
    """One WebSocket connection to the app, as a test uses it (from
    :meth:`TestClient.connect`).

    Reading: :meth:`receive_event` (a chat event as the client library's typed values),
    :meth:`receive_json`, :meth:`receive_text`, :meth:`receive_bytes`; each waits at most
    the client's timeout. With the ``roomcast.batch`` subprotocol each line of a frame is
    read as one event. The chat helpers (:meth:`join`, :meth:`send_message`,
    :meth:`leave`) wait for their answer and keep every other event for the next reads,
    in order. Once the app has closed, reads raise :class:`WebSocketClosed` (after the
    frames sent before the close) and :attr:`close_code` says how.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, transport: _WebSocketTransport, timeout: float) -> None:
        self._transport = transport
        self._timeout = timeout
        self._pending: deque[str | bytes] = deque()
        self._ids = count(1)
        self._error_reported = False
        self.subprotocol: str | None = None
        #: the code and reason the connection was closed with (``None`` while open)
        self.close_code: int | None = None
        self.close_reason: str | None = None

    @property
    def path(self) -> str:
        path: str = self._transport.scope["path"]
        return path

    # -- sending ----------------------------------------------------------------------------

    async def send_text(self, text: str) -> None:
        """Send a text frame.

        :raises WebSocketClosed: if the connection is closed
        """
        await self._send({"type": "websocket.receive", "text": text})

    async def send_bytes(self, data: bytes) -> None:
        """Send a binary frame.

        :raises WebSocketClosed: if the connection is closed
        """
        await self._send({"type": "websocket.receive", "bytes": data})

    async def send_json(self, data: Any) -> None:
        """Send ``data`` as JSON in a text frame.

        :raises WebSocketClosed: if the connection is closed
        """
        await self.send_text(orjson.dumps(data).decode())

    async def _send(self, message: Message) -> None:
        try:
            await self._transport.to_app.send(message)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            raise self._closed() from None

    # -- reading ----------------------------------------------------------------------------

    async def receive_text(self) -> str:
        """The next text frame (with ``roomcast.batch``, the next line of one).

        :raises WebSocketClosed: once the app has closed and every frame before is read
        :raises ReceiveTimeout: if nothing comes within the client's timeout
        :raises TypeError: if the next frame is binary
        """
        frame = await self._receive_frame("a text frame")
        if not isinstance(frame, str):
            raise TypeError(f"expected a text frame, got {len(frame)} bytes")
        return frame

    async def receive_bytes(self) -> bytes:
        """The next binary frame.

        :raises WebSocketClosed: once the app has closed and every frame before is read
        :raises ReceiveTimeout: if nothing comes within the client's timeout
        :raises TypeError: if the next frame is text
        """
        frame = await self._receive_frame("a binary frame")
        if not isinstance(frame, bytes):
            raise TypeError(f"expected a binary frame, got text {frame[:80]!r}")
        return frame

    async def receive_json(self) -> Any:
        """The next event as the app sent it: one decoded JSON value.

        :raises WebSocketClosed: once the app has closed and every frame before is read
        :raises ReceiveTimeout: if nothing comes within the client's timeout
        :raises orjson.JSONDecodeError: if the frame is not JSON
        """
        return orjson.loads(await self.receive_text())

    async def receive_event(self) -> Event | Ack:
        """The next event as a typed value (:mod:`roomcast.client.events`: ``Welcome``,
        ``Message``, ``Presence``, ``Error``, ``Ack``, ``Left`` ...; ``Unknown`` for one
        the library does not know). Fields the types lack are in ``receive_json()``'s.

        :raises WebSocketClosed: once the app has closed and every frame before is read
        :raises ReceiveTimeout: if nothing comes within the client's timeout
        """
        line = await self.receive_text()
        return parse_event(orjson.loads(line), line)

    async def wait_closed(self) -> Close:
        """Read (and drop) events until the app closes the connection; its close frame.

        :raises ReceiveTimeout: if the app has not closed within the client's timeout
        """
        with self._deadline("the app to close"):
            while True:
                try:
                    await self._next_frame()
                except WebSocketClosed as closed:
                    return Close(closed.code, closed.reason)

    async def _receive_frame(self, what: str) -> str | bytes:
        with self._deadline(what):
            return await self._next_frame()

    def _deadline(self, what: str) -> AbstractContextManager[None]:
        seconds = self._timeout
        return _deadline(seconds, f"{self.path}: waited {seconds:g} s for {what}")

    async def _next_frame(self) -> str | bytes:
        if self._pending:
            return self._pending.popleft()
        if self.close_code is not None:
            raise self._closed()
        try:
            message = await self._transport.from_app.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            self._ended_without_close()
        if message["type"] == "websocket.close":
            self._record_close(int(message.get("code", CloseCode.NORMAL)), message.get("reason"))
            raise self._closed()
        text = message.get("text")
        if text is None:
            return bytes(message.get("bytes") or b"")
        if self.subprotocol == BATCH_SUBPROTOCOL:
            first, *rest = text.split("\n")
            self._pending.extend(rest)
            return str(first)
        return str(text)

    def _ended_without_close(self) -> NoReturn:
        """The handler ended without a close frame: a server closes with 1011 (as for an
        exception), and the app's exception, if it raised one, is the test's.

        :raises Exception: the one the app's handler raised, the first time
        :raises WebSocketClosed: otherwise
        """
        self._record_close(CloseCode.INTERNAL_ERROR, "the app ended without closing")
        self._raise_app_error()
        raise self._closed()

    def _raise_app_error(self) -> None:
        error = self._transport.app_error
        if error is not None and not self._error_reported:
            self._error_reported = True
            raise error

    def _record_close(self, code: int, reason: str | None) -> None:
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason or ""

    def _closed(self) -> WebSocketClosed:
        code = CloseCode.NORMAL if self.close_code is None else self.close_code
        return WebSocketClosed(code, self.close_reason or "")

    async def _expect(self, matches: Callable[[Event | Ack], bool], what: str) -> Event | Ack:
        """The first event that ``matches``; every other event read meanwhile stays
        queued, in order, for the next reads."""
        skipped: list[str | bytes] = []
        try:
            with self._deadline(what):
                while True:
                    frame = await self._next_frame()
                    event = _event_in(frame)
                    if event is not None and matches(event):
                        return event
                    skipped.append(frame)
        finally:
            self._pending.extendleft(reversed(skipped))

    # -- the chat protocol ------------------------------------------------------------------

    async def send_message(
        self,
        text: str,
        *,
        room: str | None = None,
        id: str | None = None,
    ) -> Ack:
        """Send a chat message and wait for its ``ack``: on ``/ws/chat`` (v1) leave
        ``room`` out; on ``/ws`` (v2) name the room. The message's own echo and anything
        else that arrives meanwhile stay queued for the next reads. Without an ``id``
        one is made up (``t1``, ``t2`` ...): only a message with one is acknowledged.

        :raises MessageRefused: with the ``error`` the app answered it with
        :raises WebSocketClosed: if the app closed the connection first
        :raises ReceiveTimeout: if neither came within the client's timeout
        """
        id = f"t{next(self._ids)}" if id is None else id
        if room is None:
            await self.send_json({"text": text, "id": id})
        else:
            await self.send_json({"type": "message", "room": room, "text": text, "id": id})
        answer = await self._expect(lambda event: _answers(event, id), f"the ack of message {id!r}")
        if isinstance(answer, Error):
            raise MessageRefused(answer.code, answer.message, answer.raw)
        assert isinstance(answer, Ack)
        return answer

    async def join(
        self,
        room: str,
        *,
        since: int | None = None,
        epoch: str | None = None,
    ) -> Welcome:
        """v2: join ``room`` (resuming after ``since`` in ``epoch``, if given) and wait
        for its ``welcome``; the replay and everything after it stay queued.

        :raises JoinRefused: with the ``error`` the app refused the join with
            (``forbidden``, ``room_full``, ``bad_room`` ...)
        :raises WebSocketClosed: if the app closed the connection first
        :raises ReceiveTimeout: if neither came within the client's timeout
        """
        command: dict[str, Any] = {"type": "join", "room": room}
        if since is not None:
            command["since"] = since
        if epoch is not None:
            command["epoch"] = epoch
        await self.send_json(command)
        answer = await self._expect(
            lambda event: _answers_join(event, room), f"the welcome to #{room}"
        )
        if isinstance(answer, Error):
            raise JoinRefused(answer.code, answer.message)
        assert isinstance(answer, Welcome)
        return answer

    async def leave(self, room: str) -> Left:
        """v2: leave ``room`` and wait for the ``left`` that confirms it.

        :raises CommandRefused: with the ``error`` the app answered (``not_member``)
        :raises WebSocketClosed: if the app closed the connection first
        :raises ReceiveTimeout: if neither came within the client's timeout
        """
        await self.send_json({"type": "leave", "room": room})
        answer = await self._expect(
            lambda event: _answers_leave(event, room), f"the leave of #{room}"
        )
        if isinstance(answer, Error):
            raise CommandRefused(answer)
        assert isinstance(answer, Left)
        return answer

    async def typing(self, room: str) -> None:
        """v2: tell the room's other members that this connection is typing.

        :raises WebSocketClosed: if the connection is closed
        """
        await self.send_json({"type": "typing", "room": room})

    # -- ending -----------------------------------------------------------------------------

    async def close(self, code: int = CloseCode.NORMAL) -> None:
        """Disconnect with ``code`` (the app sees ``websocket.disconnect``) and wait for
        its handler to end; events already received can still be read.

        :raises ReceiveTimeout: if the handler did not end within the timeout (it is
            then cancelled)
        """
        self._record_close(code, "closed by the client")
        await self._transport.disconnect(code)

    def closed_by_test(self) -> None:
        """The test's ``connect`` block has ended: a read from now on raises
        :class:`WebSocketClosed` 1000 ``closed by the client`` (unless the app's close was
        read first), not the 1011 of an app that ended its handler without closing."""
        self._record_close(CloseCode.NORMAL, "closed by the client")

    def _check_app_error(self) -> None:
        """Raise what the app's handler raised, if no read has raised it yet."""
        self._raise_app_error()


def _event_in(frame: str | bytes) -> Event | Ack | None:
    """The event a frame carries; ``None`` for a binary frame or text that is not JSON."""
    if isinstance(frame, bytes):
        return None
    try:
        return parse_event(orjson.loads(frame), frame)
    except orjson.JSONDecodeError:
        return None


def _answers(event: Event | Ack, id: str) -> bool:
    return isinstance(event, Ack | Error) and not isinstance(event, HistoryGap) and event.id == id


def _answers_join(event: Event | Ack, room: str) -> bool:
    if isinstance(event, Welcome):
        return event.room == room
    return isinstance(event, Error) and event.room == room and event.id is None


def _answers_leave(event: Event | Ack, room: str) -> bool:
    if isinstance(event, Left):
        return event.room == room
    return isinstance(event, Error) and event.room == room and event.id is None


# -- the client -----------------------------------------------------------------------------


class TestClient:
    """Requests and WebSockets to one app whose lifespan runs (from
    :func:`open_test_client`).

    Every request carries ``host: testserver``, the headers, cookies (as one ``cookie``
    header) and query parameters the test gives, and a client address (``scope["client"]``),
    so an app's ``connect`` hook sees what it would see behind a server.
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        lifespan: _Lifespan,
        task_group: TaskGroup,
        *,
        timeout: float,
        client: tuple[str, int],
    ) -> None:
        self.app = lifespan.app
        #: the lifespan state (ASGI): what the app's startup left for its requests
        self.state = lifespan.state
        #: seconds each wait for the app may take (:class:`ReceiveTimeout` past it)
        self.timeout = timeout
        self._lifespan = lifespan
        self._task_group = task_group
        self._client = client
        self._connections: set[_WebSocketTransport] = set()
        self._stopped = False

    # -- HTTP -------------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        headers: Headers | None = None,
        cookies: Mapping[str, str] | None = None,
        json: Any = None,
        content: bytes | None = None,
        client: tuple[str, int] | None = None,
    ) -> TestResponse:
        """One HTTP request, answered by the app in the calling task. ``json`` (any
        value but ``None``) is sent as the body with ``content-type: application/json``;
        ``content`` as it is.

        :raises ReceiveTimeout: if the app has not answered within the client's timeout
        :raises RuntimeError: after :meth:`shutdown`
        """
        self._check_running()
        extra: list[tuple[str, str]] = []
        if json is not None:
            content = orjson.dumps(json)
            extra.append(("content-type", "application/json"))
        body = content or b""
        if body:
            extra.append(("content-length", str(len(body))))
        scope = self._scope("http", path, params, [*_pairs(headers), *extra], cookies, client)
        scope.update(method=method.upper(), scheme="http")
        exchange = _Exchange(body)
        what = f"{method.upper()} {path}"
        with _deadline(self.timeout, f"{what}: waited {self.timeout:g} s for the response"):
            await self.app(scope, exchange.receive, exchange.send)
        return exchange.response(what)

    async def get(self, path: str, **options: Any) -> TestResponse:
        """``GET`` (options as for :meth:`request`)."""
        return await self.request("GET", path, **options)

    async def post(self, path: str, **options: Any) -> TestResponse:
        """``POST`` (options as for :meth:`request`)."""
        return await self.request("POST", path, **options)

    async def delete(self, path: str, **options: Any) -> TestResponse:
        """``DELETE`` (options as for :meth:`request`)."""
        return await self.request("DELETE", path, **options)

    # -- WebSockets -------------------------------------------------------------------------

    @asynccontextmanager
    async def connect(
        self,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        headers: Headers | None = None,
        cookies: Mapping[str, str] | None = None,
        subprotocols: Sequence[str] = (),
        client: tuple[str, int] | None = None,
        max_buffer: float = math.inf,
    ) -> AsyncIterator[TestWebSocket]:
        """A WebSocket to ``path`` (``/ws/chat?room=lobby&name=ann`` for v1, ``/ws`` for
        v2), accepted by the app; disconnected (code 1000) when the block ends, which
        waits for the app's handler to end. ``max_buffer`` bounds the frames the app may
        send before its ``send`` waits for the test to read (default: no bound; a small
        one and no reads make a client too slow to keep up).

        A refusal after the handshake (a close code: 4001, 4400, a ``connect`` hook's)
        is read from the connection: :meth:`TestWebSocket.wait_closed`.

        :raises HandshakeRejected: if the app refused the handshake (HTTP 403, 503)
        :raises ReceiveTimeout: if the app neither accepted nor refused in time
        :raises Exception: what the app's handler raised, if no read raised it
        """
        self._check_running()
        scope = self._scope("websocket", path, params, _pairs(headers), cookies, client)
        scope.update(
            scheme="ws",
            subprotocols=list(subprotocols),
            extensions={"websocket.http.response": {}},
        )
        transport = _WebSocketTransport(scope, max_buffer, grace=self.timeout)
        self._connections.add(transport)
        self._task_group.start_soon(transport.run, self.app)
        ws = TestWebSocket(transport, self.timeout)
        try:
            ws.subprotocol = await self._handshake(transport, ws)
            yield ws
        except BaseException:
            with anyio.move_on_after(2 * self.timeout, shield=True):
                await _quietly_disconnect(transport)
            raise
        finally:
            self._connections.discard(transport)
        ws.closed_by_test()
        await transport.disconnect(CloseCode.NORMAL)
        ws._check_app_error()

    async def _handshake(self, transport: _WebSocketTransport, ws: TestWebSocket) -> str | None:
        """The subprotocol the app accepted with.

        :raises HandshakeRejected: if the app refused instead
        """
        what = f"{ws.path}: waited {self.timeout:g} s for the app to accept the handshake"
        with _deadline(self.timeout, what):
            try:
                message = await transport.from_app.receive()
            except anyio.EndOfStream:
                ws._check_app_error()
                raise HandshakeRejected(500) from None  # a server's answer to that
            if message["type"] == "websocket.accept":
                subprotocol: str | None = message.get("subprotocol")
                return subprotocol
            if message["type"] == "websocket.http.response.start":
                raise HandshakeRejected(int(message["status"]), await _body(transport))
            raise HandshakeRejected(403)

    def _scope(
        self,
        kind: str,
        path: str,
        params: Mapping[str, str] | None,
        headers: list[tuple[str, str]],
        cookies: Mapping[str, str] | None,
        client: tuple[str, int] | None,
    ) -> Message:
        path, _, query = path.partition("?")
        if params:
            query = f"{query}&{urlencode(params)}" if query else urlencode(params)
        return {
            "type": kind,
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1",
            "path": unquote(path),
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": query.encode(),
            "headers": _request_headers(headers, cookies),
            "client": client or self._client,
            "server": SERVER,
            "state": dict(self.state),
        }

    # -- shutdown ---------------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Stop the app as Hypercorn does once its graceful timeout is over, with
        WebSockets still open: cancel every handler (roomcast's each send close 1001,
        ``server shutting down``), then run the lifespan shutdown. Reads on the open
        connections then end in :class:`WebSocketClosed`. Requests and new connections
        are refused from then on; :func:`open_test_client` calls it at the end of its
        block.

        :raises LifespanFailed: if the app's lifespan shutdown failed
        """
        failure = await self.stop()
        if failure is not None:
            raise failure

    async def stop(self) -> LifespanFailed | None:
        """:meth:`shutdown`, answering why the lifespan shutdown failed instead of raising
        it (``None`` once done, or if it was done before)."""
        if self._stopped:
            return None
        self._stopped = True
        for transport in self._connections:
            transport.cancel_scope.cancel()
        with anyio.move_on_after(self.timeout):
            for transport in list(self._connections):
                await transport.finished.wait()
        return await self._lifespan.shutdown()

    def _check_running(self) -> None:
        if self._stopped:
            raise RuntimeError("the test client has shut down the app")


async def _quietly_disconnect(transport: _WebSocketTransport) -> None:
    """Disconnect on the way out of a failing block: its exception is the one to see."""
    with suppress(ReceiveTimeout):
        await transport.disconnect(CloseCode.NORMAL)


async def _body(transport: _WebSocketTransport) -> bytes:
    """The body of a handshake refused with an HTTP response of the app's own."""
    body = bytearray()
    async for message in transport.from_app:
        body += message.get("body", b"")
        if not message.get("more_body", False):
            break
    return bytes(body)


def _pairs(headers: Headers | None) -> list[tuple[str, str]]:
    if headers is None:
        return []
    items = headers.items() if isinstance(headers, Mapping) else headers
    return [(name.lower(), value) for name, value in items]


def _request_headers(
    headers: list[tuple[str, str]], cookies: Mapping[str, str] | None
) -> list[tuple[bytes, bytes]]:
    """The scope's headers: ``host`` unless the test sets one, the test's, then its
    cookies as one ``cookie`` header (after any the test wrote itself)."""
    pairs = list(headers)
    if not any(name == "host" for name, _ in pairs):
        pairs.insert(0, ("host", SERVER[0]))
    if cookies:
        pairs.append(("cookie", "; ".join(f"{name}={value}" for name, value in cookies.items())))
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in pairs]


# -- the lifespan ---------------------------------------------------------------------------


class _Lifespan:
    """The ASGI lifespan protocol, as a server runs it around serving."""

    def __init__(self, app: ASGIApp, timeout: float) -> None:
        self.app = app
        #: seconds the app has to answer a startup or a shutdown
        self.timeout = timeout
        self.state: dict[str, Any] = {}
        self._to_app, self._app_inbox = anyio.create_memory_object_stream[Message](2)
        self._app_outbox, self._from_app = anyio.create_memory_object_stream[Message](2)
        self._error: Exception | None = None

    async def run(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": self.state}
        try:
            async with self._app_outbox:
                await self.app(scope, self._app_inbox.receive, self._app_outbox.send)
        except Exception as exc:  # the test reads it as a failed startup or shutdown
            self._error = exc

    async def startup(self) -> LifespanFailed | None:
        """Start the app; why it failed, or ``None`` once it is up (or has no lifespan)."""
        return await self._phase("startup")

    async def shutdown(self) -> LifespanFailed | None:
        """Stop the app; why it failed, or ``None``."""
        return await self._phase("shutdown")

    async def _phase(self, phase: str) -> LifespanFailed | None:
        with anyio.move_on_after(self.timeout) as scope:
            try:
                await self._to_app.send({"type": f"lifespan.{phase}"})
                answer = await self._from_app.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return self._ended(phase)
        if scope.cancelled_caught:
            return LifespanFailed(phase, f"no answer within {self.timeout:g} s")
        if answer["type"] == f"lifespan.{phase}.failed":
            return LifespanFailed(phase, str(answer.get("message", "")))
        return None

    def _ended(self, phase: str) -> LifespanFailed | None:
        """The app's lifespan ended without answering: an exception is a failure; a plain
        return means it does not do lifespans (ASGI lets a server go on without)."""
        if self._error is None:
            return None
        failure = LifespanFailed(phase, str(self._error) or type(self._error).__name__)
        failure.__cause__ = self._error
        return failure


@contextmanager
def _deadline(seconds: float, what: str) -> Iterator[None]:
    """Bound a wait for the app; past it, :class:`ReceiveTimeout` saying ``what``."""
    with anyio.move_on_after(seconds) as scope:
        yield
    if scope.cancelled_caught:
        raise ReceiveTimeout(what)


@asynccontextmanager
async def open_test_client(
    app: ASGIApp | None = None,
    *,
    settings: Settings | None = None,
    timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109 (it bounds each wait, not the block)
    client: tuple[str, int] = DEFAULT_CLIENT,
) -> AsyncIterator[TestClient]:
    """Run ``app``'s lifespan around the block and yield a client for it.

    ``app`` is any ASGI app: one from :func:`roomcast.create_app` (with its hooks), or a
    host app that mounts roomcast (Starlette, FastAPI) with roomcast's lifespan. Without
    ``app``, a roomcast app is built from ``settings`` (default: ``Settings()``, never
    the environment). ``timeout`` bounds every wait for the app; ``client`` is the
    address requests come from unless one names another. An exception of the block
    comes out as it is (not in an exception group).

    :raises LifespanFailed: if the app's startup failed (before the block), or its
        shutdown (after it)
    :raises TypeError: if both ``app`` and ``settings`` are given
    """
    if app is not None and settings is not None:
        raise TypeError("give an app or the settings to build one with, not both")
    lifespan = _Lifespan(create_app(settings or Settings()) if app is None else app, timeout)
    failure: BaseException | None = None
    async with anyio.create_task_group() as task_group:
        task_group.start_soon(lifespan.run)
        failure = await lifespan.startup()
        if failure is None:
            test_client = TestClient(lifespan, task_group, timeout=timeout, client=client)
            try:
                yield test_client
            except Exception as exc:  # raised again below, outside the task group
                failure = exc
            except BaseException:  # cancellation: it must go through the task group
                with anyio.move_on_after(2 * timeout, shield=True):
                    await test_client.stop()
                raise
            shutdown_failure = await test_client.stop()
            failure = failure or shutdown_failure
        task_group.cancel_scope.cancel()
    if failure is not None:
        raise failure
