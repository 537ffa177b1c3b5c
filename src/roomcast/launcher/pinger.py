"""One task that pings every WebSocket of an app, instead of a task per connection.

Hypercorn pings a WebSocket (``websocket_ping_interval``, 20 s under ``python -m
roomcast``) from a task of its own that sends a ping, sleeps the interval, and repeats for
the connection's whole life: a task, its frames, a cancel scope and an event that an idle
connection keeps only to wake up three times a minute. That was 4 KB of the 33 per idle
connection on the Trio worker (issue 24).

The :class:`Pinger` keeps, per connection, one entry in a heap ordered by when its next
ping is due (a weak reference: it keeps no connection alive), and wakes every
:data:`TICK` seconds. It never writes itself: each due ping is a task started in the
connection's own task group (:meth:`Pingable.ping_soon`), so a peer that does not read
blocks only that ping, as Hypercorn's writes are shielded, and never the pings of the
others. The pings keep data in flight on an idle connection, which is how a vanished peer
is found (``TCP_USER_TIMEOUT``, SPEC §7): no later than with Hypercorn's own loop, give or
take one :data:`TICK`.
"""

from __future__ import annotations

import heapq
import itertools
import weakref
from typing import NoReturn, Protocol

import anyio
import anyio.lowlevel

__all__ = ["TICK", "Pingable", "Pinger"]

#: how often the pinger looks for pings due: the most a ping is late
TICK = 0.5
#: pings started between two checkpoints, so that 100,000 connections' pings do not hold
#: the event loop for one long pass
PINGS_PER_PASS = 256


class Pingable(Protocol):
    """A WebSocket the :class:`Pinger` keeps alive."""

    @property
    def closed(self) -> bool: ...

    def ping_soon(self) -> bool:
        """Start sending a ping in the connection's own task group, without waiting for
        it; ``False`` if the connection can start no more tasks (it is ending)."""
        ...


class Pinger:
    """Pings each added WebSocket every ``interval`` seconds from one task, :meth:`run`
    (run by the app's runtime for its lifespan), until the WebSocket closes."""

    def __init__(self) -> None:
        #: (when the next ping is due, order added, interval, the connection)
        self._due: list[tuple[float, int, float, weakref.ref[Pingable]]] = []
        self._order = itertools.count()

    def __len__(self) -> int:
        """Connections waiting for their next ping."""
        return len(self._due)

    def add(self, websocket: Pingable, interval: float) -> None:
        """Ping ``websocket`` every ``interval`` seconds from now on, until it closes."""
        due = anyio.current_time() + interval
        heapq.heappush(self._due, (due, next(self._order), interval, weakref.ref(websocket)))

    async def run(self) -> NoReturn:
        """Start the pings due, every :data:`TICK` seconds, until cancelled."""
        try:
            while True:
                await anyio.sleep(TICK)
                await self.ping_due()
        finally:
            self._due.clear()

    async def ping_due(self) -> int:
        """Start every ping due by now; returns how many were started."""
        now = anyio.current_time()
        again = []  # (pushed back only after the pass: an interval may be shorter than it)
        try:
            while self._due and self._due[0][0] <= now:
                due, order, interval, ref = heapq.heappop(self._due)
                websocket = ref()
                if websocket is None or websocket.closed or not websocket.ping_soon():
                    continue
                after = due + interval if due + interval > now else now + interval
                again.append((after, order, interval, ref))
                if len(again) % PINGS_PER_PASS == 0:
                    await anyio.lowlevel.checkpoint()
        finally:
            for entry in again:
                heapq.heappush(self._due, entry)
        return len(again)
