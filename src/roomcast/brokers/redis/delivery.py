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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import TaskGroup, TaskStatus
from coredis.connection import Location, TCPLocation

from ... import protocol
from ...hub import Hub, Member, Room
from ...presence import PresenceEvent
from ...protocol import ErrorCode
from ...settings import Settings
from .. import BrokerUnavailable, History
from ..channels import RoomChannels
from ..subscriber import Subscription, SubscriptionLost, open_subscription
from . import calls, scripts
from .calls import RedisClient, log
from .cluster import Shard as _Shard
from .cluster import relearn_slots, rewound, slot_masters, slot_of
from .control import Control
from .keys import _keys, _parse_entry, _publish_keys, _split_entry

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
    #: the event fanned out as ``seq`` (to tell a reused seq from it: :func:`.cluster.rewound`)
    last: str = ""


class Delivery(Control):
    """The subscriber task and the stream positions it alone writes (built on
    :class:`~.control.Control`, whose requests arrive on the same subscription)."""

    def __init__(self, settings: Settings, hub: Hub, client: RedisClient) -> None:
        super().__init__(settings, hub, client)
        self._read = self._register(scripts.READ)
        self._restart = self._register(scripts.RESTART)
        self._subscribed = False
        #: the subscription was lost at least once (its restoration is logged)
        self._lost_once = False
        self._retry = RETRY_FIRST
        #: the room channels this worker's subscriber holds (one Redis)
        self._channels = RoomChannels()
        #: in a cluster: each master's subscriber, the master of each slot, the shard each
        #: wanted channel is held on, channels moved and not yet caught up on their new one
        self._shards: dict[TCPLocation, _Shard] = {}
        self._slot_masters: list[TCPLocation] = []
        self._homes: dict[str, _Shard] = {}
        self._moved: set[str] = set()
        self._shard_group: TaskGroup | None = None
        self._streams: weakref.WeakKeyDictionary[Room, _Stream] = weakref.WeakKeyDictionary()
        #: greeted members and the run their snapshot belongs to
        self._runs: weakref.WeakKeyDictionary[Member, str] = weakref.WeakKeyDictionary()
        #: local members whose own join has not come back through pub/sub yet, by id
        self._joining: dict[
            tuple[str, str], Member
        ] = {}  # (room, member id): a v2 connection is in several

    def _let_go(self, room: Room) -> None:
        """The hub's ``room_emptied``: the room's last local member has left."""
        self._release(self.room_channel(room.name))

    def _want(self, channel: str) -> anyio.Event:
        """Hold a room's channel (on its shard's subscriber, in a cluster); the event is
        set once its subscription is confirmed."""
        if not self.cluster:
            return self._channels.want(channel)
        shard = self._homes.get(channel)
        if shard is None:
            shard = self._homes[channel] = self._shard_for(channel)
        return shard.channels.want(channel)

    def _release(self, channel: str) -> None:
        if not self.cluster:
            self._channels.release(channel)
        elif (shard := self._homes.pop(channel, None)) is not None:
            shard.channels.release(channel)

    async def _subscribe_forever(
        self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Hold the subscription, reconnecting with backoff; report started once the first
        subscription is confirmed. (In a cluster: one per master, :meth:`_shards_forever`.)"""
        if self.cluster:
            await self._shards_forever(task_status=task_status)
            return
        pool = self.client.connection_pool
        assert isinstance(pool.location, Location)
        location, options = pool.location, dict(pool.connection_kwargs)
        started = False

        def subscribed() -> None:
            nonlocal started
            self._subscribed = True
            if not started:
                task_status.started()
                started = True

        while True:
            try:
                await self._hold(
                    location, options, self._channels, self.control_channel, subscribed
                )
            except* (SubscriptionLost, BrokerUnavailable) as group:
                if self._subscribed:
                    log.warning("Redis subscription lost: %s", group.exceptions[0])
                self._subscribed = False
                self._lost_once = True
            await self._backoff()

    async def _backoff(self) -> None:
        await anyio.sleep(self._retry)
        self._retry = min(self._retry * 2, RETRY_MAX)

    async def _hold(
        self,
        location: Location,
        options: dict[str, Any],
        channels: RoomChannels,
        control: str | None,
        subscribed: Callable[[], None],
    ) -> None:
        """One subscription connection, from its handshake until it is lost: every channel
        in ``channels`` confirmed, their rooms caught up, then every burst handed on.

        :raises SubscriptionLost: when the connection ends (a sharded one: also when a
            slot it holds moves away)
        """
        async with (
            open_subscription(
                location,
                options,
                control,
                name=f"roomcast-subscriber-{os.getpid()}",
                reply_timeout=calls.REQUEST_TIMEOUT,
                sharded=self.cluster,
            ) as subscription,
            anyio.create_task_group() as tg,
        ):
            channels.restart()
            tg.start_soon(channels.keep_subscribed, subscription)
            early = await self._resubscribe(subscription, channels)
            await self._resync(channels)
            if self._lost_once:
                log.warning("Redis subscription restored")
                self._lost_once = False
            subscribed()
            self._retry = RETRY_FIRST
            await self._on_burst(early, channels)
            while True:
                await self._on_burst(await subscription.receive(), channels)

    async def _resubscribe(
        self, subscription: Subscription, channels: RoomChannels
    ) -> list[tuple[str, str | None]]:
        """Wait until a new connection holds every room channel this worker wants there;
        returns the messages that arrived meanwhile (handled after :meth:`_resync`).

        :raises SubscriptionLost: if that takes longer than :data:`~.calls.REQUEST_TIMEOUT` * 5
        """
        early: list[tuple[str, str | None]] = []
        with anyio.move_on_after(calls.REQUEST_TIMEOUT * 5):
            while not channels.ready:
                for channel, data in await subscription.receive():
                    if data is None:
                        channels.confirmed(channel)
                        self._moved.discard(channel)  # (the resync that follows covers it)
                    else:
                        early.append((channel, data))
            return early
        raise SubscriptionLost(f"{len(channels)} room channels not confirmed in time")

    async def _resync(self, channels: RoomChannels) -> None:
        """After (re)subscribing, before any new event: bring every room with local
        members (in a cluster: whose channel this connection holds) up to its counter in
        Redis (what was published while unsubscribed)."""
        rooms = [room for room in self.hub.rooms.values() if room.members]
        if self.cluster:
            rooms = [room for room in rooms if self._resyncs(room, channels)]
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

    # -- Redis Cluster: a sharded subscriber per master (see .cluster) ------------------------

    def _resyncs(self, room: Room, channels: RoomChannels) -> bool:
        """Whether a cluster master's new subscription must bring ``room`` up to date:
        its channel is held there and some member may have missed something (a room
        whose members are all still joining has missed nothing: each snapshot is read
        after this confirmation; a master's first subscription is mostly such rooms)."""
        if self.room_channel(room.name) not in channels:
            return False
        return room in self._streams or any(member in self._runs for member in room.members)

    async def _shards_forever(
        self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Learn the slot map, hold the control channel on its master (and each room's
        channel on its own, as rooms come), report started once the control channel is
        confirmed; the masters' subscribers run in this task's group until cancelled."""
        async with anyio.create_task_group() as tg:
            self._shard_group = tg
            while not self._slot_masters:
                try:
                    await self._refresh_slots()
                except BrokerUnavailable:
                    await self._backoff()
            await self._want(self.control_channel).wait()
            task_status.started()

    def _shard_for(self, channel: str) -> _Shard:
        """The subscriber of the master that owns ``channel``'s slot (started if new)."""
        location = self._slot_masters[slot_of(channel)]
        shard = self._shards.get(location)
        if shard is None:
            shard = self._shards[location] = _Shard(location)
            assert self._shard_group is not None
            self._shard_group.start_soon(self._shard_forever, shard)
        return shard

    async def _shard_forever(self, shard: _Shard) -> None:
        """Hold one master's sharded subscription; after it is lost (the node failed, or
        a slot moved), look the slots up again, move each room to where it lives now,
        and end once this node serves nothing this worker wants."""
        options = dict(self.client.connection_pool.connection_kwargs)

        def subscribed() -> None:
            shard.subscribed = True
            self._subscribed = all(s.subscribed for s in self._shards.values())

        while True:
            try:
                await self._hold(shard.location, options, shard.channels, None, subscribed)
            except* (SubscriptionLost, BrokerUnavailable) as group:
                if shard.subscribed:
                    log.warning("Redis subscription lost: %s", group.exceptions[0])
                shard.subscribed = self._subscribed = False
                self._lost_once = True
            await self._backoff()
            try:
                await self._refresh_slots()
            except BrokerUnavailable:
                continue
            if not len(shard.channels) and shard.location not in self._slot_masters:
                del self._shards[shard.location]
                self._subscribed = all(s.subscribed for s in self._shards.values())
                return

    async def _refresh_slots(self) -> None:
        """Read the slot map, then move every wanted channel whose slot another master
        owns now to that master's subscriber (caught up once confirmed there).

        :raises BrokerUnavailable: if the map cannot be read, or leaves slots unserved
        """
        # coredis asks a random node and returns (not raises) its error if that one is down
        reply = await self._call_raw(self.client.cluster_slots())
        masters = None if isinstance(reply, Exception) else slot_masters(reply)
        if masters is None:
            raise BrokerUnavailable("the cluster does not serve every hash slot")
        if self._slot_masters and set(masters) != set(self._slot_masters):
            await self._call_raw(relearn_slots(self.client))  # a master failed over: tell coredis
        self._slot_masters = masters
        for channel, shard in list(self._homes.items()):
            if self._slot_masters[slot_of(channel)] != shard.location:
                shard.channels.release(channel)
                del self._homes[channel]
                self._moved.add(channel)
                self._want(channel)

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

    async def _on_burst(self, burst: list[tuple[str, str | None]], channels: RoomChannels) -> None:
        for channel, data in burst:
            if data is None:
                channels.confirmed(channel)
                if channel in self._moved and channels.holds(channel):
                    await self._moved_in(channel)
                continue
            name = self.room_of_channel(channel)
            if name is None:
                if channel == self.control_channel:
                    self._on_control(data)
                continue
            if not channels.holds(channel):
                continue  # an earlier subscription's (see .channels)
            room = self.hub.rooms.get(name)
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

    async def _moved_in(self, channel: str) -> None:
        """A room whose slot moved is held on its new master: deliver what was published
        while it moved (from history, exactly once; ``history_gap`` for what is gone)."""
        self._moved.discard(channel)
        name = self.room_of_channel(channel)
        room = self.hub.rooms.get(name) if name is not None else None
        if room is not None and room.members and room in self._streams:
            await self._catch_up(room)

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
        if run == stream.epoch and rewound(stream.seq, stream.last, int(counter), history):
            await self._call(self._restart, _publish_keys(room.name), [run])
            await self._catch_up(room)  # (a new run now: history_gap for everyone)
            return
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
            stream.seq, stream.last = seq, event
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
