"""Settings: every ``ROOMCAST_*`` environment variable, read once into one typed object.

A bad value stops startup with a :class:`SettingsError` that names the variable, so an
operator never has to guess which of a dozen knobs was mistyped.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

__all__ = ["Settings", "SettingsError"]

T = TypeVar("T")


class SettingsError(ValueError):
    """A ``ROOMCAST_*`` variable holds a value roomcast cannot use."""


def _csv(raw: str) -> frozenset[str]:
    return frozenset(item.strip() for item in raw.split(",") if item.strip())


def _int(minimum: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = int(raw)
        if value < minimum:
            raise ValueError(f"must be >= {minimum}")
        return value

    return parse


def _float(minimum: float, *, allow_equal: bool = True) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        value = float(raw)
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError("must be a finite number")
        if value < minimum or (value == minimum and not allow_equal):
            raise ValueError(f"must be {'>=' if allow_equal else '>'} {minimum}")
        return value

    return parse


def _redis_url(raw: str) -> str:
    if not raw.startswith(("redis://", "rediss://", "unix://", "redis+cluster://")):
        raise ValueError("must start with redis://, rediss://, unix:// or redis+cluster://")
    return raw


def _http_url(raw: str) -> str:
    if not raw.startswith(("http://", "https://")):
        raise ValueError("must start with http:// or https://")
    return raw


#: the hooks a webhook can be posted for (SPEC §10)
WEBHOOK_EVENTS: frozenset[str] = frozenset({"connect", "join", "message", "stored", "leave"})
_EVENT_NAMES = "connect, join, message, stored, leave"


def _webhook_events(raw: str) -> frozenset[str]:
    events = _csv(raw)
    unknown = sorted(events - WEBHOOK_EVENTS)
    if unknown or not events:
        raise ValueError(f"not events: {', '.join(unknown)}; name some of {_EVENT_NAMES}")
    return events


#: ``ROOMCAST_ARCHIVE`` unset, on the in-process broker (with Redis: ``off``)
DEFAULT_ARCHIVE = "sqlite:///roomcast.db"
#: the shortest ``ROOMCAST_JWT_SECRET``: RFC 7518 requires an HS256 key at least as long as
#: the hash, and PyJWT only warns about a shorter one, which anyone could guess offline
#: from one token
MIN_JWT_SECRET_BYTES = 32


def _archive_url(raw: str) -> str:
    if raw == "off" or raw.startswith(("postgresql://", "postgres://")):
        return raw
    if not raw.startswith("sqlite:///") or raw == "sqlite:///":
        raise ValueError("must be sqlite:///PATH, postgresql://... or off")
    return raw


def _public_key(raw: str) -> str:
    """The PEM text of the public key file ``raw`` names (checked when the verifier is
    built at startup)."""
    try:
        with open(raw, encoding="ascii") as file:
            return file.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the key file: {exc}") from None


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return raw

    return parse


#: ``ROOMCAST_COMPRESSION``'s values (what each negotiates: ``launcher.hardening.COMPRESSION``)
COMPRESSION_CHOICES = ("off", "low-memory", "no-context", "full")


def _env(parse: Callable[[str], Any], help: str) -> dict[str, Any]:
    return {"parse": parse, "help": help}


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything roomcast can be told. Field ``x`` is read from ``ROOMCAST_X``."""

    tokens: frozenset[str] | None = field(
        default=None, metadata=_env(_csv, "comma-separated accepted tokens; unset = no auth")
    )
    allowed_origins: frozenset[str] = field(
        default=frozenset(),
        metadata=_env(_csv, "extra allowed browser origins, comma-separated; * = any"),
    )
    redis_url: str | None = field(
        default=None, metadata=_env(_redis_url, "redis://... switches the broker to Redis")
    )
    jwt_secret: str | None = field(
        default=None,
        metadata=_env(
            str,
            "HS256 secret of 32 bytes or more: every WebSocket needs a token signed with it (8.1)",
        ),
    )
    jwt_public_key: str | None = field(
        default=None,
        metadata=_env(
            _public_key, "path to a PEM public key (RSA, P-256, Ed25519) for signed tokens"
        ),
    )
    jwt_audience: str | None = field(
        default=None, metadata=_env(str, "signed tokens must carry this aud claim")
    )
    jwt_issuer: str | None = field(
        default=None, metadata=_env(str, "signed tokens must carry this iss claim")
    )
    max_connections_per_user: int = field(
        default=10, metadata=_env(_int(1), "WebSocket connections per verified user (4429)")
    )
    rate_limit: float = field(
        default=10.0,
        metadata=_env(_float(0), "chat messages/s per connection, burst twice that; 0 = off"),
    )
    room_capacity: int = field(
        default=1000, metadata=_env(_int(0), "members per room; 0 = unlimited")
    )
    max_rooms_per_connection: int = field(
        default=128,
        metadata=_env(_int(1), "rooms one /ws connection may be in at once (too_many_rooms)"),
    )
    outbox_size: int = field(
        default=1024, metadata=_env(_int(1), "events buffered per member before eviction (4008)")
    )
    history_size: int = field(
        default=100, metadata=_env(_int(0), "messages kept per room for resume")
    )
    idle_rooms: int = field(
        default=1000,
        metadata=_env(_int(0), "rooms without members whose history is kept for resume"),
    )
    max_text: int = field(default=4000, metadata=_env(_int(1), "longest chat text in characters"))
    send_timeout: float = field(
        default=30.0,
        metadata=_env(
            _float(0, allow_equal=False),
            "seconds a peer may leave sent data unread before the kernel ends it",
        ),
    )
    max_connections: int | None = field(
        default=None,
        metadata=_env(
            _int(1),
            "WebSocket connections per worker; beyond it the handshake gets HTTP 503; "
            "unset = the soft fd limit less a reserve",
        ),
    )
    api_key: str | None = field(
        default=None,
        metadata=_env(
            str, "enables the server API (/api/...): requests need Authorization: Bearer KEY"
        ),
    )
    hook_timeout: float = field(
        default=1.0,
        metadata=_env(
            _float(0, allow_equal=False),
            "seconds a hook may take before it fails closed (unavailable)",
        ),
    )
    webhook_url: str | None = field(
        default=None,
        metadata=_env(
            _http_url, "http(s) URL the hooks are posted to (webhooks); needs the secret"
        ),
    )
    webhook_secret: str | None = field(
        default=None,
        metadata=_env(str, "HMAC-SHA256 key of the webhooks' roomcast-signature header"),
    )
    webhook_events: frozenset[str] = field(
        default=WEBHOOK_EVENTS,
        metadata=_env(
            _webhook_events, "the hooks posted, comma-separated (connect,join,message,stored,leave)"
        ),
    )
    compression: str = field(
        default="low-memory",
        metadata=_env(
            _choice(*COMPRESSION_CHOICES),
            "permessage-deflate: low-memory (small windows, the client resets its context), "
            "no-context, full (zlib's defaults, ~100 KB per connection) or off",
        ),
    )
    batch_max: int = field(
        default=64, metadata=_env(_int(1), "most events in one roomcast.batch frame")
    )
    gc_threshold: int = field(
        default=50_000,
        metadata=_env(
            _int(0), "CPython's gen-0 GC threshold while serving (Python's is 700); 0 = leave it"
        ),
    )
    #: ``None``: no archive. Read from the environment, unset means :data:`DEFAULT_ARCHIVE`
    #: (``off`` with Redis): a server keeps history by default, an app built in code (a
    #: test's) keeps none unless it asks
    archive: str | None = field(
        default=None,
        metadata=_env(
            _archive_url,
            "where every message is kept: sqlite:///PATH, postgresql://... or off; unset = "
            f"{DEFAULT_ARCHIVE} (off with ROOMCAST_REDIS_URL)",
        ),
    )
    archive_days: float | None = field(
        default=None,
        metadata=_env(
            _float(0, allow_equal=False), "days the archive keeps a message; unset = forever"
        ),
    )
    # -- big rooms and retained memory ------------------------------------------------------
    presence_interval: float = field(
        default=1.0,
        metadata=_env(
            _float(0, allow_equal=False),
            "seconds between two presence notices of a room: joins and leaves in between "
            "are announced in one",
        ),
    )
    presence_grace: float = field(
        default=2.0,
        metadata=_env(
            _float(0),
            "seconds a member's leave waits before it is announced: back within it (a "
            "reloaded tab), it is announced neither leaving nor joining; 0 = at once",
        ),
    )
    history_bytes: int = field(
        default=256 * 1024,
        metadata=_env(
            _int(0), "bytes of history each room keeps for resume (oldest dropped first)"
        ),
    )
    idle_history_bytes: int = field(
        default=64 * 1024 * 1024,
        metadata=_env(
            _int(0),
            "bytes of history all rooms without members keep together (least recently "
            "emptied forgotten first)",
        ),
    )

    @property
    def auth_required(self) -> bool:
        return self.tokens is not None

    @property
    def archive_url(self) -> str:
        """The archive in use (``off``: none)."""
        return self.archive or "off"

    @property
    def signed_tokens(self) -> bool:
        return self.jwt_secret is not None or self.jwt_public_key is not None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``ROOMCAST_*`` variables (``os.environ`` by default).

        An empty variable counts as unset.

        :raises SettingsError: naming the first variable whose value cannot be used
        """
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = env_name(f.name)
            raw = environ.get(name, "").strip()
            if not raw:
                continue
            try:
                values[f.name] = f.metadata["parse"](raw)
            except ValueError as exc:
                raise SettingsError(f"{name}={raw!r}: {exc}") from None
        if "archive" not in values and "redis_url" not in values:
            values["archive"] = DEFAULT_ARCHIVE  # the embedded default keeps history
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        """:raises SettingsError: for settings that contradict each other"""
        chosen = [f for f in ("tokens", "jwt_secret", "jwt_public_key") if getattr(self, f)]
        if len(chosen) > 1:
            names = " and ".join(env_name(f) for f in chosen)
            raise SettingsError(f"{names}: set one way of checking tokens, not several")
        self._check_webhooks()
        if self.jwt_secret and len(self.jwt_secret.encode()) < MIN_JWT_SECRET_BYTES:
            raise SettingsError(
                f"ROOMCAST_JWT_SECRET: expected {MIN_JWT_SECRET_BYTES} bytes or more (an HS256 "
                "key as long as its hash, RFC 7518 3.2), e.g. from "
                "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
            )
        if self.jwt_public_key is not None:
            from .identity import TokenVerifier

            try:
                TokenVerifier(public_key=self.jwt_public_key)
            except ValueError as exc:
                raise SettingsError(f"ROOMCAST_JWT_PUBLIC_KEY: {exc}") from None

    def _check_webhooks(self) -> None:
        """The secret goes with the URL: an unsigned webhook could be forged by anyone who
        can reach the receiver, and a secret or event list without a URL is a mistyped
        configuration that would otherwise run without the application's rules."""
        if self.webhook_url is not None and not self.webhook_secret:
            raise SettingsError("ROOMCAST_WEBHOOK_SECRET: required with ROOMCAST_WEBHOOK_URL")
        if self.webhook_url is None:
            defaults = {f.name: f.default for f in fields(self)}
            for name in ("webhook_secret", "webhook_events"):
                if getattr(self, name) != defaults[name]:
                    raise SettingsError(f"{env_name(name)}: set without ROOMCAST_WEBHOOK_URL")


def env_name(field_name: str) -> str:
    return f"ROOMCAST_{field_name.upper()}"


def describe() -> list[tuple[str, str, str]]:
    """(variable, meaning, default) for every setting: the README's table comes from here."""
    rows = []
    for f in fields(Settings):
        default = f.default
        if default is None or default == frozenset():
            shown = "unset"
        elif isinstance(default, frozenset):
            shown = ",".join(sorted(default))
        else:
            shown = str(default)
        rows.append((env_name(f.name), f.metadata["help"], shown))
    return rows
