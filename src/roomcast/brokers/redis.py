"""The Redis broker: one room, one order, one ``seq`` across workers and machines.

Design
------
*Order and seq.* Every message goes through one Lua script that ``INCR``\\ s the room's
counter, appends ``"<seq>|<event>"`` to the room's history list (trimmed to
``ROOMCAST_HISTORY_SIZE``) and ``PUBLISH``\\ es it on the room's channel. Redis runs scripts
one at a time, so counter order, history order and publish order are one total order per
room, and every subscriber receives a room's messages in it. An atomic counter gives the
SPEC's gap-free ``+1`` sequence, which stream IDs would not; the seq is spliced into the
pre-serialised event, so each message is still encoded once.

*Delivery.* Each worker holds one pattern subscription and fans out locally through its
hub. Pub/sub is at-most-once: a worker cut off from Redis for a while notices the missed
seqs (a jump, or its periodic check of the room counters), re-reads them from history and
tells its members ``history_gap`` for any already trimmed away.

*Joining.* The join script registers presence and returns a snapshot (epoch, seq,
members, history) atomically. Live messages that reach the new member while the snapshot
travels are merged by seq, so the replay and the live stream meet with no gap and no
duplicate.

*Presence.* A sorted set per room maps ``<member id>:<name>`` to an expiry time; each worker
refreshes its own members every few seconds, so a dead worker's entries expire.

*Epoch.* Set once per room (``SET NX``) beside its counter; it changes only if Redis loses
the room's data (a restart without persistence), exactly when ``seq`` restarts.

*Cluster.* A room's keys share the hash tag ``{room}``, so its scripts touch one slot; the
path past one Redis is Redis Cluster with sharded pub/sub (``SPUBLISH``/``SSUBSCRIBE`` per
room) in place of the pattern subscription.
"""

from __future__ import annotations

import logging
import secrets
import time
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final

import anyio
import coredis
import orjson
from anyio.abc import TaskGroup, TaskStatus
from coredis.exceptions import RedisError

from .. import protocol
from ..hub import Hub, Member, Room, RoomFull, replay
from ..presence import PresenceEvent
from ..protocol import MAX_WELCOME_MEMBERS, ChatMessage, ErrorCode
from ..settings import Settings
from . import BrokerUnavailable, History

__all__ = ["RedisBroker", "open_redis_broker"]

log = logging.getLogger("roomcast.redis")

CHANNEL_PREFIX: Final = "roomcast:room:"
PRESENCE_TTL: Final = 15.0
TICK: Final = 1.0
#: longest a request to Redis may take before the caller is told it is unavailable
REQUEST_TIMEOUT: Final = 2.0

JOIN = """
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', ARGV[2])
local count = redis.call('ZCARD', KEYS[4])
local capacity = tonumber(ARGV[4])
if capacity > 0 and count >= capacity then return false end
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])
count = count + 1
redis.call('SET', KEYS[2], ARGV[5], 'NX')
local epoch = redis.call('GET', KEYS[2])
local seq = tonumber(redis.call('GET', KEYS[1]) or '0')
local present = redis.call('ZRANGE', KEYS[4], 0, 199)
local history = {}
if ARGV[6] == '1' then history = redis.call('LRANGE', KEYS[3], 0, -1) end
redis.call('PUBLISH', ARGV[7], 'J|' .. count .. '|' .. ARGV[1])
return {epoch, seq, count, present, history}
"""

PUBLISH = """
local seq = redis.call('INCR', KEYS[1])
redis.call('SET', KEYS[2], ARGV[5], 'NX')
local entry = seq .. '|' .. ARGV[1] .. seq .. ARGV[2]
local keep, budget = tonumber(ARGV[3]), tonumber(ARGV[6])
if keep > 0 and budget > 0 then
    local n = redis.call('RPUSH', KEYS[3], entry)
    local bytes = redis.call('INCRBY', KEYS[4], #entry)
    while n > 0 and (n > keep or bytes > budget) do
        bytes = redis.call('DECRBY', KEYS[4], #redis.call('LPOP', KEYS[3]))
        n = n - 1
    end
end
redis.call('PUBLISH', ARGV[4], 'M|' .. entry)
return seq
"""

LEAVE = """
local removed = redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
local count = redis.call('ZCARD', KEYS[1])
if removed == 1 then redis.call('PUBLISH', ARGV[3], 'L|' .. count .. '|' .. ARGV[1]) end
return count
"""


#: a room's live presence: its count and the first entries (for a notice's names)
PRESENCE_NOW = """
local live = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], '+inf', 'LIMIT', 0, tonumber(ARGV[2]))
return {redis.call('ZCOUNT', KEYS[1], ARGV[1], '+inf'), live}
"""


def _keys(room: str) -> tuple[str, str, str, str]:
    """seq, epoch, history and presence keys of a room (one hash slot: ``{room}``)."""
    base = f"roomcast:{{{room}}}"
    return f"{base}:seq", f"{base}:epoch", f"{base}:history", f"{base}:presence"


def _history_bytes_key(room: str) -> str:
    """The UTF-8 bytes the room's history list holds (kept by :data:`PUBLISH`, which drops
    the oldest entries beyond ``ROOMCAST_HISTORY_BYTES``; a list from before this counter
    is counted from its next message on, and trimmed by count meanwhile)."""
    return f"roomcast:{{{room}}}:history-bytes"


def _split_entry(entry: str) -> tuple[int, str]:
    seq, _, event = entry.partition("|")
    return int(seq), event


def _presence_entry(member: Member) -> str:
    return f"{member.id}:{member.name or ''}"


class RedisBroker:
    name = "redis"

    def __init__(self, settings: Settings, hub: Hub, client: coredis.Redis[str]) -> None:
        self.settings = settings
        self.hub = hub
        self.client = client
        self._join = client.register_script(JOIN)
        self._publish = client.register_script(PUBLISH)
        self._leave = client.register_script(LEAVE)
        self._presence_now = client.register_script(PRESENCE_NOW)
        self._healthy = True
        #: rooms whose ``seq`` reflects every message delivered so far (gaps detectable)
        self._synced: weakref.WeakSet[Room] = weakref.WeakSet()
        self._leaving_send, self._leaving = anyio.create_memory_object_stream[Member](4096)
        #: local members whose own join has not come back through pub/sub yet, by id
        self._joining: dict[str, Member] = {}
        hub.announce = self._announce
        hub.presence_source = self._presence_state

    @property
    def healthy(self) -> bool:
        return self._healthy

    # -- the Broker interface ---------------------------------------------------------------

    async def join(
        self, room: str, name: str | None, *, since: int | None, epoch: str | None
    ) -> Member:
        member = self.hub.attach(room, name)
        self._joining[member.id] = member
        try:
            snapshot = await self._call(
                self._join,
                _keys(room),
                [
                    _presence_entry(member),
                    _now_ms(),
                    _now_ms() + int(PRESENCE_TTL * 1000),
                    self.settings.room_capacity,
                    secrets.token_urlsafe(6),
                    "1" if since is not None else "0",
                    CHANNEL_PREFIX + room,
                ],
            )
        except BaseException:
            self.hub.detach(member)
            self._joining.pop(member.id, None)
            raise
        if snapshot is None:
            self.hub.detach(member)
            self._joining.pop(member.id, None)
            raise RoomFull(room)
        self._greet(member, snapshot, since, epoch)
        return member

    async def leave(self, member: Member) -> None:
        self._joining.pop(member.id, None)
        if self.hub.detach(member):
            await self._remove_presence(member)

    async def publish(self, member: Member, message: ChatMessage) -> int | None:
        if not member.joined:
            return None
        room = member.room.name
        head, tail = protocol.encode_message_parts(
            room=room, text=message.text, sender=member.name, ts=_now_ms(), id=message.id
        )
        seq = await self._sequence(room, head, tail)
        self.hub.stats.messages_in += 1
        if message.id is not None and member.joined:
            self.hub.send_to(member, protocol.encode_ack(id=message.id, seq=seq))
        return seq

    async def _sequence(self, room: str, head: str, tail: str) -> int:
        """Run :data:`PUBLISH` for one message: its seq, kept in the room's history (within
        ``ROOMCAST_HISTORY_SIZE`` and ``ROOMCAST_HISTORY_BYTES``) and published.

        :raises BrokerUnavailable: if Redis did not take it
        """
        seq_key, epoch_key, history_key, _ = _keys(room)
        keys = (seq_key, epoch_key, history_key, _history_bytes_key(room))
        args = [head, tail, self.settings.history_size, CHANNEL_PREFIX + room]
        args += [secrets.token_urlsafe(6), self.settings.history_bytes]
        return int(await self._call(self._publish, keys, args))

    # -- joining ----------------------------------------------------------------------------

    def _greet(
        self, member: Member, snapshot: list[Any], since: int | None, epoch: str | None
    ) -> None:
        room_epoch, seq, count, present, history = snapshot
        seq = int(seq)
        room = member.room
        room.epoch = room_epoch
        names = [entry.partition(":")[2] for entry in present]
        welcome = protocol.encode_welcome(
            room=room.name,
            epoch=room_epoch,
            seq=seq,
            members=[n for n in names if n],
            count=int(count),
        )
        member.greeting.append(welcome)
        if since is not None:
            entries = [_split_entry(entry) for entry in history]
            member.greeting.extend(replay(entries, seq, room_epoch, since, epoch))
        # Live events that reached the outbox while the snapshot travelled: keep those
        # after the snapshot, in order; drop the messages it already covers.
        while True:
            try:
                event = member.outbox.receive_nowait()
            except anyio.WouldBlock:
                break
            if _seq_of(event) <= seq:
                continue
            member.greeting.append(event)
        member.skip_through = seq
        if room not in self._synced:
            room.seq = max(room.seq, seq)
            self._synced.add(room)

    # -- presence ---------------------------------------------------------------------------

    def _announce(self, room: Room, event: PresenceEvent, member: Member) -> None:
        """The hub removed a member on its own (eviction): tell every worker, from a task."""
        try:
            self._leaving_send.send_nowait(member)
        except anyio.WouldBlock:
            self.hub.announce_locally(room, event, member)

    def _note_presence(self, room: Room, kind: str, rest: str) -> None:
        """A join (``J``) or leave (``L``) from any worker, for the room's next notice; a
        local member's own join is already in its welcome (its ``origin``)."""
        count, _, entry = rest.partition("|")
        member_id, _, name = entry.partition(":")
        change: PresenceEvent = "join" if kind == "J" else "leave"
        origin = self._joining.pop(member_id, None) if kind == "J" else None
        self.hub.note_presence(room, change, name or None, int(count), origin=origin)

    async def _presence_state(self, room: Room) -> tuple[int, list[str]] | None:
        """The room's count and names across workers, for a presence notice (the hub's
        ``presence_source``); ``None`` while Redis is out of reach."""
        try:
            count, entries = await self._call(
                self._presence_now, [_keys(room.name)[3]], [_now_ms(), 2 * MAX_WELCOME_MEMBERS]
            )
        except BrokerUnavailable:
            return None
        names = [name for name in (entry.partition(":")[2] for entry in entries) if name]
        return int(count), names[:MAX_WELCOME_MEMBERS]

    async def _remove_presence(self, member: Member) -> None:
        presence = _keys(member.room.name)[3]
        try:
            with anyio.move_on_after(REQUEST_TIMEOUT, shield=True):
                await self._leave(
                    keys=[presence],
                    args=[_presence_entry(member), _now_ms(), CHANNEL_PREFIX + member.room.name],
                )
                return
        except RedisError:
            pass
        # Redis is out of reach: the entry expires on its own; tell this worker's members now.
        self.hub.announce_locally(member.room, "leave", member)

    async def _process_leaves(self) -> None:
        async for member in self._leaving:
            await self._remove_presence(member)

    # -- delivery ---------------------------------------------------------------------------

    async def _subscribe(
        self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        async with self.client.pubsub(ignore_subscribe_messages=True) as pubsub:
            await pubsub.psubscribe(CHANNEL_PREFIX + "*")
            task_status.started()
            async for message in pubsub:
                if message["type"] == "pmessage":
                    room = str(message["channel"]).removeprefix(CHANNEL_PREFIX)
                    await self._on_event(room, str(message["data"]))

    async def _on_event(self, room_name: str, data: str) -> None:
        kind, _, rest = data.partition("|")
        room = self.hub.rooms.get(room_name)
        if room is None or not room.members:
            return
        if kind == "M":
            seq, event = _split_entry(rest)
            await self._deliver(room, seq, event)
        else:
            self._note_presence(room, kind, rest)

    async def _deliver(self, room: Room, seq: int, event: str) -> None:
        if room in self._synced:
            if seq <= room.seq:
                return  # already delivered (a catch-up read it from history first)
            if seq > room.seq + 1:
                await self._catch_up(room, seq - 1)
        self.hub.deliver(room.name, seq, event)

    async def _catch_up(self, room: Room, through: int) -> None:
        """Deliver what this worker missed (seq ``room.seq + 1`` to ``through``) from
        history; tell the members ``history_gap`` if some of it was already trimmed."""
        first_missing = room.seq + 1
        try:
            entries = await self._call_raw(self.client.lrange(_keys(room.name)[2], 0, -1))
        except BrokerUnavailable:
            return
        missed = [(s, e) for s, e in map(_split_entry, entries) if first_missing <= s <= through]
        if not missed or missed[0][0] != first_missing:
            gap = protocol.encode_error(
                ErrorCode.HISTORY_GAP,
                "messages were lost while the server was cut off from Redis",
                epoch=room.epoch,
                since=room.seq,
                first=missed[0][0] if missed else through + 1,
            )
            self.hub.broadcast(room.name, gap)
        for seq, event in missed:
            self.hub.deliver(room.name, seq, event)
        room.seq = max(room.seq, through)

    # -- upkeep -----------------------------------------------------------------------------

    async def _tick(self) -> None:
        """Every second: check Redis (health), catch up rooms whose counter moved past what
        arrived (a message lost to a reconnect), and refresh this worker's presence."""
        ticks = 0
        while True:
            await anyio.sleep(TICK)
            ticks += 1
            rooms = [r for r in self.hub.rooms.values() if r.members and r in self._synced]
            try:
                counters = await self._call_raw(
                    self.client.mget([_keys(r.name)[0] for r in rooms])
                    if rooms
                    else self.client.ping()
                )
                if rooms:
                    for room, counter in zip(rooms, counters, strict=True):
                        if counter is not None and int(counter) > room.seq:
                            await self._catch_up(room, int(counter))
                if ticks % int(PRESENCE_TTL / 3 / TICK) == 0:
                    await self._refresh_presence()
            except BrokerUnavailable:
                continue

    async def _refresh_presence(self) -> None:
        expires = _now_ms() + int(PRESENCE_TTL * 1000)
        for room in list(self.hub.rooms.values()):
            if room.members:
                mapping: dict[str | bytes, int | float] = {
                    _presence_entry(m): expires for m in room.members
                }
                await self._call_raw(self.client.zadd(_keys(room.name)[3], mapping))

    # -- the server API (SPEC §8.2) ---------------------------------------------------------

    async def post(self, room: str, message: ChatMessage, sender: str | None) -> int:
        head, tail = protocol.encode_message_parts(
            room=room, text=message.text, sender=sender, ts=_now_ms(), id=message.id
        )
        seq = await self._sequence(room, head, tail)
        self.hub.stats.messages_in += 1
        return seq

    async def history(self, room: str, since: int, limit: int) -> History:
        seq_key, epoch_key, history_key, _ = _keys(room)
        seq, epoch = await self._call_raw(self.client.mget([seq_key, epoch_key]))
        entries = await self._call_raw(self.client.lrange(history_key, 0, -1))
        kept = [_split_entry(entry) for entry in entries]
        latest = int(seq or 0)
        first = kept[0][0] if kept else latest + 1
        events = [event for number, event in kept if number > since][:limit]
        return History(epoch, latest, first, events)

    async def presence(self, room: str) -> list[str | None]:
        live = self.client.zrangebyscore(_keys(room)[3], _now_ms(), float("inf"))
        entries = await self._call_raw(live)
        return [entry.partition(":")[2] or None for entry in entries]

    async def rooms(self) -> dict[str, int]:
        found: dict[str, int] = {}
        now = _now_ms()
        async for key in self.client.scan_iter(match="roomcast:{*}:presence"):
            count = int(await self._call_raw(self.client.zcount(key, now, float("inf"))))
            if count:
                found[key.partition("{")[2].rpartition("}")[0]] = count
        return found

    # -- calls ------------------------------------------------------------------------------

    async def _call(self, script: Any, keys: Any, args: list[Any]) -> Any:
        return await self._call_raw(script(keys=list(keys), args=args))

    async def _call_raw(self, request: Any) -> Any:
        """Await a Redis request within :data:`REQUEST_TIMEOUT`, tracking health.

        :raises BrokerUnavailable: on any Redis error or timeout
        """
        try:
            with anyio.fail_after(REQUEST_TIMEOUT):
                result = await request
        except (RedisError, TimeoutError, OSError) as exc:
            if self._healthy:
                log.warning("Redis unavailable: %s", exc)
            self._healthy = False
            raise BrokerUnavailable(str(exc) or type(exc).__name__) from exc
        if not self._healthy:
            log.warning("Redis reachable again")
        self._healthy = True
        return result


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _seq_of(event: str) -> int:
    """The seq of a queued event, or 0 for unsequenced ones (only used while joining)."""
    if not event.startswith('{"type":"message"'):
        return 0
    seq: int = orjson.loads(event)["seq"]
    return seq


@asynccontextmanager
async def open_redis_broker(settings: Settings, hub: Hub) -> AsyncIterator[RedisBroker]:
    """Connect, subscribe, and keep the broker's tasks running until the block exits.

    :raises BrokerUnavailable: if Redis cannot be reached at startup
    """
    assert settings.redis_url is not None
    client: coredis.Redis[str] = coredis.Redis.from_url(
        settings.redis_url,
        decode_responses=True,
        connect_timeout=REQUEST_TIMEOUT,
        stream_timeout=REQUEST_TIMEOUT * 5,
    )
    async with client:
        broker = RedisBroker(settings, hub, client)
        try:  # not _call_raw: this failure is the startup's one line, not a health change
            with anyio.fail_after(REQUEST_TIMEOUT):
                await client.ping()
        except (RedisError, TimeoutError, OSError) as exc:
            raise BrokerUnavailable(f"cannot reach Redis at {settings.redis_url}: {exc}") from None
        async with anyio.create_task_group() as tg:
            await _start(tg, broker)
            yield broker
            tg.cancel_scope.cancel()


async def _start(tg: TaskGroup, broker: RedisBroker) -> None:
    with anyio.fail_after(REQUEST_TIMEOUT * 5):
        await tg.start(broker._subscribe)
    tg.start_soon(broker._tick)
    tg.start_soon(broker._process_leaves)
