"""Coalesced presence, sans I/O: what changed in a room between two of its notices.

Announcing every join to every member costs O(members) per join, so a crowd of n filling a
room costs O(n²) notices (1,000 members: 499,500), and a crowd leaving at once can fill
the outboxes of the members who stay. Instead, the hub records each join and leave here,
in O(1) and bounded memory, and its presence flusher (``Hub.run_presence``) turns what a
room collected into one notice at most once per interval. A notice carries the room's
count and member names as they are when it is sent (absolute, not a delta), so a notice
that replaces an unsent one loses nothing a client needs.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from . import protocol
from .protocol import MAX_PRESENCE_NAMES, Listed

__all__ = ["HeldLeave", "HeldLeaves", "PresenceChanges", "PresenceEvent"]

PresenceEvent = Literal["join", "leave"]


@dataclass(slots=True)
class PresenceChanges:
    """Joins and leaves of one room since its last notice: a few names and two counts,
    however many members came and went."""

    #: names of the first members who joined (at most :data:`MAX_PRESENCE_NAMES`)
    joined: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)
    #: every join and leave, named or anonymous
    joins: int = 0
    leaves: int = 0
    #: the room's count as a broker that counts members elsewhere (Redis) last reported it
    count: int | None = None
    #: the verified user of the latest change (shown when it is the only one)
    user: str | None = None

    def add(
        self,
        event: PresenceEvent,
        name: str | None,
        count: int | None = None,
        user: str | None = None,
    ) -> None:
        if event == "join":
            self.joins += 1
            names = self.joined
        else:
            self.leaves += 1
            names = self.left
        if name is not None and len(names) < MAX_PRESENCE_NAMES:
            names.append(name)
        if count is not None:
            self.count = count
        self.user = user

    def encode(self, room: str, *, count: int, people: Sequence[Listed] | None) -> str:
        """The ``system`` notice for these changes, with the room's ``count`` and named
        ``people`` as they are now (``people=None`` when they are not known here)."""
        return protocol.encode_presence(
            room=room,
            joined=self.joined,
            left=self.left,
            joins=self.joins,
            leaves=self.leaves,
            count=count,
            people=people,
            user=self.user,
        )


@dataclass(slots=True)
class HeldLeave:
    """One leave waiting out the grace (see :class:`HeldLeaves`)."""

    name: str | None
    user: str | None
    #: the room's count after it, as a broker that counts members elsewhere reported it
    count: int | None
    #: when the grace ends (``anyio.current_time()``)
    due: float
    taken_back: bool = False


def _person(name: str | None, user: str | None) -> tuple[bool, str | None]:
    """Who comes back: a verified user by its id, an anonymous member by its name (the
    nameless are told apart by nobody, so any of them stands for any other)."""
    return (True, user) if user is not None else (False, name)


class HeldLeaves:
    """A room's leaves that are not announced yet: a tab that reloads closes its
    connection and opens a new one a moment later, and announcing that as a leave and a
    join makes everyone else's member list flap. A leave waits here for the grace; if the
    same person joins meanwhile, the join takes the leave back and neither is announced.

    O(1) per leave and per join, and releasing costs one step per released leave: the
    leaves are kept in the order they were held, which is the order their grace ends (one
    grace for all, a monotonic clock), and a taken-back leave stays in that order, marked,
    until it reaches the front.
    """

    __slots__ = ("_by_person", "_held", "_order")

    def __init__(self) -> None:
        self._order: deque[HeldLeave] = deque()
        #: each person's held leaves, oldest first (more than one only for the nameless,
        #: or for a person whose leave the broker reported twice)
        self._by_person: dict[tuple[bool, str | None], deque[HeldLeave]] = {}
        self._held = 0

    def __len__(self) -> int:
        return self._held

    def hold(self, name: str | None, user: str | None, count: int | None, due: float) -> None:
        leave = HeldLeave(name, user, count, due)
        self._order.append(leave)
        self._by_person.setdefault(_person(name, user), deque()).append(leave)
        self._held += 1

    def take_back(self, name: str | None, user: str | None) -> bool:
        """A join of this person: ``True`` if it takes back a held leave (then announce
        neither)."""
        key = _person(name, user)
        leaves = self._by_person.get(key)
        if leaves is None:
            return False
        leaves.popleft().taken_back = True
        if not leaves:
            del self._by_person[key]
        self._held -= 1
        return True

    @property
    def due(self) -> float:
        """When the next held leave's grace ends (``inf`` if none is held)."""
        while self._order and self._order[0].taken_back:
            self._order.popleft()
        return self._order[0].due if self._order else math.inf

    def release(self, now: float = math.inf, most: int | None = None) -> list[HeldLeave]:
        """The held leaves whose grace has ended by ``now`` (by default all of them),
        ``most`` of them at most, no longer held, in the order they came."""
        released: list[HeldLeave] = []
        while self._held and self.due <= now and len(released) != most:
            leave = self._order.popleft()
            key = _person(leave.name, leave.user)
            leaves = self._by_person[key]
            leaves.popleft()  # the oldest of its person's, as it is the oldest of all
            if not leaves:
                del self._by_person[key]
            self._held -= 1
            released.append(leave)
        return released

    def clear(self) -> None:
        """Forget them all (the room has nobody left to tell)."""
        self._order.clear()
        self._by_person.clear()
        self._held = 0
