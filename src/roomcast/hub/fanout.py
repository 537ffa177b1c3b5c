"""Fan-out: what a room says, into the outboxes of its members.

A message is sequenced, kept in the room's history and queued for every member in one
synchronous step (:meth:`Fanout._sequence`), so a room's order is total and a resume's
history snapshot can neither miss it nor repeat it. Fan-out never waits on a client: it
only calls ``send_nowait`` on each member's bounded outbox, and a connection that cannot
take an event is dropped (:meth:`~roomcast.hub.membership.Membership._drop_all`) after the
loop, never inside it. One serialisation per message, one ``send_nowait`` per member: the
loops here are the hub's hot path, so each pass through them costs no lookup or call that
the member does not need.

Typing (:meth:`Fanout.relay_typing`) and notices to a user (:meth:`Fanout.notify`) go the
same way, but typing is never queued where it could cost an eviction.
"""

from __future__ import annotations

import time

import anyio

from .. import protocol
from ..stored import StoredMessage
from .membership import Membership
from .model import Member, Room

__all__ = ["Fanout"]


class Fanout(Membership):
    """Messages, acks, typing and notices into the outboxes of a room's members (or of
    one connection); the membership it builds on evicts who cannot take them."""

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
