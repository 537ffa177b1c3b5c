"""Rooms, membership and fan-out.

The hub is synchronous on purpose: joining, leaving and publishing never await, so each of
them happens atomically with respect to every other task on the event loop. That is what
makes a room's order total (one ``seq`` per room, assigned and fanned out in one step) and
what makes resume exact (the history snapshot and the registration of the new member
happen with no checkpoint in between, so nothing can fall into a gap or arrive twice).

Fan-out never waits on a client: each member owns a bounded outbox (an anyio memory object
stream) and the hub only ever calls ``send_nowait`` on it. A member whose outbox is full is
evicted on the spot; its connection closes it with :attr:`CloseCode.TOO_SLOW`.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from . import protocol
from .protocol import CloseCode, ErrorCode

__all__ = ["Announce", "Hub", "HubStats", "Member", "Room", "RoomFull", "replay"]


class RoomFull(Exception):
    """The room already has as many members as its capacity allows."""


@dataclass(eq=False)
class Member:
    """One connection's place in one room.

    The hub holds the send end of the outbox; the connection's sender task reads
    :attr:`greeting` first, then :attr:`outbox` until it ends. When the hub removes the
    member (eviction or shutdown) it closes the send end and records :attr:`close_code`,
    so the sender drains what is already queued and then closes the WebSocket with it.
    """

    room: Room
    name: str | None
    id: str
    greeting: list[str]
    outbox: MemoryObjectReceiveStream[str]
    _outbox_send: MemoryObjectSendStream[str] = field(repr=False)
    close_code: CloseCode | None = None
    close_reason: str = ""
    #: sequenced messages up to this seq are already in the greeting (resume), so live
    #: delivery skips them; only a broker whose snapshot is not atomic with joining needs it
    skip_through: int = 0

    @property
    def joined(self) -> bool:
        return self in self.room.members

    @property
    def queued(self) -> int:
        """Events waiting in the outbox."""
        return self.outbox.statistics().current_buffer_used


@dataclass(eq=False)
class Room:
    name: str
    epoch: str
    history: deque[tuple[int, str]]
    seq: int = 0
    #: insertion-ordered set of members: dict keys keep join order, O(1) removal
    members: dict[Member, None] = field(default_factory=dict)

    def member_names(self) -> list[str]:
        names = []
        for member in self.members:
            if member.name is not None:
                names.append(member.name)
                if len(names) == protocol.MAX_WELCOME_MEMBERS:
                    break
        return names


@dataclass
class HubStats:
    """Plain counters, read by the metrics collector at scrape time (no hot-path cost)."""

    messages_in: int = 0
    deliveries: int = 0
    evictions: int = 0
    drops: int = 0
    joins: int = 0
    leaves: int = 0


#: called when a member joins or leaves (``"join"``/``"leave"``); the default tells the
#: room's other local members, a cross-process broker tells every process instead
Announce = Callable[["Room", str, Member], None]


class Hub:
    """All rooms of one process.

    :param outbox_size: events buffered per member before it is evicted
    :param history_size: messages each room keeps for ``since`` resume
    :param room_capacity: members per room, 0 for unlimited
    :param idle_rooms: rooms without members whose history is kept (least recently
        emptied are forgotten first); beyond that a room's sequence restarts with a new epoch
    """

    def __init__(
        self,
        *,
        outbox_size: int = 1024,
        history_size: int = 100,
        room_capacity: int = 0,
        idle_rooms: int = 1000,
    ) -> None:
        self.outbox_size = outbox_size
        self.history_size = history_size
        self.room_capacity = room_capacity
        self.idle_rooms = idle_rooms
        self.rooms: dict[str, Room] = {}
        self._idle: OrderedDict[str, None] = OrderedDict()
        self.stats: HubStats = HubStats()
        self.announce: Announce = self.announce_locally
        self.node = secrets.token_hex(4)
        self._ids = itertools.count(1)
        #: members found unable to take an event, waiting to be dropped (see _drop_all)
        self._unreachable: deque[Member] = deque()
        self._dropping = False

    # -- membership -------------------------------------------------------------------------

    def join(
        self,
        room_name: str,
        name: str | None = None,
        *,
        since: int | None = None,
        epoch: str | None = None,
    ) -> Member:
        """Add a member; its greeting holds ``welcome`` and any resume replay.

        :raises RoomFull: if the room is at capacity
        """
        member = self.attach(room_name, name)
        room = member.room
        member.greeting.append(
            protocol.encode_welcome(
                room=room.name,
                epoch=room.epoch,
                seq=room.seq,
                members=room.member_names(),
                count=len(room.members),
            )
        )
        if since is not None:
            member.greeting.extend(replay(room.history, room.seq, room.epoch, since, epoch))
        self.announce(room, "join", member)
        return member

    def attach(self, room_name: str, name: str | None = None) -> Member:
        """Add a local member with an empty greeting and tell nobody (a broker that keeps
        rooms elsewhere fills in the greeting and announces the join itself).

        :raises RoomFull: if the room is at capacity
        """
        room = self._open_room(room_name)
        if self.room_capacity and len(room.members) >= self.room_capacity:
            self._forget_if_unused(room)
            raise RoomFull(room_name)
        send, receive = anyio.create_memory_object_stream[str](self.outbox_size)
        member = Member(room, name, f"{self.node}-{next(self._ids)}", [], receive, send)
        room.members[member] = None
        self.stats.joins += 1
        return member

    def leave(self, member: Member) -> None:
        """Remove a member (idempotent) and tell the rest of its room."""
        if self.detach(member):
            self.announce(member.room, "leave", member)

    def detach(self, member: Member) -> bool:
        """Remove a member and tell nobody; ``False`` if it had already left."""
        return self._remove(member, None, "")

    def close_all(self, code: CloseCode, reason: str) -> None:
        """End every membership with ``code``: each sender drains its outbox, then closes."""
        for room in list(self.rooms.values()):
            for member in list(room.members):
                self._remove(member, code, reason)

    # -- messages ---------------------------------------------------------------------------

    def publish(self, member: Member, message: protocol.ChatMessage) -> int | None:
        """Give the message the room's next ``seq`` and fan it out; ack the sender if it
        gave an ``id``. Returns the seq, or ``None`` if the member has left the room."""
        if not member.joined:
            return None
        seq = self._sequence(member.room, message, member.name)
        if message.id is not None and member.joined:
            self.send_to(member, protocol.encode_ack(id=message.id, seq=seq))
        return seq

    def post(self, room_name: str, message: protocol.ChatMessage, sender: str | None) -> int:
        """Publish into a room from outside it (the server API): the room's next ``seq``,
        its history and its members, as if a member named ``sender`` had sent it."""
        room = self._open_room(room_name)
        seq = self._sequence(room, message, sender)
        self._forget_if_unused(room)
        return seq

    def _sequence(self, room: Room, message: protocol.ChatMessage, sender: str | None) -> int:
        room.seq += 1
        seq = room.seq
        encoded = protocol.encode_message(
            room=room.name,
            seq=seq,
            text=message.text,
            sender=sender,
            ts=time.time_ns() // 1_000_000,
            id=message.id,
        )
        if self.history_size:
            room.history.append((seq, encoded))
        self.stats.messages_in += 1
        self._fanout(room, encoded)
        return seq

    def deliver(self, room_name: str, seq: int, encoded: str) -> None:
        """Fan out a message sequenced elsewhere (by a cross-process broker), in seq order."""
        room = self.rooms.get(room_name)
        if room is not None:
            room.seq = seq
            self._fanout(room, encoded, seq=seq)

    def broadcast(self, room_name: str, encoded: str, *, skip_id: str | None = None) -> None:
        """Fan out an unsequenced event (a presence notice) to a room's local members."""
        room = self.rooms.get(room_name)
        if room is not None:
            skip = next((m for m in room.members if m.id == skip_id), None)
            self._fanout(room, encoded, skip=skip)

    def announce_locally(self, room: Room, event: str, member: Member) -> None:
        if room.members:
            notice = protocol.encode_system(
                room=room.name, event=event, name=member.name, count=len(room.members)
            )
            self._fanout(room, notice, skip=member)

    def _fanout(
        self, room: Room, encoded: str, *, skip: Member | None = None, seq: int = 0
    ) -> None:
        failed = []
        skipped = 0
        for member in room.members:
            if member is skip or member.skip_through >= seq > 0:
                skipped += 1
            else:
                try:
                    member._outbox_send.send_nowait(encoded)
                except (anyio.WouldBlock, anyio.BrokenResourceError):
                    failed.append(member)
        self.stats.deliveries += len(room.members) - len(failed) - skipped
        if failed:
            self._drop_all(failed)

    def send_to(self, member: Member, encoded: str) -> None:
        """Queue one event for one member (an ack or an error); evicts it on overflow."""
        try:
            member._outbox_send.send_nowait(encoded)
        except (anyio.WouldBlock, anyio.BrokenResourceError):
            self._drop_all([member])
        else:
            self.stats.deliveries += 1

    def _drop_all(self, members: list[Member]) -> None:
        """Drop members that could not take an event, one after another.

        Dropping one announces its leave, and that fan-out can find more such members:
        when 1,000 peers disconnect at once, their senders stop before their receive loops
        leave. Those go on the same queue instead of a nested call, so a mass disconnect
        costs a loop, not a call stack 1,000 drops deep (RecursionError).
        """
        self._unreachable.extend(members)
        if self._dropping:
            return  # an outer call is already working through the queue
        self._dropping = True
        try:
            while self._unreachable:
                self._drop(self._unreachable.popleft())
        finally:
            self._dropping = False

    def _drop(self, member: Member) -> None:
        """Remove a member that cannot take another event: evicted (4008) if its outbox is
        full, or simply gone if its sender task has already stopped reading the outbox."""
        if not member._outbox_send.statistics().open_receive_streams:
            self.leave(member)
        elif self._remove(member, CloseCode.TOO_SLOW, "too slow: outbox overflowed"):
            self.stats.evictions += 1
            self.announce(member.room, "leave", member)

    # -- room lifecycle ---------------------------------------------------------------------

    def _remove(self, member: Member, code: CloseCode | None, reason: str) -> bool:
        room = member.room
        if member not in room.members:
            return False
        del room.members[member]
        member.close_code, member.close_reason = code, reason
        member._outbox_send.close()
        self.stats.leaves += 1
        self._forget_if_unused(room)
        return True

    def _open_room(self, name: str) -> Room:
        room = self.rooms.get(name)
        if room is None:
            room = Room(name, secrets.token_urlsafe(6), deque(maxlen=self.history_size))
            self.rooms[name] = room
        self._idle.pop(name, None)
        return room

    def _forget_if_unused(self, room: Room) -> None:
        if room.members:
            return
        if not room.history or not self.idle_rooms:
            del self.rooms[room.name]
            return
        self._idle[room.name] = None
        while len(self._idle) > self.idle_rooms:
            oldest, _ = self._idle.popitem(last=False)
            del self.rooms[oldest]


def replay(
    history: Sequence[tuple[int, str]], seq: int, room_epoch: str, since: int, epoch: str | None
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
                epoch=room_epoch,
                since=since,
                first=first_kept,
            )
        )
        since = 0 if not same_run else since
    events.extend(encoded for s, encoded in history if s > since)
    return events
