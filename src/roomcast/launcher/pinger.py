"""One task that pings every WebSocket of an app, instead of a task per connection.

Hypercorn pings a WebSocket (``websocket_ping_interval``, 20 s under ``python -m
roomcast``) from a task of its own that sends a ping, sleeps the interval, and repeats for
the connection's whole life: a task, its frames, a cancel scope and an event that an idle
connection keeps only to wake up three times a minute. That was 4 KB of the 33 per idle
connection on the Trio worker (issue 24).

The :class:`Pinger` keeps, per connection, one entry in a heap ordered by when its next
ping is due (a weak reference: it keeps no connection alive), and wakes when the next is
due. It never writes itself: each due ping is a task started in the connection's own task
group (:meth:`Pingable.ping_soon`), so a peer that does not read blocks only that ping, as
Hypercorn's writes are shielded, and never the pings of the others. The pings keep data in
flight on an idle connection, which is how a vanished peer is found (``TCP_USER_TIMEOUT``,
SPEC §7): no later than with Hypercorn's own loop (a ping at once, the next after a half
to a whole interval, then every interval, each within :data:`MIN_WAIT` of its time).

A ping costs the loop some 80 µs (a task, Hypercorn's layers, a ``send``). Woken twice a
second, the pinger started 250 of them at once for 10,000 connections pinged every 20 s,
and a chat message waited behind them up to 29 ms. So it wakes for what is due (at most
:data:`MIN_WAIT` apart) and lets the loop run after every :data:`PINGS_PER_PASS`; and a
connection's first interval is shortened by a random part of up to a half, so that
connections that came together (a reconnect storm) are not pinged together forever after.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
import weakref
from typing import NoReturn, Protocol

import anyio
import anyio.lowlevel

__all__ = ["MAX_WAIT", "MIN_WAIT", "PINGS_PER_PASS", "Pingable", "Pinger"]

#: the least the pinger sleeps between passes: pings due within it go out together
MIN_WAIT = 0.01
#: the most it sleeps (a connection whose first ping falls due sooner wakes it)
MAX_WAIT = 0.5
#: pings started between two checkpoints (about 2.5 ms of the loop's time)
PINGS_PER_PASS = 32


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
        #: when :meth:`run` wakes next, and what wakes it sooner (:meth:`add`)
        self._wakes_at = math.inf
        self._wake: anyio.Event | None = None

    def __len__(self) -> int:
        """Connections waiting for their next ping."""
        return len(self._due)

    def add(self, websocket: Pingable, interval: float) -> None:
        """Ping ``websocket`` every ``interval`` seconds until it closes, the first time
        after a half to a whole interval."""
        due = anyio.current_time() + interval * (1 - random.random() / 2)
        heapq.heappush(self._due, (due, next(self._order), interval, weakref.ref(websocket)))
        if due < self._wakes_at and self._wake is not None:
            self._wake.set()  # (only an interval shorter than MAX_WAIT comes to this)

    async def run(self) -> NoReturn:
        """Start the pings as they fall due, until cancelled."""
        try:
            while True:
                wait = self._until_due()
                self._wakes_at = anyio.current_time() + wait
                self._wake = anyio.Event()
                with anyio.move_on_after(wait):
                    await self._wake.wait()
                await self.ping_due()
        finally:
            self._due.clear()

    def _until_due(self) -> float:
        if not self._due:
            return MAX_WAIT
        return min(max(self._due[0][0] - anyio.current_time(), MIN_WAIT), MAX_WAIT)

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
