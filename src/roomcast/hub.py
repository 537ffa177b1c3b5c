"""Rooms, membership and fan-out.

The hub is synchronous on purpose: joining, leaving and publishing never await, so each of
them happens atomically with respect to every other task on the event loop. That is what
makes a room's order total (one ``seq`` per room, assigned and fanned out in one step) and
what makes resume exact (the history snapshot and the registration of the new member
happen with no checkpoint in between, so nothing can fall into a gap or arrive twice).

Fan-out never waits on a client: each member owns a bounded outbox (an anyio memory object
stream) and the hub only ever calls ``send_nowait`` on it. A member whose outbox is full is
evicted on the spot; its connection closes it with :attr:`CloseCode.TOO_SLOW`.

Presence is not fanned out per join or leave: each change is recorded in O(1)
(:class:`~roomcast.presence.PresenceChanges`) and :meth:`Hub.run_presence` sends each room
one notice per interval at most. A notice never takes a message's place in an outbox: it
waits in the member's one-notice slot (:attr:`Member.presence`, a newer notice replaces an
unsent one) and enters the outbox only as an empty wake-up event when the outbox is empty,
so however many members come and go, presence alone can never evict anyone.

A leave is announced only once a short grace has passed without the same person joining
again (:class:`~roomcast.presence.HeldLeaves`, ``presence_grace``): a reloading tab leaves
and joins within a moment, and the others see neither.
"""

from __future__ import annotations

import heapq
import itertools
import math
import secrets
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from . import protocol
from .history import History
from .names import skeleton
from .presence import HeldLeaves, PresenceChanges, PresenceEvent
from .protocol import CloseCode, ErrorCode
from .stored import StoredFeed, StoredMessage

__all__ = [
    "PRESENCE_RATE",
    "PRESENCE_WAKE",
    "Announce",
    "Client",
    "Hub",
    "HubStats",
    "Member",
    "NameTaken",
    "PresenceSource",
    "Room",
    "RoomFull",
    "replay",
]

#: presence notices one room's members get per second at most, all of them together: a
#: room of more members than this waits members/rate seconds between notices instead of
#: ``presence_interval``, so presence costs a room a bounded rate however big it grows
PRESENCE_RATE: Final = 1000

#: what the hub puts in an idle member's outbox to wake its sender for a presence notice
#: (no real event is empty); the notice itself waits in :attr:`Member.presence`
PRESENCE_WAKE: Final = ""


class RoomFull(Exception):
    """The room already has as many members as its capacity allows."""


class NameTaken(Exception):
    """Another member of the room has this name, or one that looks the same."""


@dataclass(eq=False, slots=True, weakref_slot=True)
class Client:
    """One connection: its outbox, and the rooms it is in (its :class:`Member` entries).

    The hub holds the send end of the outbox; the connection's sender task sends
    :attr:`greeting` first (each join's ``welcome`` and replay, in join order), then the
    outbox, until it ends. A v1 connection (``single_room``) is in exactly one room and
    ends with it: when the hub removes that membership (eviction, shutdown, an expired
    token) it closes the send end and records :attr:`close_code`, so the sender drains
    what is queued and then closes the WebSocket with it. A v2 connection outlives its
    rooms: a membership the hub ends is told with a ``left`` event; only a
    whole-connection condition (eviction, shutdown, token expiry) closes its outbox.

    Presence notices do not go through the outbox: the latest one of each room waits in
    the member's slot (:attr:`Member.presence`) until the sender takes it
    (:meth:`take_presence`), which it does whenever it finds the outbox empty or finds
    :data:`PRESENCE_WAKE` in it.
    """

    id: str
    outbox: MemoryObjectReceiveStream[str]
    _outbox_send: MemoryObjectSendStream[str] = field(repr=False)
    #: the verified user (SPEC §8.1), ``None`` when anonymous
    user: str | None = None
    #: a v1 connection: one room, and the connection ends with it
    single_room: bool = True
    #: each join's welcome and replay, sent before anything in the outbox
    greeting: list[str] = field(default_factory=list)
    #: the rooms it is in, by name
    members: dict[str, Member] = field(default_factory=dict)
    #: members whose presence slot holds a notice, oldest first
    presence_pending: dict[Member, None] = field(default_factory=dict)
    close_code: CloseCode | None = None
    close_reason: str = ""
    #: the hub has closed its outbox: nothing more can be queued
    ended: bool = False
    #: set while the sender waits for an empty outbox (see :meth:`wait_for_events`)
    _wakeup: anyio.Event | None = field(default=None, repr=False)

    async def wait_for_events(self) -> None:
        """Wait until the hub queues an event, a greeting or a presence notice, or ends
        the outbox.

        Cheaper than waiting in the outbox's ``receive()``, which an idle connection
        would sit in for its whole life: one event instead of anyio's waiter objects
        (1.7 KB less per idle connection). The hub wakes it after every
        ``send_nowait`` and ``close`` (:meth:`_wake`).
        """
        self._wakeup = wakeup = anyio.Event()
        try:
            await wakeup.wait()
        finally:
            self._wakeup = None

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None

    def take_presence(self) -> str | None:
        """The oldest waiting presence notice, if any; its slot is empty afterwards."""
        for member in self.presence_pending:
            del self.presence_pending[member]
            notice, member.presence = member.presence, None
            return notice
        return None

    @property
    def queued(self) -> int:
        """Events waiting in the outbox."""
        return self.outbox.statistics().current_buffer_used


@dataclass(eq=False, slots=True, weakref_slot=True)  # a broker may keep weak references
class Member:
    """One connection's place in one room.

    Events go to its :class:`Client`'s outbox, which it shares with the client's other
    rooms (v2); ``outbox``, ``greeting``, ``close_code`` and the rest are the client's.
    """

    room: Room
    name: str | None
    id: str
    client: Client
    #: sequenced messages up to this seq are already in the greeting (resume), so live
    #: delivery skips them; only a broker whose snapshot is not atomic with joining needs it
    skip_through: int = 0
    #: the presence notice waiting to be sent, if any (a newer one replaces it)
    presence: str | None = None
    #: the room's :attr:`Room.presence_version` this member's view already reflects
    presence_seen: int = 0
    #: the verified user (SPEC §8.1), ``None`` when anonymous (the client's)
    user: str | None = None
    #: while a broker's snapshot travels (``skip_through`` skips everything): what was
    #: fanned out meanwhile, for the broker to keep what follows the snapshot
    backlog: list[str] | None = None

    @property
    def joined(self) -> bool:
        return self in self.room.members

    @property
    def outbox(self) -> MemoryObjectReceiveStream[str]:
        return self.client.outbox

    @property
    def greeting(self) -> list[str]:
        return self.client.greeting

    @greeting.setter
    def greeting(self, events: list[str]) -> None:
        self.client.greeting = events

    @property
    def close_code(self) -> CloseCode | None:
        return self.client.close_code

    @property
    def close_reason(self) -> str:
        return self.client.close_reason

    @property
    def queued(self) -> int:
        return self.client.queued

    async def wait_for_events(self) -> None:
        await self.client.wait_for_events()

    def take_presence(self) -> str | None:
        return self.client.take_presence()


@dataclass(eq=False, slots=True, weakref_slot=True)  # a broker may keep weak references
class Room:
    name: str
    epoch: str
    history: History
    seq: int = 0
    #: insertion-ordered set of members: dict keys keep join order, O(1) removal
    members: dict[Member, None] = field(default_factory=dict)
    #: joins and leaves not announced yet (``None``: nothing to announce)
    presence: PresenceChanges | None = None
    #: +1 per join or leave, so that a notice skips members whose welcome is newer
    presence_version: int = 0
    #: leaves waiting out the grace before they are recorded in :attr:`presence`
    held_leaves: HeldLeaves = field(default_factory=HeldLeaves)
    #: the flusher has a wake-up for this room's held leaves (or is about to)
    grace_scheduled: bool = False
    #: no notice within the last interval: the next change is announced at once
    presence_quiet: bool = True
    #: when the interval since the room's last notice ends (``anyio.current_time()``;
    #: ``inf`` until the flusher has seen a notice that went out at once)
    presence_next: float = -math.inf
    #: connections per verified user: a user with three tabs open is one member
    users: Counter[str] = field(default_factory=Counter)
    #: connections beyond each user's first (``sum(users.values()) - len(users)``, kept
    #: as joins and leaves happen so that :attr:`count` is O(1) in a crowd)
    extra_tabs: int = 0
    #: who holds each name skeleton here (a user id, or an anonymous member's id), and how
    #: many connections hold it (see :meth:`Hub.attach`)
    name_owners: dict[str, tuple[str, int]] = field(default_factory=dict)

    @property
    def count(self) -> int:
        """Members as people: anonymous connections, plus each verified user once."""
        return len(self.members) - self.extra_tabs

    def people(self) -> list[tuple[str | None, str | None]]:
        """``(user, name)`` of each member as a person, in join order: a verified user
        once (as its first connection is named), each anonymous connection."""
        return list(self._people())

    def member_names(self) -> list[str]:
        named = (name for _, name in self._people() if name is not None)
        return list(itertools.islice(named, protocol.MAX_WELCOME_MEMBERS))

    def _people(self) -> Iterator[tuple[str | None, str | None]]:
        users: set[str] = set()
        for member in self.members:
            if member.user is not None:
                if member.user in users:
                    continue
                users.add(member.user)
            yield member.user, member.name


@dataclass
class HubStats:
    """Plain counters, read by the metrics collector at scrape time (no hot-path cost)."""

    messages_in: int = 0
    deliveries: int = 0
    evictions: int = 0
    drops: int = 0
    joins: int = 0
    leaves: int = 0
    #: presence notices handed to members (each replaces any unsent one)
    presence_notices: int = 0


#: called when a member joins or leaves; the default records it for the room's next
#: presence notice, a cross-process broker tells every process instead
Announce = Callable[["Room", PresenceEvent, Member], None]

#: how a broker that keeps presence elsewhere gives the room's count and names (as in
#: ``welcome``) for a notice; ``None`` if it cannot now (the notice then has no names)
PresenceSource = Callable[["Room"], Awaitable[tuple[int, list[str]] | None]]

#: called when a room's last local member has left (a broker that subscribes per room
#: lets the room's channel go)
RoomEmptied = Callable[["Room"], None]


class Hub:
    """All rooms of one process.

    :param outbox_size: events buffered per member before it is evicted
    :param history_size: messages each room keeps for ``since`` resume
    :param room_capacity: members per room, 0 for unlimited
    :param idle_rooms: rooms without members whose history is kept (least recently
        emptied are forgotten first); beyond that a room's sequence restarts with a new epoch
    :param history_bytes: bytes of history each room keeps (:func:`~roomcast.history.entry_size`)
    :param idle_history_bytes: bytes of history all rooms without members keep together;
        beyond it the least recently emptied are forgotten, as beyond ``idle_rooms``
    :param presence_interval: seconds between two presence notices of one room (longer in
        rooms of more than :data:`PRESENCE_RATE` members)
    :param presence_grace: seconds a leave waits before it is announced; the same person
        joining within it (a reloaded tab) takes it back, and neither is announced. 0 (the
        hub's default, for tests of everything else) announces leaves as they happen
    :param max_text: the longest chat text in characters, told to clients in ``welcome``
    """

    def __init__(
        self,
        *,
        outbox_size: int = 1024,
        history_size: int = 100,
        room_capacity: int = 0,
        idle_rooms: int = 1000,
        history_bytes: int = 256 * 1024,
        idle_history_bytes: int = 64 * 1024 * 1024,
        presence_interval: float = 1.0,
        presence_grace: float = 0.0,
        max_text: int = 4000,
    ) -> None:
        self.outbox_size = outbox_size
        self.history_size = history_size
        self.room_capacity = room_capacity
        self.idle_rooms = idle_rooms
        self.history_bytes = history_bytes
        self.idle_history_bytes = idle_history_bytes
        self.presence_interval = presence_interval
        self.presence_grace = presence_grace
        self.max_text = max_text
        self.rooms: dict[str, Room] = {}
        self._idle: OrderedDict[str, None] = OrderedDict()
        #: history bytes held by the rooms in ``_idle``
        self.idle_bytes: int = 0
        #: rooms whose first change since their last notice came after the flusher looked
        self._presence_new: list[Room] = []
        #: rooms whose held leaves the flusher has no wake-up for yet
        self._grace_new: list[Room] = []
        self._presence_wakeup: anyio.Event | None = None
        #: set by a broker that keeps presence elsewhere (Redis); None: this hub's members
        self.presence_source: PresenceSource | None = None
        self.stats: HubStats = HubStats()
        self.announce: Announce = self.announce_locally
        #: set by a broker that subscribes per room; called synchronously from the removal
        self.room_emptied: RoomEmptied | None = None
        #: where the messages this hub sequences go once fanned out (hooks, the archive);
        #: ``None`` while nobody consumes them. A cross-process broker feeds it itself
        self.stored: StoredFeed | None = None
        self.node = secrets.token_hex(4)
        self._ids = itertools.count(1)
        #: open v2 connections (a v1 connection is found through its one room)
        self.clients: dict[Client, None] = {}
        #: connections found unable to take an event, waiting to be dropped (_drop_all)
        self._unreachable: deque[Client] = deque()
        self._dropping = False

    # -- membership -------------------------------------------------------------------------

    def open_client(self, user: str | None = None, *, single_room: bool = True) -> Client:
        """A connection's outbox, for :meth:`join` (v2: ``single_room=False``, a
        connection that joins and leaves rooms and outlives them)."""
        send, receive = anyio.create_memory_object_stream[str](self.outbox_size)
        client = Client(f"{self.node}-{next(self._ids)}", receive, send, user, single_room)
        if not single_room:
            self.clients[client] = None
        return client

    def forget_client(self, client: Client) -> None:
        """A v2 connection has ended: it no longer receives notices or shutdown's 1001."""
        self.clients.pop(client, None)

    def join(
        self,
        room_name: str,
        name: str | None = None,
        *,
        since: int | None = None,
        epoch: str | None = None,
        user: str | None = None,
        client: Client | None = None,
    ) -> Member:
        """Add a member (of ``client``, or of a new v1 client); the client's greeting gets
        its ``welcome`` and any resume replay.

        :raises RoomFull: if the room is at capacity
        :raises NameTaken: if another member's name looks like ``name``
        """
        member = self.attach(room_name, name, user, client=client)
        room = member.room
        member.greeting.append(
            protocol.encode_welcome(
                room=room.name,
                epoch=room.epoch,
                seq=room.seq,
                members=room.member_names(),
                count=room.count,
                max_text=self.max_text,
            )
        )
        if since is not None:
            member.greeting.extend(
                replay(room.history.entries, room.seq, room.epoch, since, epoch, room=room.name)
            )
        member.client._wake()
        self.announce(room, "join", member)
        member.presence_seen = room.presence_version  # its welcome shows its own join
        return member

    def attach(
        self,
        room_name: str,
        name: str | None = None,
        user: str | None = None,
        *,
        client: Client | None = None,
    ) -> Member:
        """Add a local member and tell nobody (a broker that keeps rooms elsewhere fills in
        the greeting and announces the join itself).

        A name that looks like another member's (:func:`roomcast.names.skeleton`) is
        refused, unless that member is the same verified user (another tab).

        :raises RoomFull: if the room is at capacity
        :raises NameTaken: if another member's name looks like ``name``
        """
        room = self._open_room(room_name)
        if self.room_capacity and len(room.members) >= self.room_capacity:
            self._forget_if_unused(room)
            raise RoomFull(room_name)
        if client is None:
            client = self.open_client(user)
        member = Member(room, name, client.id, client, user=client.user)
        if name is not None and not _claim_name(room, name, client.user or member.id):
            self._forget_if_unused(room)
            raise NameTaken(name)
        room.members[member] = None
        client.members[room_name] = member
        if member.user is not None:
            room.users[member.user] += 1
            room.extra_tabs += room.users[member.user] > 1
        self.stats.joins += 1
        return member

    def rename(self, member: Member, name: str) -> None:
        """Give a member a new display name (a refreshed token's ``name`` claim): its later
        messages carry it, and the room's member list shows it from the next notice.

        :raises NameTaken: if another member's name looks like ``name`` (the old one stays)
        """
        if name == member.name or not member.joined:
            return
        self.claim_name(member, name)
        self.adopt_name(member, name)

    def claim_name(self, member: Member, name: str) -> None:
        """Hold ``name`` in the member's room for its owner, beside the name it has: the
        first half of a rename whose second half (:meth:`adopt_name`, or
        :meth:`release_name` if it falls through) waits for a broker.

        :raises NameTaken: if another member's name looks like ``name``
        """
        if not _claim_name(member.room, name, member.user or member.id):
            raise NameTaken(name)

    def adopt_name(self, member: Member, name: str) -> None:
        """Make a name held by :meth:`claim_name` the member's own, letting the old go."""
        if member.name is not None:
            _release_name(member.room, member.name)
        member.name = name

    def release_name(self, member: Member, name: str) -> None:
        """Let go of a name held by :meth:`claim_name` that the member did not adopt."""
        _release_name(member.room, name)

    def end(self, member: Member, code: CloseCode, reason: str) -> None:
        """End one membership with ``code`` (a room no longer granted, the server API):
        a v1 connection's sender drains its outbox and closes with it, a v2 connection is
        told with a ``left`` event; the room is told."""
        if self._remove(member, code, reason):
            self.announce(member.room, "leave", member)

    def end_client(self, client: Client, code: CloseCode, reason: str) -> None:
        """End a whole connection with ``code`` (an expired token, eviction, shutdown):
        it leaves every room it is in, each told, and its sender closes with ``code``."""
        if client.close_code is None:
            client.close_code, client.close_reason = code, reason
        for member in list(client.members.values()):
            if self._remove(member, code, reason):
                self.announce(member.room, "leave", member)
        self._close(client, code, reason)

    def end_user(self, user: str, code: CloseCode, reason: str) -> int:
        """End every connection of the verified ``user`` here (each tab, each room it is
        in, and its v2 connections in no room), as :meth:`end_client` does; returns how many
        were ended. Its rooms hear one leave each, with its last connection (see
        :meth:`announce_locally`)."""
        ending = {
            member.client: None
            for room in self.rooms.values()
            if user in room.users
            for member in room.members
            if member.user == user
        }
        ending.update((client, None) for client in self.clients if client.user == user)
        for client in ending:
            self.end_client(client, code, reason)
        return len(ending)

    def leave(self, member: Member) -> None:
        """Remove a member (idempotent) and tell the rest of its room."""
        if self.detach(member):
            self.announce(member.room, "leave", member)

    def detach(self, member: Member) -> bool:
        """Remove a member and tell nobody; ``False`` if it had already left."""
        return self._remove(member, None, "")

    def close_all(self, code: CloseCode, reason: str) -> None:
        """End every connection with ``code``: each sender drains its outbox, then closes."""
        clients = {member.client: None for room in self.rooms.values() for member in room.members}
        clients.update(self.clients)  # v2 connections in no room too
        for client in clients:
            for member in list(client.members.values()):
                self._remove(member, code, reason)
            self._close(client, code, reason)

    # -- messages ---------------------------------------------------------------------------

    def publish(self, member: Member, message: protocol.ChatMessage) -> int | None:
        """Give the message the room's next ``seq`` and fan it out; ack the sender if it
        gave an ``id``. Returns the seq, or ``None`` if the member has left the room."""
        if not member.joined:
            return None
        seq = self._sequence(member.room, message, member.name, member.user)
        if message.id is not None:
            self.ack(member, message.id, seq)
        return seq

    def ack(self, member: Member, id: str, seq: int) -> None:
        """Confirm a message the member sent (its ``ack`` names the room on a v2
        connection, which is in several)."""
        room = None if member.client.single_room else member.room.name
        self.send_to(member, protocol.encode_ack(id=id, seq=seq, room=room))

    def post(self, room_name: str, message: protocol.ChatMessage, sender: str | None) -> int:
        """Publish into a room from outside it (the server API): the room's next ``seq``,
        its history and its members, as if a member named ``sender`` had sent it."""
        room = self._open_room(room_name)
        seq = self._sequence(room, message, sender)
        self._forget_if_unused(room)
        return seq

    def _sequence(
        self,
        room: Room,
        message: protocol.ChatMessage,
        sender: str | None,
        user: str | None = None,
    ) -> int:
        room.seq += 1
        seq = room.seq
        ts = time.time_ns() // 1_000_000
        encoded = protocol.encode_message(
            room=room.name,
            seq=seq,
            text=message.text,
            sender=sender,
            ts=ts,
            id=message.id,
            user=user,
            data=message.data,
        )
        if self.history_size:
            room.history.append(seq, encoded)
        self.stats.messages_in += 1
        self._fanout(room, encoded)
        if self.stored is not None:
            self.stored.put(StoredMessage.of(room.name, seq, room.epoch, message, sender, user, ts))
        return seq

    def deliver(self, room_name: str, seq: int, encoded: str) -> None:
        """Fan out a message sequenced elsewhere (by a cross-process broker), in seq order."""
        room = self.rooms.get(room_name)
        if room is not None:
            room.seq = seq
            self._fanout(room, encoded, seq=seq)

    # -- presence ---------------------------------------------------------------------------

    def announce_locally(self, room: Room, event: PresenceEvent, member: Member) -> None:
        """Record a local member's join or leave, unless nobody else is there to tell, or
        it is a verified user's second tab (a user joins with its first connection and
        leaves with its last)."""
        if member.user is not None and room.users[member.user] > (event == "join"):
            return
        if len(room.members) > member.joined:
            self.note_presence(room, event, member.name, origin=member, user=member.user)

    def note_presence(
        self,
        room: Room,
        event: PresenceEvent,
        name: str | None,
        count: int | None = None,
        *,
        origin: Member | None = None,
        user: str | None = None,
    ) -> None:
        """Record a join or leave for the room's next notice, in O(1).

        In a quiet room (no notice within the last interval) that notice goes out at once,
        so a member's join is announced before anything it says; later changes wait for
        :meth:`run_presence`. (At once only while the flusher runs and the room is counted
        here; with a :attr:`presence_source` the flusher asks it first.)

        ``count`` is the room's count after the change, from a broker that counts members
        elsewhere. ``origin`` is the local member that joined, whose welcome shows it.

        With a ``presence_grace``, a leave is held for it first (:meth:`_hold_leave`), and
        a join of the same person within it (same verified user; an anonymous member's
        same name) takes it back: neither is announced, and the others' member lists,
        which still show that person, stay right.
        """
        if event == "join" and room.held_leaves.take_back(name, user):
            if origin is not None and origin.joined:
                origin.presence_seen = room.presence_version  # its welcome shows the room
            return
        if event == "leave" and self.presence_grace > 0:
            self._hold_leave(room, name, count, user)
            return
        self._record(room, event, name, count, origin=origin, user=user)

    def _hold_leave(
        self, room: Room, name: str | None, count: int | None, user: str | None
    ) -> None:
        """Hold a leave until the grace ends, when the flusher records it
        (:meth:`_release_held`), unless a notice goes out first: a notice shows the room as
        it is, so it names every held leave too (:meth:`_with_held`)."""
        room.held_leaves.hold(name, user, count, anyio.current_time() + self.presence_grace)
        if room.grace_scheduled:
            return
        room.grace_scheduled = True
        self._grace_new.append(room)
        if self._presence_wakeup is not None:
            self._presence_wakeup.set()

    def _record(
        self,
        room: Room,
        event: PresenceEvent,
        name: str | None,
        count: int | None = None,
        *,
        origin: Member | None = None,
        user: str | None = None,
    ) -> None:
        """Record a change for the room's next notice (see :meth:`note_presence`)."""
        changes = room.presence
        fresh = changes is None
        if changes is None:
            changes = room.presence = PresenceChanges()
        changes.add(event, name, count, user)
        room.presence_version += 1
        if origin is not None and origin.joined:
            origin.presence_seen = room.presence_version
        if not fresh:
            return  # the flusher already knows the room
        wakeup = self._presence_wakeup
        if wakeup is not None and room.presence_quiet and self.presence_source is None:
            self._announce_now(room)
        self._presence_new.append(room)
        if wakeup is not None:
            wakeup.set()

    async def run_presence(self) -> None:
        """Send presence notices until cancelled (a task in the broker's task group).

        Each room's notice goes out at most once per interval (``presence_interval``, or
        one second per :data:`PRESENCE_RATE` members in a bigger room): the first change
        after a quiet interval at once (:meth:`note_presence`), the changes within the
        interval that follows together at its end. So every member gets at most one
        notice per interval, a crowd joining or leaving costs O(members) per interval (and
        a room at most :data:`PRESENCE_RATE` notices a second), and rooms do not wait on
        each other.
        """
        schedule: list[tuple[float, int, Room]] = []  # a heap of (due time, order, room)
        graces: list[tuple[float, int, Room]] = []  # a heap of (grace's end, order, room)
        order = itertools.count()
        while True:
            self._presence_wakeup = wakeup = anyio.Event()
            now = anyio.current_time()
            rooms, self._grace_new = self._grace_new, []
            for room in rooms:
                self._schedule_grace(graces, next(order), room)
            while graces and graces[0][0] <= now:
                _, _, room = heapq.heappop(graces)
                self._release_held(room, now)  # (a room that is quiet announces at once)
                self._schedule_grace(graces, next(order), room)
            rooms, self._presence_new = self._presence_new, []
            for room in rooms:
                if room.presence_next == math.inf:  # just announced: its interval starts
                    room.presence_next = now + self._interval(len(room.members))
                if not room.presence_quiet:
                    heapq.heappush(schedule, (room.presence_next, next(order), room))
                elif room.presence is not None:  # quiet, but not announced at once
                    heapq.heappush(schedule, (now, next(order), room))
            while schedule and schedule[0][0] <= now:
                due, _, room = heapq.heappop(schedule)
                if due < room.presence_next:
                    continue  # a later entry ends this room's interval
                changes, room.presence = room.presence, None
                if changes is not None and await self._flush(room, changes):
                    size = max(len(room.members), changes.count or 0)
                    room.presence_quiet = False
                    room.presence_next = anyio.current_time() + self._interval(size)
                    heapq.heappush(schedule, (room.presence_next, next(order), room))
                else:
                    room.presence_quiet = True  # an interval without changes
            due = min(
                schedule[0][0] if schedule else math.inf, graces[0][0] if graces else math.inf
            )
            if due == math.inf:
                await wakeup.wait()
                continue
            with anyio.move_on_after(due - anyio.current_time()):
                await wakeup.wait()

    @staticmethod
    def _schedule_grace(graces: list[tuple[float, int, Room]], order: int, room: Room) -> None:
        """Wake the flusher when the room's next held leave is due, if it holds one (each
        may have been taken back already)."""
        if room.held_leaves:
            heapq.heappush(graces, (room.held_leaves.due, order, room))
        else:
            room.grace_scheduled = False

    def _release_held(self, room: Room, now: float) -> None:
        """Record the room's first held leave if its grace has ended by ``now``: the
        notice that follows names every leave still held as well (:meth:`_with_held`), so
        leaves whose graces end together go out together, also from a quiet room."""
        for leave in room.held_leaves.release(now, most=1):
            self._record(room, "leave", leave.name, leave.count, user=leave.user)

    def _with_held(self, room: Room, changes: PresenceChanges) -> PresenceChanges:
        """``changes`` and every leave still held: a notice that goes out during a grace
        shows the room without that person (its ``count`` and ``members`` are the room's
        as it is), so it names the leave too, and a return is then a join like any."""
        for leave in room.held_leaves.release():
            changes.add("leave", leave.name, leave.count, leave.user)
            room.presence_version += 1
        return changes

    def _interval(self, members: int) -> float:
        return max(self.presence_interval, members / PRESENCE_RATE)

    def flush_presence(self) -> int:
        """Send every pending notice now, with what this hub knows of each room (what the
        flusher does, without its schedule, when no :attr:`presence_source` is set).
        Returns how many members were handed one."""
        rooms, self._presence_new = self._presence_new, []
        # (a member this drops is announced by the next flush)
        return sum(self._announce_now(room) for room in rooms)

    def _announce_now(self, room: Room) -> int:
        changes, room.presence = room.presence, None
        if changes is None or not room.members:
            return 0
        notice = _notice(room, self._with_held(room, changes), None)
        handed = self._hand_out(room, notice, room.presence_version)
        if handed:
            room.presence_quiet = False
            room.presence_next = math.inf  # the flusher starts the interval
        return handed

    async def _flush(self, room: Room, changes: PresenceChanges) -> int:
        """Hand out the notice for ``changes``, just taken from the room: up to the
        room's version now, whatever changes while a presence source is asked."""
        version = room.presence_version
        state = None
        if room.members and self.presence_source is not None:
            state = await self.presence_source(room)
        if not room.members:
            return 0
        return self._hand_out(room, _notice(room, self._with_held(room, changes), state), version)

    def _hand_out(self, room: Room, notice: str, version: int) -> int:
        """Put ``notice``, which reports the room's changes up to ``version``, in the
        presence slot of every member whose view is older.

        A member whose slot was empty and whose outbox is empty gets :data:`PRESENCE_WAKE`
        (its sender may be waiting on the outbox); one with a busy outbox takes the notice
        when it has drained it. Either way the notice costs at most one outbox slot, never
        evicts, and a newer notice replaces it until it is sent.
        """
        unreachable = []
        handed = 0
        for member in room.members:
            if member.presence_seen >= version:
                continue  # its welcome or an earlier notice already shows these changes
            member.presence_seen = version
            client = member.client
            if not client.presence_pending and not client.queued:
                try:
                    client._outbox_send.send_nowait(PRESENCE_WAKE)
                    client._wake()
                except anyio.WouldBlock:  # not into an empty outbox; a busy sender finds the slot
                    pass
                except anyio.BrokenResourceError:  # its sender has stopped reading
                    unreachable.append(client)
                    continue
            member.presence = notice
            client.presence_pending[member] = None
            handed += 1
        self.stats.presence_notices += handed
        if unreachable:
            self._drop_all(unreachable)
        return handed

    def _fanout(self, room: Room, encoded: str, *, seq: int = 0) -> None:
        failed = []
        skipped = 0
        for member in room.members:
            if member.skip_through >= seq > 0:
                skipped += 1
                if member.backlog is not None:  # joining: kept until its snapshot is in
                    member.backlog.append(encoded)
                    if len(member.backlog) > self.outbox_size:
                        failed.append(member.client)
            else:
                client = member.client
                try:
                    client._outbox_send.send_nowait(encoded)
                except (anyio.WouldBlock, anyio.BrokenResourceError):
                    failed.append(client)
                else:
                    if client._wakeup is not None:
                        client._wake()
        self.stats.deliveries += len(room.members) - len(failed) - skipped
        if failed:
            self._drop_all(failed)

    def send_to(self, member: Member, encoded: str) -> None:
        """Queue one event for one member (an ack or an error); evicts it on overflow.
        Nothing for a member that has left: its outbox is closed (an expired token, the
        server API, shutdown) while its receive loop may still answer a last frame."""
        if member.joined:
            self.send_to_client(member.client, encoded)

    def send_to_client(self, client: Client, encoded: str) -> None:
        """Queue one event for one connection (v2: an error about no room, ``left``);
        evicts it on overflow, nothing once its outbox is closed."""
        try:
            client._outbox_send.send_nowait(encoded)
        except anyio.WouldBlock:
            self._drop_all([client])
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass  # its sender has stopped, or the hub has ended it
        else:
            client._wake()
            self.stats.deliveries += 1

    def relay_typing(self, room: Room, encoded: str, *, origin: str) -> None:
        """Give the room's v2 connections other than ``origin`` (a client id) a ``typing``
        event. Never queued where it could cost anything: an outbox more than half full
        skips it (and a v1 connection, whose protocol has no such event), so typing can
        never evict."""
        half = self.outbox_size // 2
        for member in room.members:
            client = member.client
            if client.id == origin or client.single_room or client.queued > half:
                continue
            try:
                client._outbox_send.send_nowait(encoded)
            except (anyio.WouldBlock, anyio.BrokenResourceError):
                continue
            client._wake()

    def notify(self, user: str, encoded: str) -> int:
        """Queue ``encoded`` (a ``notice``) for every v2 connection of ``user``; returns
        how many took it (one whose outbox is full is evicted, as for any event)."""
        reached = 0
        for client in list(self.clients):
            if client.user == user and not client.ended:
                self.send_to_client(client, encoded)
                reached += not client.ended
        return reached

    def _drop_all(self, clients: list[Client]) -> None:
        """Drop connections that could not take an event, one after another.

        Dropping one can make a broker tell the room at once (Redis, when Redis is out of
        reach), and that fan-out can find more such members: when 1,000 peers disconnect
        at once, their senders stop before their receive loops leave. Those go on the same
        queue instead of a nested call, so a mass disconnect costs a loop, not a call stack
        1,000 drops deep (RecursionError).
        """
        self._unreachable.extend(clients)
        if self._dropping:
            return  # an outer call is already working through the queue
        self._dropping = True
        try:
            while self._unreachable:
                self._drop(self._unreachable.popleft())
        finally:
            self._dropping = False

    def _drop(self, client: Client) -> None:
        """Remove a connection that cannot take another event from every room it is in:
        evicted (4008) if its outbox is full, or simply gone if its sender task has
        already stopped reading the outbox."""
        if not client._outbox_send.statistics().open_receive_streams:
            for member in list(client.members.values()):
                self.leave(member)
            return
        if client.close_code is not None or client.ended:
            return  # already ending
        self.stats.evictions += 1
        self.end_client(client, CloseCode.TOO_SLOW, "too slow: outbox overflowed")

    # -- room lifecycle ---------------------------------------------------------------------

    def _remove(self, member: Member, code: CloseCode | None, reason: str) -> bool:
        """Take a member out of its room. A v1 connection ends with its room (its outbox
        closes with ``code``); a v2 connection hears ``left`` when ``code`` says the
        server ended the membership (not when the whole connection is ending)."""
        room = member.room
        if member not in room.members:
            return False
        del room.members[member]
        client = member.client
        if client.members.get(room.name) is member:
            del client.members[room.name]
        if not client.single_room and client.close_code is None:
            client.presence_pending.pop(member, None)  # it goes on, without this room
        if member.user is not None:
            room.users[member.user] -= 1
            if room.users[member.user]:
                room.extra_tabs -= 1
            else:
                del room.users[member.user]
        if member.name is not None:
            _release_name(room, member.name)
        if client.single_room:
            self._close(client, code, reason)
        elif code is not None and client.close_code is None:
            self.send_to_client(client, protocol.encode_left(room.name, code, reason))
        self.stats.leaves += 1
        if not room.members:
            room.held_leaves.clear()  # nobody is left to tell
            if self.room_emptied is not None:
                self.room_emptied(room)
        self._forget_if_unused(room)
        return True

    @staticmethod
    def _close(client: Client, code: CloseCode | None, reason: str) -> None:
        """Close a connection's outbox: its sender drains it, then closes with ``code``."""
        if client.close_code is None:
            client.close_code, client.close_reason = code, reason
        client.ended = True
        client._outbox_send.close()
        client._wake()

    def _open_room(self, name: str) -> Room:
        room = self.rooms.get(name)
        if room is None:
            history = History(self.history_size, self.history_bytes)
            room = Room(name, secrets.token_urlsafe(6), history)
            self.rooms[name] = room
        elif name in self._idle:
            del self._idle[name]
            self.idle_bytes -= room.history.bytes
        return room

    def _forget_if_unused(self, room: Room) -> None:
        """Forget a room without members, or keep its history for resume while it is among
        the most recently emptied within both idle budgets (rooms and bytes)."""
        if room.members:
            return
        if not room.history or not self.idle_rooms:
            del self.rooms[room.name]
            return
        self._idle[room.name] = None
        self.idle_bytes += room.history.bytes
        while len(self._idle) > self.idle_rooms or self.idle_bytes > self.idle_history_bytes:
            oldest, _ = self._idle.popitem(last=False)
            self.idle_bytes -= self.rooms.pop(oldest).history.bytes


def _notice(room: Room, changes: PresenceChanges, state: tuple[int, list[str]] | None) -> str:
    """The room's notice for ``changes``, with the count and names a presence source gave
    (``state``), else the count a broker reported with the changes (names unknown here),
    else this hub's own."""
    if state is not None:
        count, members = state
    elif changes.count is not None:
        count, members = changes.count, None
    else:
        count, members = room.count, room.member_names()
    return changes.encode(room.name, count=count, members=members)


def _claim_name(room: Room, name: str, owner: str) -> bool:
    """Hold ``name``'s skeletons in ``room`` for ``owner``; ``False`` (and nothing held)
    if another owner holds either."""
    keys = skeleton(name)
    if any(room.name_owners.get(key, (owner, 0))[0] != owner for key in keys):
        return False
    for key in set(keys):
        held = room.name_owners.get(key, (owner, 0))[1]
        room.name_owners[key] = (owner, held + 1)
    return True


def _release_name(room: Room, name: str) -> None:
    for key in set(skeleton(name)):
        owner, held = room.name_owners[key]
        if held > 1:
            room.name_owners[key] = (owner, held - 1)
        else:
            del room.name_owners[key]


def replay(
    history: Sequence[tuple[int, str]],
    seq: int,
    room_epoch: str,
    since: int,
    epoch: str | None,
    *,
    room: str,
) -> list[str]:
    """Events for a client resuming after ``since`` in a room whose latest seq is ``seq``:
    ``history_gap`` if it missed messages that are gone (or its epoch is not the room's),
    then every retained message after it."""
    same_run = epoch in (None, room_epoch) and since <= seq
    first_kept = history[0][0] if history else seq + 1
    events = []
    if not same_run or first_kept > since + 1:
        events.append(
            protocol.encode_error(
                ErrorCode.HISTORY_GAP,
                "some messages since your last seq are no longer available",
                room=room,
                epoch=room_epoch,
                since=since,
                first=first_kept,
            )
        )
        since = 0 if not same_run else since
    events.extend(encoded for s, encoded in history if s > since)
    return events
