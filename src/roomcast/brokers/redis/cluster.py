"""Redis Cluster: rooms spread over shards, each message crossing one shard only.

Chosen by ``ROOMCAST_REDIS_URL=redis+cluster://host:port[,host:port...]`` (seed nodes; the
client learns the rest and the slot map from them). Everything below holds only in that
mode: with ``redis://``, ``rediss://`` or ``unix://`` the broker is exactly the single-Redis
one.

*Why not today's broker on a cluster client.* It runs, but every ``PUBLISH`` in a cluster is
broadcast over the cluster bus to every node, and every worker's subscriber hears every
room on whichever node it is connected to: each node carries every message, so adding
masters adds no capacity. Sharded pub/sub (``SPUBLISH``/``SSUBSCRIBE``, Redis 7) keeps a
channel's messages on the shard that owns the channel's hash slot.

*One room, one slot.* Every key of a room is ``roomcast:{<room>}:<suffix>`` (:mod:`.keys`),
and its channel, in cluster mode, ``<namespace>room:{<room>}``: the same hash tag, so the
same slot (the tag is everything between the first ``{`` and the next ``}``, and the
prefixes hold no brace; no room name starts with ``}``, which would make the tag empty: a
plain room name is ``[A-Za-z0-9_.-]``, a direct room starts ``dm:``). A room's whole state
and its stream live on one master, and each of its scripts runs there atomically, as on a
single Redis.

*Publishing.* The scripts publish with ``SPUBLISH`` instead of ``PUBLISH``
(:func:`cluster_script`): a sharded message reaches the subscribers of the owning shard
only (its master and replicas). The channel is one of the script's arguments, not a
declared key: Redis checks the slot of everything a script touches when it touches it
(checked on 7.0: ``SPUBLISH`` inside a script to a channel of another slot fails with
"non local key"; to one in the script's slot it succeeds), and the script's keys, all in
the room's slot, already route the call to the right node. A batch of messages for many
rooms (:mod:`.publishing`), presence upkeep over many rooms, claim refreshes and report
lists are grouped by hash slot (:func:`by_slot`), one script call per group; a group that
fails (its master is down) refuses only its own messages.

*Delivery.* One sharded subscriber per master (:mod:`..subscriber`, ``sharded``): the
channel of a room with local members is ``SSUBSCRIBE``\\ d on the master that owns its slot,
through that node's own :class:`~..channels.RoomChannels`, and a join waits for that
confirmation before its snapshot, exactly as on one Redis (the argument of :mod:`.joining`
is per room: what matters is that the subscription that delivers a room's messages is
confirmed before the snapshot is read, on the node that runs the room's scripts). coredis's
own sharded pub/sub is not used: it drops the ``sunsubscribe`` a node sends when a slot
leaves it, so a moved room would go silent.

*The control channel* (disconnect, notify) is ``SPUBLISH``\\ ed on one fixed channel,
``<namespace>{control}``, and every worker ``SSUBSCRIBE``\\ s it on the master that owns that
slot: ``SPUBLISH`` answers how many subscribers that shard has, which is every worker, so
the requester still knows how many reports to wait for. (A classic ``PUBLISH`` would reach
every node's subscribers, but it answers only with the receiving node's count.)

*Connection claims* are one key per user, ``roomcast:user:<user>:connections``: each claim
script touches one key, so it runs on the key's master as it is; refreshes are grouped by
slot. Presence upkeep is per room (per slot group), and a room's presence, names and users
are in its slot, so caps, names and people are counted as on one Redis.

*Idle rooms.* On one Redis, every script that empties a room settles it against the
global idle set and byte budget (``roomcast:idle``, ``roomcast:idle-bytes``) and evicts
the least recently emptied rooms, deleting keys of rooms it was not given: both are
cross-slot. In a cluster the scripts only mark a room idle in its own slot (or forget it
at once if it has no history), and one worker at a time sweeps the marks every few
seconds, forgetting the oldest rooms beyond the budgets: :mod:`.idle`, where the design
is argued.

*Slot moves and failover.* A node that stops owning a slot (resharding: ``CLUSTER
SETSLOT ... NODE``) sends each of its sharded subscribers ``sunsubscribe`` for that slot's
channels; a master that fails closes its connections, and its replica takes over its
slots. Either way the node's subscriber loses rooms it still wants: the worker re-reads
the slot map, moves each of those rooms to the subscriber of the node that owns it now
(wanted there, confirmed there), then brings each up to its counter from history
(:meth:`~.delivery.Delivery._catch_up`): what was published meanwhile is delivered
exactly once and in order, and what the cluster lost (writes a failed master had not
replicated) is announced with ``history_gap`` or a new epoch, as after a lost Redis (seqs
the worker fanned out that the new master never got end the room's run, :func:`rewound`,
so that they are never given to other messages). The coredis client is told to re-read
its own slot map as soon as the masters change (:func:`relearn_slots`).
Rooms on the other masters are not touched. Joins that arrive meanwhile wait for the new
confirmation or are refused 1011 "try again shortly".
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import coredis
from coredis._utils import hash_slot
from coredis.connection import TCPLocation

from ..channels import RoomChannels
from . import scripts

__all__ = [
    "CLUSTER_SCHEME",
    "SLOTS",
    "Shard",
    "by_slot",
    "cluster_script",
    "relearn_slots",
    "rewound",
    "seed_nodes",
    "slot_masters",
    "slot_of",
]

#: hash slots in a Redis Cluster
SLOTS: Final = 16384
#: the URL scheme that selects cluster mode; its netloc is a comma-separated list of seeds
CLUSTER_SCHEME: Final = "redis+cluster://"

T = TypeVar("T")


@dataclass(eq=False)
class Shard:
    """A cluster master's sharded subscriber (:mod:`.delivery`): the room channels it
    should hold, and whether it holds them now."""

    location: TCPLocation
    channels: RoomChannels = field(default_factory=RoomChannels)
    subscribed: bool = False


def slot_masters(
    ranges: Mapping[tuple[int, int], Sequence[Mapping[str, Any]]],
) -> list[TCPLocation] | None:
    """The master of every hash slot, from ``CLUSTER SLOTS`` as coredis returns it;
    ``None`` if some slot has none (the cluster is not whole)."""
    slots: list[TCPLocation | None] = [None] * SLOTS
    for (first, last), nodes in ranges.items():
        location = TCPLocation(nodes[0]["host"], int(nodes[0]["port"]))
        slots[first : last + 1] = [location] * (last - first + 1)
    served = [location for location in slots if location is not None]
    return served if len(served) == SLOTS else None


def relearn_slots(client: object) -> Awaitable[None]:
    """Have a cluster client read the slot map again, now.

    The worker's subscribers notice a failover first (their master's connection ends, and
    they poll the slot map until another master serves its slots). coredis, left to
    itself, re-reads its map only after 15 failed calls, and then retries with a backoff
    that grows to 30 s: with retries off (``_client`` in :mod:`roomcast.brokers.redis`),
    every publish to the failed master's rooms was refused ``unavailable`` for a minute
    after its replica had taken over. Asked here as soon as the map shows another set of
    masters, coredis follows within the subscriber's own backoff (at most 2 s)."""
    assert isinstance(client, coredis.RedisCluster)
    return client.connection_pool.cluster_layout.initialize()


def rewound(seq: int, last: str, counter: int, history: Sequence[tuple[int, str]]) -> bool:
    """Whether Redis lost seqs of a run that a worker fanned out up to ``seq`` (``last``
    the event it fanned out as ``seq``, if known): the room's counter is behind it, or
    history holds another event under ``seq`` (reused since). A master that fails over to
    a replica loses what it had not yet copied there, though its subscribers had it; its
    next messages would take those seqs again, and members who had the lost ones would
    drop the new ones as already seen. (Possible on one Redis too, restarted from an
    append-only file that missed the last second.)"""
    return counter < seq or (last != "" and dict(history).get(seq, last) != last)


def seed_nodes(url: str) -> list[TCPLocation]:
    """The seed nodes of a ``redis+cluster://host:port[,host:port...]`` URL.

    :raises ValueError: if a seed is not ``host:port``
    """
    netloc = url.removeprefix(CLUSTER_SCHEME).partition("/")[0].rpartition("@")[2]
    seeds = []
    for seed in netloc.split(","):
        host, _, port = seed.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"a cluster seed must be host:port, not {seed!r}")
        seeds.append(TCPLocation(host.strip("[]"), int(port)))
    return seeds


def slot_of(key: str) -> int:
    """The hash slot of a key or channel (its hash tag's, if it has one)."""
    return hash_slot(key.encode())


def by_slot(items: Iterable[T], key: Callable[[T], str]) -> list[list[T]]:
    """``items`` grouped by the hash slot of ``key(item)``, each group in the items' order
    and the groups in the order of their first item."""
    groups: dict[int, list[T]] = {}
    for item in items:
        groups.setdefault(slot_of(key(item)), []).append(item)
    return list(groups.values())


def cluster_script(script: str) -> str:
    """A broker script as cluster mode runs it: its room events ``SPUBLISH``\\ ed (on the
    room's own shard), and idle rooms settled without the global idle keys (see *Idle
    rooms*): ``forget``, ``settle`` and ``evict`` redefined after the helpers (a later ``local
    function`` of the same name is the one the script's body calls), and the publish
    script's check of the idle set answered "not there"."""
    if script.startswith(scripts.HELPERS):
        body = script[len(scripts.HELPERS) :].replace("redis.call('ZSCORE', IDLE, room)", "false")
        script = scripts.HELPERS + _SETTLE_LOCALLY + body
    return script.replace("redis.call('PUBLISH', ", "redis.call('SPUBLISH', ")


#: settle against the budgets as :mod:`.idle` sweeps them: a room left without presence and
#: without history is forgotten at once (its idle mark with it), one with history is
#: marked idle since now (Redis's clock, ms), and one with presence is not idle
_SETTLE_LOCALLY: Final = """
local function forget(room)
  local keys = {}
  for i, suffix in ipairs({'seq', 'epoch', 'history', 'history-bytes', 'presence', 'users',
                           'names', 'idle'}) do
    keys[i] = key_of(room, suffix)
  end
  redis.call('DEL', unpack(keys))
end
local function evict(rooms, budget) end
local function settle(room, rooms, budget)
  local idle = key_of(room, 'idle')
  if redis.call('EXISTS', key_of(room, 'presence')) == 1 then
    redis.call('DEL', idle)
    return
  end
  if redis.call('EXISTS', idle) == 1 then return end
  if tonumber(rooms) <= 0 or redis.call('LLEN', key_of(room, 'history')) == 0 then
    forget(room)
    return
  end
  local time = redis.call('TIME')
  redis.call('SET', idle, tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000))
end
"""
