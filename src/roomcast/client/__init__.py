"""roomcast's Python client library, on anyio: it runs on trio and on asyncio.

::

    from roomcast.client import Message, open_room

    async with open_room("ws://127.0.0.1:8000", "lobby", name="ada") as room:
        seq = await room.send("hello")          # once the server accepted it
        async for event in room:               # Welcome, Message, Presence, HistoryGap ...
            if isinstance(event, Message):
                print(event.seq, event.sender, event.text)

A room reconnects by itself with backoff and resumes where it was (``since``/``epoch``):
nothing is delivered twice, a gap it cannot fill arrives as a :class:`HistoryGap` event,
and a message is sent once however often the connection drops.
:mod:`roomcast.client.api` talks to the server API (publish, history, presence).
"""

from .events import (
    Error,
    Event,
    HistoryGap,
    Message,
    Presence,
    Reconnecting,
    Unknown,
    Welcome,
    parse_event,
)
from .room import (
    MessageRefused,
    Room,
    RoomClosed,
    RoomUnavailable,
    TokenSource,
    chat_url,
    open_room,
)

__all__ = [
    "Error",
    "Event",
    "HistoryGap",
    "Message",
    "MessageRefused",
    "Presence",
    "Reconnecting",
    "Room",
    "RoomClosed",
    "RoomUnavailable",
    "TokenSource",
    "Unknown",
    "Welcome",
    "chat_url",
    "open_room",
    "parse_event",
]
