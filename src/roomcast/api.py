"""The server API (SPEC §8.2): HTTP for the application's backend.

Enabled by ``ROOMCAST_API_KEY``; every request carries ``Authorization: Bearer <key>``.
JSON in and out; an error is ``{"error": code, "message": text}`` with a 4xx (or 503)
status. Everything goes through the broker, so the API behaves the same on every worker
and, with Redis, on every machine: a message posted here gets the room's next ``seq``, is
kept in its history and reaches every member.

::

    POST /api/rooms/{room}/messages   {"text", "from"?, "id"?}  -> {"seq"}
    DELETE /api/rooms/{room}/messages                           -> {"room", "epoch", "seq"}
    GET  /api/rooms/{room}/history?since=S&limit=N             -> {"room", "epoch", "seq",
                                                                    "first", "messages"}
    GET  /api/rooms/{room}/history?before=S&limit=N            -> {"room", "epoch", "before",
                                                                    "more", "messages"}
    GET  /api/rooms/{room}/presence                             -> {"room", "count", "members":
                                                                    [{"user", "name"}]}
    GET  /api/rooms                                             -> {"rooms": [{"name", "count"}]}
    POST /api/users/{user}/disconnect                           -> {"closed"}
    POST /api/users/{user}/notify     {"data"}                  -> {"delivered"}

*History* has two directions: ``since`` reads forwards from a seq (what a backend filling a
gap wants), ``before`` pages backwards from one (scrollback, :mod:`.scrollback`: ``limit``
at most 200, messages in seq order, ``more`` while earlier ones exist; a ``before`` past
the room's latest seq gives the newest page).

*Presence* lists people: each verified user once however many tabs it has open (with the
name one of them shows), each anonymous connection with ``"user": null``; ``count`` counts them.

*Disconnect* closes every connection of a verified user (the token's ``sub``; percent-
encode it in the URL, ``/`` included) with 4001 "disconnected by the server", in every room
and tab, on every worker and server, each room hearing one leave. It is not a ban: the user
may connect again with a token that is still valid (refuse to issue new ones, and keep
tokens short-lived, to keep someone out). ``closed`` is how many connections were closed:
with one process, exactly; with Redis, the request goes to every worker over pub/sub
(``PUBLISH`` tells how many workers are subscribed), each closes the user's connections
it holds and reports its count on a list the request waits on (``BLPOP``) for up to one
second, and ``closed`` adds up the reports that came in time. A worker that is too slow
to report still closes the connections (they are just not counted); one that was cut off
from Redis at that moment never hears of the request and keeps them.

*Notify* gives every protocol v2 (``/ws``) connection of a verified user a ``notice``
event carrying ``data`` (any JSON: a mention, an invitation), on every worker and server;
``delivered`` counts the connections reached, as ``closed`` does for a disconnect.

Request parsing is sans I/O (:func:`parse_publish`, :func:`parse_history_query`,
:func:`parse_user`), so the rules are tested without a server; :func:`handle` is the thin
I/O edge.
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qsl, unquote_to_bytes

import orjson

from . import protocol
from .admission import Headers, header
from .archive import ArchiveUnavailable
from .asgi import BodyTooLarge, Receive, Scope, Send, read_body, respond
from .brokers import BrokerUnavailable
from .names import BadName, normalize_name
from .scrollback import scrollback

if TYPE_CHECKING:
    from .runtime import Runtime

__all__ = [
    "ApiError",
    "Publish",
    "handle",
    "parse_history_query",
    "parse_publish",
    "parse_scrollback_query",
    "parse_user",
]

PREFIX: Final = "/api/"
#: largest request body accepted: a message at ROOMCAST_MAX_TEXT of 4-byte characters fits
MAX_BODY: Final = 65536
DEFAULT_LIMIT: Final = 100
MAX_LIMIT: Final = 1000
JSON: Final = "application/json"
#: longest user id (a token's ``sub`` is refused beyond it too)
MAX_USER: Final = 256

_ROOM_ROUTE: Final = re.compile(r"/api/rooms/(?P<room>[^/]+)/(?P<what>messages|history|presence)")
_USER_ROUTE: Final = re.compile(r"/api/users/(?P<user>.*)/(?P<what>disconnect|notify)", re.DOTALL)
#: the same in the undecoded path, where a ``%2F`` in a user id is not a separator yet
_RAW_USER_ROUTE: Final = re.compile(rb"/api/users/([^/]*)/(?:disconnect|notify)\Z")


class ApiError(Exception):
    """A request the API refuses: ``status``, and ``code``/``message`` for the body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Publish:
    message: protocol.ChatMessage
    sender: str | None


def parse_publish(body: bytes, *, max_text: int) -> Publish:
    """The body of ``POST /api/rooms/{room}/messages``.

    :raises ApiError: 400 for anything but a JSON object with a non-empty string
        ``text`` (and, if present, a valid ``from`` display name and ``id``); 413 for a
        text over ``max_text`` characters
    """
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ApiError(400, "bad_request", "the body must be a JSON object") from None
    if not isinstance(data, dict):
        raise ApiError(400, "bad_request", "the body must be a JSON object")
    text, sender, id = data.get("text"), data.get("from"), data.get("id")
    if not isinstance(text, str) or not text.strip():
        raise ApiError(400, "bad_request", '"text" must be a non-empty string')
    if len(text) > max_text:
        message = f"text is {len(text)} characters; the limit is {max_text}"
        raise ApiError(413, protocol.ErrorCode.TOO_LONG.value, message)
    if sender is not None:
        try:
            sender = normalize_name(sender) if isinstance(sender, str) else None
        except BadName as exc:
            raise ApiError(400, "bad_request", f'"from": {exc}') from None
        if sender is None:
            raise ApiError(400, "bad_request", '"from" must be a string')
    if id is not None and not protocol.valid_id(id):
        message = f'"id" must be a string of at most {protocol.MAX_ID_LENGTH} characters'
        raise ApiError(400, protocol.ErrorCode.BAD_ID.value, message)
    return Publish(protocol.ChatMessage(text, id), sender)


def parse_history_query(query_string: bytes) -> tuple[int, int]:
    """``(since, limit)`` from ``?since=S&limit=N`` (defaults 0 and :data:`DEFAULT_LIMIT`).

    :raises ApiError: 400 unless both are integers, ``since >= 0`` and
        ``1 <= limit <= MAX_LIMIT``
    """
    params = dict(parse_qsl(query_string.decode("latin-1")))
    since, limit = params.get("since", "0"), params.get("limit", str(DEFAULT_LIMIT))
    if not (_digits(since) and len(since) <= 18):
        raise ApiError(400, "bad_request", "since must be a non-negative integer")
    if not (_digits(limit) and len(limit) <= 4 and 1 <= int(limit) <= MAX_LIMIT):
        raise ApiError(400, "bad_request", f"limit must be an integer from 1 to {MAX_LIMIT}")
    return int(since), int(limit)


def parse_scrollback_query(query_string: bytes) -> tuple[int, int] | None:
    """``(before, limit)`` from ``?before=S&limit=N`` (``limit`` defaults to
    :data:`~.protocol.DEFAULT_PAGE`), or ``None`` for a query without ``before`` (a
    ``since`` one).

    :raises ApiError: 400 unless ``before`` is a positive integer, ``1 <= limit <=
        MAX_PAGE``, and ``since`` is not given too
    """
    params = dict(parse_qsl(query_string.decode("latin-1"), keep_blank_values=True))
    if "before" not in params:
        return None
    if "since" in params:
        raise ApiError(400, "bad_request", "give since (forwards) or before (backwards), not both")
    before, limit = params["before"], params.get("limit", str(protocol.DEFAULT_PAGE))
    if not (_digits(before) and len(before) <= 18 and int(before) >= 1):
        raise ApiError(400, "bad_request", "before must be a positive integer (a seq)")
    if not (_digits(limit) and len(limit) <= 4 and 1 <= int(limit) <= protocol.MAX_PAGE):
        message = f"limit must be an integer from 1 to {protocol.MAX_PAGE} with before"
        raise ApiError(400, "bad_request", message)
    return int(before), int(limit)


def _digits(text: str) -> bool:
    """ASCII digits only (``str.isdigit`` also takes ``²`` and ``٣``, which ``int`` refuses)."""
    return text.isascii() and text.isdigit()


def parse_user(segment: bytes) -> str:
    """The user id in a ``/api/users/{user}/...`` path segment, percent-decoded.

    :raises ApiError: 400 unless it decodes to 1-:data:`MAX_USER` characters of UTF-8
    """
    try:
        user = unquote_to_bytes(segment).decode()
    except UnicodeDecodeError:
        raise ApiError(400, "bad_request", "the user id must be percent-encoded UTF-8") from None
    return _checked_user(user)


def _checked_user(user: str) -> str:
    if not 1 <= len(user) <= MAX_USER:
        raise ApiError(400, "bad_request", f"the user id must be 1-{MAX_USER} characters")
    return user


def _user_in(scope: Scope, decoded: str) -> str:
    """The user id of a ``/api/users/{user}/...`` request: from the undecoded path (so
    that an id with a ``%2F`` is one segment), else as the server decoded it."""
    raw = _RAW_USER_ROUTE.search(scope.get("raw_path") or b"")
    return parse_user(raw[1]) if raw is not None else _checked_user(decoded)


def authorized(headers: Headers, key: str) -> bool:
    """Whether the request carries ``Authorization: Bearer <key>`` (constant time)."""
    given = header(headers, b"authorization") or ""
    scheme, _, token = given.partition(" ")
    # as bytes: compare_digest refuses str with non-ASCII characters (TypeError)
    presented = token.strip().encode("latin-1")
    return scheme.lower() == "bearer" and hmac.compare_digest(presented, key.encode())


async def handle(runtime: Runtime, path: str, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer one API request (``path`` is below the app's mount point)."""
    key = runtime.settings.api_key
    if key is None:
        await respond(send, 404, b"Not Found", "text/plain; charset=utf-8")
        return
    try:
        if not authorized(scope.get("headers", []), key):
            raise ApiError(401, "unauthorized", "Authorization: Bearer <ROOMCAST_API_KEY> needed")
        status, body = await _route(runtime, path, scope, receive)
    except ApiError as error:
        status, body = error.status, {"error": error.code, "message": error.message}
    except BrokerUnavailable:
        status = 503
        body = {"error": "unavailable", "message": "the chat service is unavailable"}
    except ArchiveUnavailable:  # (a page older than the retained window)
        status = 503
        body = {"error": "unavailable", "message": "the archive is unavailable; try again"}
    extra = [(b"www-authenticate", b"Bearer")] if status == 401 else []
    encoded = body if isinstance(body, bytes) else orjson.dumps(body)
    await respond(send, status, encoded, JSON, headers=extra)


async def _route(
    runtime: Runtime, path: str, scope: Scope, receive: Receive
) -> tuple[int, dict[str, Any] | bytes]:
    method: str = scope["method"]
    broker = runtime.broker
    if path == "/api/rooms":
        _allow(method, "GET")
        rooms = await broker.rooms()
        return 200, {"rooms": [{"name": name, "count": n} for name, n in sorted(rooms.items())]}
    if (user_match := _USER_ROUTE.fullmatch(path)) is not None:
        _allow(method, "POST")
        user = _user_in(scope, user_match["user"])
        if user_match["what"] == "disconnect":
            return 200, {"closed": await broker.disconnect(user)}
        data = parse_notify(await _body(receive))
        return 200, {"delivered": await broker.notify(user, data)}
    match = _ROOM_ROUTE.fullmatch(path)
    if match is None:
        raise ApiError(404, "not_found", f"no API endpoint at {path[:80]}")
    room, what = match["room"], match["what"]
    if not protocol.valid_v2_room(room):
        # a direct room is a room like any here: /api/rooms lists it, and a stored hook's
        # gaps in it are filled from its history
        raise ApiError(400, "bad_request", protocol.V2_ROOM_RULE)
    if what == "messages" and method == "DELETE":
        return 200, await _forget_messages(runtime, room)
    if what == "messages":
        _allow(method, "POST")
        publish = parse_publish(await _body(receive), max_text=runtime.settings.max_text)
        return 200, {"seq": await broker.post(room, publish.message, publish.sender)}
    _allow(method, "GET")
    if what == "history":
        query = scope.get("query_string", b"")
        backwards = parse_scrollback_query(query)
        if backwards is not None:
            return 200, await _scrollback_page(runtime, room, *backwards)
        since, limit = parse_history_query(query)
        history = await broker.history(room, since, limit)
        head = orjson.dumps(
            {"room": room, "epoch": history.epoch, "seq": history.seq, "first": history.first}
        )
        # the retained events are already JSON: splice them in rather than re-encode them
        return 200, head[:-1] + b',"messages":[' + ",".join(history.events).encode() + b"]}"
    people = await broker.presence(room)
    members = [{"user": person.user, "name": person.name} for person in people]
    return 200, {"room": room, "count": len(members), "members": members}


async def _scrollback_page(runtime: Runtime, room: str, before: int, limit: int) -> bytes:
    page = await scrollback(runtime, room, before, limit)
    head = orjson.dumps({"room": room, "epoch": page.epoch, "before": before, "more": page.more})
    # the events are already JSON: splice them in rather than re-encode them
    return head[:-1] + b',"messages":[' + ",".join(page.messages).encode() + b"]}"


async def _forget_messages(runtime: Runtime, room: str) -> dict[str, Any]:
    """``DELETE /api/rooms/{room}/messages``: the room's archived and retained messages
    go; its epoch and seq stay (members stay too, and are not told), so a client resuming
    from before is told ``history_gap``."""
    position = await runtime.broker.clear_history(room)
    if position is None:
        history = await runtime.broker.history(room, 0, 1)
        position = None if history.epoch is None else (history.epoch, history.seq)
    if position is not None and runtime.archive is not None:
        try:
            await runtime.archive.forget(room, *position)
        except ArchiveUnavailable:
            raise ApiError(503, "unavailable", "the archive is unavailable; try again") from None
    epoch, seq = position or (None, 0)
    return {"room": room, "epoch": epoch, "seq": seq}


async def _body(receive: Receive) -> bytes:
    try:
        return await read_body(receive, MAX_BODY)
    except BodyTooLarge:
        raise ApiError(413, "too_large", f"the body is over {MAX_BODY} bytes") from None


def parse_notify(body: bytes) -> Any:
    """The ``data`` of ``POST /api/users/{user}/notify`` ``{"data": ...}``: any JSON value.

    :raises ApiError: 400 unless the body is a JSON object with a ``data`` member, or if
        ``data`` is an object with the member reserved for roomcast's own notices
    """
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ApiError(400, "bad_request", "the body must be a JSON object") from None
    if not isinstance(parsed, dict) or "data" not in parsed:
        raise ApiError(400, "bad_request", 'the body must be a JSON object with "data"')
    data = parsed["data"]
    if isinstance(data, dict) and protocol.RESERVED_NOTICE_KEY in data:
        # so that a client can trust a notice that carries it to be roomcast's own
        key = protocol.RESERVED_NOTICE_KEY
        raise ApiError(400, "bad_request", f'"{key}" in data is reserved for roomcast\'s notices')
    return data


def _allow(method: str, expected: str) -> None:
    if method != expected:
        raise ApiError(405, "method_not_allowed", f"use {expected}")
