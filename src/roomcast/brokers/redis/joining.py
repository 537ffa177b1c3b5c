"""Joining, where a member's snapshot meets the room's stream; and why no seq is
delivered twice or out of order.

*Joining.* The member is attached locally (it receives every fan-out from then on) and its
room's subscription is confirmed (every message published from then on reaches this
worker) before its join script runs; the script registers presence and returns a snapshot
(run, seq, members, history) atomically. Events fanned out while the snapshot travelled
sit in the member's outbox: the greeting keeps the messages after the snapshot's seq and
drops the rest, and from then on the member skips any seq up to it
(``Member.skip_through``), which can still arrive late from pub/sub. If the room's stream
jumped while the join was in flight, which messages reached the outbox can no longer be
told apart, so the join leaves and starts over (a room emptied and recreated meanwhile,
as when a page reloads onto another server, does this); after :data:`JOIN_ATTEMPTS` it is
refused with 1011 ("try again shortly"), as when Redis is unreachable.

*Why no seq is delivered twice or out of order.* Every sequenced fan-out in a worker goes
through :meth:`~.delivery.Delivery._advance`, in the subscriber task, which fans out seq
``s`` only when the room's position is exactly ``s - 1`` and sets it to ``s``, with no
await between the check and the fan-out; its callers hand it only events of the
position's own run (an event of another run first sends the subscriber to history, which
settles the current run). A position only moves forward within a run: by ``_advance``, or
by a jump past what history no longer holds, announced with ``history_gap``. So for a
member present throughout, the seqs it receives are successive values of one counter,
each once, strictly increasing (by one, except across an announced jump). Interleavings
cannot break this: pub/sub events and history reads are consumed by that one task, one at
a time; an await (reading history) happens before a check, never between a check and its
fan-out; a duplicate (an entry read from history and then arriving through pub/sub, or a
notice from behind the position) fails the check and is dropped. Joiners are covered by
the snapshot argument above: the member is attached before the snapshot is taken, so
every seq after the snapshot is fanned out after the attach, exactly once, either into the
outbox before the greeting (kept) or after it (sent); the seqs up to the snapshot are
dropped or skipped. A run change (Redis lost the room's data: ``seq`` restarts and
``epoch`` changes) is a jump: members from the earlier run get ``history_gap`` with the
new epoch and start over at the new run's first seq; events of retired runs are dropped.

Joining is built on presence (a join writes the member's entry, a leave removes it) and
so on delivery: it reads the stream positions (the subscriber alone writes them) and adds
the members it greets to those whose run delivery knows.
"""

from __future__ import annotations

import contextlib
import secrets
import sys
from typing import Any

import anyio

from ... import protocol
from ...hub import Client, Hub, Member, NameTaken, Room, RoomFull, replay
from ...settings import Settings
from .. import BrokerUnavailable
from . import calls, scripts
from .calls import RedisClient
from .keys import PRESENCE_TTL, _keys, _listed, _now_ms, _seq_of, _split_entry
from .presence import Presence

__all__ = ["JOIN_ATTEMPTS", "Joining"]

#: times a join starts over (detached, so with a fresh stream position) when the room's
#: stream moved while its snapshot travelled, before it is refused with 1011
JOIN_ATTEMPTS = 3


class _StreamMoved(BrokerUnavailable):
    """The room's stream jumped, or went to another run, while a join's snapshot
    travelled: the join left again, and may start over."""


class Joining(Presence):
    """A member's join (attach, subscribe, snapshot, greeting) and leave."""

    def __init__(self, settings: Settings, hub: Hub, client: RedisClient) -> None:
        super().__init__(settings, hub, client)
        self._join = self._register(scripts.JOIN)

    async def join(
        self,
        room: str,
        name: str | None,
        *,
        since: int | None,
        epoch: str | None,
        user: str | None = None,
        client: Client | None = None,
    ) -> Member:
        for _ in range(JOIN_ATTEMPTS - 1):
            with contextlib.suppress(_StreamMoved):
                return await self._join_once(room, name, since, epoch, user, client)
        return await self._join_once(room, name, since, epoch, user, client)

    async def _join_once(
        self,
        room: str,
        name: str | None,
        since: int | None,
        epoch: str | None,
        user: str | None,
        client: Client | None,
    ) -> Member:
        member = self.hub.attach(room, name, user, client=client)
        member.skip_through, member.backlog = sys.maxsize, []  # until the snapshot is in
        self._joining[member.room.name, member.id] = member
        subscribed = self._want(self.room_channel(room))
        try:
            if not subscribed.is_set():
                await self._subscribed_to(subscribed)
            jumps = self._jumps(member.room)
            snapshot = await self._call(
                self._join,
                _keys(room),
                [
                    self._entry(member),
                    _now_ms(),
                    _now_ms() + int(PRESENCE_TTL * 1000),
                    self.settings.room_capacity,
                    secrets.token_urlsafe(6),
                    "1" if since is not None else "0",
                    self.room_channel(room),
                    *self._idle_args(),
                ],
            )
        except BaseException:
            self.hub.detach(member)
            self._joining.pop((member.room.name, member.id), None)
            raise
        if snapshot is None or snapshot == scripts.TAKEN:
            self.hub.detach(member)
            self._joining.pop((member.room.name, member.id), None)
            if snapshot is None:
                raise RoomFull(room)
            raise NameTaken(name)
        stream = self._streams.get(member.room)
        other_run = stream is not None and stream.epoch != snapshot[0]
        if self._jumps(member.room) != jumps or other_run:
            # The stream jumped (or is about to: another run) while the snapshot travelled:
            # what reached the outbox can no longer be told apart from what is missing.
            await self.leave(member)
            raise _StreamMoved("the room's stream was resynchronised during the join")
        self._greet(member, snapshot, since, epoch)
        return member

    async def leave(self, member: Member) -> None:
        self._joining.pop((member.room.name, member.id), None)
        if self.hub.detach(member):
            await self._remove_presence(member)

    @staticmethod
    async def _subscribed_to(room_channel: anyio.Event) -> None:
        """Wait for a room's subscription to be confirmed.

        :raises BrokerUnavailable: if it is not within :data:`~.calls.REQUEST_TIMEOUT` (the
            subscriber is reconnecting)
        """
        with anyio.move_on_after(calls.REQUEST_TIMEOUT):
            await room_channel.wait()
            return
        raise BrokerUnavailable("not subscribed to the room's channel")

    def _jumps(self, room: Room) -> int:
        stream = self._streams.get(room)
        return stream.jumps if stream is not None else 0

    def _greet(
        self, member: Member, snapshot: list[Any], since: int | None, epoch: str | None
    ) -> None:
        run, seq, count, present, history, new = snapshot
        if not new:  # another tab of a user already there: no join to come back
            self._joining.pop((member.room.name, member.id), None)
        seq = int(seq)
        welcome = protocol.encode_welcome(
            room=member.room.name,
            epoch=run,
            seq=seq,
            people=_listed(present),
            count=int(count),
            max_text=self.settings.max_text,
        )
        member.greeting.append(welcome)
        if since is not None:
            entries = [_split_entry(entry) for entry in history]
            member.greeting.extend(replay(entries, seq, run, since, epoch, room=member.room.name))
        # Fanned out while the snapshot travelled: keep the messages after it, in order.
        backlog, member.backlog = member.backlog or [], None
        member.greeting.extend(event for event in backlog if _seq_of(event) > seq)
        member.skip_through = seq
        member.client._wake()
        self._runs[member] = run
