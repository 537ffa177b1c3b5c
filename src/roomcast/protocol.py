"""The chat protocol, sans I/O: parse what clients send, encode what the server sends.

Everything here is a pure function of its arguments (no clock, no sockets, no event loop),
so the wire format is tested synchronously and the I/O edges stay thin. Encoders return
``str`` because ASGI text frames carry ``str``; each event is serialised exactly once, no
matter how many members receive it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any, Final
from urllib.parse import parse_qsl

import orjson

from .names import BadName, normalize_name

__all__ = [
    "BATCH_SUBPROTOCOL",
    "BadMessage",
    "BadQuery",
    "ChatMessage",
    "ChatQuery",
    "CloseCode",
    "Command",
    "ErrorCode",
    "HistoryRequest",
    "Join",
    "Leave",
    "Listed",
    "ProtocolError",
    "Refresh",
    "RoomMessage",
    "Typing",
    "dm_opened",
    "dm_users",
    "encode_ack",
    "encode_error",
    "encode_history",
    "encode_left",
    "encode_message",
    "encode_message_parts",
    "encode_notice",
    "encode_presence",
    "encode_typing",
    "encode_welcome",
    "join_batch",
    "parse_chat_query",
    "parse_client_frame",
    "parse_command",
    "parse_rooms_name",
    "valid_id",
    "valid_room",
    "valid_v2_room",
]

BATCH_SUBPROTOCOL: Final = "roomcast.batch"
DEFAULT_ROOM: Final = "general"
MAX_ID_LENGTH: Final = 64
MAX_WELCOME_MEMBERS: Final = 100
#: messages in one scrollback page (SPEC §11): at most, and when the client does not say
MAX_PAGE: Final = 200
DEFAULT_PAGE: Final = 50
#: the largest ``seq`` a client may name (``since``, ``before``): 18 digits
MAX_SEQ: Final = 10**18
#: a person as member lists show it (``members``, ``people``): the verified user id
#: (``None`` when anonymous) and the display name
Listed = tuple[str | None, str]
#: the member of a ``notice``'s ``data`` object that marks roomcast's own notices (its
#: value says which kind); the server API refuses application notices that carry it
RESERVED_NOTICE_KEY: Final = "roomcast"
#: names listed per direction (joined, left) in one presence notice; the rest are counted
MAX_PRESENCE_NAMES: Final = 10

_ROOM_RE: Final = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
#: a direct-message room: ``dm:`` and two user ids (no ``:`` nor control characters)
_DM_RE: Final = re.compile(r"dm:([^:\x00-\x1f\x7f]{1,256}):([^:\x00-\x1f\x7f]{1,256})")
_EPOCH_RE: Final = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


class CloseCode(IntEnum):
    """WebSocket close codes roomcast sends (SPEC §6)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    UNAUTHORIZED = 4001
    ROOM_FULL = 4003
    UNKNOWN_PATH = 4004
    TOO_SLOW = 4008
    BAD_REQUEST = 4400
    FORBIDDEN = 4403
    TOO_MANY_CONNECTIONS = 4429


class ErrorCode(StrEnum):
    """Machine-readable codes of ``error`` events."""

    RATE_LIMITED = "rate_limited"
    TOO_LONG = "too_long"
    BINARY_UNSUPPORTED = "binary_unsupported"
    BAD_ID = "bad_id"
    HISTORY_GAP = "history_gap"
    UNAVAILABLE = "unavailable"
    UNKNOWN_TYPE = "unknown_type"
    BAD_TOKEN = "bad_token"
    # protocol v2 (/ws): about one room, never closing the connection
    NOT_MEMBER = "not_member"
    ALREADY_MEMBER = "already_member"
    FORBIDDEN = "forbidden"
    ROOM_FULL = "room_full"
    TOO_MANY_ROOMS = "too_many_rooms"
    BAD_ROOM = "bad_room"
    NAME_TAKEN = "name_taken"
    BAD_REQUEST = "bad_request"
    # hooks (SPEC §10): a message refused by the application's ``message`` hook carries the
    # hook's own code instead
    REFUSED = "refused"


class ProtocolError(ValueError):
    """What a client sent cannot be used; ``message`` says what was expected."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadQuery(ProtocolError):
    """A ``/ws/chat`` query parameter is invalid: the connection is closed with ``code``."""

    code = CloseCode.BAD_REQUEST


class BadMessage(ProtocolError):
    """A chat frame is refused: the client gets an ``error`` event with ``code`` (and the
    message's ``id``, when it had a usable one, so the client knows which was refused)."""

    def __init__(
        self, code: ErrorCode, message: str, id: str | None = None, *, room: str | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.id = id
        self.room = room


# -- client to server ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChatQuery:
    """The query string of ``/ws/chat``, validated."""

    room: str = DEFAULT_ROOM
    name: str | None = None
    token: str | None = None
    since: int | None = None
    epoch: str | None = None


def parse_rooms_name(query_string: bytes) -> str | None:
    """The ``name`` of a ``/ws`` query string, normalised (``None``: absent or empty).
    ``/ws`` takes only ``name`` and ``token``: ``room``, ``since`` and ``epoch`` are
    ``/ws/chat``'s, and like any other parameter they are ignored here.

    :raises BadQuery: for a query string that is not UTF-8, or a bad name
    """
    return _query_name(_query_params(query_string))


def _query_params(query_string: bytes) -> dict[str, str]:
    """The parameters, the first of each name counting."""
    try:
        pairs = parse_qsl(query_string.decode("ascii"), keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise _bad_query("the query string is not valid percent-encoded UTF-8") from None
    params: dict[str, str] = {}
    for key, value in pairs:
        params.setdefault(key, value)
    return params


def _query_name(params: dict[str, str]) -> str | None:
    name = params.get("name") or None
    if name is None:
        return None
    try:
        return normalize_name(name)
    except BadName as exc:
        raise _bad_query(str(exc)) from None


def parse_chat_query(query_string: bytes) -> ChatQuery:
    """Validate ``room``, ``name``, ``token``, ``since`` and ``epoch``.

    Unknown parameters are ignored; when a parameter repeats, the first one counts.

    :raises BadQuery: with a message naming the parameter and what was expected
    """
    params = _query_params(query_string)
    room = params.get("room", DEFAULT_ROOM)
    if not valid_room(room):
        raise _bad_query("room must be 1-64 characters of A-Z a-z 0-9 _ - .")
    name = _query_name(params)
    since = params.get("since") or None
    if since is not None and not (since.isascii() and since.isdigit() and len(since) <= 18):
        raise _bad_query("since must be a non-negative integer")
    epoch = params.get("epoch") or None
    if epoch is not None and not _EPOCH_RE.fullmatch(epoch):
        raise _bad_query("epoch must be 1-64 characters of A-Z a-z 0-9 _ - .")
    return ChatQuery(
        room=room,
        name=name,
        token=params.get("token") or None,
        since=None if since is None else int(since),
        epoch=epoch,
    )


def valid_room(room: str) -> bool:
    """1-64 characters of ``A-Z a-z 0-9 _ - .``"""
    return _ROOM_RE.fullmatch(room) is not None


def valid_v2_room(room: str) -> bool:
    """A room a ``/ws`` connection (and the server API) can name: :func:`valid_room`, or
    a direct-message room (:func:`dm_users`)."""
    return valid_room(room) or dm_users(room) is not None


#: what :func:`valid_v2_room` takes, for the errors that refuse another
V2_ROOM_RULE: Final = "room must be 1-64 characters of A-Z a-z 0-9 _ - ., or dm:A:B for users A < B"


def valid_id(value: object) -> bool:
    """A message's (or request's) ``id``: a string of at most :data:`MAX_ID_LENGTH`."""
    return isinstance(value, str) and len(value) <= MAX_ID_LENGTH


def dm_users(room: str) -> tuple[str, str] | None:
    """The two users of a direct-message room ``dm:A:B`` (``A`` < ``B``), else ``None``:
    only they may join it (v2)."""
    match = _DM_RE.fullmatch(room)
    if match is None or not match[1] < match[2]:
        return None
    return match[1], match[2]


def _bad_query(message: str) -> BadQuery:
    return BadQuery(message)


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """A chat message a client asked to send; ``data`` is what a ``message`` hook added to
    travel with it (SPEC §10: never taken from a client)."""

    text: str
    id: str | None = None
    data: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Refresh:
    """A client's ``{"type": "refresh", "token": ...}``: a new token for this connection
    (SPEC §8.3)."""

    token: str


def parse_client_frame(frame: str, *, max_text: int) -> ChatMessage | Refresh | None:
    """Turn a client text frame into a chat message or a command.

    A JSON object whose ``"type"`` is a string other than ``"message"`` is a command.
    Otherwise the seed chapter's rules apply: a JSON object with a string ``"text"`` is a
    message (with an optional string ``"id"``); any other frame, JSON or not, is itself the
    chat text. Returns ``None`` for an empty (or whitespace-only) text, which is ignored.

    :raises BadMessage: :attr:`ErrorCode.TOO_LONG` past ``max_text`` characters,
        :attr:`ErrorCode.BAD_ID` for an ``id`` that is not a string of at most 64
        characters, :attr:`ErrorCode.UNKNOWN_TYPE` for a command this server does not
        know, :attr:`ErrorCode.BAD_TOKEN` for a ``refresh`` without a string ``token``
    """
    text, message_id = frame, None
    if frame[:1] == "{":
        data = _loads_object(frame)
        kind = None if data is None else data.get("type")
        if data is not None and isinstance(kind, str) and kind != "message":
            return _command(kind, data)
        if data is not None and isinstance(data.get("text"), str):
            text, message_id = data["text"], data.get("id")
    return _chat_message(text, message_id, max_text)


def _chat_message(text: str, message_id: object, max_text: int) -> ChatMessage | None:
    if message_id is not None and not (
        isinstance(message_id, str) and valid_id(message_id)  # (isinstance: for mypy)
    ):
        raise BadMessage(
            ErrorCode.BAD_ID, f"id must be a string of at most {MAX_ID_LENGTH} characters"
        )
    if not text.strip():
        return None
    if len(text) > max_text:
        raise BadMessage(
            ErrorCode.TOO_LONG,
            f"message is {len(text)} characters; the limit is {max_text}",
            message_id,
        )
    return ChatMessage(text, message_id)


def _command(kind: str, data: dict[str, Any]) -> Refresh:
    if kind == "refresh":
        token = data.get("token")
        if not isinstance(token, str) or not token:
            raise BadMessage(ErrorCode.BAD_TOKEN, "refresh needs a token: a non-empty string")
        return Refresh(token)
    raise BadMessage(
        ErrorCode.UNKNOWN_TYPE, f"unknown command type {kind[:40]!r}; expected refresh"
    )


# -- protocol v2: many rooms over one connection (/ws) -----------------------------------------


@dataclass(frozen=True, slots=True)
class Join:
    """``{"type": "join", "room", "since"?, "epoch"?}``: join a room, resuming after
    ``since`` in run ``epoch`` as ``/ws/chat?since=&epoch=`` does."""

    room: str
    since: int | None = None
    epoch: str | None = None


@dataclass(frozen=True, slots=True)
class Leave:
    """``{"type": "leave", "room"}``"""

    room: str


@dataclass(frozen=True, slots=True)
class RoomMessage:
    """``{"type": "message", "room", "text", "id"?}``: a chat message into a room."""

    room: str
    message: ChatMessage


@dataclass(frozen=True, slots=True)
class Typing:
    """``{"type": "typing", "room"}``: relayed to the room's others, never stored."""

    room: str


@dataclass(frozen=True, slots=True)
class HistoryRequest:
    """``{"type": "history", "room", "before"?, "limit"?, "id"?}``: a page of the room's
    messages before seq ``before`` (the newest when ``None``), answered with one
    ``history`` event to this connection only (``id`` echoed, to match the answer)."""

    room: str
    before: int | None = None
    limit: int = DEFAULT_PAGE
    id: str | None = None


Command = Join | Leave | RoomMessage | Typing | Refresh | HistoryRequest

_V2_TYPES = "join, leave, message, typing, history or refresh"


def parse_command(frame: str, *, max_text: int) -> Command | None:
    """Turn a ``/ws`` text frame into a command: a JSON object with a string ``type``.
    Returns ``None`` for a message whose text is empty (or whitespace), which is ignored.

    :raises BadMessage: :attr:`ErrorCode.UNKNOWN_TYPE` for a frame that is not such an
        object or a type this server does not know; :attr:`ErrorCode.BAD_ROOM` for a
        missing or malformed ``room``; :attr:`ErrorCode.BAD_REQUEST` for a ``since`` or
        ``epoch`` that is not one; what :func:`parse_client_frame` raises for a message's
        text and id, and for ``refresh``. Each carries the room it was about, if any.
    """
    data = _loads_object(frame) if frame[:1] == "{" else None
    kind = None if data is None else data.get("type")
    if data is None or not isinstance(kind, str):
        raise BadMessage(ErrorCode.UNKNOWN_TYPE, f"send JSON objects with a type: {_V2_TYPES}")
    if kind == "refresh":
        return _command(kind, data)
    if kind not in ("join", "leave", "message", "typing", "history"):
        raise BadMessage(
            ErrorCode.UNKNOWN_TYPE, f"unknown command type {kind[:40]!r}; expected {_V2_TYPES}"
        )
    room = data.get("room")
    if not isinstance(room, str) or not valid_v2_room(room):
        raise BadMessage(
            ErrorCode.BAD_ROOM,
            V2_ROOM_RULE,
            room=room if isinstance(room, str) and len(room) <= 600 else None,
        )
    if kind == "join":
        return _join(room, data)
    if kind == "leave":
        return Leave(room)
    if kind == "typing":
        return Typing(room)
    if kind == "history":
        return _history(room, data)
    text, message_id = data.get("text"), data.get("id")
    if not isinstance(text, str):
        usable_id = message_id if valid_id(message_id) else None
        raise BadMessage(
            ErrorCode.BAD_REQUEST, "a message needs a string text", usable_id, room=room
        )
    try:
        message = _chat_message(text, message_id, max_text)
    except BadMessage as exc:
        exc.room = room
        raise
    return None if message is None else RoomMessage(room, message)


def _join(room: str, data: dict[str, Any]) -> Join:
    since, epoch = data.get("since"), data.get("epoch")
    if since is not None and not (_whole(since) and 0 <= since < 10**18):
        raise BadMessage(ErrorCode.BAD_REQUEST, "since must be a non-negative integer", room=room)
    if epoch is not None and not (isinstance(epoch, str) and _EPOCH_RE.fullmatch(epoch)):
        raise BadMessage(
            ErrorCode.BAD_REQUEST, "epoch must be 1-64 characters of A-Z a-z 0-9 _ - .", room=room
        )
    return Join(room, since, epoch)


def _history(room: str, data: dict[str, Any]) -> HistoryRequest:
    before, limit, id = data.get("before"), data.get("limit", DEFAULT_PAGE), data.get("id")
    if id is not None and not valid_id(id):
        message = f"id must be a string of at most {MAX_ID_LENGTH} characters"
        raise BadMessage(ErrorCode.BAD_ID, message, room=room)
    if before is not None and not (_whole(before) and 1 <= before < MAX_SEQ):
        raise BadMessage(
            ErrorCode.BAD_REQUEST, "before must be a positive integer (a seq)", id, room=room
        )
    if not (_whole(limit) and 1 <= limit <= MAX_PAGE):
        raise BadMessage(
            ErrorCode.BAD_REQUEST, f"limit must be an integer from 1 to {MAX_PAGE}", id, room=room
        )
    return HistoryRequest(room, before, limit, id)


def _whole(value: object) -> bool:
    """An integer, not a bool (JSON ``true`` must not read as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _loads_object(frame: str) -> dict[str, Any] | None:
    try:
        data = orjson.loads(frame)
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


# -- server to client ---------------------------------------------------------------------


def _dumps(event: dict[str, Any]) -> str:
    return orjson.dumps(event).decode()


def encode_message(
    *,
    room: str,
    seq: int,
    text: str,
    sender: str | None,
    ts: int,
    id: str | None = None,
    user: str | None = None,
    data: dict[str, Any] | None = None,
) -> str:
    head, tail = encode_message_parts(
        room=room, text=text, sender=sender, ts=ts, id=id, user=user, data=data
    )
    return f"{head}{seq}{tail}"


def encode_message_parts(
    *,
    room: str,
    text: str,
    sender: str | None,
    ts: int,
    id: str | None = None,
    user: str | None = None,
    data: dict[str, Any] | None = None,
) -> tuple[str, str]:
    """A ``message`` event split around its ``seq``: ``head + str(seq) + tail`` is the
    event. A broker that assigns the seq elsewhere (a Redis script) splices it in, so the
    event is still serialised once. ``user`` is the sender's verified user id (SPEC §8.1),
    ``None`` when anonymous; ``data`` is a ``message`` hook's object (SPEC §10), left out
    when there is none."""
    head = f'{{"type":"message","text":{_string(text)},"room":{_string(room)},"seq":'
    sender_json = "null" if sender is None else _string(sender)
    user_json = "null" if user is None else _string(user)
    id_json = "" if id is None else f',"id":{_string(id)}'
    data_json = "" if data is None else f',"data":{orjson.dumps(data).decode()}'
    return head, f',"from":{sender_json},"user":{user_json},"ts":{ts}{id_json}{data_json}}}'


def _string(value: str) -> str:
    return orjson.dumps(value).decode()


def encode_welcome(
    *, room: str, epoch: str, seq: int, people: Sequence[Listed], count: int, max_text: int
) -> str:
    """The first event of a connection. ``limits`` tells a client what the server will
    refuse (``text``: the longest chat text in characters), so that it can keep an
    over-long draft instead of sending it only to have it refused. ``people`` (the named
    members, in join order) become ``members`` and ``people``: see :func:`_listing`."""
    return _dumps(
        {
            "type": "welcome",
            "room": room,
            "epoch": epoch,
            "seq": seq,
            **_listing(people),
            "count": count,
            "limits": {"text": max_text},
        }
    )


def _listing(people: Sequence[Listed]) -> dict[str, Any]:
    """A room's member list, at most :data:`MAX_WELCOME_MEMBERS`, twice: ``members``, the
    names (what v1 clients read), and ``people``, the same people in the same order with
    their user ids (``{"user", "name"}``), which a client needs to open a direct room
    (``dm:A:B`` names user ids, not display names)."""
    listed = people[:MAX_WELCOME_MEMBERS]
    return {
        "members": [name for _, name in listed],
        "people": [{"user": user, "name": name} for user, name in listed],
    }


def encode_presence(
    *,
    room: str,
    joined: list[str],
    left: list[str],
    joins: int,
    leaves: int,
    count: int,
    people: Sequence[Listed] | None,
    user: str | None = None,
) -> str:
    """A ``system`` notice for the joins and leaves of one room since its last notice.

    It keeps the single-change shape (``message``, ``event``, ``name``, ``count``) and adds
    what a coalesced notice needs: ``joined``/``left`` (names, at most
    :data:`MAX_PRESENCE_NAMES` each; anonymous members are only counted), ``joins``/``leaves``
    (how many in all) and ``members`` and ``people`` (the room's names now, and the same
    with user ids, as in ``welcome``; both absent with ``people=None``). ``count`` and
    ``members`` are absolute, so a client that replaces its member list with them is right
    whichever notices it saw before. ``event`` is ``join`` or ``leave`` when only one kind
    of change happened, else ``presence``; ``name`` is set only for a single named change,
    ``user`` (the verified user id, SPEC §8.1) only for a single change by a verified user.
    """
    if joins and leaves:
        event = "presence"
        text = f"{_who(joined, joins)} joined and {_who(left, leaves)} left #{room}"
    elif joins:
        event, text = "join", f"{_who(joined, joins)} joined #{room}"
    else:
        event, text = "leave", f"{_who(left, leaves)} left #{room}"
    single = joined if joins == 1 and not leaves else left if leaves == 1 and not joins else []
    notice: dict[str, Any] = {
        "type": "system",
        "room": room,
        "message": text,
        "event": event,
        "name": single[0] if single else None,
        "user": user if joins + leaves == 1 else None,
        "count": count,
        "joined": joined[:MAX_PRESENCE_NAMES],
        "left": left[:MAX_PRESENCE_NAMES],
        "joins": joins,
        "leaves": leaves,
    }
    if people is not None:
        notice.update(_listing(people))
    return _dumps(notice)


def _who(names: list[str], total: int) -> str:
    """``ann``, ``ann and bob``, ``ann, bob and 3 others``, ``5 users``, ``A user``."""
    names = names[:MAX_PRESENCE_NAMES]
    others = total - len(names)
    if not names:
        return "A user" if total == 1 else f"{total} users"
    if others > 0:
        return f"{', '.join(names)} and {others} {'other' if others == 1 else 'others'}"
    if len(names) == 1:
        return names[0]
    return f"{', '.join(names[:-1])} and {names[-1]}"


def encode_ack(*, id: str | None, seq: int, room: str | None = None) -> str:
    """An ``ack``; v2 names its ``room`` (v1's connection is in one)."""
    if room is None:
        return _dumps({"type": "ack", "id": id, "seq": seq})
    return _dumps({"type": "ack", "room": room, "id": id, "seq": seq})


def encode_left(room: str, code: int, reason: str) -> str:
    """v2: a membership ended: the client's own ``leave`` (1000), or the server's doing
    with the close code a v1 connection would have had (4403 a grant withdrawn, ...)."""
    return _dumps({"type": "left", "room": room, "code": int(code), "reason": reason})


def encode_typing(*, room: str, user: str | None, name: str | None) -> str:
    """v2: someone in the room is typing (relayed, never stored)."""
    return _dumps({"type": "typing", "room": room, "user": user, "name": name})


def encode_notice(data: Any) -> str:
    """v2: the application's message to one user (``POST /api/users/{user}/notify``)."""
    return _dumps({"type": "notice", "data": data})


def dm_opened(room: str, user: str, name: str | None) -> dict[str, Any]:
    """v2: a ``notice``'s ``data`` telling a user that ``user`` (named ``name``) opened the
    direct room ``room`` with it. Its :data:`RESERVED_NOTICE_KEY` says roomcast sent it,
    not the application (which may not use that key: the server API refuses it)."""
    return {RESERVED_NOTICE_KEY: "dm", "room": room, "user": user, "name": name}


def encode_history(
    *,
    room: str,
    epoch: str | None,
    before: int | None,
    messages: list[str],
    more: bool,
    id: str | None = None,
) -> str:
    """v2: a scrollback page (SPEC §11): ``messages`` are encoded ``message`` events in seq
    order, spliced in as they are rather than decoded and encoded again; ``more`` says
    whether earlier ones exist; ``before`` and ``id`` are the request's, to match it."""
    head = {"type": "history", "room": room, "epoch": epoch, "before": before}
    if id is not None:
        head["id"] = id
    more_json = "true" if more else "false"
    return f'{_dumps(head)[:-1]},"more":{more_json},"messages":[{",".join(messages)}]}}'


def encode_error(
    code: ErrorCode | str, message: str, *, id: str | None = None, **extra: Any
) -> str:
    """An ``error`` event; ``id`` names the client message it answers, if it had one.
    ``code`` is one of roomcast's, or the one a ``message`` hook refused with."""
    event = {"type": "error", "error": str(code), "message": message, **extra}
    if id is not None:
        event["id"] = id
    return _dumps(event)


def join_batch(events: list[str]) -> str:
    """One ``roomcast.batch`` frame: events in order, one per line.

    Encoded events never contain a raw newline (JSON escapes it), so a newline is an
    unambiguous separator.
    """
    return "\n".join(events)
