"""A room's keys and presence entries, and how long a room's data lives in Redis.

Pure functions, used by every part of the broker (and underscored: they are the broker's,
not the rest of roomcast's): the names of a room's keys and of a user's connection
claims, the presence entry that stands for a member in Redis (see *Presence* in
:mod:`.presence`) and how to read one back, the time as the scripts count it.

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

*Cluster.* A room's keys share the hash tag ``{room}``, so they live in one hash slot;
what Redis Cluster needs beyond that (calls grouped per slot, sharded pub/sub, the idle
keys that are global here) is :mod:`.cluster`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Final, NamedTuple

import orjson

from ...hub import Member
from ...names import skeleton
from ...protocol import MAX_WELCOME_MEMBERS, Listed
from .. import Person

__all__ = ["PRESENCE_TTL"]

#: seconds a member's presence entry lives unless its worker refreshes it
PRESENCE_TTL: Final = 10.0


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
    """A room's keys for :data:`~.scripts.PUBLISH`: seq, epoch, history, and the UTF-8
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


def _listed(entries: Sequence[str]) -> list[Listed]:
    """The people a member list shows, from presence entries: each named person once (a
    verified user by its first entry), at most :data:`MAX_WELCOME_MEMBERS`."""
    named = [(person.user, person.name) for person in _people(entries) if person.name]
    return named[:MAX_WELCOME_MEMBERS]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _seq_of(event: str) -> int:
    """The seq of a queued event, or 0 for unsequenced ones (only used while joining)."""
    if not event.startswith('{"type":"message"'):
        return 0
    seq: int = orjson.loads(event)["seq"]
    return seq
