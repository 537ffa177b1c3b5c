"""Where a room's events wait for their reader: bounded, in arrival order.

A room of its own (:func:`~roomcast.client.open_room`) has a memory object stream. The
rooms of one connection (:func:`~roomcast.client.open_connection`) share a
:class:`Mailbox`: every undelivered event of the connection, in the order it arrived,
which a :class:`~roomcast.client.Room` reads its own share of and ``async for event in
conn`` reads all of. Each event is read once, by whichever of the two asks first, so
reading a room through its ``Room`` or through the connection (or both) never loses or
repeats an event. Each room's share is bounded: when a room's reader falls ``limit``
events behind, the connection stops reading from the server (which in time evicts a
client that reads too slowly; the connection then reconnects and resumes).
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Protocol

import anyio

from .events import Event

__all__ = ["ANY", "Inbox", "Mailbox", "RoomInbox", "StreamInbox"]

#: the key of the connection's own events (not about one room)
CONNECTION = ""
#: :meth:`Mailbox.get`: the next event, whatever it is about
ANY = None


class Inbox(Protocol):
    """A room's events waiting for the reader."""

    async def put(self, event: Event) -> None: ...

    async def get(self) -> Event:
        """The next event; :class:`anyio.EndOfStream` once closed and read to the end."""
        ...

    def close(self) -> None: ...


class StreamInbox:
    """A room of its own: a memory object stream of ``limit`` events."""

    def __init__(self, limit: int) -> None:
        self._in, self._out = anyio.create_memory_object_stream[Event](limit)

    async def put(self, event: Event) -> None:
        await self._in.send(event)

    async def get(self) -> Event:
        try:
            return await self._out.receive()
        except anyio.ClosedResourceError:
            raise anyio.EndOfStream from None

    def close(self) -> None:
        self._in.close()


class Mailbox:
    """A connection's undelivered events, keyed by room (``""``: the connection's own)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._items: deque[tuple[str, Event]] = deque()
        self._counts: Counter[str] = Counter()
        self._closed: set[str] = set()
        self._all_closed = False
        self._changed = anyio.Event()

    async def put(self, key: str, event: Event) -> None:
        """Queue a room's event, waiting while that room has ``limit`` unread."""
        while self._counts[key] >= self._limit and not self._is_closed(key):
            await self._changed.wait()
        if self._is_closed(key):
            return  # the room was left meanwhile: nobody will read it
        self._append(key, event)

    def put_connection(self, event: Event) -> None:
        """Queue one of the connection's own events (notices, errors about no room).
        They are not resumable anyway, so rather than hold up every room for a reader
        that never asks for them, the oldest is dropped once ``limit`` wait."""
        if self._all_closed:
            return
        if self._counts[CONNECTION] >= self._limit:
            index = next(i for i, (key, _) in enumerate(self._items) if key == CONNECTION)
            del self._items[index]
            self._counts[CONNECTION] -= 1
        self._append(CONNECTION, event)

    async def get(self, key: str | None = ANY) -> Event:
        """The oldest event of room ``key`` (of any room, and the connection's own, for
        :data:`ANY`); :class:`anyio.EndOfStream` once it is closed and read to the end."""
        await anyio.lowlevel.checkpoint()
        while True:
            for index, (item_key, event) in enumerate(self._items):
                if key is ANY or item_key == key:
                    del self._items[index]
                    self._counts[item_key] -= 1
                    self._notify()
                    return event
            if self._all_closed or (key is not ANY and key in self._closed):
                raise anyio.EndOfStream
            await self._changed.wait()

    def close(self, key: str) -> None:
        """No more events for room ``key``: its reader ends after the queued ones."""
        self._closed.add(key)
        self._notify()

    def close_all(self) -> None:
        self._all_closed = True
        self._notify()

    def _is_closed(self, key: str) -> bool:
        return self._all_closed or key in self._closed

    def _append(self, key: str, event: Event) -> None:
        self._items.append((key, event))
        self._counts[key] += 1
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()


class RoomInbox:
    """One membership's view of its connection's :class:`Mailbox`. Its key is the
    membership's own, not the room's name, so a room left and joined again is a new
    ``Room`` whose events the old one never reads."""

    def __init__(self, mailbox: Mailbox, key: str) -> None:
        self._mailbox = mailbox
        self._room = key

    async def put(self, event: Event) -> None:
        await self._mailbox.put(self._room, event)

    async def get(self) -> Event:
        return await self._mailbox.get(self._room)

    def close(self) -> None:
        self._mailbox.close(self._room)
