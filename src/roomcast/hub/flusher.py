"""The presence flusher: a room's joins and leaves, turned into at most one notice per
interval.

Presence is not fanned out per join or leave: each change is recorded in O(1)
(:class:`~roomcast.presence.PresenceChanges`) and :meth:`PresenceFlusher.run_presence`
sends each room one notice per interval at most. A notice never takes a message's place
in an outbox: it waits in the member's one-notice slot (:attr:`Member.presence`, a newer
notice replaces an unsent one) and enters the outbox only as an empty wake-up event when
the outbox is empty, so however many members come and go, presence alone can never evict
anyone.

A leave is announced only once a short grace has passed without the same person joining
again (:class:`~roomcast.presence.HeldLeaves`, ``presence_grace``): a reloading tab leaves
and joins within a moment, and the others see neither.

This is a part of its own, not more of the hub's class, because it has state of its own
(what is due when, the flusher's wake-up) and needs only two things of the rest of the
hub: its counters and a way to drop connections that have stopped reading
(:meth:`~roomcast.hub.membership.Membership._drop_all`). The sans-IO bookkeeping of one
room's changes is :mod:`roomcast.presence`; this module schedules and hands out notices.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Awaitable, Callable
from typing import Final

import anyio

from ..presence import PresenceChanges, PresenceEvent
from ..protocol import Listed
from .model import PRESENCE_WAKE, Client, HubStats, Member, Room

__all__ = ["PRESENCE_RATE", "PresenceFlusher", "PresenceSource"]

#: presence notices one room's members get per second at most, all of them together: a
#: room of more members than this waits members/rate seconds between notices instead of
#: ``presence_interval``, so presence costs a room a bounded rate however big it grows
PRESENCE_RATE: Final = 1000

#: how a broker that keeps presence elsewhere gives the room's count and named people (as
#: in ``welcome``) for a notice; ``None`` if it cannot now (the notice then has no names)
PresenceSource = Callable[[Room], Awaitable[tuple[int, list[Listed]] | None]]


class PresenceFlusher:
    """Presence notices of every room of one hub (``hub.flusher``).

    :param stats: the hub's counters (``presence_notices``)
    :param drop_all: drops connections found to have stopped reading their outbox
    :param presence_interval: as :class:`~roomcast.hub.Hub`'s
    :param presence_grace: as :class:`~roomcast.hub.Hub`'s
    """

    def __init__(
        self,
        stats: HubStats,
        drop_all: Callable[[list[Client]], None],
        *,
        presence_interval: float,
        presence_grace: float,
    ) -> None:
        self.stats = stats
        self._drop_all = drop_all
        self.presence_interval = presence_interval
        self.presence_grace = presence_grace
        #: rooms whose first change since their last notice came after the flusher looked
        self._presence_new: list[Room] = []
        #: rooms whose held leaves the flusher has no wake-up for yet
        self._grace_new: list[Room] = []
        self._presence_wakeup: anyio.Event | None = None
        #: set by a broker that keeps presence elsewhere (Redis); None: this hub's members
        self.presence_source: PresenceSource | None = None

    def announce_locally(self, room: Room, event: PresenceEvent, member: Member) -> None:
        """Record a local member's join or leave, unless nobody else is there to tell, or
        it is a verified user's second tab (a user joins with its first connection and
        leaves with its last)."""
        if member.user is not None and room.users[member.user] > (event == "join"):
            return
        if len(room.members) > member.joined:
            self.note_presence(room, event, member.name, origin=member, user=member.user)

    def note_presence(
        self,
        room: Room,
        event: PresenceEvent,
        name: str | None,
        count: int | None = None,
        *,
        origin: Member | None = None,
        user: str | None = None,
    ) -> None:
        """Record a join or leave for the room's next notice, in O(1).

        In a quiet room (no notice within the last interval) that notice goes out at once,
        so a member's join is announced before anything it says; later changes wait for
        :meth:`run_presence`. (At once only while the flusher runs and the room is counted
        here; with a :attr:`presence_source` the flusher asks it first.)

        ``count`` is the room's count after the change, from a broker that counts members
        elsewhere. ``origin`` is the local member that joined, whose welcome shows it.

        With a ``presence_grace``, a leave is held for it first (:meth:`_hold_leave`), and
        a join of the same person within it (same verified user; an anonymous member's
        same name) takes it back: neither is announced, and the others' member lists,
        which still show that person, stay right.
        """
        if event == "join" and room.held_leaves.take_back(name, user):
            if origin is not None and origin.joined:
                origin.presence_seen = room.presence_version  # its welcome shows the room
            return
        if event == "leave" and self.presence_grace > 0:
            self._hold_leave(room, name, count, user)
            return
        self._record(room, event, name, count, origin=origin, user=user)

    def _hold_leave(
        self, room: Room, name: str | None, count: int | None, user: str | None
    ) -> None:
        """Hold a leave until the grace ends, when the flusher records it
        (:meth:`_release_held`), unless a notice goes out first: a notice shows the room as
        it is, so it names every held leave too (:meth:`_with_held`)."""
        room.held_leaves.hold(name, user, count, anyio.current_time() + self.presence_grace)
        if room.grace_scheduled:
            return
        room.grace_scheduled = True
        self._grace_new.append(room)
        if self._presence_wakeup is not None:
            self._presence_wakeup.set()

    def _record(
        self,
        room: Room,
        event: PresenceEvent,
        name: str | None,
        count: int | None = None,
        *,
        origin: Member | None = None,
        user: str | None = None,
    ) -> None:
        """Record a change for the room's next notice (see :meth:`note_presence`)."""
        changes = room.presence
        fresh = changes is None
        if changes is None:
            changes = room.presence = PresenceChanges()
        changes.add(event, name, count, user)
        room.presence_version += 1
        if origin is not None and origin.joined:
            origin.presence_seen = room.presence_version
        if not fresh:
            return  # the flusher already knows the room
        wakeup = self._presence_wakeup
        if wakeup is not None and room.presence_quiet and self.presence_source is None:
            self._announce_now(room)
        self._presence_new.append(room)
        if wakeup is not None:
            wakeup.set()

    async def run_presence(self) -> None:
        """Send presence notices until cancelled (a task in the broker's task group).

        Each room's notice goes out at most once per interval (``presence_interval``, or
        one second per :data:`PRESENCE_RATE` members in a bigger room): the first change
        after a quiet interval at once (:meth:`note_presence`), the changes within the
        interval that follows together at its end. So every member gets at most one
        notice per interval, a crowd joining or leaving costs O(members) per interval (and
        a room at most :data:`PRESENCE_RATE` notices a second), and rooms do not wait on
        each other.
        """
        schedule: list[tuple[float, int, Room]] = []  # a heap of (due time, order, room)
        graces: list[tuple[float, int, Room]] = []  # a heap of (grace's end, order, room)
        order = itertools.count()
        while True:
            self._presence_wakeup = wakeup = anyio.Event()
            now = anyio.current_time()
            rooms, self._grace_new = self._grace_new, []
            for room in rooms:
                self._schedule_grace(graces, next(order), room)
            while graces and graces[0][0] <= now:
                _, _, room = heapq.heappop(graces)
                self._release_held(room, now)  # (a room that is quiet announces at once)
                self._schedule_grace(graces, next(order), room)
            rooms, self._presence_new = self._presence_new, []
            for room in rooms:
                if room.presence_next == math.inf:  # just announced: its interval starts
                    room.presence_next = now + self._interval(len(room.members))
                if not room.presence_quiet:
                    heapq.heappush(schedule, (room.presence_next, next(order), room))
                elif room.presence is not None:  # quiet, but not announced at once
                    heapq.heappush(schedule, (now, next(order), room))
            while schedule and schedule[0][0] <= now:
                due, _, room = heapq.heappop(schedule)
                if due < room.presence_next:
                    continue  # a later entry ends this room's interval
                changes, room.presence = room.presence, None
                if changes is not None and await self._flush(room, changes):
                    size = max(len(room.members), changes.count or 0)
                    room.presence_quiet = False
                    room.presence_next = anyio.current_time() + self._interval(size)
                    heapq.heappush(schedule, (room.presence_next, next(order), room))
                else:
                    room.presence_quiet = True  # an interval without changes
            due = min(
                schedule[0][0] if schedule else math.inf, graces[0][0] if graces else math.inf
            )
            if due == math.inf:
                await wakeup.wait()
                continue
            with anyio.move_on_after(due - anyio.current_time()):
                await wakeup.wait()

    @staticmethod
    def _schedule_grace(graces: list[tuple[float, int, Room]], order: int, room: Room) -> None:
        """Wake the flusher when the room's next held leave is due, if it holds one (each
        may have been taken back already)."""
        if room.held_leaves:
            heapq.heappush(graces, (room.held_leaves.due, order, room))
        else:
            room.grace_scheduled = False

    def _release_held(self, room: Room, now: float) -> None:
        """Record the room's first held leave if its grace has ended by ``now``: the
        notice that follows names every leave still held as well (:meth:`_with_held`), so
        leaves whose graces end together go out together, also from a quiet room."""
        for leave in room.held_leaves.release(now, most=1):
            self._record(room, "leave", leave.name, leave.count, user=leave.user)

    def _with_held(self, room: Room, changes: PresenceChanges) -> PresenceChanges:
        """``changes`` and every leave still held: a notice that goes out during a grace
        shows the room without that person (its ``count`` and ``members`` are the room's
        as it is), so it names the leave too, and a return is then a join like any."""
        for leave in room.held_leaves.release():
            changes.add("leave", leave.name, leave.count, leave.user)
            room.presence_version += 1
        return changes

    def _interval(self, members: int) -> float:
        return max(self.presence_interval, members / PRESENCE_RATE)

    def flush_presence(self) -> int:
        """Send every pending notice now, with what this hub knows of each room (what the
        flusher does, without its schedule, when no :attr:`presence_source` is set).
        Returns how many members were handed one."""
        rooms, self._presence_new = self._presence_new, []
        # (a member this drops is announced by the next flush)
        return sum(self._announce_now(room) for room in rooms)

    def _announce_now(self, room: Room) -> int:
        changes, room.presence = room.presence, None
        if changes is None or not room.members:
            return 0
        notice = _notice(room, self._with_held(room, changes), None)
        handed = self._hand_out(room, notice, room.presence_version)
        if handed:
            room.presence_quiet = False
            room.presence_next = math.inf  # the flusher starts the interval
        return handed

    async def _flush(self, room: Room, changes: PresenceChanges) -> int:
        """Hand out the notice for ``changes``, just taken from the room: up to the
        room's version now, whatever changes while a presence source is asked."""
        version = room.presence_version
        state = None
        if room.members and self.presence_source is not None:
            state = await self.presence_source(room)
        if not room.members:
            return 0
        return self._hand_out(room, _notice(room, self._with_held(room, changes), state), version)

    def _hand_out(self, room: Room, notice: str, version: int) -> int:
        """Put ``notice``, which reports the room's changes up to ``version``, in the
        presence slot of every member whose view is older.

        A member whose slot was empty and whose outbox is empty gets :data:`PRESENCE_WAKE`
        (its sender may be waiting on the outbox); one with a busy outbox takes the notice
        when it has drained it. Either way the notice costs at most one outbox slot, never
        evicts, and a newer notice replaces it until it is sent.
        """
        unreachable = []
        handed = 0
        for member in room.members:
            if member.presence_seen >= version:
                continue  # its welcome or an earlier notice already shows these changes
            member.presence_seen = version
            client = member.client
            if not client.presence_pending and not client.queued:
                try:
                    client._outbox_send.send_nowait(PRESENCE_WAKE)
                    client._wake()
                except anyio.WouldBlock:  # not into an empty outbox; a busy sender finds the slot
                    pass
                except anyio.BrokenResourceError:  # its sender has stopped reading
                    unreachable.append(client)
                    continue
            member.presence = notice
            client.presence_pending[member] = None
            handed += 1
        self.stats.presence_notices += handed
        if unreachable:
            self._drop_all(unreachable)
        return handed


def _notice(room: Room, changes: PresenceChanges, state: tuple[int, list[Listed]] | None) -> str:
    """The room's notice for ``changes``, with the count and people a presence source gave
    (``state``), else the count a broker reported with the changes (names unknown here),
    else this hub's own."""
    people: list[Listed] | None
    if state is not None:
        count, people = state
    elif changes.count is not None:
        count, people = changes.count, None
    else:
        count, people = room.count, room.listed()
    return changes.encode(room.name, count=count, people=people)
