"""Presence and names across workers: entries with an expiry, kept alive by each worker.

*Presence.* A sorted set per room maps each connection's entry, ``<member id>:<JSON [user,
name, skeleton, skeleton]>`` (see *Names*), to an expiry time. Every :data:`TICK` each
worker runs one upkeep script over its rooms: it refreshes its members' entries every
:data:`PRESENCE_REFRESH` seconds and removes every expired entry, announcing those as
leaves. So when a worker or a whole server dies, its members leave the room for everyone
else, with leave notices and the new count, at most :data:`~.keys.PRESENCE_TTL` +
:data:`TICK` seconds after its last refresh. A worker back from a pause longer than that
adds its members back (if their names are still free: see *Names*) and announces them as
joins. The scripts announce every join and leave at once; each worker's hub holds the
leaves it hears for ``ROOMCAST_PRESENCE_GRACE`` (:class:`~roomcast.presence.HeldLeaves`),
so a member back within it, on any worker or server, is announced neither leaving nor
joining.

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
step, expiry included: the join refuses (:data:`~.scripts.TAKEN`, close 4400) if
another owner holds either skeleton, and a dead server's names come back with its presence,
within the same bound. The hub's own check runs first (it costs nothing and settles races
between one worker's members); its owners are the same, so it refuses nothing Redis would
accept while that worker's members are present. A rename (a refreshed token's ``name``)
is one script: it holds the new name, lets the old one go and rewrites the entry with the
same expiry, or changes nothing (``bad_token``). A worker back from a pause longer than the
presence TTL adds its members back only if their names are still free: one whose name
someone took meanwhile is ended with 4400, as a joiner with that name would be refused;
whoever holds a name keeps it. A name is held as long as its entry lives: a crashed
server's, or one whose leave could not reach Redis, for up to :data:`~.keys.PRESENCE_TTL` +
:data:`TICK` seconds; a rename whose answer was lost leaves an unrefreshed entry that
lapses as well (and is removed with the member's own if it leaves first). Entries written
before names were claimed hold none.

Presence is built on delivery: upkeep keeps the entries of greeted members (those
:mod:`.delivery` knows the run of), and the joins and leaves the scripts publish reach the
hub through the subscriber.
"""

from __future__ import annotations

import secrets
import weakref
from collections.abc import Sequence
from typing import Final

import anyio
from coredis.exceptions import RedisError

from ...hub import Hub, Member, NameTaken, Room
from ...presence import PresenceEvent
from ...protocol import MAX_WELCOME_MEMBERS, CloseCode, Listed
from ...settings import Settings
from .. import BrokerUnavailable, Person
from . import calls, scripts
from .calls import RedisClient
from .cluster import by_slot
from .delivery import Delivery
from .keys import (
    PRESENCE_TTL,
    _keys,
    _listed,
    _now_ms,
    _people,
    _presence_entry,
    _presence_keys,
)

__all__ = ["PRESENCE_REFRESH", "TICK", "Presence"]

#: seconds between refreshes of a worker's presence entries
PRESENCE_REFRESH: Final = 2.0
#: seconds between presence upkeep runs (expired entries are announced as leaves)
TICK: Final = 1.0
#: rooms per presence upkeep call
UPKEEP_ROOMS: Final = 100


class Presence(Delivery):
    """Each member's presence entry: written with its join (:mod:`.joining`), renamed,
    refreshed and added back by upkeep, removed when it leaves; the room's presence as
    every worker sees it."""

    def __init__(self, settings: Settings, hub: Hub, client: RedisClient) -> None:
        super().__init__(settings, hub, client)
        self._leave = self._register(scripts.LEAVE)
        self._rename = self._register(scripts.RENAME)
        self._upkeep_script = self._register(scripts.UPKEEP)
        self._presence_now = self._register(scripts.PRESENCE)
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
        self._leaving_send, self._leaving = anyio.create_memory_object_stream[Member](4096)

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
                    self.room_channel(room),
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

    def _entry(self, member: Member) -> str:
        entry = self._entries.get(member)
        if entry is None:
            entry = self._entries[member] = _presence_entry(member)
        return entry

    async def _presence_state(self, room: Room) -> tuple[int, list[Listed]] | None:
        """The room's count and named people across workers, for a presence notice (the
        hub's ``presence_source``); ``None`` while Redis is out of reach."""
        try:
            count, entries = await self._presence_of(room.name, 2 * MAX_WELCOME_MEMBERS)
        except BrokerUnavailable:
            return None
        return count, _listed(entries)

    async def _presence_of(self, room: str, entries: int) -> tuple[int, list[str]]:
        """The room's count (people) and its first ``entries`` presence entries (-1: all),
        after removing (and announcing) expired ones.

        :raises BrokerUnavailable: if Redis cannot be reached
        """
        args = [_now_ms(), entries, self.room_channel(room), secrets.token_urlsafe(6)]
        args += self._idle_args()
        count, live = await self._call(self._presence_now, _presence_keys(room), args)
        return int(count), live

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
            with anyio.move_on_after(calls.REQUEST_TIMEOUT, shield=True):
                await self._leave(
                    keys=_presence_keys(member.room.name),
                    args=[
                        _now_ms(),
                        self.room_channel(member.room.name),
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
                for chunk in self._upkeep_chunks(rooms):
                    await self._upkeep(chunk, refresh=tick % refresh_every == 0)
                if tick % refresh_every == 0:
                    await self._refresh_claims()
            except BrokerUnavailable:
                continue

    def _upkeep_chunks(self, rooms: list[Room]) -> list[list[Room]]:
        """The rooms in calls of at most :data:`UPKEEP_ROOMS` (in a cluster, each call's
        rooms in one hash slot)."""
        groups = by_slot(rooms, key=lambda room: _keys(room.name).seq) if self.cluster else [rooms]
        return [
            group[start : start + UPKEEP_ROOMS]
            for group in groups
            for start in range(0, len(group), UPKEEP_ROOMS)
        ]

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
            args += [self.room_channel(room.name), len(still), len(back)]
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

    # -- the server API (SPEC §8.2) ---------------------------------------------------------

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
