"""The Redis broker: one room, one order, one ``seq`` across workers and machines.

Design
------
*Order and seq.* Every message goes through a Lua script (:mod:`.redis_scripts`) that
advances the room's counter, appends ``"<seq>|<event>"`` to the room's capped history list
and publishes it on the room's channel. Redis runs scripts one at a time, so counter,
history and publish order are one total order per room, and every subscriber receives a
room's events in it. The seq is spliced into the pre-serialised event, so each message
is still encoded once.

*Publishing.* A connection's receive loop never waits for Redis: :meth:`publish` puts the
message on this worker's bounded queue and goes back to reading its client. One publisher
task takes everything queued (up to :data:`MAX_BATCH`) and sends it as a single script
call, one batch in flight at a time; meanwhile the next batch gathers. Batches run in
queue order and a batch keeps each room's messages in queue order, so a sender's messages
get increasing seqs in the order it sent them, and its ``ack``\\ s (or ``unavailable``
errors, when the call fails) come back in that order too. A slow Redis fills the queue
and then blocks the receive loops: backpressure reaches the clients' sockets, nothing
grows. Each member may hold only :data:`MEMBER_QUEUE` places in the queue, so a flooding
connection waits for its own messages and not the others for it. Each batch is one
``PUBLISH`` per room, so subscribers receive it as one burst. (The server API's
:meth:`RedisBroker.post` makes a call of its own: its caller waits for the seq.)

*Delivery.* Each worker holds one subscription connection (:mod:`.subscriber`) with its
control channel and the channel of every room it has local members in, and no other: a
worker hears only the rooms it serves (:mod:`.channels`: subscribed when a room's first
local member joins, let go when the last leaves, many at once in one command). The
subscriber returns everything one socket read brought as a burst; the burst is fanned out
in one synchronous step, so a batching sender wakes once for all of it. For each room
with local members, the worker keeps a *stream position*: the run (``epoch``) and the
last ``seq`` it has fanned out. One task, the subscriber, is the only
writer of stream positions, and it advances a position only by fanning out exactly the
next seq, or by a *jump* that tells the members concerned ``history_gap``.

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

*Joining.* The member is attached locally (it receives every fan-out from then on) and its
room's subscription is confirmed (every message published from then on reaches this
worker) before its join script runs; the script registers presence and returns a snapshot (run, seq,
members, history) atomically. Events fanned out while the snapshot travelled sit in the
member's outbox: the greeting keeps the messages after the snapshot's seq and drops the
rest, and from then on the member skips any seq up to it (``Member.skip_through``), which
can still arrive late from pub/sub. If the room's stream jumped while the join was in
flight, which messages reached the outbox can no longer be told apart, so the join is
refused with 1011 ("try again shortly"), as when Redis is unreachable.

*Why no seq is delivered twice or out of order.* Every sequenced fan-out in a worker goes
through :meth:`RedisBroker._advance`, in the subscriber task, which fans out seq ``s`` only
when the room's position is exactly ``s - 1`` and sets it to ``s``, with no await between
the check and the fan-out; its callers hand it only events of the position's own run (an
event of another run first sends the subscriber to history, which settles the current
run). A position only moves forward within a run: by ``_advance``, or by a jump past what
history no longer holds, announced with ``history_gap``. So for a member present
throughout, the seqs it receives are successive values of one counter, each once,
strictly increasing (by one, except across an announced jump). Interleavings cannot break
this: pub/sub events and history reads are consumed by that one task, one at a time; an
await (reading history) happens before a check, never between a check and its fan-out; a
duplicate (an entry read from history and then arriving through pub/sub, or a notice from
behind the position) fails the check and is dropped. Joiners are covered by the
snapshot argument above: the member is attached before the snapshot is taken, so every
seq after the snapshot is fanned out after the attach, exactly once, either into the outbox
before the greeting (kept) or after it (sent); the seqs up to the snapshot are dropped or
skipped. A run change (Redis lost the room's data: ``seq`` restarts and ``epoch`` changes)
is a jump: members from the earlier run get ``history_gap`` with the new epoch and start
over at the new run's first seq; events of retired runs are dropped.

*Presence.* A sorted set per room maps each connection's entry, ``<member id>:<JSON [user,
name, skeleton, skeleton]>`` (see *Names*), to an expiry time. Every :data:`TICK` each
worker runs one upkeep script over its rooms: it refreshes its members' entries every
:data:`PRESENCE_REFRESH` seconds and removes every expired entry, announcing those as
leaves. So when a worker or a whole server dies, its members leave the room for everyone
else, with leave notices and the new count, at most :data:`PRESENCE_TTL` + :data:`TICK`
seconds after its last refresh. A worker back from a pause longer than that adds its
members back (if their names are still free: see *Names*) and announces them as joins.
The scripts announce every join and leave at once; each worker's hub holds the leaves it
hears for ``ROOMCAST_PRESENCE_GRACE`` (:class:`~roomcast.presence.HeldLeaves`), so a
member back within it, on any worker or server, is announced neither leaving nor joining.

*A user is one member* (SPEC §8.1), however many connections it has in the room, on
whichever workers and servers. Beside the sorted set, a hash per room counts each user's
entries (the field ``""`` counts the anonymous ones). Every script that adds an entry
(join, a paused worker's members coming back) or removes one (leave, expiry, which any
script touching the room's presence reaps first) updates the hash in the same atomic step
and announces only a person's change: a join when a user's count goes from 0 to 1, a leave
when it comes back to 0 (anonymous entries are each a person). The room's ``count`` is the
hash's users plus its anonymous entries, so it counts people the way each hub does, in O(1).
As the hash follows the entries, expiry still works per connection: a dead server's
connections expire within the same bound, and a user leaves only with the last of them;
a user with a tab on a live server stays. Names in ``welcome`` and notices are read from the
entries and each user is listed once. Capacity (``ROOMCAST_ROOM_CAPACITY``) still counts
connections, as each hub does.

*Names* (:mod:`roomcast.names`). A name that looks like another member's is refused in
the whole room, not only on one worker. Beside the presence set, a hash per room maps each
name skeleton to ``<count>|<owner>``: the owner is the verified user (``u<user>``, so a
user's tabs on any worker share its name) or the anonymous connection (``m<member id>``),
the count how many entries hold it. The entry carries its name's two skeletons, so every
script that adds or removes entries holds or lets go of their names in the same atomic
step, expiry included: the join refuses (:data:`~.redis_scripts.TAKEN`, close 4400) if
another owner holds either skeleton, and a dead server's names come back with its presence,
within the same bound. The hub's own check runs first (it costs nothing and settles races
between one worker's members); its owners are the same, so it refuses nothing Redis would
accept while that worker's members are present. A rename (a refreshed token's ``name``)
is one script: it holds the new name, lets the old one go and rewrites the entry with the
same expiry, or changes nothing (``bad_token``). A worker back from a pause longer than the
presence TTL adds its members back only if their names are still free: one whose name
someone took meanwhile is ended with 4400, as a joiner with that name would be refused;
whoever holds a name keeps it. A name is held as long as its entry lives: a crashed
server's, or one whose leave could not reach Redis, for up to :data:`PRESENCE_TTL` +
:data:`TICK` seconds; a rename whose answer was lost leaves an unrefreshed entry that
lapses as well (and is removed with the member's own if it leaves first). Entries written
before names were claimed hold none.

*Connections per user* (``ROOMCAST_MAX_CONNECTIONS_PER_USER``). Each connection of a
verified user claims a place in the user's sorted set (claim id -> expiry) with one script
that first drops lapsed claims and then checks the cap (:data:`~.redis_scripts.CLAIM`).
Claims are refreshed with presence and lapse as presence entries do, so the slots of a
dead server's connections come back within the same bound; a closing connection removes
its claim at once.

*Disconnect* (the server API). A request on ``<prefix>control`` reaches every subscribed
worker; each ends the user's local memberships (:meth:`~roomcast.hub.Hub.end_user`) and
reports how many on the request's own list, all its queued reports in one script call
(:data:`~.redis_scripts.REPORT`). The requester knows from ``PUBLISH`` how many workers
heard it and waits (``BLPOP``) up to :data:`DISCONNECT_WAIT` for their reports.

*Epoch.* Set once per room (``SET NX``) beside its counter; it changes when the room's
data is gone, exactly when ``seq`` restarts: Redis lost it (a restart without persistence),
or the room was forgotten while idle (below).

*Idle rooms* (SPEC §7: what an anonymous client can make the server retain has a byte
budget). A room without presence entries keeps its keys only while it is among the
``ROOMCAST_IDLE_ROOMS`` most recently emptied and within ``ROOMCAST_IDLE_HISTORY_BYTES`` of
history (UTF-8, its history-bytes key) together, as the in-memory hub keeps its rooms.
Every script that changes a room's presence (join, leave, rename, presence read, upkeep,
each after reaping expired entries) settles it in the same atomic step: a room with
entries is taken off the global sorted set of idle rooms (``roomcast:idle``: room ->
when it became idle, ms, by Redis's clock, kept strictly increasing), and its history
bytes off their global total (``roomcast:idle-bytes``); a room left without entries is
added to both, or, having no history to keep, has its keys deleted at once. The publish
script counts an idle room's growth (the server API posts into rooms without members) and
makes a room it writes into without presence idle. Whenever the set or the total grows,
the least recently emptied rooms are forgotten (all their keys deleted, their bytes
subtracted) until both budgets hold. The budgets are each call's arguments, from its
server's settings. A forgotten room joined again starts a new run (new epoch, ``seq`` from
1): a client resuming into it gets ``history_gap`` with the new epoch, as after Redis lost
the data. No worker holds a stream position for an idle room (it has no local members:
their presence entries would make it not idle), so nothing here needs telling: a worker
whose last member left dropped the room (and its position) with it, and a later join
starts from its snapshot's run. The one overlap is a join on a worker whose previous
member in the room is leaving at that moment, its leave forgetting the room (no history)
before the join's script recreates it: the worker's old position belongs to the run that
ended, so the join is refused 1011 "try again shortly" like any join that races a new run,
and the retry starts cleanly. A room whose members all belonged to a crashed server keeps
its keys until a script next touches it (a join, the server API's presence or room list,
which reap expired entries): only then does it become idle and count against the budgets.
Paused workers' members that come back (upkeep) take the room off the idle set again; if
it was forgotten meanwhile, they start over in the new run with ``history_gap``.

*Cluster.* A room's keys share the hash tag ``{room}``. Publishing and upkeep take several
rooms per script call, which a single Redis (or a replicated one) accepts; Redis Cluster
would need those calls grouped per hash slot and sharded pub/sub (``SSUBSCRIBE``), and a
different scheme for idle rooms: evicting one deletes keys of rooms the script was not
given (its keys are built in Lua from the room's name), and the two idle keys are global.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import sys
import time
import weakref
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

import anyio
import coredis
import orjson
from anyio.abc import TaskStatus
from coredis.exceptions import RedisError
from coredis.retry import NoRetryPolicy

from .. import protocol
from ..hub import Client, Hub, Member, NameTaken, Room, RoomFull, replay
from ..names import skeleton
from ..presence import PresenceEvent
from ..protocol import MAX_WELCOME_MEMBERS, ChatMessage, CloseCode, ErrorCode
from ..settings import Settings
from ..stored import StoredMessage
from . import (
    DISCONNECTED,
    UNAVAILABLE_NOTICE,
    BrokerUnavailable,
    Claim,
    History,
    Person,
    redis_scripts,
)
from .channels import RoomChannels
from .subscriber import Subscription, SubscriptionLost, open_subscription

__all__ = ["PRESENCE_TTL", "Backlog", "RedisBroker", "open_redis_broker"]

log = logging.getLogger("roomcast.redis")

#: seconds a member's presence entry lives unless its worker refreshes it
PRESENCE_TTL: Final = 10.0
#: seconds between refreshes of a worker's presence entries
PRESENCE_REFRESH: Final = 2.0
#: seconds between presence upkeep runs (expired entries are announced as leaves)
TICK: Final = 1.0
#: longest a request to Redis may take before the caller is told it is unavailable
REQUEST_TIMEOUT: Final = 2.0
#: messages a worker queues for Redis before receive loops wait (backpressure)
QUEUE_SIZE: Final = 2048
#: messages one member may have queued: beyond that its own receive loop waits, so one
#: flooding connection cannot fill the worker's queue, and its acks come at most this
#: many at once
MEMBER_QUEUE: Final = 64
#: most messages in one publishing script call
MAX_BATCH: Final = 1024
#: rooms per presence upkeep call
UPKEEP_ROOMS: Final = 100
#: connection claims per refresh call
REFRESH_CLAIMS: Final = 500
#: subscriber reconnection backoff, seconds
RETRY_FIRST, RETRY_MAX = 0.1, 2.0
#: seconds the server API's disconnect waits for the workers' reports of what they closed
DISCONNECT_WAIT: Final = 1.0
#: reports of closed connections a worker queues for Redis (beyond: not reported)
REPORT_QUEUE: Final = 256
#: milliseconds a disconnect's report list lives (its requester has stopped waiting)
REPORT_TTL_MS: Final = 30_000


class _Keys(NamedTuple):
    """A room's keys (one hash slot: ``{room}``)."""

    seq: str
    epoch: str
    history: str
    #: sorted set: presence entry (one per connection) -> expiry (ms)
    presence: str
    #: hash: user -> its entries in ``presence`` ("" -> the anonymous ones)
    users: str
    #: hash: name skeleton -> ``<entries holding it>|<owner>`` (``u<user>`` or ``m<member>``)
    names: str


def _keys(room: str) -> _Keys:
    base = f"roomcast:{{{room}}}"
    suffixes = ("seq", "epoch", "history", "presence", "users", "names")
    return _Keys(*(f"{base}:{suffix}" for suffix in suffixes))


def _user_key(user: str) -> str:
    """A verified user's connections across servers (sorted set: claim id -> expiry, ms).
    Room keys start ``roomcast:{``, so no user id can name one of them."""
    return f"roomcast:user:{user}:connections"


def _presence_keys(room: str) -> list[str]:
    """The keys of the scripts that change a room's presence: seq, epoch, presence, users,
    names."""
    keys = _keys(room)
    return [keys.seq, keys.epoch, keys.presence, keys.users, keys.names]


def _publish_keys(room: str) -> list[str]:
    """A room's keys for :data:`~.redis_scripts.PUBLISH`: seq, epoch, history, and the UTF-8
    bytes its history holds."""
    keys = _keys(room)
    return [keys.seq, keys.epoch, keys.history, f"{keys.history}-bytes"]


def _split_entry(entry: str) -> tuple[int, str]:
    seq, _, event = entry.partition("|")
    return int(seq), event


def _presence_entry(member: Member, name: str | None = None) -> str:
    """A member's entry in its room's presence set (as named ``name``, if given):
    ``<member id>:<JSON [user, name, skeleton, skeleton]>``, the skeletons of
    :func:`~roomcast.names.skeleton` for the scripts' name claims (none without a name).
    Ids have no ``:``, JSON escapes newlines, so any user id and name fit."""
    name = member.name if name is None else name
    who: list[str | None] = [member.user, name]
    if name is not None:
        who.extend(skeleton(name))
    return f"{member.id}:{orjson.dumps(who).decode()}"


def _parse_entry(entry: str) -> tuple[str, Person]:
    """The member id and the person of a presence entry (one written before entries
    carried the user, ``<id>:<name>``, is an anonymous member of that name; one from
    before they carried skeletons, ``[user, name]``, reads as any other)."""
    member_id, _, rest = entry.partition(":")
    try:
        who = orjson.loads(rest)
    except orjson.JSONDecodeError:
        who = None
    if not isinstance(who, list) or len(who) < 2:
        return member_id, Person(None, rest or None)
    return member_id, Person(who[0], who[1])


def _people(entries: Sequence[str]) -> list[Person]:
    """The people among presence entries: each verified user once, in the entries' order."""
    people: list[Person] = []
    users: set[str] = set()
    for entry in entries:
        person = _parse_entry(entry)[1]
        if person.user is not None:
            if person.user in users:
                continue
            users.add(person.user)
        people.append(person)
    return people


@dataclass(eq=False)
class _Stream:
    """How far this worker has fanned out one room's stream (written by the subscriber
    task only: :meth:`RedisBroker._advance`, or a jump in :meth:`RedisBroker._catch_up`)."""

    epoch: str
    seq: int
    #: incremented by every jump; a join that sees it change while in flight is refused
    jumps: int = 0
    #: runs that ended (Redis lost the room's data): their late events are dropped
    retired: set[str] = field(default_factory=set)


class Backlog(NamedTuple):
    """See :attr:`RedisBroker.backlog`."""

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


class RedisBroker:
    name = "redis"

    def __init__(self, settings: Settings, hub: Hub, client: coredis.Redis[str]) -> None:
        self.settings = settings
        self.hub = hub
        self.client = client
        pool = client.connection_pool
        #: every channel and report list this broker uses starts with it
        self.namespace = f"roomcast:{pool.connection_kwargs.get('db') or 0}:"
        self.channel_prefix = self.namespace + "room:"
        #: requests for every worker (the server API's disconnect)
        self.control_channel = self.namespace + "control"
        self._join = client.register_script(redis_scripts.JOIN)
        self._leave = client.register_script(redis_scripts.LEAVE)
        self._rename = client.register_script(redis_scripts.RENAME)
        self._publish = client.register_script(redis_scripts.PUBLISH)
        self._read = client.register_script(redis_scripts.READ)
        self._upkeep_script = client.register_script(redis_scripts.UPKEEP)
        self._presence_now = client.register_script(redis_scripts.PRESENCE)
        self._report = client.register_script(redis_scripts.REPORT)
        self._claim = client.register_script(redis_scripts.CLAIM)
        self._refresh_claims_script = client.register_script(redis_scripts.REFRESH_CLAIMS)
        #: this worker's connection claims (id -> user), refreshed with presence
        self._claims: dict[str, str] = {}
        self._healthy = True
        self._subscribed = False
        #: the room channels this worker's subscriber holds
        self._channels = RoomChannels()
        self._streams: weakref.WeakKeyDictionary[Room, _Stream] = weakref.WeakKeyDictionary()
        #: greeted members and the run their snapshot belongs to
        self._runs: weakref.WeakKeyDictionary[Member, str] = weakref.WeakKeyDictionary()
        #: each member's presence entry, as written when it joined or was last renamed
        self._entries: weakref.WeakKeyDictionary[Member, str] = weakref.WeakKeyDictionary()
        #: an entry Redis may hold for a member beside its own: a rename's, while it is in
        #: flight or if its answer was lost (removed with the member's own when it leaves;
        #: else it lapses unrefreshed)
        self._renamed: weakref.WeakKeyDictionary[Member, str] = weakref.WeakKeyDictionary()
        #: members whose rename is in flight (not added back meanwhile: which entry is theirs
        #: is not settled)
        self._renaming: weakref.WeakSet[Member] = weakref.WeakSet()
        #: members whose presence entry had expired at the last refresh (a long pause)
        self._absent: weakref.WeakSet[Member] = weakref.WeakSet()
        self._slots: weakref.WeakKeyDictionary[Member, anyio.Semaphore] = (
            weakref.WeakKeyDictionary()
        )
        self._outgoing_send, self._outgoing = anyio.create_memory_object_stream[_Outgoing](
            QUEUE_SIZE
        )
        self._leaving_send, self._leaving = anyio.create_memory_object_stream[Member](4096)
        #: (report list, connections closed) for :meth:`disconnect` requests from any worker
        self._reports_send, self._reports = anyio.create_memory_object_stream[tuple[str, int]](
            REPORT_QUEUE
        )
        #: local members whose own join has not come back through pub/sub yet, by id
        self._joining: dict[
            tuple[str, str], Member
        ] = {}  # (room, member id): a v2 connection is in several
        hub.announce = self._announce
        hub.presence_source = self._presence_state
        hub.room_emptied = self._let_go

    @property
    def healthy(self) -> bool:
        """Redis answers requests and this worker is subscribed."""
        return self._healthy and self._subscribed

    @property
    def backlog(self) -> Backlog:
        """Messages waiting for Redis, and receive loops waiting for room (in the queue or
        in their member's share of it)."""
        queue = self._outgoing_send.statistics()
        waiting = sum(slots.statistics().tasks_waiting for slots in self._slots.values())
        return Backlog(queue.current_buffer_used, queue.tasks_waiting_send + waiting)

    # -- the Broker interface ---------------------------------------------------------------

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
        member = self.hub.attach(room, name, user, client=client)
        member.skip_through, member.backlog = sys.maxsize, []  # until the snapshot is in
        self._joining[member.room.name, member.id] = member
        subscribed = self._channels.want(self.channel_prefix + room)
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
                    self.channel_prefix + room,
                    *self._idle_args(),
                ],
            )
        except BaseException:
            self.hub.detach(member)
            self._joining.pop((member.room.name, member.id), None)
            raise
        if snapshot is None or snapshot == redis_scripts.TAKEN:
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
            raise BrokerUnavailable("the room's stream was resynchronised during the join")
        self._greet(member, snapshot, since, epoch)
        return member

    async def leave(self, member: Member) -> None:
        self._joining.pop((member.room.name, member.id), None)
        if self.hub.detach(member):
            await self._remove_presence(member)

    async def rename(self, member: Member, name: str) -> None:
        """Give a member a new name room-wide: this worker's hub holds it first (free, and
        it settles races between this worker's members), then one script holds it in Redis,
        lets the old one go and rewrites the member's presence entry (same expiry).

        An entry that is no longer there (it expired while this worker was paused) is not
        written back here: the next upkeep adds the renamed one back, claiming its name.

        :raises NameTaken: if another member's name looks like ``name`` (nothing changes)
        :raises BrokerUnavailable: if Redis cannot be reached (nothing changes here; if the
            script ran anyway, the entry it wrote lapses and the old one comes back)
        """
        if name == member.name or not member.joined:
            return
        self.hub.claim_name(member, name)
        renamed = self._renamed[member] = _presence_entry(member, name)
        self._renaming.add(member)
        room = member.room.name
        try:
            outcome = await self._call(
                self._rename,
                _presence_keys(room),
                [
                    self._entry(member),
                    renamed,
                    _now_ms(),
                    self.channel_prefix + room,
                    secrets.token_urlsafe(6),
                    *self._idle_args(),
                ],
            )
        except BaseException:
            self.hub.release_name(member, name)
            raise
        finally:
            self._renaming.discard(member)
        del self._renamed[member]
        if outcome == 0 or not member.joined:
            self.hub.release_name(member, name)
            if outcome == 0:
                raise NameTaken(name)
            return
        self.hub.adopt_name(member, name)
        self._entries[member] = renamed
        if outcome == -1:
            self._absent.add(member)

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

    # -- joining ----------------------------------------------------------------------------

    @staticmethod
    async def _subscribed_to(room_channel: anyio.Event) -> None:
        """Wait for a room's subscription to be confirmed.

        :raises BrokerUnavailable: if it is not within :data:`REQUEST_TIMEOUT` (the
            subscriber is reconnecting)
        """
        with anyio.move_on_after(REQUEST_TIMEOUT):
            await room_channel.wait()
            return
        raise BrokerUnavailable("not subscribed to the room's channel")

    def _let_go(self, room: Room) -> None:
        """The hub's ``room_emptied``: the room's last local member has left."""
        self._channels.release(self.channel_prefix + room.name)

    def _entry(self, member: Member) -> str:
        entry = self._entries.get(member)
        if entry is None:
            entry = self._entries[member] = _presence_entry(member)
        return entry

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
        names = [person.name for person in _people(present) if person.name]
        welcome = protocol.encode_welcome(
            room=member.room.name,
            epoch=run,
            seq=seq,
            members=names[:MAX_WELCOME_MEMBERS],
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

    # -- delivery (the subscriber task) -----------------------------------------------------

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
                        reply_timeout=REQUEST_TIMEOUT,
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

        :raises SubscriptionLost: if that takes longer than :data:`REQUEST_TIMEOUT` * 5
        """
        early: list[tuple[str, str | None]] = []
        with anyio.move_on_after(REQUEST_TIMEOUT * 5):
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
                # it comes no later than that member's snapshot (see the module docstring).
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

    async def _presence_state(self, room: Room) -> tuple[int, list[str]] | None:
        """The room's count and names across workers, for a presence notice (the hub's
        ``presence_source``); ``None`` while Redis is out of reach."""
        try:
            count, entries = await self._presence_of(room.name, 2 * MAX_WELCOME_MEMBERS)
        except BrokerUnavailable:
            return None
        names = [person.name for person in _people(entries) if person.name]
        return count, names[:MAX_WELCOME_MEMBERS]

    async def _presence_of(self, room: str, entries: int) -> tuple[int, list[str]]:
        """The room's count (people) and its first ``entries`` presence entries (-1: all),
        after removing (and announcing) expired ones.

        :raises BrokerUnavailable: if Redis cannot be reached
        """
        args = [_now_ms(), entries, self.channel_prefix + room, secrets.token_urlsafe(6)]
        args += self._idle_args()
        count, live = await self._call(self._presence_now, _presence_keys(room), args)
        return int(count), live

    # -- publishing (the publisher task) ----------------------------------------------------

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
        """One script call for the batch; then every sender's acks, in queue order."""
        rooms: dict[str, list[_Outgoing]] = {}
        for outgoing in batch:
            rooms.setdefault(outgoing.member.room.name, []).append(outgoing)
        keys: list[str] = []
        args = self._publish_args()
        for room, messages in rooms.items():
            keys.extend(_publish_keys(room))
            args += [self.channel_prefix + room, len(messages)]
            for outgoing in messages:
                args += [outgoing.head, outgoing.tail]
        try:
            firsts = await self._call(self._publish, keys, args)
        except BrokerUnavailable:
            for outgoing in batch:
                outgoing.slots.release()
                self._refuse(outgoing)
            return
        self.hub.stats.messages_in += len(batch)
        for (room, messages), (first, epoch) in zip(rooms.items(), firsts, strict=True):
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
        """:data:`~.redis_scripts.PUBLISH`'s leading arguments: the history bounds
        (``ROOMCAST_HISTORY_SIZE``, ``ROOMCAST_HISTORY_BYTES``), a new room's epoch and the
        idle budgets."""
        size, budget = self.settings.history_size, self.settings.history_bytes
        return [size, secrets.token_urlsafe(6), budget, *self._idle_args()]

    def _idle_args(self) -> list[str | int]:
        """The idle budgets every script that changes presence or history enforces
        (``ROOMCAST_IDLE_ROOMS``, ``ROOMCAST_IDLE_HISTORY_BYTES``)."""
        return [self.settings.idle_rooms, self.settings.idle_history_bytes]

    def _refuse(self, outgoing: _Outgoing) -> None:
        if outgoing.member.joined:
            self.hub.stats.drops += 1
            member = outgoing.member
            room = {} if member.client.single_room else {"room": member.room.name}
            error = protocol.encode_error(
                ErrorCode.UNAVAILABLE, UNAVAILABLE_NOTICE, id=outgoing.id, **room
            )
            self.hub.send_to(member, error)

    # -- presence ---------------------------------------------------------------------------

    def _announce(self, room: Room, event: PresenceEvent, member: Member) -> None:
        """The hub removed a member on its own (eviction): tell every worker, from a task."""
        try:
            self._leaving_send.send_nowait(member)
        except anyio.WouldBlock:
            self.hub.announce_locally(room, event, member)

    async def _remove_presence(self, member: Member) -> None:
        entries = [self._entry(member)]
        if (renamed := self._renamed.get(member)) is not None:
            entries.append(renamed)
        try:
            with anyio.move_on_after(REQUEST_TIMEOUT, shield=True):
                await self._leave(
                    keys=_presence_keys(member.room.name),
                    args=[
                        _now_ms(),
                        self.channel_prefix + member.room.name,
                        secrets.token_urlsafe(6),
                        *self._idle_args(),
                        *entries,
                    ],
                )
                return
        except RedisError:
            pass
        # Redis is out of reach: the entry expires on its own; tell this worker's members now.
        self.hub.announce_locally(member.room, "leave", member)

    async def _process_leaves(self) -> None:
        async for member in self._leaving:
            await self._remove_presence(member)

    async def _upkeep_forever(self) -> None:
        """Every :data:`TICK`: presence upkeep for the rooms with local members (which also
        checks that Redis answers), or a ping if there are none."""
        refresh_every = round(PRESENCE_REFRESH / TICK)
        for tick in range(1, 1 << 62):
            await anyio.sleep(TICK)
            rooms = [room for room in self.hub.rooms.values() if room.members]
            try:
                if not rooms:
                    await self._call_raw(self.client.ping())
                for start in range(0, len(rooms), UPKEEP_ROOMS):
                    chunk = rooms[start : start + UPKEEP_ROOMS]
                    await self._upkeep(chunk, refresh=tick % refresh_every == 0)
                if tick % refresh_every == 0:
                    await self._refresh_claims()
            except BrokerUnavailable:
                continue

    async def _upkeep(self, rooms: Sequence[Room], *, refresh: bool) -> None:
        now = _now_ms()
        keys: list[str] = []
        expires = now + int(PRESENCE_TTL * 1000)
        args: list[str | int] = [now, expires, secrets.token_urlsafe(6), *self._idle_args()]
        refreshed: list[list[Member]] = []
        added: list[list[Member]] = []
        for room in rooms:
            greeted = [m for m in room.members if m in self._runs]
            back = [m for m in greeted if m in self._absent and m not in self._renaming]
            still = [m for m in greeted if m not in self._absent] if refresh else []
            for member in back:
                self._absent.discard(member)
            keys += _presence_keys(room.name)
            args += [self.channel_prefix + room.name, len(still), len(back)]
            args += [self._entry(m) for m in still] + [self._entry(m) for m in back]
            refreshed.append(still)
            added.append(back)
        results = await self._call(self._upkeep_script, keys, args)
        for members, returning, (gone, refused) in zip(refreshed, added, results, strict=True):
            expired = set(gone)
            self._absent.update(m for m in members if m.joined and self._entry(m) in expired)
            self._end_refused(returning, set(refused))

    def _end_refused(self, returning: Sequence[Member], refused: set[str]) -> None:
        """Members back from a pause whose name someone else took while they were gone
        (their entries had expired, letting it go): they end as a joiner with that name
        would be refused, 4400. Whoever holds a name now keeps it."""
        for member in returning:
            if member.joined and self._entry(member) in refused:
                room = member.room.name
                reason = f"the name {member.name} is taken in #{room}"
                self.hub.end(member, CloseCode.BAD_REQUEST, reason)

    # -- connections per user (ROOMCAST_MAX_CONNECTIONS_PER_USER) ---------------------------

    async def claim_connection(self, user: str, limit: int) -> Claim | None:
        """One more connection of ``user``, counted in Redis across every worker and server.

        A claim lives :data:`PRESENCE_TTL` and is refreshed with presence, so the claims of
        a worker that died lapse as its members' presence does, and the user's slots come
        back within that bound.
        """
        claim = Claim(user, secrets.token_urlsafe(9))
        now = _now_ms()
        self._claims[claim.id] = user  # refreshed from now on, even if this is cancelled
        try:
            added = await self._call(
                self._claim,
                [_user_key(user)],
                [now, now + int(PRESENCE_TTL * 1000), limit, claim.id],
            )
        except BaseException:
            del self._claims[claim.id]  # (a claim made anyway lapses unrefreshed)
            raise
        if not added:
            del self._claims[claim.id]
            return None
        return claim

    async def release_connection(self, claim: Claim) -> None:
        if self._claims.pop(claim.id, None) is None:
            return
        with contextlib.suppress(BrokerUnavailable):
            await self._call_raw(self.client.zrem(_user_key(claim.user), [claim.id]))

    async def _refresh_claims(self) -> None:
        claims = list(self._claims.items())
        expiry = _now_ms() + int(PRESENCE_TTL * 1000)
        for start in range(0, len(claims), REFRESH_CLAIMS):
            chunk = claims[start : start + REFRESH_CLAIMS]
            keys = [_user_key(user) for _, user in chunk]
            await self._call(self._refresh_claims_script, keys, [expiry, *(id for id, _ in chunk)])

    # -- the server API (SPEC §8.2) ---------------------------------------------------------

    async def disconnect(self, user: str) -> int:
        """Ask every subscribed worker to close ``user``'s connections, and add up what
        they report within :data:`DISCONNECT_WAIT` (see the module docstring)."""
        return await self._ask_every_worker("D", user)

    async def notify(self, user: str, data: Any) -> int:
        """Ask every subscribed worker to queue a ``notice`` for ``user``'s v2
        connections, and add up what they report within :data:`DISCONNECT_WAIT`."""
        request = orjson.dumps([user, protocol.encode_notice(data)]).decode()
        return await self._ask_every_worker("N", request)

    async def typing(self, member: Member) -> None:
        """Tell the room's other v2 connections on every worker (not sequenced, not
        stored: a ``T`` event on the room's channel, relayed by each subscriber)."""
        encoded = protocol.encode_typing(room=member.room.name, user=member.user, name=member.name)
        channel = self.channel_prefix + member.room.name
        await self._call_raw(self.client.publish(channel, f"T|{member.client.id}|{encoded}"))

    async def _ask_every_worker(self, kind: str, request: str) -> int:
        """Publish ``kind|<report list>|request`` on the control channel and add up the
        counts the workers push to the report list within :data:`DISCONNECT_WAIT`."""
        report = f"{self.namespace}reports:{secrets.token_urlsafe(12)}"
        workers = await self._call_raw(
            self.client.publish(self.control_channel, f"{kind}|{report}|{request}")
        )
        closed = 0
        deadline = anyio.current_time() + DISCONNECT_WAIT
        for _ in range(int(workers)):
            remaining = deadline - anyio.current_time()
            if remaining <= 0:  # (BLPOP's timeout 0 would wait forever)
                break
            popped = await self._call_raw(self.client.blpop([report], remaining))
            if popped is None:
                break
            closed += int(popped[1])
        return closed

    def _on_control(self, data: str) -> None:
        """A request from the control channel: ``D|<report list>|<user>`` closes the
        user's local connections, ``N|<report list>|<JSON [user, notice]>`` queues the
        notice for its v2 connections; either queues the count for the report list."""
        kind, _, rest = data.partition("|")
        report, _, request = rest.partition("|")
        if kind == "D":
            closed = self.hub.end_user(request, CloseCode.UNAUTHORIZED, DISCONNECTED)
        elif kind == "N":
            user, notice = orjson.loads(request)
            closed = self.hub.notify(user, notice)
        else:
            return
        # (a full queue: the requester stops waiting without this report, and counts less)
        with contextlib.suppress(anyio.WouldBlock):
            self._reports_send.send_nowait((report, closed))

    async def _send_reports(self) -> None:
        """Push queued disconnect reports, everything queued in one script call."""
        async with self._reports:
            async for first in self._reports:
                batch = [first]
                while True:
                    try:
                        batch.append(self._reports.receive_nowait())
                    except anyio.WouldBlock:
                        break
                keys = [report for report, _ in batch]
                args = [REPORT_TTL_MS, *(closed for _, closed in batch)]
                try:
                    await self._call(self._report, keys, args)
                except BrokerUnavailable:
                    continue

    async def post(self, room: str, message: ChatMessage, sender: str | None) -> int:
        """The API's publish: one script call of its own (the caller waits for the seq)."""
        ts = _now_ms()
        head, tail = protocol.encode_message_parts(
            room=room, text=message.text, sender=sender, ts=ts, id=message.id, data=message.data
        )
        firsts = await self._call(
            self._publish,
            _publish_keys(room),
            [*self._publish_args(), self.channel_prefix + room, 1, head, tail],
        )
        self.hub.stats.messages_in += 1
        (first, epoch), *_ = firsts
        self._store(room, epoch, int(first), [_Unsequenced(message, sender, None, ts)])
        return int(first)

    async def history(self, room: str, since: int, limit: int) -> History:
        seq_key, epoch_key, history_key, *_ = _keys(room)
        seq, epoch = await self._call_raw(self.client.mget([seq_key, epoch_key]))
        entries = await self._call_raw(self.client.lrange(history_key, 0, -1))
        kept = [_split_entry(entry) for entry in entries]
        latest = int(seq or 0)
        first = kept[0][0] if kept else latest + 1
        events = [event for number, event in kept if number > since][:limit]
        return History(epoch, latest, first, events)

    async def presence(self, room: str) -> list[Person]:
        _, entries = await self._presence_of(room, -1)
        return _people(entries)

    async def rooms(self) -> dict[str, int]:
        found: dict[str, int] = {}
        async for key in self.client.scan_iter(match="roomcast:{*}:presence"):
            room = key.partition("{")[2].rpartition("}")[0]
            count, _ = await self._presence_of(room, 0)
            if count:
                found[room] = count
        return found

    # -- calls ------------------------------------------------------------------------------

    async def _call(self, script: Any, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return await self._call_raw(script(keys=list(keys), args=list(args)))

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
    """Connect, subscribe, and keep the broker's tasks (subscriber, publisher, presence
    upkeep, leave announcements) running in one task group until the block exits.

    :raises BrokerUnavailable: if Redis cannot be reached at startup
    """
    assert settings.redis_url is not None
    client: coredis.Redis[str] = coredis.Redis.from_url(
        settings.redis_url,
        decode_responses=True,
        connect_timeout=REQUEST_TIMEOUT,
        stream_timeout=REQUEST_TIMEOUT * 5,
        client_name=f"roomcast-{os.getpid()}",
        # A script that ran but whose reply was lost must not run again: a retried
        # publish would be a second copy of the message under a new seq.
        retry_policy=NoRetryPolicy(),
    )
    async with client:
        broker = RedisBroker(settings, hub, client)
        try:  # not _call_raw: this failure is the startup's one line, not a health change
            with anyio.fail_after(REQUEST_TIMEOUT):
                await client.ping()
        except (RedisError, TimeoutError, OSError) as exc:
            raise BrokerUnavailable(f"cannot reach Redis at {settings.redis_url}: {exc}") from None
        async with anyio.create_task_group() as tg:
            try:
                with anyio.fail_after(REQUEST_TIMEOUT * 5):
                    await tg.start(broker._subscribe_forever)
            except TimeoutError:
                raise BrokerUnavailable(
                    f"cannot subscribe to Redis at {settings.redis_url}"
                ) from None
            tg.start_soon(broker._publish_forever)
            tg.start_soon(broker._upkeep_forever)
            tg.start_soon(broker._process_leaves)
            tg.start_soon(broker._send_reports)
            yield broker
            tg.cancel_scope.cancel()
