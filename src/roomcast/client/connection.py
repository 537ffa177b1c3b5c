"""Many rooms over one connection (protocol v2, ``/ws``), resumed together after a drop.

::

    open_connection
    └── task group
        └── connection task   (connect -> join every room (since/epoch each) -> read and
            │                  dispatch events -> on a drop: back off, reconnect)
            └── token task    (a new token before the current one expires: ``refresh``)

Each room joined is a :class:`~roomcast.client.Room`, the same as :func:`open_room`'s:
``send`` (exactly once, across reconnections), ``async for event in room``,
``connected``, and its own resume state (``seq``, ``epoch``). The connection only carries
the frames: a room's ``welcome``, replay, messages and acks go to that room, which handles
them exactly as a room of its own does. ``async for event in conn`` reads the events of
every room (each knows its room) and the connection's own (:class:`Notice`, errors about
no room); each event is read once, through its room or through the connection.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any, Final
from urllib.parse import urlencode, urlsplit, urlunsplit

import anyio
import httpx
import orjson
from anyio.abc import TaskStatus
from httpx_ws import AsyncWebSocketSession, HTTPXWSException
from wsproto.utilities import LocalProtocolError

from ..protocol import BATCH_SUBPROTOCOL, CloseCode
from .events import Ack, Error, Event, Left, Reconnecting, Welcome, parse_event
from .inbox import ANY, Mailbox, RoomInbox
from .room import (
    CONNECT_TIMEOUT,
    FIRST_BACKOFF,
    RETRYABLE,
    STABLE_AFTER,
    Room,
    RoomClosed,
    RoomUnavailable,
    TokenSource,
    _claims,
    _why_it_ended,
    open_socket,
    running,
    wait_to_refresh,
)

__all__ = [
    "Connection",
    "ConnectionClosed",
    "ConnectionUnavailable",
    "JoinRefused",
    "connection_url",
    "dm_room",
    "open_connection",
]

V2_PATH: Final = "/ws"
#: the close code a v1 connection would get for each refusal of a join (what
#: :class:`JoinRefused` carries as its ``code``)
REFUSAL_CODES: Final = {
    "forbidden": CloseCode.FORBIDDEN,
    "room_full": CloseCode.ROOM_FULL,
    "unavailable": 1013,
}


class ConnectionClosed(RoomClosed):
    """The connection ended for good (``code``, ``reason``), and every room with it."""


class ConnectionUnavailable(ConnectionClosed, RoomUnavailable):
    """The first connection failed: the server could not be reached, or refused the
    handshake (``code`` is then the HTTP status, or the close code: 4001 a bad token ...)."""


class JoinRefused(RoomClosed):
    """The server refused to join the room: ``error`` is its code (``forbidden``,
    ``room_full``, ``too_many_rooms``, ``name_taken``, ``bad_room`` ...), ``code`` the
    close code v1 would have used (4403, 4003, or 4400)."""

    def __init__(self, error: str, message: str) -> None:
        super().__init__(REFUSAL_CODES.get(error, CloseCode.BAD_REQUEST), message)
        self.error = error


def connection_url(url: str, **params: str | None) -> str:
    """The ``ws://`` URL of the v2 endpoint (``/ws``) under ``url`` (a server's base URL,
    with or without a mount prefix; ``.../ws`` or v1's ``.../ws/chat`` work too).

    :raises ValueError: if ``url`` is not ``ws://``, ``wss://``, ``http://`` or ``https://``
    """
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"expected a ws:// or wss:// URL with a host, got {url!r}")
    path = parts.path.rstrip("/")
    if path.endswith(V2_PATH + "/chat"):  # v1's endpoint: its v2 sibling
        path = path.removesuffix("/chat")
    elif not path.endswith(V2_PATH):  # a base URL, with or without a mount prefix
        path += V2_PATH
    query = urlencode({k: v for k, v in params.items() if v is not None})
    return urlunsplit((scheme, parts.netloc, path, query, ""))


def dm_room(user: str, other: str) -> str:
    """The direct-message room of two verified users: ``dm:`` and their ids, sorted."""
    first, second = sorted((user, other))
    return f"dm:{first}:{second}"


class Connection:
    """One ``/ws`` connection and the rooms joined over it. Use :func:`open_connection`."""

    def __init__(
        self,
        url: str,
        *,
        name: str | None,
        token: str | TokenSource | None,
        batch: bool,
        buffer: int,
        reconnect: bool,
        max_backoff: float,
    ) -> None:
        connection_url(url)  # fail early on a bad URL
        self.url = url
        self.display_name = name
        self._token_source = token if callable(token) else None
        #: the token the next connection presents (from the token source when given)
        self.token = None if callable(token) else token
        self._batch = batch
        self._buffer = buffer
        self._reconnect = reconnect
        self._max_backoff = max_backoff
        self._mailbox = Mailbox(buffer)
        #: the rooms joined (or being joined), by name
        self._rooms: dict[str, Room] = {}
        #: set once this connection's welcome (or refusal) came for each room being joined
        self._answered: dict[Room, anyio.Event] = {}
        self._ws: AsyncWebSocketSession | None = None
        self._send_lock = anyio.Lock()
        self._connected = anyio.Event()
        self._started = False
        self._closed: ConnectionClosed | None = None
        self._memberships = 0

    # -- the caller's side ----------------------------------------------------------------

    @property
    def rooms(self) -> dict[str, Room]:
        """The rooms joined, by name (a copy)."""
        return dict(self._rooms)

    @property
    def user(self) -> str | None:
        """The verified user id the token names (its ``sub``), or ``None`` without one."""
        sub = _claims(self.token).get("sub")
        return sub if isinstance(sub, str) else None

    @property
    def connected(self) -> bool:
        """Whether the connection is open (each room has its own ``connected``: caught up)."""
        return self._connected.is_set()

    async def wait_connected(self) -> None:
        await self._connected.wait()

    async def join(self, room: str, *, since: int | None = None, epoch: str | None = None) -> Room:
        """Join ``room`` and return it once the server has welcomed us (and, with ``since``
        and ``epoch``, replays what came after them first). While the connection is down,
        the join waits for the next one.

        :raises JoinRefused: if the server refused (not granted, full, bad name ...)
        :raises ValueError: if the room is joined already
        :raises ConnectionClosed: if the connection ended for good
        """
        if self._closed is not None:
            raise self._closed
        if room in self._rooms:
            raise ValueError(f"#{room} is joined already")
        self._memberships += 1
        inbox = RoomInbox(self._mailbox, f"{room}\x00{self._memberships}")
        member = Room(
            self.url,
            room,
            name=self.display_name,
            token=None,
            batch=self._batch,
            since=since,
            epoch=epoch,
            buffer=self._buffer,
            reconnect=self._reconnect,
            max_backoff=self._max_backoff,
            inbox=inbox,
        )
        self._rooms[room] = member
        answered = self._answered[member] = anyio.Event()
        try:
            if self._ws is not None:
                await self._send({"type": "join", "room": room, **_resume_of(member)})
            await answered.wait()
        except BaseException:
            with anyio.move_on_after(1, shield=True):
                await self._abandon(member)
            raise
        if member._closed is not None:
            raise member._closed
        return member

    async def leave(self, room: str | Room) -> None:
        """Leave ``room``: its iteration ends (after what was already received) and it
        is not joined again after a reconnection."""
        name = room.name if isinstance(room, Room) else room
        member = self._rooms.get(name)
        if member is None:
            return
        if self._ws is None or not member._started:
            self._end_room(member, RoomClosed(CloseCode.NORMAL, "left"))
            return
        await self._send({"type": "leave", "room": name})
        await member._ended.wait()

    async def typing(self, room: str | Room) -> None:
        """Tell the room's other members we are typing (the server relays at most one a
        second; while disconnected, nothing is sent)."""
        name = room.name if isinstance(room, Room) else room
        member = self._rooms.get(name)
        if member is not None and member.connected:
            await self._send({"type": "typing", "room": name})

    def __aiter__(self) -> Connection:
        return self

    async def __anext__(self) -> Event:
        """The next event of any room joined, or of the connection itself.

        :raises ConnectionClosed: once the connection ended for good (not 1000) and every
            event before that was read
        """
        try:
            return await self._mailbox.get(ANY)
        except anyio.EndOfStream:
            if self._closed is not None and self._closed.code != CloseCode.NORMAL:
                raise self._closed from None
            raise StopAsyncIteration from None

    # -- the connection task -----------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Stay connected until the server ends the connection for good (or the task
        group is cancelled). ``task_status.started()`` once the first connection is open.

        :raises ConnectionUnavailable: if the first connection fails
        """
        attempt = 0
        try:
            async with httpx.AsyncClient(timeout=CONNECT_TIMEOUT) as http:
                while True:
                    opened_at: list[float] = []
                    code, reason = await self._connect(http, task_status, opened_at)
                    if not self._started:
                        raise ConnectionUnavailable(code, reason)
                    if code not in RETRYABLE or not self._reconnect:
                        self._finish(ConnectionClosed(code, reason))
                        return
                    stable = bool(opened_at) and anyio.current_time() - opened_at[0] >= STABLE_AFTER
                    attempt = 1 if stable else attempt + 1
                    delay = min(self._max_backoff, FIRST_BACKOFF * 2 ** (attempt - 1))
                    delay *= random.uniform(0.5, 1.0)
                    for member in list(self._rooms.values()):
                        if member._started:
                            await member._inbox.put(
                                Reconnecting(code, reason, attempt, delay, room=member.name)
                            )
                    await anyio.sleep(delay)
        except ConnectionUnavailable as unavailable:
            self._finish(unavailable)
            raise

    async def _connect(
        self, http: httpx.AsyncClient, task_status: TaskStatus[None], opened_at: list[float]
    ) -> tuple[int, str]:
        """One connection, until it ends: ``(close code, reason)``."""
        if self._token_source is not None:
            self.token = await self._token_source()
        url = connection_url(self.url, name=self.display_name)
        try:
            async with open_socket(http, url, self.token, batch=self._batch) as ws:
                try:
                    async with anyio.create_task_group() as tg:
                        await self._opened(ws)
                        opened_at.append(anyio.current_time())
                        if not self._started:
                            self._started = True
                            task_status.started()
                        if self._token_source is not None:
                            tg.start_soon(self._keep_token_fresh)
                        await self._read(ws)
                finally:
                    self._ws = None
                    self._connected = anyio.Event()
                    for member in self._rooms.values():
                        member._unlink()
        except Exception as exc:  # httpx-ws raises from its task group: look inside
            return _why_it_ended(exc)
        raise AssertionError("unreachable: reading only ends with an exception")

    async def _opened(self, ws: AsyncWebSocketSession) -> None:
        """A new connection: join every room again, each resuming where it was."""
        self._ws = ws
        self._connected.set()
        for member in list(self._rooms.values()):
            self._answered.setdefault(member, anyio.Event())
            member._link = self._send_text
            await self._send({"type": "join", "room": member.name, **_resume_of(member)})

    async def _read(self, ws: AsyncWebSocketSession) -> None:
        split = ws.subprotocol == BATCH_SUBPROTOCOL
        while True:
            frame = await ws.receive_text()
            for line in frame.split("\n") if split else (frame,):
                await self._dispatch(parse_event(orjson.loads(line), line))

    async def _dispatch(self, event: Event | Ack) -> None:
        """Hand one server event to its room (or to the connection's own events)."""
        name = getattr(event, "room", None)
        if name is None:
            if not isinstance(event, Ack):
                self._mailbox.put_connection(event)
            return
        member = self._rooms.get(name)
        if member is None:
            return  # a room left meanwhile
        if isinstance(event, Left):
            await member._inbox.put(event)
            self._end_room(member, RoomClosed(event.code, event.reason))
            return
        answered = self._answered.get(member)
        if answered is not None and isinstance(event, Error) and event.id is None:
            # an error about the room before this connection's welcome: the join's answer
            self._end_room(member, JoinRefused(event.code, event.message))
            return
        if isinstance(event, Welcome):
            member._link = self._send_text
            if answered is not None:
                del self._answered[member]
                answered.set()
        if await member._handle(event):
            member._started = member._resume = True

    def _end_room(self, member: Room, closed: RoomClosed) -> None:
        """The membership is over: the room's reader ends, a ``join`` waiting returns."""
        if self._rooms.get(member.name) is member:
            del self._rooms[member.name]
        member._unlink()
        member._finish(closed)
        answered = self._answered.pop(member, None)
        if answered is not None:
            answered.set()

    async def _abandon(self, member: Room) -> None:
        """A join given up (cancelled): tell the server, if it may have joined us."""
        if self._rooms.get(member.name) is not member:
            return
        self._end_room(member, RoomClosed(CloseCode.NORMAL, "join cancelled"))
        if self._ws is not None:
            await self._send({"type": "leave", "room": member.name})

    async def _keep_token_fresh(self) -> None:
        """Before the token expires, fetch a new one and send it in-band (``refresh``) for
        the whole connection. A refresh that drops a room's grant makes the server leave
        that room (``left`` 4403), which ends that room only."""
        assert self._token_source is not None
        while await wait_to_refresh(self.token):
            self.token = await self._token_source()
            await self._send({"type": "refresh", "token": self.token})

    async def _send(self, frame: dict[str, Any]) -> None:
        await self._send_text(orjson.dumps(frame).decode())

    async def _send_text(self, text: str) -> None:
        """Send one frame on the current connection; a failure means it is going (what
        it carried is sent again, or joined again, on the next one)."""
        ws = self._ws
        if ws is None:
            return
        async with self._send_lock:
            with suppress(HTTPXWSException, LocalProtocolError, httpx.TransportError, OSError):
                await ws.send_text(text)

    def _finish(self, closed: ConnectionClosed) -> None:
        self._closed = closed
        for member in list(self._rooms.values()):
            self._end_room(member, closed)
        self._mailbox.close_all()


def _resume_of(member: Room) -> dict[str, Any]:
    """The ``since``/``epoch`` a room joins with: where it was, once it was welcomed (or
    where its caller asked it to start)."""
    if not member._resume:
        return {}
    return {"since": member.seq} | ({} if member.epoch is None else {"epoch": member.epoch})


@asynccontextmanager
async def open_connection(
    url: str,
    *,
    token: str | TokenSource | None = None,
    name: str | None = None,
    batch: bool = True,
    reconnect: bool = True,
    buffer: int = 1024,
    max_backoff: float = 10.0,
) -> AsyncIterator[Connection]:
    """Open one connection to the server at ``url`` (protocol v2) and keep it open until
    the block exits; join rooms over it with :meth:`Connection.join`.

    ``token`` and ``name`` are as for :func:`open_room` (a token source is asked before
    every connection and before the token expires; the new token is sent in-band for
    the whole connection). After a drop the connection reconnects with backoff (up to
    ``max_backoff`` seconds) and joins every room again, each resuming after its own last
    ``seq``: nothing twice, and a :class:`HistoryGap` for what is gone. ``buffer`` events
    of each room may wait for their reader; then the connection stops reading. Read
    every room you join (through its :class:`Room` or ``async for event in conn``).
    The connection's task lives in this block's task group: none outlives it.

    :raises ConnectionUnavailable: if the first connection fails
    """
    connection = Connection(
        url,
        name=name,
        token=token,
        batch=batch,
        buffer=buffer,
        reconnect=reconnect,
        max_backoff=max_backoff,
    )
    try:
        async with running(connection.run):
            yield connection
    finally:
        if connection._closed is None:
            connection._finish(ConnectionClosed(CloseCode.NORMAL, "closed"))
