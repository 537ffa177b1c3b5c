"""roomcast's Python client library, on anyio: it runs on trio and on asyncio.

::

    from roomcast.client import Message, open_room

    async with open_room("ws://127.0.0.1:8000", "lobby", name="ada") as room:
        seq = await room.send("hello")          # once the server accepted it
        async for event in room:               # Welcome, Message, Presence, HistoryGap ...
            if isinstance(event, Message):
                print(event.seq, event.sender, event.text)

Many rooms over one connection (protocol v2)::

    async with open_connection("ws://127.0.0.1:8000", name="ada") as conn:
        lobby = await conn.join("lobby")
        await lobby.send("hello")
        async for event in conn:               # every room's events, each with its room
            ...

A room reconnects by itself with backoff and resumes where it was (``since``/``epoch``):
nothing is delivered twice, a gap it cannot fill arrives as a :class:`HistoryGap` event,
and a message is sent once however often the connection drops.
:mod:`roomcast.client.api` talks to the server API (publish, history, presence).
"""

from .connection import (
    Connection,
    ConnectionClosed,
    ConnectionUnavailable,
    JoinRefused,
    connection_url,
    dm_room,
    open_connection,
)
from .events import (
    Error,
    Event,
    HistoryGap,
    Left,
    Message,
    Notice,
    Person,
    Presence,
    Reconnecting,
    Scrollback,
    Typing,
    Unknown,
    Welcome,
    parse_event,
)
from .room import (
    HistoryRefused,
    MessageRefused,
    Room,
    RoomClosed,
    RoomUnavailable,
    TokenSource,
    chat_url,
    open_room,
)

__all__ = [
    "Connection",
    "ConnectionClosed",
    "ConnectionUnavailable",
    "Error",
    "Event",
    "HistoryGap",
    "HistoryRefused",
    "JoinRefused",
    "Left",
    "Message",
    "MessageRefused",
    "Notice",
    "Person",
    "Presence",
    "Reconnecting",
    "Room",
    "RoomClosed",
    "RoomUnavailable",
    "Scrollback",
    "TokenSource",
    "Typing",
    "Unknown",
    "Welcome",
    "chat_url",
    "connection_url",
    "dm_room",
    "open_connection",
    "open_room",
    "parse_event",
]
