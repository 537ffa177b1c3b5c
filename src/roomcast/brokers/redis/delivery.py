"""Delivery: the subscriber task, which fans out every room's stream in order, once.

*Delivery.* Each worker holds one subscription connection (:mod:`~roomcast.brokers.subscriber`)
with its control channel and the channel of every room it has local members in, and no
other: a worker hears only the rooms it serves (:mod:`~roomcast.brokers.channels`:
subscribed when a room's first local member joins, let go when the last leaves, many at
once in one command). The subscriber returns everything one socket read brought as a
burst; the burst is fanned out in one synchronous step, so a batching sender wakes once
for all of it. For each room with local members, the worker keeps a *stream position*:
the run (``epoch``) and the last ``seq`` it has fanned out. One task, the subscriber, is
the only writer of stream positions, and it advances a position only by fanning out
exactly the next seq, or by a *jump* that tells the members concerned ``history_gap``.

*Catching up.* Within one subscription Redis loses nothing and reorders nothing. Events
can go missing only while the subscription is down (a reconnect, or Redis dropping a
subscriber that fell too far behind), so after every (re)subscription the subscriber
compares each room's counter with its position and re-reads what it missed from history
before it handles any new event. An event that does not follow the position (a batch
starting past ``seq + 1``, a presence notice from further on, another run) also sends the
subscriber to history first. Entries already trimmed from history are announced with
``history_gap`` to the members that needed them. A worker that was merely paused
(SIGSTOP, a long GC) finds its backlog intact in the socket and in Redis's output buffer
and simply works through it.

Why this delivers no seq twice or out of order, to members present throughout and to
joiners alike, is argued in :mod:`.joining`, where joining and delivery meet. The
subscriber also hands on what is not a room's stream: control requests
(:mod:`.control`), typing, and presence changes from every worker (for the hub's
notices; *Presence* in :mod:`.presence`). The server API's history is read here too.
"""

from __future__ import annotations

import os
import secrets
import weakref
from dataclasses import dataclass, field

import anyio
import coredis
from anyio.abc import TaskStatus

from ... import protocol
from ...hub import Hub, Member, Room
from ...presence import PresenceEvent
from ...protocol import ErrorCode
from ...settings import Settings
from .. import BrokerUnavailable, History
from ..channels import RoomChannels
from ..subscriber import Subscription, SubscriptionLost, open_subscription
from . import calls, scripts
from .calls import log
from .control import Control
from .keys import _keys, _parse_entry, _split_entry

__all__ = ["Delivery"]

#: subscriber reconnection backoff, seconds
RETRY_FIRST, RETRY_MAX = 0.1, 2.0


@dataclass(eq=False)
class _Stream:
    """How far this worker has fanned out one room's stream (written by the subscriber
    task only: :meth:`Delivery._advance`, or a jump in :meth:`Delivery._catch_up`)."""

    epoch: str
    seq: int
    #: incremented by every jump; a join that sees it change while in flight is refused
    jumps: int = 0
    #: runs that ended (Redis lost the room's data): their late events are dropped
    retired: set[str] = field(default_factory=set)


class Delivery(Control):
    """The subscriber task and the stream positions it alone writes (built on
    :class:`~.control.Control`, whose requests arrive on the same subscription)."""

    def __init__(self, settings: Settings, hub: Hub, client: coredis.Redis[str]) -> None:
        super().__init__(settings, hub, client)
        self._read = client.register_script(scripts.READ)
        self._subscribed = False
        #: the room channels this worker's subscriber holds
        self._channels = RoomChannels()
        self._streams: weakref.WeakKeyDictionary[Room, _Stream] = weakref.WeakKeyDictionary()
        #: greeted members and the run their snapshot belongs to
        self._runs: weakref.WeakKeyDictionary[Member, str] = weakref.WeakKeyDictionary()
        #: local members whose own join has not come back through pub/sub yet, by id
        self._joining: dict[
            tuple[str, str], Member
        ] = {}  # (room, member id): a v2 connection is in several

    def _let_go(self, room: Room) -> None:
        """The hub's ``room_emptied``: the room's last local member has left."""
        self._channels.release(self.channel_prefix + room.name)

    async def _subscribe_forever(
        self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Hold the subscription, reconnecting with backoff; report started once the first
        subscription is confirmed."""
        pool = self.client.connection_pool
        assert pool.location is not None
        retry = RETRY_FIRST
        started = False
        while True:
            try:
                async with (
                    open_subscription(
                        pool.location,
                        dict(pool.connection_kwargs),
                        self.control_channel,
                        name=f"roomcast-subscriber-{os.getpid()}",
                        reply_timeout=calls.REQUEST_TIMEOUT,
                    ) as subscription,
                    anyio.create_task_group() as tg,
                ):
                    self._channels.restart()
                    tg.start_soon(self._channels.keep_subscribed, subscription)
                    early = await self._resubscribe(subscription)
                    await self._resync()
                    if started:
                        log.warning("Redis subscription restored")
                    self._subscribed = True
                    if not started:
                        task_status.started()
                        started = True
                    retry = RETRY_FIRST
                    await self._on_burst(early)
                    while True:
                        await self._on_burst(await subscription.receive())
            except* (SubscriptionLost, BrokerUnavailable) as group:
                if self._subscribed:
                    log.warning("Redis subscription lost: %s", group.exceptions[0])
                self._subscribed = False
            await anyio.sleep(retry)
            retry = min(retry * 2, RETRY_MAX)

    async def _resubscribe(self, subscription: Subscription) -> list[tuple[str, str | None]]:
        """Wait until a new connection holds every room channel this worker wants; returns
        the messages that arrived meanwhile (handled after :meth:`_resync`).

        :raises SubscriptionLost: if that takes longer than :data:`~.calls.REQUEST_TIMEOUT` * 5
        """
        early: list[tuple[str, str | None]] = []
        with anyio.move_on_after(calls.REQUEST_TIMEOUT * 5):
            while not self._channels.ready:
                for channel, data in await subscription.receive():
                    if data is None:
                        self._channels.confirmed(channel)
                    else:
                        early.append((channel, data))
            return early
        raise SubscriptionLost(f"{len(self._channels)} room channels not confirmed in time")

    async def _resync(self) -> None:
        """After (re)subscribing, before any new event: bring every room with local
        members up to its counter in Redis (what was published while unsubscribed)."""
        rooms = [room for room in self.hub.rooms.values() if room.members]
        if not rooms:
            return
        values = await self._call_raw(
            self.client.mget([key for room in rooms for key in _keys(room.name)[:2]])  # seq, epoch
        )
        for index, room in enumerate(rooms):
            counter, run = values[2 * index], values[2 * index + 1]
            stream = self._streams.get(room)
            if stream is None:
                stream = self._adopt(room, run, int(counter or 0))
            if stream.epoch != run or stream.seq != int(counter or 0):
                await self._catch_up(room)

    def _adopt(self, room: Room, run: str | None, seq: int) -> _Stream:
        """A stream position for a room that had none when its events may have been lost:
        the earliest snapshot among its greeted members (``run`` at ``seq`` if none is
        greeted yet), counted as a jump: members still joining are refused and retry."""
        greeted = [(self._runs[m], m.skip_through) for m in room.members if m in self._runs]
        if greeted:
            run = greeted[0][0]
            seq = min(s for r, s in greeted if r == run)
        stream = self._streams[room] = _Stream(run or "", seq, jumps=1)
        return stream

    async def _on_burst(self, burst: list[tuple[str, str | None]]) -> None:
        prefix = len(self.channel_prefix)
        for channel, data in burst:
            if data is None:
                self._channels.confirmed(channel)
                continue
            if not channel.startswith(self.channel_prefix):
                if channel == self.control_channel:
                    self._on_control(data)
                continue
            if not self._channels.holds(channel):
                continue  # an earlier subscription's (see .channels)
            room = self.hub.rooms.get(channel[prefix:])
            if room is None or not room.members:
                if room is not None:
                    self._streams.pop(room, None)  # no one to deliver to: start afresh
                continue
            kind, _, rest = data.partition("|")
            run, _, rest = rest.partition("|")
            if kind == "T":  # typing: ``T|<origin client id>|<event>``, not sequenced
                self.hub.relay_typing(room, rest, origin=run)
                continue
            if kind == "M":
                entries = [_split_entry(entry) for entry in rest.split("\n")]
                stream = self._streams.get(room)
                if stream is None or stream.epoch != run or entries[0][0] != stream.seq + 1:
                    stream = await self._follow(room, run, entries[0][0] - 1)
                if stream is not None:
                    for seq, event in entries:
                        self._advance(room, stream, seq, event)
            elif kind in ("J", "L"):
                seq_text, _, rest = rest.partition("|")
                count, _, entries_text = rest.partition("|")
                if await self._follow(room, run, int(seq_text)) is not None:
                    self._announce_remote(room, kind, int(count), entries_text.split("\n"))

    async def _follow(self, room: Room, run: str, seq: int) -> _Stream | None:
        """The room's stream position, caught up so that an event of ``run`` coming right
        after ``seq`` can be handled; ``None`` if the event is stale or the room is gone."""
        stream = self._streams.get(room)
        if stream is None:
            runs = {self._runs[m] for m in room.members if m in self._runs}
            if runs <= {run}:
                # The first event since this worker's first member of the room attached:
                # it comes no later than that member's snapshot (see :mod:`.joining`).
                stream = self._streams[room] = _Stream(run, seq)
                return stream
            stream = self._adopt(room, run, seq)  # members from another run: history decides
        if run in stream.retired:
            return None
        if run == stream.epoch and seq <= stream.seq:
            return stream
        await self._catch_up(room)
        stream = self._streams.get(room)
        if stream is None or self.hub.rooms.get(room.name) is not room or not room.members:
            return None
        if run != stream.epoch:
            stream.retired.add(run)  # read after the event arrived: the event's run is over
            return None
        return stream

    async def _catch_up(self, room: Room) -> None:
        """Read the room's run, counter and history, then (synchronously) jump past what
        is gone and fan out what this worker has not."""
        run, counter, entries = await self._call(
            self._read,
            _keys(room.name)[:3],
            [secrets.token_urlsafe(6)],  # seq, epoch, history
        )
        stream = self._streams.get(room)
        if stream is None or self.hub.rooms.get(room.name) is not room or not room.members:
            return
        history = [_split_entry(entry) for entry in entries]
        first = history[0][0] if history else int(counter) + 1
        since = stream.seq
        jumped = run != stream.epoch or (first > stream.seq + 1 and int(counter) > stream.seq)
        if run != stream.epoch:
            stream.retired.add(stream.epoch)
            stream.epoch = room.epoch = run
        if jumped:
            stream.seq = first - 1
            stream.jumps += 1
        self._tell_gaps(room, run, since, stream.seq + 1, jumped=jumped)
        for seq, event in history:
            self._advance(room, stream, seq, event)

    def _advance(self, room: Room, stream: _Stream, seq: int, event: str) -> None:
        """Fan out seq ``seq`` of the stream's run if it is the next one; else drop it."""
        if seq == stream.seq + 1:
            stream.seq = seq
            self.hub.deliver(room.name, seq, event)

    def _tell_gaps(self, room: Room, run: str, since: int, first: int, *, jumped: bool) -> None:
        """After a history read: ``history_gap`` for every greeted member from an earlier
        run (it starts over in ``run``) and, if the stream jumped from ``since`` to just
        before ``first``, for every member that needed something in between."""
        for member in list(room.members):
            member_run = self._runs.get(member)
            if member_run is None:
                continue  # still joining: refused when its snapshot arrives (a jump)
            told_since = max(since, member.skip_through)
            if member_run != run:
                self._runs[member] = run
                member.skip_through = 0
            elif not jumped or member.skip_through >= first - 1:
                continue
            gap = protocol.encode_error(
                ErrorCode.HISTORY_GAP,
                "messages were lost while the server was cut off from Redis",
                room=room.name,
                epoch=run,
                since=told_since,
                first=first,
            )
            self.hub.send_to(member, gap)

    def _announce_remote(self, room: Room, kind: str, count: int, entries: list[str]) -> None:
        """Entries that joined (``J``) or left (``L``), from any worker, for the room's next
        presence notice: the hub coalesces them (O(1) each). A local member's own join is
        already in its welcome (the change's ``origin``)."""
        change: PresenceEvent = "join" if kind == "J" else "leave"
        for index, entry in enumerate(entries):
            member_id, person = _parse_entry(entry)
            later = len(entries) - 1 - index
            origin = self._joining.pop((room.name, member_id), None) if kind == "J" else None
            after = count - later if kind == "J" else count + later
            self.hub.note_presence(
                room, change, person.name, after, origin=origin, user=person.user
            )

    # -- the server API (SPEC §8.2) ---------------------------------------------------------

    async def history(self, room: str, since: int, limit: int) -> History:
        seq_key, epoch_key, history_key, *_ = _keys(room)
        seq, epoch = await self._call_raw(self.client.mget([seq_key, epoch_key]))
        entries = await self._call_raw(self.client.lrange(history_key, 0, -1))
        kept = [_split_entry(entry) for entry in entries]
        latest = int(seq or 0)
        first = kept[0][0] if kept else latest + 1
        events = [event for number, event in kept if number > since][:limit]
        return History(epoch, latest, first, events)
