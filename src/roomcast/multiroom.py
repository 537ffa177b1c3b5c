"""Protocol v2 (``/ws``): one connection, many rooms, as the same task tree as v1.

::

    serve_rooms
    └── task group
        ├── receive loop   (commands: join, leave, message, typing, history, refresh), within
        │                  the token's expiry scope when tokens are signed
        ├── sender task    (the connection's one outbox -> WebSocket frames; then the close)
        └── leave teller   (only with a ``leave`` hook: the hook for each ended membership)

The connection is one :class:`~roomcast.hub.Client`: one bounded outbox and one sender
task whatever its number of rooms; each room it joins adds a
:class:`~roomcast.hub.Member` whose fan-out goes into that outbox. A v1 connection
(:mod:`.connection`) is the one-room case of the same hub code. Problems with one room are
``error`` events carrying ``room``; only whole-connection conditions (eviction 4008, an
expired token 4001, shutdown 1001) close the connection.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import nullcontext
from typing import Final

import anyio
import anyio.lowlevel

from . import protocol
from .admission import TokenBucket
from .archive import ArchiveUnavailable
from .asgi import ConnectionClosed, WebSocket
from .brokers import UNAVAILABLE_NOTICE, Broker, BrokerUnavailable
from .connection import (
    CLOSE_TIMEOUT,
    RATE_NOTICE,
    REFRESH_NOTICE,
    REFRESH_RATE,
    RENAME_UNAVAILABLE,
    Credentials,
    left,
    request_of,
    send_outbox,
)
from .hooks import HOOK_UNAVAILABLE, HookFailed, HookRunner, JoinRequest, LeaveEvent, Refuse
from .hub import Client, Member, NameTaken, RoomFull
from .identity import TokenRejected
from .protocol import (
    BadMessage,
    CloseCode,
    ErrorCode,
    HistoryRequest,
    Join,
    Leave,
    Refresh,
    RoomMessage,
    Typing,
)
from .scrollback import Page
from .settings import Settings

__all__ = [
    "HISTORY_BURST",
    "HISTORY_RATE",
    "MAX_PAGES_WAITING",
    "MAX_QUEUED_FOR_HISTORY",
    "TYPING_INTERVAL",
    "PageSource",
    "serve_rooms",
]

#: a member's typing events in one room are relayed at most once per this many seconds
TYPING_INTERVAL = 1.0
#: ``history`` pages a connection may ask for per second (and in a burst): a budget of its
#: own, apart from chat messages, so that scrolling never costs a message its slot and a
#: client cannot make the server read its history (or archive) as fast as it can send
HISTORY_RATE: Final = 2.0
HISTORY_BURST: Final = 10
#: a ``history`` request is refused while more events than this wait in the connection's
#: outbox: a client that asks for pages without reading them holds at most a few
MAX_QUEUED_FOR_HISTORY: Final = 8
#: ... or while this many of its pages wait there: a page is a copy made for one
#: connection (up to the room's whole retained window, not an event the room shares), so
#: a client that asks for pages and reads none holds three (one being written), not a
#: burst's ten; two leave room for a client asking for two rooms' pages at once
MAX_PAGES_WAITING: Final = 2
HISTORY_BACKLOG_NOTICE: Final = "read what was sent before asking for more history"

#: where a ``history`` command's page comes from: ``(room, before, limit)`` -> page
#: (:func:`~roomcast.scrollback.scrollback` with the app's runtime)
PageSource = Callable[[str, int | None, int], Awaitable[Page]]


class Session:
    """What the receive loop of one ``/ws`` connection keeps: its client, its display name,
    its token (signed tokens), its rate limits."""

    def __init__(
        self,
        broker: Broker,
        client: Client,
        settings: Settings,
        name: str | None,
        credentials: Credentials | None,
        hooks: HookRunner | None,
        pages: PageSource,
    ) -> None:
        self.broker = broker
        self.pages = pages
        self.hooks = hooks
        self.hub = broker.hub
        self.client = client
        self.settings = settings
        self.name = name
        self.credentials = credentials
        #: the ``leave`` hook's bookkeeping, when there is such a hook
        self.leaves = None if hooks is None or "leave" not in hooks.present else Leaves(hooks)
        if self.leaves is not None:
            client.on_removed = self.leaves.removed
        now = anyio.current_time()
        rate = settings.rate_limit
        self.messages = TokenBucket(rate, 2 * rate, now) if rate else None
        self.refreshes = TokenBucket(REFRESH_RATE, 3 * REFRESH_RATE, now)
        self.pages_asked = TokenBucket(HISTORY_RATE, HISTORY_BURST, now)
        #: where the last pages queued stand among all the events of the outbox: one has
        #: left it once the sender has taken that many (``client.taken``)
        self.pages_at: deque[int] = deque(maxlen=MAX_PAGES_WAITING)
        #: when each room's last typing event was relayed
        self.typed: dict[str, float] = {}

    def refuse(
        self,
        code: ErrorCode | str,
        message: str,
        *,
        room: str | None = None,
        id: str | None = None,
    ) -> None:
        """An ``error`` event (about ``room``, if any; ``code`` is roomcast's or a
        ``message`` hook's). Each costs a slot of the connection's own outbox, so a flood
        it does not read ends in its eviction."""
        self.hub.stats.drops += 1
        extra = {} if room is None else {"room": room}
        self.hub.send_to_client(self.client, protocol.encode_error(code, message, id=id, **extra))

    def member(self, room: str, *, id: str | None = None) -> Member | None:
        """The connection's membership of ``room``; ``not_member`` if it has none."""
        member = self.client.members.get(room)
        if member is None:
            self.refuse(ErrorCode.NOT_MEMBER, f"join #{room} first", room=room, id=id)
        return member

    # -- commands ---------------------------------------------------------------------------

    async def join(self, command: Join) -> None:
        room = command.room
        if room in self.client.members:
            self.refuse(ErrorCode.ALREADY_MEMBER, f"already in #{room}", room=room)
            return
        if len(self.client.members) >= self.settings.max_rooms_per_connection:
            limit = self.settings.max_rooms_per_connection
            self.refuse(ErrorCode.TOO_MANY_ROOMS, f"at most {limit} rooms", room=room)
            return
        refusal = self._refusal(room)
        if refusal is not None:
            self.refuse(ErrorCode.FORBIDDEN, refusal, room=room)
            return
        if not await self._hook_allows(room):
            return
        try:
            member = await self.broker.join(
                room,
                self.name,
                since=command.since,
                epoch=command.epoch,
                user=self.client.user,
                client=self.client,
            )
        except NameTaken:
            self.refuse(
                ErrorCode.NAME_TAKEN, f"the name {self.name} is taken in #{room}", room=room
            )
        except RoomFull:
            self.refuse(ErrorCode.ROOM_FULL, "room full", room=room)
        except BrokerUnavailable:
            self.refuse(ErrorCode.UNAVAILABLE, UNAVAILABLE_NOTICE, room=room)
        else:
            if self.leaves is not None:
                self.leaves.joined(member)
            if command.since is None:  # (a resume is the same conversation going on)
                await self._tell_the_other_user(room)

    async def _tell_the_other_user(self, room: str) -> None:
        """A direct room joined afresh while its other user is not in it: that user's
        ``/ws`` connections, on every worker and server, get a ``notice`` saying who opened
        it (:func:`~roomcast.protocol.dm_opened`), so that its client can show the
        conversation before (or without) a message in it. Advisory: a broker that cannot
        be reached costs the notice only."""
        me, pair = self.client.user, protocol.dm_users(room)
        if me is None or pair is None:
            return
        other = pair[1] if pair[0] == me else pair[0]
        with contextlib.suppress(BrokerUnavailable):
            if any(person.user == other for person in await self.broker.presence(room)):
                return
            await self.broker.notify(other, protocol.dm_opened(room, me, self.name))

    async def _hook_allows(self, room: str, *, id: str | None = None) -> bool:
        """The ``join`` hook's word: a refusal is ``forbidden`` with its reason, a hook
        that failed ``unavailable``; either way the connection stays."""
        hooks = self.hooks
        if hooks is None or "join" not in hooks.present:
            return True
        try:
            refusal = await hooks.join(JoinRequest(self.client.user, self.name, room))
        except HookFailed:
            self.refuse(ErrorCode.UNAVAILABLE, HOOK_UNAVAILABLE, room=room, id=id)
            return False
        if refusal is not None:
            reason = refusal.reason or f"not allowed in #{room}"
            self.refuse(ErrorCode.FORBIDDEN, reason, room=room, id=id)
            return False
        return True

    def _refusal(self, room: str) -> str | None:
        """Why the connection may not join ``room``, or ``None``: a direct-message room is
        for its two users only; other rooms need the token's grant."""
        identity = None if self.credentials is None else self.credentials.identity
        pair = protocol.dm_users(room)
        if pair is not None:
            if identity is None or identity.user not in pair:
                return f"#{room} is a direct conversation of two other users"
            return None
        if identity is not None and not identity.may_enter(room):
            return f"not allowed in #{room}"
        return None

    async def leave(self, command: Leave) -> None:
        """The client's own leave: ``left`` 1000 (the ``leave`` hook hears it through
        :class:`Leaves`, as every ended membership)."""
        member = self.member(command.room)
        if member is not None:
            self.typed.pop(command.room, None)
            await self.broker.answered(member)  # its messages' acks come before its left
            await self.broker.leave(member)
            self.hub.send_to_client(self.client, protocol.encode_left(command.room, 1000, "left"))

    async def message(self, command: RoomMessage) -> None:
        id = command.message.id
        member = self.member(command.room, id=id)
        if member is None:
            return
        if self.messages is not None and not self.messages.take(anyio.current_time()):
            self.refuse(ErrorCode.RATE_LIMITED, RATE_NOTICE, room=command.room, id=id)
            return
        message = command.message
        if self.hooks is not None and "message" in self.hooks.present:
            screened = await self.hooks.screen(request_of(member, message), message)
            if isinstance(screened, Refuse):
                self.refuse(str(screened.code), screened.reason, room=command.room, id=id)
                return
            message = screened
        try:
            await self.broker.publish(member, message)
        except BrokerUnavailable:
            self.refuse(ErrorCode.UNAVAILABLE, UNAVAILABLE_NOTICE, room=command.room, id=id)

    async def typing(self, command: Typing) -> None:
        member = self.member(command.room)
        if member is None:
            return
        now = anyio.current_time()
        if now - self.typed.get(command.room, -TYPING_INTERVAL) < TYPING_INTERVAL:
            return  # at most one a second: the others' view does not change faster
        self.typed[command.room] = now
        with contextlib.suppress(BrokerUnavailable):  # advisory: not worth an error
            await self.broker.typing(member)

    async def history(self, command: HistoryRequest) -> None:
        """A scrollback page, to this connection only. Reading a room is allowed to whoever
        may join it: a member, or a connection the room's grant (and the ``join`` hook)
        would let in; being a member is not required, so a client can show a room's past
        before (or without) announcing itself there. Refusals carry the request's ``id``."""
        room, id = command.room, command.id
        if not self.pages_asked.take(anyio.current_time()):
            self.refuse(ErrorCode.RATE_LIMITED, RATE_NOTICE, room=room, id=id)
            return
        client = self.client
        if client.queued > MAX_QUEUED_FOR_HISTORY or self._pages_waiting() >= MAX_PAGES_WAITING:
            self.refuse(ErrorCode.RATE_LIMITED, HISTORY_BACKLOG_NOTICE, room=room, id=id)
            return
        if room not in self.client.members and not await self._may_read(room, id):
            return
        try:
            page = await self.pages(room, command.before, command.limit)
        except (BrokerUnavailable, ArchiveUnavailable):
            self.refuse(ErrorCode.UNAVAILABLE, UNAVAILABLE_NOTICE, room=room, id=id)
            return
        encoded = protocol.encode_history(
            room=room,
            epoch=page.epoch,
            before=command.before,
            messages=page.messages,
            more=page.more,
            id=id,
        )
        self.hub.send_to_client(client, encoded)
        self.pages_at.append(client.taken + client.queued)

    def _pages_waiting(self) -> int:
        return sum(1 for at in self.pages_at if self.client.taken < at)

    async def _may_read(self, room: str, id: str | None) -> bool:
        """Whether a connection that is not in ``room`` may read it: what it may join."""
        refusal = self._refusal(room)
        if refusal is not None:
            self.refuse(ErrorCode.FORBIDDEN, refusal, room=room, id=id)
            return False
        return await self._hook_allows(room, id=id)

    async def refresh(self, command: Refresh) -> None:
        """A new token for the whole connection (as v1's refresh): the same user moves the
        deadline and brings its ``name`` (to every room) and ``rooms`` (a room no longer
        granted is left: ``left`` 4403)."""
        if not self.refreshes.take(anyio.current_time()):
            self.refuse(ErrorCode.RATE_LIMITED, REFRESH_NOTICE)
            return
        credentials = self.credentials
        if credentials is None or credentials.verifier is None:
            self.refuse(ErrorCode.BAD_TOKEN, "this server does not use signed tokens")
            return
        try:
            identity = credentials.verifier.verify(command.token)
        except TokenRejected as rejected:
            self.refuse(ErrorCode.BAD_TOKEN, rejected.reason)
            return
        if identity.user != credentials.identity.user:
            self.refuse(ErrorCode.BAD_TOKEN, "the token is for another user")
            return
        for member in list(self.client.members.values()):
            try:
                await self.broker.rename(member, identity.name)
            except NameTaken:
                room = member.room.name
                self.refuse(
                    ErrorCode.BAD_TOKEN, f"the name {identity.name} is taken in #{room}", room=room
                )
                return
            except BrokerUnavailable:
                self.refuse(ErrorCode.BAD_TOKEN, RENAME_UNAVAILABLE)
                return
        credentials.renew(identity)
        self.name = identity.name
        for member in list(self.client.members.values()):
            room = member.room.name
            if protocol.dm_users(room) is None and not identity.may_enter(room):
                self.hub.end(member, CloseCode.FORBIDDEN, f"not allowed in #{room}")


async def serve_rooms(
    ws: WebSocket,
    broker: Broker,
    settings: Settings,
    *,
    name: str | None,
    batch: bool,
    pages: PageSource,
    credentials: Credentials | None = None,
    hooks: HookRunner | None = None,
) -> None:
    """Run a ``/ws`` connection until either side ends it (or its token expires); it has
    left every room when this returns (or raises), and the ``leave`` hook has been told.
    ``history`` commands are answered from ``pages``."""
    user = None if credentials is None else credentials.identity.user
    client = broker.hub.open_client(user, single_room=False)
    session = Session(broker, client, settings, name, credentials, hooks, pages)
    leaves = session.leaves
    expiry = credentials.expiry if credentials is not None else nullcontext()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(send_outbox, ws, client, tg.cancel_scope, batch, settings.batch_max)
            if leaves is not None:
                tg.start_soon(leaves.tell_as_they_end)
            with expiry:
                if await _receive_commands(ws, session):
                    tg.cancel_scope.cancel()  # the peer is gone: nobody left to write to
            if credentials is not None and credentials.expiry.cancelled_caught:
                broker.hub.end_client(client, CloseCode.UNAUTHORIZED, "token expired")
    finally:
        broker.hub.forget_client(client)
        await leave_every_room(broker, client)
        if leaves is not None:
            await leaves.tell_the_rest()


class Leaves:
    """The ``leave`` hook for every membership of one connection, once each, whatever
    ends it: the client's ``leave``, the server (a refresh that no longer grants the room,
    a name lost while a worker was paused: ``left`` with its code), or the connection's
    end (the client going, eviction, an expired token, a disconnect, shutdown).

    The hub tells it of each membership it takes away (:attr:`Client.on_removed`, from
    the one place memberships end), whichever task ends it; the hook then runs in this
    connection's own task (:meth:`tell_as_they_end`), never in the task that ended it (a
    room's fan-out, Redis upkeep). Only memberships whose join succeeded are owed one: a
    join refused after the hub attached the member (Redis: a name taken elsewhere) is no
    membership to its hook.
    """

    def __init__(self, hooks: HookRunner) -> None:
        self.hooks = hooks
        #: memberships whose join succeeded and whose end the hook has not heard of yet
        self._owed: dict[Member, None] = {}
        #: ended memberships, as the hook will see them, not told yet
        self._due: deque[LeaveEvent] = deque()
        self._wakeup = anyio.Event()

    def joined(self, member: Member) -> None:
        """A join succeeded: its end is owed to the hook (at once, if it has already
        ended: a connection evicted while its join travelled)."""
        if member.joined:
            self._owed[member] = None
        else:
            self._tell(left(member))

    def removed(self, member: Member, reason: str) -> None:
        """The hub has ended ``member`` (:attr:`Client.on_removed`): tell the hook, once."""
        if member in self._owed:
            del self._owed[member]
            self._tell(LeaveEvent(member.user, member.name, member.room.name, reason))

    def _tell(self, event: LeaveEvent) -> None:
        self._due.append(event)
        self._wakeup.set()

    async def tell_as_they_end(self) -> None:
        """Call the hook for each membership as it ends, one at a time, until cancelled
        (the connection's end: :meth:`tell_the_rest` takes what is left). A call that has
        begun finishes (the hook bounds itself): cancelling it would lose it."""
        while True:
            await self._wakeup.wait()
            self._wakeup = anyio.Event()
            while self._due:
                await anyio.lowlevel.checkpoint_if_cancelled()
                event = self._due.popleft()
                with anyio.move_on_after(self.hooks.timeout + CLOSE_TIMEOUT, shield=True):
                    await self.hooks.leave(event)

    async def tell_the_rest(self) -> None:
        """The hook for every membership not told yet, at once, when the connection ends:
        one bounded wait however many rooms, as for the leaves themselves."""
        due, self._due = self._due, deque()
        with anyio.move_on_after(self.hooks.timeout + CLOSE_TIMEOUT, shield=True):
            async with anyio.create_task_group() as tg:
                for event in due:
                    tg.start_soon(self.hooks.leave, event)


async def leave_every_room(broker: Broker, client: Client) -> None:
    """Leave the connection's rooms at once, not one after another: telling other
    processes may wait (Redis: each leave bounds its own call), and a connection in 128
    rooms must not take 128 of those waits to go."""
    with anyio.move_on_after(CLOSE_TIMEOUT, shield=True):
        async with anyio.create_task_group() as tg:
            for member in list(client.members.values()):
                tg.start_soon(broker.leave, member)


async def _receive_commands(ws: WebSocket, session: Session) -> bool:
    """Carry out the client's commands until it disconnects (``True``) or the hub ends
    the connection (``False``)."""
    client = session.client
    max_text = session.settings.max_text
    while not client.ended:
        try:
            frame = await ws.receive()
        except ConnectionClosed:
            return True
        if isinstance(frame, bytes):
            session.refuse(ErrorCode.BINARY_UNSUPPORTED, "send JSON text frames, not binary")
            continue
        try:
            command = protocol.parse_command(frame, max_text=max_text)
        except BadMessage as exc:
            session.refuse(exc.code, exc.message, room=exc.room, id=exc.id)
            continue
        if isinstance(command, RoomMessage):
            await session.message(command)
        elif isinstance(command, Typing):
            await session.typing(command)
        elif isinstance(command, Join):
            await session.join(command)
        elif isinstance(command, Leave):
            await session.leave(command)
        elif isinstance(command, HistoryRequest):
            await session.history(command)
        elif isinstance(command, Refresh):
            await session.refresh(command)
    return False
