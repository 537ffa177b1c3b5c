"""What a member's sender task would send it, read synchronously from the hub's side."""

from __future__ import annotations

from typing import Any

import anyio
import orjson

from roomcast.hub import PRESENCE_WAKE, Member


def drain(member: Member) -> list[dict[str, Any]]:
    """Everything a sender task would send a member right now: its greeting, then its
    outbox, with a waiting presence notice where it wakes the sender or when the outbox is
    empty (as connection._next_event does)."""
    events = [orjson.loads(e) for e in member.greeting]
    member.greeting = []
    while True:
        try:
            event = member.outbox.receive_nowait()
        except anyio.WouldBlock:
            if (notice := member.take_presence()) is not None:
                events.append(orjson.loads(notice))
            return events
        except anyio.EndOfStream:
            return events
        if event is not PRESENCE_WAKE:
            events.append(orjson.loads(event))
        elif (notice := member.take_presence()) is not None:
            events.append(orjson.loads(notice))
