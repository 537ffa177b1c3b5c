"""The events a room delivers, as typed values, and their parsing (sans I/O).

:func:`parse_event` turns one server event (a decoded JSON object) into one of the
dataclasses below; it never raises, so a server newer than this library (a new event type,
a new field) costs an :class:`Unknown` event, not a crashed client.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Ack",
    "Error",
    "Event",
    "HistoryGap",
    "Message",
    "Presence",
    "Reconnecting",
    "Unknown",
    "Welcome",
    "parse_event",
]


@dataclass(frozen=True, slots=True)
class Welcome:
    """The room as it was when this connection joined (one per connection, reconnections
    included): its ``epoch``, latest ``seq``, and who is there."""

    room: str
    epoch: str
    seq: int
    members: tuple[str, ...]
    count: int
    #: the event as the server sent it (one JSON object)
    raw: str = field(default="", repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Message:
    """A chat message, in the room's order (``seq`` +1 each)."""

    room: str
    seq: int
    text: str
    sender: str | None  # the wire's "from"
    user: str | None
    ts: int
    id: str | None = None
    #: the event as the server sent it (one JSON object)
    raw: str = field(default="", repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Presence:
    """Members came or went (``event`` is ``"join"`` or ``"leave"``); ``names`` are the
    ones the notice names (several when the server coalesced a crowd, none when it only
    counts), ``count`` the room's size after it."""

    event: str
    names: tuple[str, ...]
    count: int
    message: str
    #: the event as the server sent it (one JSON object)
    raw: str = field(default="", repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class HistoryGap:
    """Messages were missed and are gone: those after ``since`` and before ``first`` (the
    first the server still had). ``epoch`` is the room's; if it is not the one you knew,
    the room's sequence restarted (a server without shared history restarted)."""

    epoch: str
    since: int
    first: int
    #: the event as the server sent it (one JSON object)
    raw: str = field(default="", repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Error:
    """An ``error`` event that answers none of :meth:`Room.send`'s messages."""

    code: str
    message: str
    id: str | None = None
    #: the event as the server sent it (one JSON object)
    raw: str = field(default="", repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Ack:
    """The server accepted message ``id`` as ``seq`` (consumed by the library)."""

    id: str
    seq: int


@dataclass(frozen=True, slots=True)
class Reconnecting:
    """The connection was lost (``code``, ``reason`` as the server or the network gave
    them); the room reconnects in ``delay`` seconds and resumes where it was."""

    code: int
    reason: str
    attempt: int
    delay: float


@dataclass(frozen=True, slots=True)
class Unknown:
    """A server event this library does not know; ``raw`` is all of it."""

    raw: dict[str, Any]


Event = Welcome | Message | Presence | HistoryGap | Error | Reconnecting | Unknown


def parse_event(raw: Any, line: str = "") -> Event | Ack:
    """One decoded server event as a typed value (:class:`Unknown` if it is not one);
    ``line`` is the JSON it was decoded from, kept as the event's ``raw``."""
    if not isinstance(raw, dict):
        return Unknown({"value": raw})
    try:
        return _parse(raw, line)
    except (KeyError, TypeError, ValueError):
        return Unknown(raw)


def _parse(raw: dict[str, Any], line: str) -> Event | Ack:
    kind = raw.get("type")
    if kind == "message":
        return Message(
            room=_str(raw["room"]),
            seq=_int(raw["seq"]),
            text=_str(raw["text"]),
            sender=_optional_str(raw.get("from")),
            user=_optional_str(raw.get("user")),
            ts=_int(raw.get("ts", 0)),
            id=_optional_str(raw.get("id")),
            raw=line,
        )
    if kind == "ack":
        return Ack(id=_str(raw["id"]), seq=_int(raw["seq"]))
    if kind == "welcome":
        return Welcome(
            room=_str(raw["room"]),
            epoch=_str(raw["epoch"]),
            seq=_int(raw["seq"]),
            members=tuple(_str(name) for name in raw.get("members") or ()),
            count=_int(raw.get("count", 0)),
            raw=line,
        )
    if kind == "system":
        names = raw.get("names")
        if names is None:
            names = [] if raw.get("name") is None else [raw["name"]]
        return Presence(
            event=_str(raw.get("event", "")),
            names=tuple(_str(name) for name in names),
            count=_int(raw.get("count", 0)),
            message=_str(raw.get("message", "")),
            raw=line,
        )
    if kind == "error" and raw.get("error") == "history_gap":
        return HistoryGap(
            epoch=_str(raw["epoch"]),
            since=_int(raw["since"]),
            first=_int(raw["first"]),
            raw=line,
        )
    if kind == "error":
        return Error(
            code=_str(raw["error"]),
            message=_str(raw.get("message", "")),
            id=_optional_str(raw.get("id")),
            raw=line,
        )
    return Unknown(raw)


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def _optional_str(value: Any) -> str | None:
    return None if value is None else _str(value)


def _int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"expected an integer, got {value!r}")
    return value
