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

from dataclasses import dataclass, field
from typing import Literal

from . import protocol
from .protocol import MAX_PRESENCE_NAMES

__all__ = ["PresenceChanges", "PresenceEvent"]

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

    def encode(self, room: str, *, count: int, members: list[str] | None) -> str:
        """The ``system`` notice for these changes, with the room's ``count`` and
        ``members`` as they are now (``members=None`` when they are not known here)."""
        return protocol.encode_presence(
            room=room,
            joined=self.joined,
            left=self.left,
            joins=self.joins,
            leaves=self.leaves,
            count=count,
            members=members,
            user=self.user,
        )
