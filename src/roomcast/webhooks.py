"""Webhooks: the hooks of :mod:`.hooks` posted over HTTP, for a standalone server
(``ROOMCAST_WEBHOOK_URL``, SPEC §10's wire format), and :func:`verify` for receivers.

::

    connection task ── HookRunner (time limit, fail closed) ── WebhookCalls ── POST ──> receiver
    stored feed ─────── StoredDelivery (retried with backoff) ─ WebhookCalls ── POST ──> receiver

:class:`WebhookCalls` is a :class:`~.hooks.HookCalls` like the application's Python hooks,
so the same :class:`~.hooks.HookRunner` puts the same rules around it: a request that
answers anything but a 2xx with a usable JSON object, or does not answer in
``ROOMCAST_HOOK_TIMEOUT``, is a failure, and ``connect``, ``join`` and ``message`` fail
closed. Every request goes through one pooled :class:`httpx.AsyncClient`, opened with the
runtime (:func:`open_webhooks`) and closed after it.

``stored`` differs from its Python form: a receiver that is down for a minute should not
lose a minute of messages, so :class:`StoredDelivery` posts each message until the
receiver takes it (backoff up to :data:`MAX_BACKOFF`), in order, from the feed's bounded
queue. Fan-out never waits for it; while it retries, that queue fills and then drops
(logged once, counted). A message whose post timed out may have reached the receiver and
is posted again: delivery is at least once, and ``(room, epoch, seq)`` identifies it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Any, Final

import anyio
import httpx
import orjson

from .hooks import (
    ConnectAnswer,
    ConnectRequest,
    JoinRequest,
    LeaveEvent,
    MessageAnswer,
    MessageRequest,
    Refuse,
    Rewrite,
)
from .identity import Identity
from .settings import Settings
from .stored import StoredMessage

__all__ = [
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "StoredDelivery",
    "WebhookCalls",
    "WebhookFailed",
    "open_webhooks",
    "sign",
    "verify",
]

log = logging.getLogger("roomcast")

TIMESTAMP_HEADER: Final = "roomcast-timestamp"
SIGNATURE_HEADER: Final = "roomcast-signature"
#: the first wait before a failed ``stored`` post is tried again; it doubles up to MAX_BACKOFF
FIRST_BACKOFF: Final = 0.1
MAX_BACKOFF: Final = 10.0
#: idle keep-alive connections kept to the receiver: a burst of joins reuses them
POOL_KEEPALIVE: Final = 50
#: connections open to the receiver at once; further posts wait for one (within their time limit)
POOL_MAX: Final = 200

#: the longest answer read from the receiver: an identity with a token's 1,000 room grants,
#: or a rewrite at ROOMCAST_MAX_TEXT with its data, fits many times; more is a failure
MAX_ANSWER_BYTES: Final = 1024 * 1024

#: the keys each event's answer may have (any other key is a failure: a typo such as
#: ``{"refused": ...}`` must not pass as ``{}``)
_ANSWER_KEYS: Final = {
    "connect": frozenset({"refuse", "user", "name", "rooms", "exp"}),
    "join": frozenset({"refuse"}),
    "message": frozenset({"refuse", "text", "data"}),
}


# -- signatures ------------------------------------------------------------------------------


def sign(secret: str | bytes, timestamp: str, body: bytes) -> str:
    """The ``roomcast-signature`` of ``body`` sent at ``timestamp``:
    ``sha256=<hex HMAC-SHA256(secret, timestamp + "." + body)>``."""
    key = secret.encode() if isinstance(secret, str) else secret
    digest = hmac.new(key, timestamp.encode("ascii") + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def verify(
    secret: str | bytes,
    timestamp: str | None,
    body: bytes,
    signature: str | None,
    tolerance: float = 300,
    *,
    now: float | None = None,
) -> bool:
    """Whether a webhook request is roomcast's: ``signature`` (the ``roomcast-signature``
    header) signs ``body`` (the raw bytes, before any JSON parsing) at ``timestamp`` (the
    ``roomcast-timestamp`` header) with ``secret``, and that timestamp is within
    ``tolerance`` seconds of ``now`` (a captured request replayed later is refused).

    A missing header is ``None``: not roomcast's. The comparison takes the same time
    however much of the signature matches, so it tells an attacker nothing."""
    if timestamp is None or signature is None or not (timestamp.isascii() and timestamp.isdigit()):
        return False
    now = time.time() if now is None else now
    if abs(now - int(timestamp)) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


# -- posting ---------------------------------------------------------------------------------


class WebhookFailed(Exception):
    """The receiver answered something roomcast cannot use (or nothing): fail closed."""


class WebhookCalls:
    """:class:`~.hooks.HookCalls` over HTTP: one POST per call to one URL."""

    def __init__(
        self, client: httpx.AsyncClient, url: str, secret: str, events: frozenset[str]
    ) -> None:
        self.client = client
        self.url = url
        self.secret = secret
        self.events = events

    def has(self, name: str) -> bool:
        return name in self.events

    async def connect(self, request: ConnectRequest) -> ConnectAnswer:
        client = None if request.client is None else list(request.client)
        answer = await self.post(
            "connect",
            {
                "headers": dict(request.headers),
                "query": dict(request.query),
                "client": client,
                "path": request.path,
            },
        )
        if "refuse" in answer:
            return _refusal(answer)
        if "user" in answer:
            return _identity(answer)
        return None

    async def join(self, request: JoinRequest) -> Refuse | None:
        answer = await self.post("join", asdict(request))
        return _refusal(answer) if "refuse" in answer else None

    async def message(self, request: MessageRequest) -> MessageAnswer:
        answer = await self.post("message", asdict(request))
        if "refuse" in answer:
            return _refusal(answer)
        if "text" in answer or "data" in answer:  # data alone: the text as sent, with data
            return Rewrite(answer.get("text", request.text), answer.get("data"))
        return None

    async def stored(self, message: StoredMessage) -> None:
        await self.post("stored", asdict(message))

    async def leave(self, event: LeaveEvent) -> None:
        await self.post("leave", asdict(event))

    async def post(self, event: str, fields: Mapping[str, Any]) -> dict[str, Any]:
        """POST ``{"event": event, **fields}``, signed; the answer's JSON object.

        :raises WebhookFailed: for a status other than 2xx, or an answer that is not a
            JSON object of the event's keys (``stored`` and ``leave`` only observe: any
            2xx will do)
        :raises httpx.HTTPError: if the receiver cannot be reached
        """
        body = orjson.dumps({"event": event, **fields})
        timestamp = str(int(time.time()))
        headers = {
            "content-type": "application/json",
            "accept-encoding": "identity",  # a compressed answer could inflate past the cap
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: sign(self.secret, timestamp, body),
        }
        request = self.client.build_request("POST", self.url, content=body, headers=headers)
        response = await self.client.send(request, stream=True)
        try:
            if not response.is_success:
                raise WebhookFailed(f"HTTP {response.status_code} from {self.url}")
            if event not in _ANSWER_KEYS:
                return {}
            return _answer(event, await _read_answer(response))
        finally:
            with anyio.move_on_after(1.0, shield=True):
                await response.aclose()


async def _read_answer(response: httpx.Response) -> bytes:
    """The body of ``response``, read up to :data:`MAX_ANSWER_BYTES`: a receiver that
    answers 100 MB must not make each waiting connection hold 100 MB."""
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_ANSWER_BYTES:
        raise WebhookFailed(f"an answer of {declared} bytes is over {MAX_ANSWER_BYTES}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            raise WebhookFailed(f"an answer over {MAX_ANSWER_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _answer(event: str, content: bytes) -> dict[str, Any]:
    try:
        answer = orjson.loads(content)
    except orjson.JSONDecodeError:
        raise WebhookFailed(f"the {event} answer is not JSON: {content[:80]!r}") from None
    if not isinstance(answer, dict):
        raise WebhookFailed(f"the {event} answer is not a JSON object: {content[:80]!r}")
    unknown = sorted(answer.keys() - _ANSWER_KEYS[event])
    if unknown:
        raise WebhookFailed(f"the {event} answer has keys it may not have: {unknown}")
    return answer


def _refusal(answer: Mapping[str, Any]) -> Refuse:
    """``{"refuse": {"code": C, "reason": R}}``; the runner checks the code's kind."""
    refusal = answer["refuse"]
    if not isinstance(refusal, dict) or not isinstance(refusal.get("reason", ""), str):
        raise WebhookFailed(f"a refusal must be {{'code': ..., 'reason': '...'}}, not {refusal!r}")
    return Refuse(refusal.get("code", "refused"), refusal.get("reason", ""))


def _identity(answer: Mapping[str, Any]) -> Identity:
    """``{"user", "name", "rooms", "exp"}``: ``name`` defaults to ``user``, ``rooms`` to
    every room (``null``), ``exp`` (Unix seconds) to never; the runner checks the rest."""
    exp = answer.get("exp")
    if exp is not None and (isinstance(exp, bool) or not isinstance(exp, int | float)):
        raise WebhookFailed(f"an identity's exp must be Unix seconds, not {exp!r}")
    rooms = answer.get("rooms")
    if rooms is not None and not isinstance(rooms, list):
        raise WebhookFailed(f"an identity's rooms must be a list or null, not {rooms!r}")
    user = answer["user"]
    return Identity(
        user,
        answer.get("name", user),
        None if rooms is None else tuple(rooms),
        math.inf if exp is None else float(exp),
    )


# -- stored, retried -------------------------------------------------------------------------


class StoredDelivery:
    """The stored feed's consumer for webhooks: each message posted, in order, until the
    receiver takes it (each attempt bounded by the hook timeout, then a wait that doubles
    from :data:`FIRST_BACKOFF` to :data:`MAX_BACKOFF`). An outage is logged once when it
    starts and once when it ends, not once per attempt."""

    def __init__(self, calls: WebhookCalls, *, timeout: float) -> None:
        self.calls = calls
        self.timeout = timeout
        #: attempts that failed, over the process's life
        self.failures = 0
        self._failing = False

    async def __call__(self, batch: Sequence[StoredMessage]) -> None:
        for message in batch:
            await self.deliver(message)

    async def deliver(self, message: StoredMessage) -> None:
        """Post ``message`` until the receiver answers a 2xx (or the task is cancelled)."""
        backoff = FIRST_BACKOFF
        while not await self._attempt(message):
            await anyio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)

    async def _attempt(self, message: StoredMessage) -> bool:
        try:
            with anyio.fail_after(self.timeout):
                await self.calls.stored(message)
        except Exception as exc:  # timeout, refused connection, 5xx: the receiver's (not Cancelled)
            self.failures += 1
            if not self._failing:
                self._failing = True
                log.warning(
                    "roomcast: the stored webhook failed (%s): seq %d of #%s and later ones "
                    "are posted again until it answers",
                    _describe(exc),
                    message.seq,
                    message.room,
                )
            return False
        if self._failing:
            self._failing = False
            log.warning(
                "roomcast: the stored webhook answers again (seq %d of #%s taken)",
                message.seq,
                message.room,
            )
        return True


def _describe(exc: Exception) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return str(exc) or type(exc).__name__


# -- the client's life -----------------------------------------------------------------------


@asynccontextmanager
async def open_webhooks(settings: Settings) -> AsyncIterator[WebhookCalls]:
    """The webhooks of ``settings`` (``ROOMCAST_WEBHOOK_URL`` must be set) over a pooled
    client, closed on exit. httpx's own timeout is a backstop a little past the hook
    timeout: each call's real bound is the runner's (or :class:`StoredDelivery`'s)."""
    assert settings.webhook_url is not None and settings.webhook_secret is not None
    client = httpx.AsyncClient(
        timeout=httpx.Timeout(settings.hook_timeout + 1.0),
        limits=httpx.Limits(max_connections=POOL_MAX, max_keepalive_connections=POOL_KEEPALIVE),
        follow_redirects=False,
        trust_env=False,  # the receiver is the operator's own URL: no proxy from the environment
    )
    try:
        yield WebhookCalls(
            client, settings.webhook_url, settings.webhook_secret, settings.webhook_events
        )
    finally:
        with anyio.move_on_after(1.0, shield=True):
            await client.aclose()
