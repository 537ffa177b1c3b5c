"""Publishing: a worker's messages to Redis, a batch per script call, acks in order.

*Order and seq.* Every message goes through a Lua script (:mod:`.scripts`) that
advances the room's counter, appends ``"<seq>|<event>"`` to the room's capped history list
and publishes it on the room's channel. Redis runs scripts one at a time, so counter,
history and publish order are one total order per room, and every subscriber receives a
room's events in it. The seq is spliced into the pre-serialised event, so each message
is still encoded once.

*Publishing.* A connection's receive loop never waits for Redis: :meth:`Publishing.publish`
puts the message on this worker's bounded queue and goes back to reading its client. One
publisher task takes everything queued (up to :data:`MAX_BATCH`) and sends it as a single
script call, one batch in flight at a time; meanwhile the next batch gathers. Batches run
in queue order and a batch keeps each room's messages in queue order, so a sender's
messages get increasing seqs in the order it sent them, and its ``ack``\\ s (or
``unavailable`` errors, when the call fails) come back in that order too. A slow Redis
fills the queue and then blocks the receive loops: backpressure reaches the clients'
sockets, nothing grows. Each member may hold only :data:`MEMBER_QUEUE` places in the
queue, so a flooding connection waits for its own messages and not the others for it.
Each batch is one ``PUBLISH`` per room, so subscribers receive it as one burst. (The
server API's :meth:`Publishing.post` makes a call of its own: its caller waits for the
seq.)

Publishing needs nothing of the other parts but :class:`~.calls.Calls`: what it publishes
comes back to every worker, this one included, through delivery (:mod:`.delivery`).
"""

from __future__ import annotations

import secrets
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple

import anyio

from ... import protocol
from ...hub import Hub, Member
from ...protocol import ChatMessage, ErrorCode
from ...settings import Settings
from ...stored import StoredMessage
from .. import UNAVAILABLE_NOTICE, BrokerUnavailable
from . import calls, scripts
from .calls import Calls, RedisClient
from .cluster import by_slot
from .keys import _keys, _now_ms, _publish_keys

__all__ = ["MAX_BATCH", "MEMBER_QUEUE", "QUEUE_SIZE", "Backlog", "Publishing"]

#: messages a worker queues for Redis before receive loops wait (backpressure)
QUEUE_SIZE: Final = 2048
#: messages one member may have queued: beyond that its own receive loop waits, so one
#: flooding connection cannot fill the worker's queue, and its acks come at most this
#: many at once
MEMBER_QUEUE: Final = 64
#: most messages in one publishing script call
MAX_BATCH: Final = 1024


class Backlog(NamedTuple):
    """See :attr:`Publishing.backlog`."""

    queued: int
    waiting: int


@dataclass(eq=False, slots=True)
class _Outgoing:
    """A message waiting in the publisher's queue, serialised around its future seq."""

    member: Member
    id: str | None
    head: str
    tail: str
    #: the member's queue slots, one of which this message holds until it is answered
    slots: anyio.Semaphore
    #: what the stored feed gets once sequenced (``None`` while nobody consumes it)
    stored: _Unsequenced | None = None


class _Unsequenced(NamedTuple):
    """A queued message's parts the stored feed needs once Redis has given it a seq."""

    message: ChatMessage
    name: str | None
    user: str | None
    ts: int


class Publishing(Calls):
    """This worker's queue for Redis, each member's share of it, and the publisher task
    that empties it."""

    def __init__(self, settings: Settings, hub: Hub, client: RedisClient) -> None:
        super().__init__(settings, hub, client)
        self._publish = self._register(scripts.PUBLISH)
        self._clear = self._register(scripts.CLEAR)
        self._slots: weakref.WeakKeyDictionary[Member, anyio.Semaphore] = (
            weakref.WeakKeyDictionary()
        )
        self._outgoing_send, self._outgoing = anyio.create_memory_object_stream[_Outgoing](
            QUEUE_SIZE
        )

    @property
    def backlog(self) -> Backlog:
        """Messages waiting for Redis, and receive loops waiting for room (in the queue or
        in their member's share of it)."""
        queue = self._outgoing_send.statistics()
        waiting = sum(slots.statistics().tasks_waiting for slots in self._slots.values())
        return Backlog(queue.current_buffer_used, queue.tasks_waiting_send + waiting)

    async def publish(self, member: Member, message: ChatMessage) -> None:
        """Queue the message for this worker's publisher (waiting only while the queue,
        or the member's share of it, is full); its ``ack`` or ``unavailable`` error
        follows in the member's outbox."""
        if not member.joined:
            return
        ts = _now_ms()
        head, tail = protocol.encode_message_parts(
            room=member.room.name,
            text=message.text,
            sender=member.name,
            user=member.user,
            ts=ts,
            id=message.id,
            data=message.data,
        )
        slots = self._slots.get(member)
        if slots is None:
            slots = self._slots[member] = anyio.Semaphore(MEMBER_QUEUE)
        try:
            slots.acquire_nowait()
        except anyio.WouldBlock:
            await slots.acquire()
        stored = None
        if self.hub.stored is not None:
            stored = _Unsequenced(message, member.name, member.user, ts)
        outgoing = _Outgoing(member, message.id, head, tail, slots, stored)
        try:
            self._outgoing_send.send_nowait(outgoing)
        except anyio.WouldBlock:
            try:
                await self._outgoing_send.send(outgoing)
            except BaseException:
                slots.release()
                raise

    async def answered(self, member: Member) -> None:
        """Wait until every message ``member`` has queued has its ``ack`` or error in the
        member's outbox: at most two calls' time (one batch may be in flight before the
        one that holds its messages).

        Its queued messages each hold one of its :data:`MEMBER_QUEUE` slots until
        answered, and its receive loop, busy leaving, queues no more: so once all the
        slots can be taken, all are answered.

        The bound is the publisher's, not a guess: every call it makes is bounded by
        :data:`~.calls.REQUEST_TIMEOUT`, and the member's last message has at most
        :data:`QUEUE_SIZE` // :data:`MAX_BATCH` batches queued before its own, and one
        in flight. (Two calls' time, measured from the leave, ran out just before the
        second batch's refusal on a stalled Redis: its messages got neither ``ack`` nor
        error.)
        """
        slots = self._slots.get(member)
        if slots is None or slots.value == MEMBER_QUEUE:
            return
        taken = 0
        calls_ahead = QUEUE_SIZE // MAX_BATCH + 2  # queued batches, the one in flight, its own
        try:
            with anyio.move_on_after(calls_ahead * calls.REQUEST_TIMEOUT + 1):
                while taken < MEMBER_QUEUE:
                    await slots.acquire()
                    taken += 1
        finally:
            for _ in range(taken):
                slots.release()

    # -- the publisher task -----------------------------------------------------------------

    async def _publish_forever(self) -> None:
        async with self._outgoing:
            async for first in self._outgoing:
                batch = [first]
                while len(batch) < MAX_BATCH:
                    try:
                        batch.append(self._outgoing.receive_nowait())
                    except anyio.WouldBlock:
                        break
                await self._publish_batch(batch)

    async def _publish_batch(self, batch: list[_Outgoing]) -> None:
        """One script call for the batch (in a cluster, one per hash slot among its
        rooms); then every sender's acks, in queue order within each room."""
        rooms: dict[str, list[_Outgoing]] = {}
        for outgoing in batch:
            rooms.setdefault(outgoing.member.room.name, []).append(outgoing)
        if not self.cluster:
            await self._publish_rooms(list(rooms.items()))
            return
        # The slots' calls at once, each on its own master's connection: one after
        # another, a batch of 200 rooms waited out 200 round trips (a room's messages
        # share a slot, so each room's order is its call's).
        async with anyio.create_task_group() as tg:
            for group in by_slot(rooms.items(), key=lambda item: _keys(item[0]).seq):
                tg.start_soon(self._publish_rooms, group)

    async def _publish_rooms(self, rooms: list[tuple[str, list[_Outgoing]]]) -> None:
        """One script call for these rooms' messages, then their acks (or refusals)."""
        keys: list[str] = []
        args = self._publish_args()
        for room, messages in rooms:
            keys.extend(_publish_keys(room))
            args += [self.room_channel(room), len(messages)]
            for outgoing in messages:
                args += [outgoing.head, outgoing.tail]
        try:
            firsts = await self._call(self._publish, keys, args)
        except BrokerUnavailable:
            for _, messages in rooms:
                for outgoing in messages:
                    outgoing.slots.release()
                    self._refuse(outgoing)
            return
        self.hub.stats.messages_in += sum(len(messages) for _, messages in rooms)
        for (room, messages), (first, epoch) in zip(rooms, firsts, strict=True):
            for offset, outgoing in enumerate(messages):
                outgoing.slots.release()
                if outgoing.id is not None:
                    self.hub.ack(outgoing.member, outgoing.id, int(first) + offset)
            self._store(room, epoch, int(first), [outgoing.stored for outgoing in messages])

    def _store(
        self, room: str, epoch: str, first: int, messages: Sequence[_Unsequenced | None]
    ) -> None:
        """Hand messages Redis has just sequenced (``first`` on) to the stored feed: this
        worker published them, so it is the one worker that does (SPEC §10)."""
        feed = self.hub.stored
        if feed is None:
            return
        for seq, unsequenced in enumerate(messages, first):
            if unsequenced is not None:  # (queued before anyone consumed the feed: none)
                message, name, user, ts = unsequenced
                feed.put(StoredMessage.of(room, seq, epoch, message, name, user, ts))

    def _publish_args(self) -> list[str | int]:
        """:data:`~.scripts.PUBLISH`'s leading arguments: the history bounds
        (``ROOMCAST_HISTORY_SIZE``, ``ROOMCAST_HISTORY_BYTES``), a new room's epoch and the
        idle budgets."""
        size, budget = self.settings.history_size, self.settings.history_bytes
        return [size, secrets.token_urlsafe(6), budget, *self._idle_args()]

    def _refuse(self, outgoing: _Outgoing) -> None:
        if outgoing.member.joined:
            self.hub.stats.drops += 1
            member = outgoing.member
            room = {} if member.client.single_room else {"room": member.room.name}
            error = protocol.encode_error(
                ErrorCode.UNAVAILABLE, UNAVAILABLE_NOTICE, id=outgoing.id, **room
            )
            self.hub.send_to(member, error)

    # -- the server API (SPEC §8.2) ---------------------------------------------------------

    async def clear_history(self, room: str) -> tuple[str, int] | None:
        """Forget the room's retained messages in Redis (where every worker reads them);
        its ``(epoch, seq)``, ``None`` if Redis does not hold the room.

        :raises BrokerUnavailable: if Redis cannot be reached
        """
        position = await self._call(self._clear, _publish_keys(room), self._idle_args())
        return None if position is None else (position[0], int(position[1]))

    async def post(self, room: str, message: ChatMessage, sender: str | None) -> int:
        """The API's publish: one script call of its own (the caller waits for the seq)."""
        ts = _now_ms()
        head, tail = protocol.encode_message_parts(
            room=room, text=message.text, sender=sender, ts=ts, id=message.id, data=message.data
        )
        firsts = await self._call(
            self._publish,
            _publish_keys(room),
            [*self._publish_args(), self.room_channel(room), 1, head, tail],
        )
        self.hub.stats.messages_in += 1
        (first, epoch), *_ = firsts
        self._store(room, epoch, int(first), [_Unsequenced(message, sender, None, ts)])
        return int(first)
