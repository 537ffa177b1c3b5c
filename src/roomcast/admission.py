"""Who may connect, and how fast they may talk: tokens, Origin, rate limits.

Pure functions of the handshake headers and the settings, plus a token bucket that reads
its clock from the caller (so tests drive it with trio's MockClock or plain numbers).
"""

from __future__ import annotations

import hmac
import resource
from collections.abc import Iterable
from urllib.parse import parse_qsl, urlsplit

from .settings import Settings

__all__ = [
    "TokenBucket",
    "default_max_connections",
    "header",
    "origin_allowed",
    "presented_token",
    "query_param",
    "token_valid",
]

Headers = Iterable[tuple[bytes, bytes]]

#: descriptors a worker keeps for everything but WebSockets: listening sockets, Redis,
#: log files, plain HTTP requests (/healthz), and the handshakes it answers with 503
FD_RESERVE = 64


def default_max_connections() -> int:
    """WebSocket connections this process can hold with the descriptors it may open: its
    soft ``RLIMIT_NOFILE`` less a reserve (:data:`FD_RESERVE`, or a tenth if more).

    Beyond this a handshake is answered 503 while there are still descriptors to answer
    it with, instead of the kernel's listen backlog filling with clients nobody accepts.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return max(1, soft - max(FD_RESERVE, soft // 10))


def header(headers: Headers, name: bytes) -> str | None:
    """The first value of header ``name`` (lower-case bytes), decoded as latin-1."""
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def query_param(query_string: bytes, name: str) -> str | None:
    """The first value of query parameter ``name``, read leniently (bad bytes replaced), so
    a token can be checked before the rest of the query is validated."""
    for key, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
        if key == name:
            return value
    return None


def presented_token(headers: Headers, query_token: str | None) -> str | None:
    """The token a client presented: ``Authorization: Bearer`` wins over the ``token``
    query parameter (which browsers need: they cannot set headers on a WebSocket)."""
    authorization = header(headers, b"authorization")
    if authorization is not None:
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer":
            return credentials.strip() or None
    return query_token or None


def token_valid(settings: Settings, token: str | None) -> bool:
    """Whether ``token`` is one of ``ROOMCAST_TOKENS`` (always true when they are unset).
    Comparison is constant-time."""
    if settings.tokens is None:
        return True
    if not token:
        return False
    presented = token.encode()
    return any(hmac.compare_digest(presented, ok.encode()) for ok in settings.tokens)


def origin_allowed(settings: Settings, headers: Headers) -> bool:
    """A browser's ``Origin`` must name the ``Host`` it connects to, or be listed in
    ``ROOMCAST_ALLOWED_ORIGINS``. Requests without ``Origin`` (non-browser clients) pass."""
    origin = header(headers, b"origin")
    if origin is None:
        return True
    allowed = settings.allowed_origins
    if "*" in allowed or origin.rstrip("/") in allowed:
        return True
    host = header(headers, b"host")
    if host is None or origin == "null":
        return False
    return urlsplit(origin).netloc.lower() == host.strip().lower()


class TokenBucket:
    """Allows ``rate`` events per second on average, bursts of up to ``burst``.

    Time is passed in by the caller (``anyio.current_time()`` in the server), which keeps
    the bucket deterministic under test clocks.
    """

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._last = now

    def take(self, now: float) -> bool:
        """Spend one token if there is one; ``False`` means the event is over the limit."""
        elapsed = max(0.0, now - self._last)
        self._last = now
        self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False
