"""A room that stays joined: connect, resume after every drop, and send exactly once.

::

    open_room
    └── task group
        └── connection task   (connect -> read events -> on a drop: back off, reconnect
                               with since=<last seq>&epoch=<epoch>, resend what was not
                               sequenced)

The caller's side is :meth:`Room.send` (returns the message's ``seq`` once the server
accepted it), ``async for event in room``, and :meth:`Room.history` (a page of the room's
past, over a ``/ws`` connection). Both work on trio and asyncio (anyio), over
httpx-ws.

Exactly once, across reconnections: every message carries an ``id`` of this room's own.
After a reconnection the server first replays what the room missed (``since``), and a
message of ours found in that replay was sequenced before the drop: it is settled with
that ``seq``, not sent again. Only what the replay does not hold is resent. (With the
Redis broker a message can still be in flight in Redis while the replay is read; that
message would be sent twice. The memory broker sequences synchronously.)
"""

from __future__ import annotations

import base64
import itertools
import random
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from dataclasses import dataclass, field, replace
from typing import Any, Final
from urllib.parse import urlencode, urlsplit, urlunsplit

import anyio
import httpx
import orjson
from anyio.abc import TaskStatus
from httpx_ws import (
    AsyncWebSocketSession,
    HTTPXWSException,
    WebSocketDisconnect,
    WebSocketUpgradeError,
    aconnect_ws,
)
from wsproto.utilities import LocalProtocolError

from ..protocol import BATCH_SUBPROTOCOL, CloseCode
from .events import (
    Ack,
    Error,
    Event,
    HistoryGap,
    Message,
    Reconnecting,
    Scrollback,
    Welcome,
    parse_event,
)
from .inbox import Inbox, StreamInbox

__all__ = [
    "DEFAULT_PAGE",
    "HistoryRefused",
    "MessageRefused",
    "Room",
    "RoomClosed",
    "RoomUnavailable",
    "TokenSource",
    "chat_url",
    "open_room",
]

#: an async callable returning a fresh token (asked before each connection and before the
#: current token expires)
TokenSource = Callable[[], Awaitable[str]]
#: sends one text frame on the room's current connection; a failure is swallowed (the
#: connection is going, and what was not sequenced goes again after the resume)
Link = Callable[[str], Awaitable[None]]

CHAT_PATH: Final = "/ws/chat"
#: close codes after which the room reconnects: the server went away, the network broke,
#: the service was unavailable, or this client read too slowly (4008) and was evicted
RETRYABLE: Final = frozenset({1001, 1006, 1011, 1012, 1013, CloseCode.TOO_SLOW})
FIRST_BACKOFF: Final = 0.1
CONNECT_TIMEOUT: Final = 10.0
#: a token is renewed when this share of its remaining lifetime has passed
REFRESH_AT: Final = 0.8
#: a drop this long after the welcome starts the backoff over
STABLE_AFTER: Final = 10.0
#: messages in a :meth:`Room.history` page unless the caller says (the server allows 200)
DEFAULT_PAGE: Final = 50


class RoomClosed(Exception):
    """The server ended the membership for good, with ``code`` and ``reason``
    (4001 token, 4003 room full, 4400 bad request, 4403 not allowed, 4429 too many
    connections, 1000 normal closure ...)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"closed {code}" + (f": {reason}" if reason else ""))
        self.code = code
        self.reason = reason


class RoomUnavailable(RoomClosed):
    """The first connection failed: the server could not be reached, or refused the
    handshake (``code`` is then the HTTP status, e.g. 403 or 503)."""


class MessageRefused(Exception):
    """The server refused a message (``code``: ``rate_limited``, ``too_long``,
    ``unavailable`` ...); it was not sent to anyone."""

    def __init__(self, code: str, message: str, raw: str = "") -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        #: the server's ``error`` event as it sent it (one JSON object)
        self.raw = raw


class HistoryRefused(Exception):
    """The server refused a :meth:`Room.history` request (``code``: ``rate_limited``,
    ``forbidden``, ``bad_request``, ``unavailable``; ``unsupported`` for a room of
    :func:`open_room`, whose protocol has no scrollback)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(eq=False)
class _PageRequest:
    """A :meth:`Room.history` request: its frame (sent again on the next connection if
    this one drops before the answer), and the answer."""

    frame: str
    done: anyio.Event = field(default_factory=anyio.Event)
    page: Scrollback | None = None
    error: Exception | None = None

    def settle(self, page: Scrollback | None = None, error: Exception | None = None) -> None:
        if not self.done.is_set():
            self.page, self.error = page, error
            self.done.set()


@dataclass(eq=False)
class _Pending:
    text: str
    done: anyio.Event = field(default_factory=anyio.Event)
    seq: int | None = None
    error: Exception | None = None

    def settle(self, seq: int | None = None, error: Exception | None = None) -> None:
        if not self.done.is_set():
            self.seq, self.error = seq, error
            self.done.set()


def chat_url(url: str, room: str, **params: str | int | None) -> str:
    """The ``ws://`` URL of ``room``'s chat endpoint under ``url`` (a server's base URL,
    with or without a mount prefix, or the chat endpoint itself), with ``params``.

    :raises ValueError: if ``url`` is not ``ws://``, ``wss://``, ``http://`` or ``https://``
    """
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"expected a ws:// or wss:// URL with a host, got {url!r}")
    path = parts.path if parts.path.endswith(CHAT_PATH) else parts.path.rstrip("/") + CHAT_PATH
    query = {"room": room, **{k: str(v) for k, v in params.items() if v is not None}}
    return urlunsplit((scheme, parts.netloc, path, urlencode(query), ""))


class Room:
    """One joined room. Use :func:`open_room`."""

    def __init__(
        self,
        url: str,
        room: str,
        *,
        name: str | None,
        token: str | TokenSource | None,
        batch: bool,
        since: int | None,
        epoch: str | None,
        buffer: int,
        reconnect: bool,
        max_backoff: float,
        inbox: Inbox | None = None,
    ) -> None:
        chat_url(url, room)  # fail early on a bad URL
        self.url = url
        self.name = room
        self.display_name = name
        self._token_source = token if callable(token) else None
        #: the token the next connection presents (fetched again before each one, and
        #: before it expires, when a token source was given)
        self.token = None if callable(token) else token
        #: the last message seq seen (and the epoch it belongs to): where a resume starts
        self.seq = since or 0
        self.epoch = epoch
        #: messages dropped because they were already seen (0 unless the server repeats)
        self.duplicates = 0
        self._batch = batch
        self._reconnect = reconnect
        self._max_backoff = max_backoff
        #: a room of a connection (v2) shares its connection's mailbox
        self._inbox: Inbox = inbox if inbox is not None else StreamInbox(buffer)
        self._v2 = inbox is not None
        self._pending: dict[str, _Pending] = {}
        self._pages: dict[str, _PageRequest] = {}
        self._prefix = secrets.token_hex(4)
        self._ids = itertools.count(1)
        self._link: Link | None = None
        self._replay_until: int | None = None  # set by a welcome, cleared once caught up
        #: whether this connection resumes a run of the room's sequence that is over (a
        #: new epoch, or ``since`` past the room's seq): the server says so with a
        #: ``history_gap`` before the replay, and the replay is not read until it came
        self._restarted = False
        self._gap_expected = False
        self._welcomed_at: float | None = None
        self._connected = anyio.Event()
        #: whether connections ask for a replay (``since``): after the first welcome, always
        self._resume = since is not None
        #: whether the first welcome came (``open_room`` returns then; until then a failed
        #: connection is :class:`RoomUnavailable`, not a drop to recover from)
        self._started = False
        self._closed: RoomClosed | None = None
        #: set once the room is closed for good (a v2 ``leave`` waits for it)
        self._ended = anyio.Event()

    # -- the caller's side ----------------------------------------------------------------

    async def send(self, text: str, *, id: str | None = None) -> int:
        """Send a chat message; return its ``seq`` once the server has accepted it.

        While the room is reconnecting the message waits, and it is sent once: a message
        the server sequenced before a drop is recognised in the resume replay. ``id`` is
        the message's id on the wire (one of the room's own by default; one you give must
        be unique among the messages you send, or the resume cannot tell them apart).

        :raises MessageRefused: if the server refused it (rate limit, length, outage)
        :raises RoomClosed: if the room was closed for good first
        """
        if self._closed is not None:
            raise self._closed
        if id is None:
            id = f"{self._prefix}-{next(self._ids)}"
        elif id in self._pending:
            raise ValueError(f"message {id!r} is already on its way")
        pending = self._pending[id] = _Pending(text)
        try:
            if self._link is not None and self._connected.is_set():
                await self._transmit(self._link, id, pending)
            await pending.done.wait()
        finally:
            del self._pending[id]
        if pending.error is not None:
            raise pending.error
        assert pending.seq is not None
        return pending.seq

    async def history(self, *, before: int | None = None, limit: int = DEFAULT_PAGE) -> Scrollback:
        """A page of the room's past: up to ``limit`` (1-200) messages before seq
        ``before`` (the newest when ``None``), in seq order, with ``more`` telling whether
        earlier ones exist; page on with ``before=page.messages[0].seq``. The page comes
        to this call only (the room's events are untouched, so a message can be both in a
        page and read live: tell them apart by ``seq``). While the room is reconnecting
        the request waits, and it is asked again if a drop cuts it short.

        Needs a room of :func:`~roomcast.client.open_connection` (protocol v2): the
        one-room protocol of :func:`open_room` has no such command (the server API's
        ``before=`` serves a backend: :mod:`roomcast.client.api`).

        :raises HistoryRefused: if the server refused (rate limit: at most 2 pages a
            second, 10 at once; a room not granted; a bad ``before``/``limit``), or for
            a room of :func:`open_room`
        :raises RoomClosed: if the room was closed for good first
        """
        if self._closed is not None:
            raise self._closed
        if not self._v2:
            raise HistoryRefused(
                "unsupported",
                "scrollback needs a /ws connection: join the room with open_connection",
            )
        id = f"{self._prefix}-page{next(self._ids)}"
        frame: dict[str, Any] = {"type": "history", "room": self.name, "limit": limit, "id": id}
        if before is not None:
            frame["before"] = before
        request = self._pages[id] = _PageRequest(orjson.dumps(frame).decode())
        try:
            if self._link is not None and self._connected.is_set():
                await self._link(request.frame)
            await request.done.wait()
        finally:
            del self._pages[id]
        if request.error is not None:
            raise request.error
        assert request.page is not None
        return request.page

    def __aiter__(self) -> Room:
        return self

    @property
    def connected(self) -> bool:
        """Whether a connection is open and caught up (its resume replay read)."""
        return self._connected.is_set()

    async def wait_connected(self) -> None:
        """Return once :attr:`connected` (at once if it is)."""
        await self._connected.wait()

    def is_own(self, message: Message) -> bool:
        """Whether ``message`` was sent by this room (through :meth:`send`)."""
        return message.id is not None and message.id.startswith(self._prefix + "-")

    async def __anext__(self) -> Event:
        """The next event.

        :raises RoomClosed: once the server has closed the room for good and every event
            before that was read
        """
        try:
            return await self._inbox.get()
        except anyio.EndOfStream:
            if self._closed is not None and self._closed.code != CloseCode.NORMAL:
                raise self._closed from None
            raise StopAsyncIteration from None

    # -- the connection task -----------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Stay connected until the server closes the room for good (or the task group is
        cancelled). ``task_status.started()`` comes with the first welcome.

        :raises RoomUnavailable: if the first connection fails
        """
        attempt = 0
        async with httpx.AsyncClient(timeout=CONNECT_TIMEOUT) as http:
            while True:
                self._welcomed_at = None
                code, reason = await self._connect(http, task_status)
                if not self._started:
                    self._finish(RoomUnavailable(code, reason))
                    raise RoomUnavailable(code, reason)
                if code not in RETRYABLE or not self._reconnect:
                    self._finish(RoomClosed(code, reason))
                    return
                stable = self._welcomed_at is not None and (
                    anyio.current_time() - self._welcomed_at >= STABLE_AFTER
                )
                attempt = 1 if stable else attempt + 1
                delay = min(self._max_backoff, FIRST_BACKOFF * 2 ** (attempt - 1))
                delay *= random.uniform(0.5, 1.0)  # a server's clients do not all return at once
                await self._inbox.put(Reconnecting(code, reason, attempt, delay))
                await anyio.sleep(delay)

    async def _connect(
        self, http: httpx.AsyncClient, task_status: TaskStatus[None]
    ) -> tuple[int, str]:
        """One connection, until it ends: ``(close code, reason)``."""
        params: dict[str, str | int | None] = {"name": self.display_name}
        if self._resume:
            params |= {"since": self.seq, "epoch": self.epoch}
        url = chat_url(self.url, self.name, **params)
        if self._token_source is not None:
            self.token = await self._token_source()
        try:
            async with open_socket(http, url, self.token, batch=self._batch) as ws:
                self._link = _link(ws)
                try:
                    async with anyio.create_task_group() as tg:
                        if self._token_source is not None:
                            tg.start_soon(self._keep_token_fresh, ws)
                        await self._read(ws, task_status)
                finally:
                    self._unlink()
        except Exception as exc:  # httpx-ws raises from its task group: look inside
            return _why_it_ended(exc)
        raise AssertionError("unreachable: reading only ends with an exception")

    async def _read(self, ws: AsyncWebSocketSession, task_status: TaskStatus[None]) -> None:
        split = ws.subprotocol == BATCH_SUBPROTOCOL
        while True:
            frame = await ws.receive_text()
            for line in frame.split("\n") if split else (frame,):
                event = parse_event(orjson.loads(line), line)
                if await self._handle(event) and not self._started:
                    self._started = self._resume = True  # from now on every connection resumes
                    task_status.started()

    def _unlink(self) -> None:
        """The connection is gone: nothing is sent until the next one has caught up."""
        self._link = None
        self._replay_until = None
        if self._connected.is_set():
            self._connected = anyio.Event()

    async def _handle(self, event: Event | Ack) -> bool:
        """Deliver or settle one server event; ``True`` for a welcome."""
        if isinstance(event, Ack):
            self._settle(event.id, seq=event.seq)
            return False
        if isinstance(event, Scrollback):
            if (request := self._pages.get(event.id or "")) is not None:
                request.settle(page=event)
            return False
        if isinstance(event, Error) and (request := self._pages.get(event.id or "")) is not None:
            request.settle(error=HistoryRefused(event.code, event.message))
            return False
        if isinstance(event, Welcome):
            self._welcome(event)
        elif isinstance(event, HistoryGap):
            event = replace(event, restarted=event.restarted or self._restarted)
            self.seq = event.first - 1  # the replay starts at the first message kept
            self._gap_expected = False
        elif isinstance(event, Message):
            if event.seq <= self.seq:
                self.duplicates += 1
                return False
            self.seq = event.seq
            if event.id is not None:
                self._settle(event.id, seq=event.seq)
        elif isinstance(event, Error) and event.id in self._pending:
            self._settle(event.id, error=MessageRefused(event.code, event.message, event.raw))
            return False
        await self._inbox.put(event)
        until = self._replay_until
        if until is not None and not self._gap_expected and self.seq >= until:
            await self._caught_up()
        return isinstance(event, Welcome)

    def _welcome(self, welcome: Welcome) -> None:
        """A connection's first event: where its replay ends, and whether it resumes a run
        of the room's sequence that is over (the server then sends ``history_gap`` first)."""
        if not self._resume:
            self.seq = welcome.seq  # nothing to replay: start at the room's latest
        new_epoch = self.epoch is not None and self.epoch != welcome.epoch
        self._restarted = self._resume and (new_epoch or self.seq > welcome.seq)
        self._gap_expected = self._restarted
        self.epoch = welcome.epoch
        self._replay_until = welcome.seq
        self._welcomed_at = anyio.current_time()

    async def _keep_token_fresh(self, ws: AsyncWebSocketSession) -> None:
        """Before the token expires, fetch a new one and send it in-band (``refresh``,
        SPEC §8.3), so the connection is not closed 4001 "token expired"."""
        assert self._token_source is not None
        while await wait_to_refresh(self.token):
            self.token = await self._token_source()
            with suppress(HTTPXWSException, LocalProtocolError, httpx.TransportError, OSError):
                await ws.send_text(orjson.dumps({"type": "refresh", "token": self.token}).decode())

    async def _caught_up(self) -> None:
        """The resume replay is over: send what it did not show as sequenced."""
        self._replay_until = None
        self._connected.set()
        link = self._link
        if link is None:
            return
        for id, pending in list(self._pending.items()):
            if not pending.done.is_set():
                await self._transmit(link, id, pending)
        for request in list(self._pages.values()):  # cut short by the drop: ask again
            if not request.done.is_set():
                await link(request.frame)

    async def _transmit(self, link: Link, id: str, pending: _Pending) -> None:
        frame = {"text": pending.text, "id": id}
        if self._v2:
            frame = {"type": "message", "room": self.name, **frame}
        await link(orjson.dumps(frame).decode())

    def _settle(self, id: str, *, seq: int | None = None, error: Exception | None = None) -> None:
        pending = self._pending.get(id)
        if pending is not None:
            pending.settle(seq, error)

    def _finish(self, closed: RoomClosed) -> None:
        self._closed = closed
        for pending in self._pending.values():
            pending.settle(error=closed)
        for request in self._pages.values():
            request.settle(error=closed)
        self._inbox.close()
        self._ended.set()


@asynccontextmanager
async def open_room(
    url: str,
    room: str,
    *,
    name: str | None = None,
    token: str | TokenSource | None = None,
    batch: bool = True,
    since: int | None = None,
    epoch: str | None = None,
    buffer: int = 1024,
    reconnect: bool = True,
    max_backoff: float = 10.0,
) -> AsyncIterator[Room]:
    """Join ``room`` on the server at ``url`` and stay in it until the block exits.

    ``url`` is the server's address (``ws://host:8000``, or the prefix it is mounted
    under); ``since`` and ``epoch`` resume from an earlier session. ``token`` is a token,
    or an async callable returning one (a :data:`TokenSource`): it is then asked before
    every connection and again before the current token expires, and the new token is
    sent in-band (``refresh``), so a long session outlives short-lived tokens. The block is entered
    once the server has welcomed us; from then on drops are survived: the room
    reconnects with backoff (up to ``max_backoff`` seconds) and resumes, and a
    :class:`~roomcast.client.Reconnecting` event says so. Read events with
    ``async for event in room``: at most ``buffer`` wait for you, then the room stops
    reading from the server (which in time evicts a member that reads too slowly; the
    room then reconnects and resumes).

    :raises RoomUnavailable: if the first connection fails
    """
    instance = Room(
        url,
        room,
        name=name,
        token=token,
        batch=batch,
        since=since,
        epoch=epoch,
        buffer=buffer,
        reconnect=reconnect,
        max_backoff=max_backoff,
    )
    async with running(instance.run):
        yield instance


def open_socket(
    http: httpx.AsyncClient, url: str, token: str | None, *, batch: bool
) -> AbstractAsyncContextManager[AsyncWebSocketSession]:
    """One connection attempt's WebSocket (``url``: ``ws://`` or ``wss://``), the token as
    a bearer header, ``roomcast.batch`` offered when ``batch``."""
    return aconnect_ws(
        url.replace("ws", "http", 1),
        http,
        subprotocols=[BATCH_SUBPROTOCOL] if batch else None,
        headers={"authorization": f"Bearer {token}"} if token else {},
        session_class=AsyncWebSocketSession,
    )


@asynccontextmanager
async def running(run: Callable[..., Coroutine[Any, Any, None]]) -> AsyncIterator[None]:
    """Run ``run`` (it reports started through ``task_status``) in a task group for as
    long as the block runs, then cancel it. The task group wraps whatever ends it in an
    exception group; a caller of ``open_room`` or ``open_connection`` expects what was
    raised, so a single exception comes out unwrapped."""
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(run)
            try:
                yield
            finally:
                tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        if len(group.exceptions) != 1:
            raise
        raise group.exceptions[0] from group.exceptions[0].__cause__


def _link(ws: AsyncWebSocketSession) -> Link:
    async def send_text(text: str) -> None:
        # a failure means the connection is going: the message goes again after the resume
        with suppress(HTTPXWSException, LocalProtocolError, httpx.TransportError, OSError):
            await ws.send_text(text)

    return send_text


async def wait_to_refresh(token: str | None) -> bool:
    """Sleep until it is time to fetch the next token (:data:`REFRESH_AT` of the way to
    its ``exp``); ``False`` at once for a token that has no ``exp`` (nothing to renew)."""
    expires = _expiry(token)
    if expires is None:
        return False
    await anyio.sleep(max(1.0, (expires - time.time()) * REFRESH_AT))
    return True


def _expiry(token: str | None) -> float | None:
    """The ``exp`` claim of a JWT, read without verifying it (the server does that): only
    to know when to fetch the next one."""
    try:
        return float(_claims(token)["exp"])
    except (ValueError, KeyError, TypeError):
        return None


def _claims(token: str | None) -> dict[str, Any]:
    """A JWT's claims, read without verifying them (``{}`` if it is not a JWT)."""
    if not token:
        return {}
    try:
        payload = token.split(".")[1]
        claims = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, orjson.JSONDecodeError):
        return {}
    return claims if isinstance(claims, dict) else {}


def _why_it_ended(exc: BaseException) -> tuple[int, str]:
    """``(close code, reason)`` for how a connection ended: the server's close, the HTTP
    status that refused the handshake, or 1006 for the network.

    :raises BaseException: ``exc`` itself if it holds none of those (a bug, not a drop)
    """
    leaves = _leaves(exc)
    for leaf in leaves:
        if isinstance(leaf, WebSocketDisconnect):
            return leaf.code, leaf.reason
        if isinstance(leaf, WebSocketUpgradeError):
            return leaf.response.status_code, leaf.response.reason_phrase
    for leaf in leaves:
        if isinstance(leaf, HTTPXWSException | httpx.TransportError | OSError):
            return 1006, str(leaf) or type(leaf).__name__
    raise exc


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]
