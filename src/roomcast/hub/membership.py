"""Membership: which connections are in which rooms, and how each place ends.

Everything here is synchronous, as the whole hub is: a join registers the member and
writes its greeting (``welcome``, then any resume :func:`replay`) with no checkpoint in
between, which is what makes resume exact. A membership ends in one place
(:meth:`Membership._remove`) whatever ends it: a leave, the server, an expired token,
eviction, shutdown.

Ending is part of membership rather than of fan-out because fan-out's only answer to a
connection that cannot take an event is to end it: :meth:`Membership._drop_all` takes
such connections out of every room they are in, and :meth:`Membership.send_to_client`
(one event for one connection, which a ``left`` needs) evicts one whose outbox is full.
:class:`~roomcast.hub.fanout.Fanout` builds on this class for everything a room says.

The rooms themselves live here too: a room is opened by its first member or message,
and forgotten when it has none, unless its history is kept for resume among the most
recently emptied rooms (``idle_rooms``, ``idle_history_bytes``).
"""

from __future__ import annotations

import itertools
import secrets
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import anyio

from .. import protocol
from ..history import History
from ..names import skeleton
from ..protocol import CloseCode, ErrorCode
from ..stored import StoredFeed
from .model import Announce, Client, HubStats, Member, NameTaken, Room, RoomFull

if TYPE_CHECKING:
    from ..archive import Position

__all__ = ["Membership", "RoomEmptied", "replay"]

#: called when a room's last local member has left (a broker that subscribes per room
#: lets the room's channel go)
RoomEmptied = Callable[[Room], None]


class Membership:
    """The rooms of one process and the connections in them (the base of
    :class:`~roomcast.hub.Hub`; see :class:`~roomcast.hub.Hub` for the parameters)."""

    #: called when a member joins or leaves: the hub's presence flusher
    #: (``announce_locally``) unless a cross-process broker puts its own
    announce: Announce

    def __init__(
        self,
        *,
        outbox_size: int,
        history_size: int,
        room_capacity: int,
        idle_rooms: int,
        history_bytes: int,
        idle_history_bytes: int,
        max_text: int,
    ) -> None:
        self.outbox_size = outbox_size
        self.history_size = history_size
        self.room_capacity = room_capacity
        self.idle_rooms = idle_rooms
        self.history_bytes = history_bytes
        self.idle_history_bytes = idle_history_bytes
        self.max_text = max_text
        self.rooms: dict[str, Room] = {}
        self._idle: OrderedDict[str, None] = OrderedDict()
        #: history bytes held by the rooms in ``_idle``
        self.idle_bytes: int = 0
        self.stats: HubStats = HubStats()
        #: set by a broker that subscribes per room; called synchronously from the removal
        self.room_emptied: RoomEmptied | None = None
        #: where the messages this hub sequences go once fanned out (hooks, the archive);
        #: ``None`` while nobody consumes them. A cross-process broker feeds it itself
        self.stored: StoredFeed | None = None
        #: set by a broker that keeps rooms' positions in the archive: called when a room
        #: the hub does not hold is opened, it gives the room's epoch, seq and window
        #: (``None``: a new room, with a new epoch)
        self.restore: Callable[[str], Position | None] | None = None
        self.node = secrets.token_hex(4)
        self._ids = itertools.count(1)
        #: open v2 connections (a v1 connection is found through its one room)
        self.clients: dict[Client, None] = {}
        #: connections found unable to take an event, waiting to be dropped (_drop_all)
        self._unreachable: deque[Client] = deque()
        self._dropping = False

    # -- joining ----------------------------------------------------------------------------

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
                people=room.listed(),
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

    # -- names ------------------------------------------------------------------------------

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

    # -- ending -----------------------------------------------------------------------------

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
        :meth:`.PresenceFlusher.announce_locally`)."""
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

    def _remove(self, member: Member, code: CloseCode | None, reason: str) -> bool:
        """Take a member out of its room. A v1 connection ends with its room (its outbox
        closes with ``code``); a v2 connection hears ``left`` when ``code`` says the
        server ended the membership (not when the whole connection is ending), and its
        :attr:`~.model.Client.on_removed` is told in every case: this is the one place
        every membership ends, once."""
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
        if client.on_removed is not None:
            client.on_removed(member, reason if code is not None else "left")
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

    # -- one connection's events, and eviction ----------------------------------------------

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

    # -- rooms ------------------------------------------------------------------------------

    def _open_room(self, name: str) -> Room:
        room = self.rooms.get(name)
        if room is None:
            room = self._new_room(name, None if self.restore is None else self.restore(name))
            self.rooms[name] = room
        elif name in self._idle:
            del self._idle[name]
            self.idle_bytes -= room.history.bytes
        return room

    def _new_room(self, name: str, position: Position | None) -> Room:
        """A room as the hub first holds it: new, or where the archive left it."""
        history = History(self.history_size, self.history_bytes)
        if position is None:
            return Room(name, secrets.token_urlsafe(6), history)
        for seq, encoded in position.window if self.history_size else ():
            history.append(seq, encoded)
        return Room(name, position.epoch, history, seq=position.seq)

    def peek_room(self, name: str, position: Position | None) -> Room | None:
        """The room at ``position`` as it would open, not held by the hub (a history
        request for a room nobody is in)."""
        return None if position is None else self._new_room(name, position)

    def clear_history(self, name: str) -> tuple[str, int] | None:
        """Forget a room's retained messages (the server API's DELETE): its epoch and seq
        stay, so a client resuming from before gets ``history_gap``. Returns the room's
        ``(epoch, seq)``, ``None`` if the hub does not hold it."""
        room = self.rooms.get(name)
        if room is None:
            return None
        if name in self._idle:
            self.idle_bytes -= room.history.bytes
        room.history = History(self.history_size, self.history_bytes)
        position = room.epoch, room.seq
        if name in self._idle and not room.members:
            del self._idle[name]
            del self.rooms[name]
        return position

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
