"""Hooks: the application's own rules where chat happens (SPEC §10).

An application registers async functions on a :class:`Hooks` object and passes it to
:func:`roomcast.create_app`::

    hooks = roomcast.Hooks()

    @hooks.message
    async def moderate(message: roomcast.MessageRequest) -> roomcast.MessageAnswer:
        if "spam" in message.text:
            return roomcast.Refuse("spam", "no spam here")
        return roomcast.Rewrite(message.text.replace(":)", "🙂"))

    app = roomcast.create_app(hooks=hooks)

Each hook takes one event object, whose fields are those of the webhook's JSON body, and
answers with ``None`` (go on as usual), :class:`Refuse`, :class:`Rewrite` (``message``) or
an :class:`~roomcast.identity.Identity` (``connect``).

Where roomcast calls them, it calls a :class:`HookCalls`, the one small interface an
implementation over HTTP (webhooks) provides too; :class:`HookRunner` puts the rules
around any of them: each call is bounded by ``ROOMCAST_HOOK_TIMEOUT``, and a call that
times out, raises or answers something unusable is logged in one line naming the hook and
raises :class:`HookFailed`, which the caller turns into a closed door (``unavailable``).
Every call is made in the task of the connection it concerns; only ``stored`` runs
elsewhere, from the :mod:`~roomcast.stored` feed.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeVar

import anyio
import orjson

from .identity import LEEWAY, MAX_ROOM_GRANTS, Identity
from .names import BadName, normalize_name
from .protocol import ChatMessage, CloseCode, ErrorCode
from .stored import StoredMessage

__all__ = [
    "HOOK_UNAVAILABLE",
    "ConnectAnswer",
    "ConnectRequest",
    "HookCalls",
    "HookFailed",
    "HookRunner",
    "Hooks",
    "JoinRequest",
    "LeaveEvent",
    "MessageAnswer",
    "MessageRequest",
    "PythonHooks",
    "Refuse",
    "Rewrite",
]

log = logging.getLogger("roomcast")

T = TypeVar("T")

#: longest error code a ``message`` hook may refuse with (as a client message id)
MAX_CODE: Final = 64
#: longest reason of a refusal: it goes into a close frame, whose reason has 123 bytes
MAX_REASON: Final = 120
#: longest ``data`` a rewrite may add, as JSON bytes (the server API's body limit): every
#: member, every joiner's replay and the history get it, and a client library with a frame
#: limit (``websockets``: 1 MiB) would close on a bigger message, in every member at once
MAX_DATA_BYTES: Final = 65536
#: the ``error`` text when a hook failed and roomcast failed closed
HOOK_UNAVAILABLE: Final = "not done: the application's check is unavailable; try again shortly"


# -- what hooks see --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """A WebSocket handshake, after the Origin check (``connect``)."""

    #: request headers, names in lower case (several of one name joined by ``", "``)
    headers: Mapping[str, str]
    #: the ``cookie`` header's cookies
    cookies: Mapping[str, str]
    #: query parameters (the first of each name)
    query: Mapping[str, str]
    #: the peer's ``(host, port)``, when the server knows it
    client: tuple[str, int] | None
    #: the request path (below the mount point): ``/ws`` or ``/ws/chat``
    path: str


@dataclass(frozen=True, slots=True)
class JoinRequest:
    """A membership about to start (``join``)."""

    user: str | None
    name: str | None
    room: str


@dataclass(frozen=True, slots=True)
class MessageRequest:
    """A chat message before it is sequenced (``message``)."""

    user: str | None
    name: str | None
    room: str
    text: str
    id: str | None


@dataclass(frozen=True, slots=True)
class LeaveEvent:
    """A membership that has ended (``leave``): ``reason`` is ``left`` when the client
    left or went away, else why the server ended it (``too slow``, ``token expired``,
    ``server shutting down``, ...)."""

    user: str | None
    name: str | None
    room: str
    reason: str


# -- what hooks answer ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Refuse:
    """No: for ``connect`` a close ``code`` in 4000-4499; for ``message`` the ``error``
    code the sender gets (a string, default ``refused``); for ``join`` the code is not
    used (v1 closes 4403, v2 answers ``forbidden``). ``reason`` is the close reason or
    the error's ``message``."""

    code: int | str = "refused"
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Rewrite:
    """Accept the message as ``text`` instead, with ``data`` (a JSON object) travelling
    with it: what every member, the history, the API and ``stored`` see."""

    text: str
    data: dict[str, Any] | None = None


ConnectAnswer = Identity | Refuse | None
MessageAnswer = Rewrite | Refuse | None

ConnectHook = Callable[[ConnectRequest], Awaitable[ConnectAnswer]]
JoinHook = Callable[[JoinRequest], Awaitable[Refuse | None]]
MessageHook = Callable[[MessageRequest], Awaitable[MessageAnswer]]
StoredHook = Callable[[StoredMessage], Awaitable[None]]
LeaveHook = Callable[[LeaveEvent], Awaitable[None]]


class Hooks:
    """The application's hooks, registered with decorators (or set as attributes); a hook
    not registered is not called."""

    def __init__(self) -> None:
        self.on_connect: ConnectHook | None = None
        self.on_join: JoinHook | None = None
        self.on_message: MessageHook | None = None
        self.on_stored: StoredHook | None = None
        self.on_leave: LeaveHook | None = None

    def connect(self, hook: ConnectHook) -> ConnectHook:
        """Who the client is: an :class:`Identity`, a :class:`Refuse`, or ``None`` to
        let the configured tokens decide (signed, shared, or none)."""
        self.on_connect = hook
        return hook

    def join(self, hook: JoinHook) -> JoinHook:
        """Whether the connection may join the room: ``None`` or a :class:`Refuse`."""
        self.on_join = hook
        return hook

    def message(self, hook: MessageHook) -> MessageHook:
        """What becomes of a message: ``None`` (as sent), :class:`Rewrite`, :class:`Refuse`."""
        self.on_message = hook
        return hook

    def stored(self, hook: StoredHook) -> StoredHook:
        """Observe each accepted message once it is sequenced and fanned out."""
        self.on_stored = hook
        return hook

    def leave(self, hook: LeaveHook) -> LeaveHook:
        """Observe a membership that has ended."""
        self.on_leave = hook
        return hook


class HookCalls(Protocol):
    """What roomcast calls: the application's functions (:class:`Hooks`) or, for a
    standalone server, the same events over HTTP. ``has(name)`` says whether a hook is
    there at all (roomcast skips the work around one that is not)."""

    def has(self, name: str) -> bool: ...

    async def connect(self, request: ConnectRequest) -> ConnectAnswer: ...

    async def join(self, request: JoinRequest) -> Refuse | None: ...

    async def message(self, request: MessageRequest) -> MessageAnswer: ...

    async def stored(self, message: StoredMessage) -> None: ...

    async def leave(self, event: LeaveEvent) -> None: ...


class PythonHooks:
    """:class:`HookCalls` for hooks registered in Python."""

    def __init__(self, hooks: Hooks) -> None:
        self.hooks = hooks

    def has(self, name: str) -> bool:
        return getattr(self.hooks, f"on_{name}") is not None

    async def connect(self, request: ConnectRequest) -> ConnectAnswer:
        hook = self.hooks.on_connect
        return None if hook is None else await hook(request)

    async def join(self, request: JoinRequest) -> Refuse | None:
        hook = self.hooks.on_join
        return None if hook is None else await hook(request)

    async def message(self, request: MessageRequest) -> MessageAnswer:
        hook = self.hooks.on_message
        return None if hook is None else await hook(request)

    async def stored(self, message: StoredMessage) -> None:
        if self.hooks.on_stored is not None:
            await self.hooks.on_stored(message)

    async def leave(self, event: LeaveEvent) -> None:
        if self.hooks.on_leave is not None:
            await self.hooks.on_leave(event)


class HookFailed(Exception):
    """A hook timed out, raised, or answered something roomcast cannot use (already
    logged): the caller fails closed."""


class HookRunner:
    """The rules of SPEC §10 around a :class:`HookCalls`: a time limit, fail closed, one
    log line per failure, answers checked."""

    def __init__(self, calls: HookCalls, *, timeout: float, max_text: int) -> None:
        self.calls = calls
        self.timeout = timeout
        self.max_text = max_text
        #: the hooks there are: a missing one costs a set lookup, no call
        self.present = frozenset(
            name for name in ("connect", "join", "message", "stored", "leave") if calls.has(name)
        )

    async def connect(self, request: ConnectRequest) -> Identity | Refuse | None:
        """:raises HookFailed: (fail closed: ``unavailable``)"""
        if "connect" not in self.present:
            return None
        answer = await self._bounded("connect", self.calls.connect(request))
        if answer is None:
            return None
        if isinstance(answer, Refuse):
            if isinstance(answer.code, int) and 4000 <= answer.code <= 4499:
                return Refuse(answer.code, answer.reason[:MAX_REASON])
            raise _unusable("connect", f"a refusal's code must be 4000-4499, not {answer.code!r}")
        if isinstance(answer, Identity):
            return _unexpired(_checked_identity(answer))
        raise _unusable("connect", f"expected an Identity, a Refuse or None, not {answer!r}")

    async def join(self, request: JoinRequest) -> Refuse | None:
        """:raises HookFailed: (fail closed: ``unavailable``)"""
        if "join" not in self.present:
            return None
        answer = await self._bounded("join", self.calls.join(request))
        if answer is None or isinstance(answer, Refuse):
            return answer if answer is None else Refuse(answer.code, answer.reason[:MAX_REASON])
        raise _unusable("join", f"expected a Refuse or None, not {answer!r}")

    async def message(self, request: MessageRequest) -> MessageAnswer:
        """:raises HookFailed: (fail closed: ``unavailable``)"""
        if "message" not in self.present:
            return None
        answer = await self._bounded("message", self.calls.message(request))
        if answer is None:
            return None
        if isinstance(answer, Refuse):
            code = answer.code
            if isinstance(code, str) and 0 < len(code) <= MAX_CODE:
                return answer
            raise _unusable("message", f"a refusal's code must be a string, not {code!r}")
        if isinstance(answer, Rewrite):
            return self._checked_rewrite(answer)
        raise _unusable("message", f"expected a Rewrite, a Refuse or None, not {answer!r}")

    async def screen(self, request: MessageRequest, message: ChatMessage) -> ChatMessage | Refuse:
        """``message`` as the ``message`` hook leaves it (rewritten, with its ``data``), or
        the refusal its sender gets: the hook's own, or ``unavailable`` if it failed."""
        try:
            answer = await self.message(request)
        except HookFailed:
            return Refuse(ErrorCode.UNAVAILABLE, HOOK_UNAVAILABLE)
        if answer is None:
            return message
        if isinstance(answer, Refuse):
            return Refuse(answer.code, answer.reason or "message refused")
        return ChatMessage(answer.text, message.id, answer.data)

    async def leave(self, event: LeaveEvent) -> None:
        """Advisory: a failure is logged and goes no further."""
        if "leave" in self.present:
            with contextlib.suppress(HookFailed):  # (logged)
                await self._bounded("leave", self.calls.leave(event))

    async def stored(self, batch: Sequence[StoredMessage]) -> None:
        """The feed's consumer: the hook once per message, in order; a failure is logged
        and that message is not offered again."""
        for message in batch:
            with contextlib.suppress(HookFailed):  # (logged)
                await self._bounded("stored", self.calls.stored(message))

    async def _bounded(self, name: str, call: Awaitable[T]) -> T:
        try:
            with anyio.fail_after(self.timeout):
                return await call
        except TimeoutError:
            log.warning("roomcast: the %s hook took longer than %ss", name, self.timeout)
            raise HookFailed(name) from None
        except Exception as exc:  # the application's bug: fail closed (never Cancelled)
            log.warning("roomcast: the %s hook raised %s", name, _one_line(exc))
            raise HookFailed(name) from exc

    def _checked_rewrite(self, answer: Rewrite) -> Rewrite:
        if not isinstance(answer.text, str) or not answer.text.strip():
            raise _unusable("message", "a rewrite's text must be a non-empty string")
        if len(answer.text) > self.max_text:
            raise _unusable(
                "message", f"a rewrite of {len(answer.text)} characters is over {self.max_text}"
            )
        if answer.data is not None:
            if not isinstance(answer.data, dict):
                raise _unusable("message", "a rewrite's data must be a dict (a JSON object)")
            try:
                size = len(orjson.dumps(answer.data))
            except TypeError as exc:
                raise _unusable("message", f"a rewrite's data is not JSON: {exc}") from None
            if size > MAX_DATA_BYTES:
                raise _unusable(
                    "message", f"a rewrite's data of {size} bytes is over {MAX_DATA_BYTES}"
                )
        return answer


def _checked_identity(identity: Identity) -> Identity:
    """The hook's identity with its name normalised as any display name."""
    if not isinstance(identity.user, str) or not 0 < len(identity.user) <= 256:
        raise _unusable("connect", "an identity's user must be a string of 1-256 characters")
    try:
        name = normalize_name(identity.name)
    except (BadName, TypeError, AttributeError):
        raise _unusable("connect", f"{identity.name!r} is not a usable display name") from None
    rooms = identity.rooms
    if rooms is not None and not (
        len(rooms) <= MAX_ROOM_GRANTS and all(isinstance(room, str) for room in rooms)
    ):
        raise _unusable(
            "connect", f"an identity's rooms must be at most {MAX_ROOM_GRANTS} room names (or None)"
        )
    expires = identity.expires
    if isinstance(expires, bool) or not isinstance(expires, int | float) or math.isnan(expires):
        raise _unusable("connect", f"an identity's expires must be Unix seconds, not {expires!r}")
    return Identity(identity.user, name, None if rooms is None else tuple(rooms), expires)


def _unexpired(identity: Identity) -> Identity | Refuse:
    """An identity already past its expiry is refused at the handshake (4001), as an expired
    token is: admitted, it would join, read the room's replay and only then be closed."""
    if identity.expires + LEEWAY <= time.time():
        return Refuse(int(CloseCode.UNAUTHORIZED), "token expired")
    return identity


def _unusable(name: str, problem: str) -> HookFailed:
    log.warning("roomcast: the %s hook answered something unusable: %s", name, problem)
    return HookFailed(name)


def _one_line(exc: BaseException) -> str:
    """``ValueError('no') at app.py:12 in moderate``: enough to find it, on one line."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""
    return f"{exc!r}{where}"
