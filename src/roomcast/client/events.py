"""The events a room delivers, as typed values, and their parsing (sans I/O).

:func:`parse_event` turns one server event (a decoded JSON object) into one of the
dataclasses below; it never raises, so a server newer than this library (a new event type,
a new field) costs an :class:`Unknown` event, not a crashed client.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import orjson

__all__ = [
    "Ack",
    "Error",
    "Event",
    "HistoryGap",
    "Left",
    "Message",
    "Notice",
    "Person",
    "Presence",
    "Reconnecting",
    "Scrollback",
    "Typing",
    "Unknown",
    "Welcome",
    "parse_event",
]


@dataclass(frozen=True, slots=True)
class Person:
    """A member as a room's member list shows it: its display ``name`` and its verified
    ``user`` id (``None`` when anonymous), which names its direct room with you
    (:func:`~roomcast.client.dm_room`)."""

    user: str | None
    name: str


@dataclass(frozen=True, slots=True)
class Welcome:
    """The room as it was when this connection joined (one per connection, reconnections
    included): its ``epoch``, latest ``seq``, and who is there (``members``, their names;
    ``people``, the same with their user ids; empty from a server that does not send
    them)."""

    room: str
    epoch: str
    seq: int
    members: tuple[str, ...]
    count: int
    #: the event as the server sent it (one JSON object)
    raw: str = field(default="", repr=False, compare=False)
    people: tuple[Person, ...] = ()


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
    """Members came or went since the room's last notice (the server coalesces them:
    ``event`` is ``"join"``, ``"leave"``, or ``"presence"`` for both). ``names`` are the
    ones the notice names (``joined`` then ``left``, at most ten each; anonymous members
    are only counted in ``joins`` and ``leaves``). ``count`` is the room's size now and
    ``members`` its names now, ``people`` the same with user ids (as in :class:`Welcome`;
    ``None`` from a server that does not send them): replace a member list with them
    rather than patching it."""

    event: str
    names: tuple[str, ...]
    count: int
    message: str
    #: the event as the server sent it (one JSON object)
    raw: str = field(default="", repr=False, compare=False)
    joined: tuple[str, ...] = ()
    left: tuple[str, ...] = ()
    joins: int = 0
    leaves: int = 0
    members: tuple[str, ...] | None = None
    #: the room it is about (``None`` from a v1 server, whose connection is one room)
    room: str | None = None
    people: tuple[Person, ...] | None = None


@dataclass(frozen=True, slots=True)
class HistoryGap:
    """Messages were missed and are gone. Within one run of the room's sequence, those
    after ``since`` and before ``first`` (the first the server still had).

    If ``restarted``, the room's sequence started over since ``since`` was seen (a new
    ``epoch``: a server without shared history restarted): what came after ``since`` in
    the old run is gone, the new run counts from 1, and ``first`` is the first message of
    the new run still kept (the replay that follows starts there).
    """

    epoch: str
    since: int
    first: int
    #: the event as the server sent it (one JSON object)
    raw: str = field(default="", repr=False, compare=False)
    #: set by :class:`~roomcast.client.Room` when the epoch it resumed is not the room's;
    #: :func:`parse_event` alone sees it only when ``first <= since + 1`` (within one
    #: run, a gap always starts after ``since + 1``)
    restarted: bool = False
    #: the room it is about (``None`` on v1's one-room connection)
    room: str | None = None


@dataclass(frozen=True, slots=True)
class Error:
    """An ``error`` event that answers none of :meth:`Room.send`'s messages."""

    code: str
    message: str
    id: str | None = None
    #: the event as the server sent it (one JSON object)
    raw: str = field(default="", repr=False, compare=False)
    #: the room it is about, if any (v2: ``None`` for the whole connection, e.g. a refused
    #: token ``refresh``)
    room: str | None = None


@dataclass(frozen=True, slots=True)
class Ack:
    """The server accepted message ``id`` as ``seq`` (consumed by the library)."""

    id: str
    seq: int
    room: str | None = None


@dataclass(frozen=True, slots=True)
class Reconnecting:
    """The connection was lost (``code``, ``reason`` as the server or the network gave
    them); the room reconnects in ``delay`` seconds and resumes where it was."""

    code: int
    reason: str
    attempt: int
    delay: float
    #: v2: the room told (each room of a connection gets one, as a room of its own does)
    room: str | None = None


@dataclass(frozen=True, slots=True)
class Left:
    """v2: the membership of ``room`` ended: ``code`` 1000 for our own leave, otherwise
    the server ended it (4403 the token no longer grants the room, 4008 ...). It is the
    room's last event; its iteration then ends (with :class:`RoomClosed` unless 1000)."""

    room: str
    code: int
    reason: str
    #: the event as the server sent it (one JSON object)
    raw: str = field(default="", repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Typing:
    """v2: another member of ``room`` is typing (at most one a second per member; never
    stored, so a reconnection does not bring it back)."""

    room: str
    user: str | None
    name: str | None
    #: the event as the server sent it (one JSON object)
    raw: str = field(default="", repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Notice:
    """v2: the application's message to this user (``POST /api/users/{user}/notify``):
    ``data`` is its JSON value. Not about a room; not stored, not resumed."""

    data: Any
    #: the event as the server sent it (one JSON object)
    raw: str = field(default="", repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Scrollback:
    """v2: a page of ``room``'s past (SPEC §11), what :meth:`Room.history` returns:
    ``messages`` in seq order, all before the ``before`` asked for (the newest when it was
    ``None``); ``more`` says whether earlier ones exist (ask again with ``before`` the
    first one's seq); ``epoch`` is the run of the room's sequence their seqs belong to.
    The answer to a request, consumed by the library (as :class:`Ack`): never read from a
    room's events."""

    room: str
    epoch: str | None
    before: int | None
    messages: tuple[Message, ...]
    more: bool
    id: str | None = None
    #: the event as the server sent it (one JSON object)
    raw: str = field(default="", repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Unknown:
    """A server event this library does not know; ``raw`` is all of it."""

    raw: dict[str, Any]


Event = (
    Welcome
    | Message
    | Presence
    | HistoryGap
    | Error
    | Reconnecting
    | Left
    | Typing
    | Notice
    | Scrollback
    | Unknown
)


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
        return Ack(id=_str(raw["id"]), seq=_int(raw["seq"]), room=_optional_str(raw.get("room")))
    if kind == "welcome":
        return Welcome(
            room=_str(raw["room"]),
            epoch=_str(raw["epoch"]),
            seq=_int(raw["seq"]),
            members=tuple(_str(name) for name in raw.get("members") or ()),
            count=_int(raw.get("count", 0)),
            raw=line,
            people=_people(raw.get("people") or []),
        )
    if kind == "system":
        return _presence(raw, line)
    if kind == "error" and raw.get("error") == "history_gap":
        since, first = _int(raw["since"]), _int(raw["first"])
        return HistoryGap(
            epoch=_str(raw["epoch"]),
            since=since,
            first=first,
            raw=line,
            restarted=first <= since + 1,
            room=_optional_str(raw.get("room")),
        )
    if kind == "error":
        return Error(
            code=_str(raw["error"]),
            message=_str(raw.get("message", "")),
            id=_optional_str(raw.get("id")),
            raw=line,
            room=_optional_str(raw.get("room")),
        )
    return _parse_v2(kind, raw, line)


def _parse_v2(kind: Any, raw: dict[str, Any], line: str) -> Event:
    """The events only ``/ws`` (protocol v2) sends."""
    if kind == "left":
        return Left(
            room=_str(raw["room"]),
            code=_int(raw["code"]),
            reason=_str(raw.get("reason", "")),
            raw=line,
        )
    if kind == "typing":
        return Typing(
            room=_str(raw["room"]),
            user=_optional_str(raw.get("user")),
            name=_optional_str(raw.get("name")),
            raw=line,
        )
    if kind == "notice":
        return Notice(data=raw.get("data"), raw=line)
    if kind == "history":
        return _scrollback(raw, line)
    return Unknown(raw)


def _scrollback(raw: dict[str, Any], line: str) -> Scrollback:
    messages = []
    for event in raw["messages"]:
        message = _parse(event, "") if isinstance(event, dict) else None
        if not isinstance(message, Message):
            raise TypeError(f"expected message events, got {event!r}")
        # each keeps its own JSON in ``raw``, as a message read from a room does
        messages.append(replace(message, raw=orjson.dumps(event).decode()))
    before = raw.get("before")
    more = raw["more"]
    if not isinstance(more, bool):
        raise TypeError(f"expected a bool, got {more!r}")
    return Scrollback(
        room=_str(raw["room"]),
        epoch=_optional_str(raw.get("epoch")),
        before=None if before is None else _int(before),
        messages=tuple(messages),
        more=more,
        id=_optional_str(raw.get("id")),
        raw=line,
    )


def _presence(raw: dict[str, Any], line: str) -> Presence:
    event = _str(raw.get("event", ""))
    name = _optional_str(raw.get("name"))
    single = () if name is None else (name,)
    # a server that sends one notice per change names it in "name" only
    joined = _names(raw["joined"]) if "joined" in raw else single if event == "join" else ()
    left = _names(raw["left"]) if "left" in raw else single if event == "leave" else ()
    members, people = raw.get("members"), raw.get("people")
    return Presence(
        event=event,
        names=joined + left,
        count=_int(raw.get("count", 0)),
        message=_str(raw.get("message", "")),
        raw=line,
        joined=joined,
        left=left,
        joins=_int(raw.get("joins", 1 if event == "join" else 0)),
        leaves=_int(raw.get("leaves", 1 if event == "leave" else 0)),
        members=None if members is None else _names(members),
        room=_optional_str(raw.get("room")),
        people=None if people is None else _people(people),
    )


def _names(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise TypeError(f"expected a list of names, got {value!r}")
    return tuple(_str(name) for name in value)


def _people(value: Any) -> tuple[Person, ...]:
    if not isinstance(value, list):
        raise TypeError(f"expected a list of people, got {value!r}")
    return tuple(Person(_optional_str(p["user"]), _str(p["name"])) for p in value)


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
