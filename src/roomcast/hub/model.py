"""The hub's data: a connection (:class:`Client`), its place in one room (:class:`Member`),
a room (:class:`Room`), and the hub's counters.

Plain slotted dataclasses with no behaviour beyond their own bookkeeping, kept apart from
the code that changes them (:mod:`.membership`, :mod:`.fanout`, :mod:`.flusher`) so that
each of those reads against one shared picture of what a room and a connection hold.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Final

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .. import protocol
from ..history import History
from ..presence import HeldLeaves, PresenceChanges, PresenceEvent
from ..protocol import CloseCode

__all__ = [
    "PRESENCE_WAKE",
    "Announce",
    "Client",
    "HubStats",
    "Member",
    "NameTaken",
    "Room",
    "RoomFull",
]

#: called with a membership the hub has just ended and why (see :attr:`Client.on_removed`)
Removed = Callable[["Member", str], None]

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
    #: events the sender has taken out of the outbox so far: with :attr:`queued`, it
    #: tells whether an event queued earlier has left the outbox (it is first in, first out)
    taken: int = 0
    #: set while the sender waits for an empty outbox (see :meth:`wait_for_events`)
    _wakeup: anyio.Event | None = field(default=None, repr=False)
    #: told of each membership the hub takes away, however it ends, with why (``left``
    #: when nobody ended it: the connection's own leave or its end); a v2 connection
    #: with a ``leave`` hook sets it, so that the hook hears every ended membership once
    on_removed: Removed | None = field(default=None, repr=False)

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
        return [name for _, name in self.listed()]

    def listed(self) -> list[protocol.Listed]:
        """The people a member list shows (``welcome``, notices): those with a name, at
        most :data:`~roomcast.protocol.MAX_WELCOME_MEMBERS`, in join order, found without
        walking the rest of a crowd."""
        named = ((user, name) for user, name in self._people() if name is not None)
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
Announce = Callable[[Room, PresenceEvent, Member], None]
