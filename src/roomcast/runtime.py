"""The runtime: everything that lives from lifespan startup to shutdown (settings, hub,
broker, metrics, the token verifier, the static files), and :func:`open_runtime`, which
creates and ends it. The ASGI app (:mod:`.app`), the server API (:mod:`.api`) and the
metrics (:mod:`.metrics`) all take it from the lifespan state."""

from __future__ import annotations

import gc
import mimetypes
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Final

import anyio
from prometheus_client import CollectorRegistry

from . import metrics
from .admission import default_max_connections
from .brokers import Broker, open_broker
from .hub import Hub
from .identity import TokenVerifier
from .protocol import CloseCode
from .settings import Settings

__all__ = ["STATE_KEY", "Runtime", "gc_threshold", "open_runtime"]

#: where the runtime waits in the ASGI lifespan state for every request
STATE_KEY: Final = "roomcast"


@dataclass(eq=False)
class Runtime:
    """Everything that lives from lifespan startup to shutdown."""

    settings: Settings
    hub: Hub
    broker: Broker
    shared_metrics: metrics.SharedMetrics | None = field(init=False)
    registry: CollectorRegistry = field(init=False)
    static: dict[str, tuple[bytes, str]] = field(init=False)
    max_connections: int = field(init=False)
    #: verifies signed tokens (``None`` unless ROOMCAST_JWT_SECRET/_PUBLIC_KEY is set)
    verifier: TokenVerifier | None = field(init=False)
    #: open WebSockets, counted from the handshake
    connections: int = 0
    #: handshakes answered 503 because ``connections`` was at ``max_connections``
    refused: int = 0

    def __post_init__(self) -> None:
        self.max_connections = self.settings.max_connections or default_max_connections()
        self.verifier = _open_verifier(self.settings)
        self.shared_metrics = metrics.open_shared_metrics()
        self.registry = metrics.open_registry(self)
        self.static = _load_static()


@asynccontextmanager
async def open_runtime(settings: Settings | None = None) -> AsyncIterator[Runtime]:
    """Create the runtime (reading the environment if no settings are given); on exit,
    end every membership with :attr:`CloseCode.GOING_AWAY`.

    :raises SettingsError: if a ``ROOMCAST_*`` variable holds an unusable value
    :raises BrokerUnavailable: if the configured Redis cannot be reached
    """
    settings = Settings.from_env() if settings is None else settings
    hub = Hub(
        outbox_size=settings.outbox_size,
        history_size=settings.history_size,
        room_capacity=settings.room_capacity,
        idle_rooms=settings.idle_rooms,
        history_bytes=settings.history_bytes,
        idle_history_bytes=settings.idle_history_bytes,
        presence_interval=settings.presence_interval,
        presence_grace=settings.presence_grace,
        max_text=settings.max_text,
    )
    with gc_threshold(settings.gc_threshold):
        async with open_broker(settings, hub) as broker, anyio.create_task_group() as tg:
            runtime = Runtime(settings, hub, broker)
            _harden_hypercorn(settings)  # after the broker: a failed startup logs one line only
            if runtime.shared_metrics is not None:
                tg.start_soon(_share_metrics, runtime, runtime.shared_metrics)
            try:
                yield runtime
            finally:
                hub.close_all(CloseCode.GOING_AWAY, "server shutting down")
                tg.cancel_scope.cancel()


def _harden_hypercorn(settings: Settings) -> None:
    """Served by Hypercorn (plain ``hypercorn`` or the launcher): mend, once per process,
    what Hypercorn 0.18 breaks of roomcast's guarantees (:mod:`.launcher.hardening`)."""
    if "hypercorn.protocol" in sys.modules:
        from .launcher import hardening

        hardening.install(settings.send_timeout, settings.compression)


async def _share_metrics(runtime: Runtime, shared: metrics.SharedMetrics) -> None:
    """Keep this worker's values in the files every worker's ``/metrics`` merges."""
    while True:
        shared.sync(runtime)
        await anyio.sleep(metrics.SYNC_INTERVAL)


@contextmanager
def gc_threshold(gen0: int) -> Iterator[None]:
    """Raise CPython's gen-0 collection threshold while serving; restore it after.

    A fan-out allocates a few objects per delivery, so at Python's default (a collection
    every 700 net allocations) the cyclic GC runs thousands of times a second, and its
    older-generation passes walk every connection's tasks, frames and streams: in a room of
    1,000 members that was some 40% of the server's CPU (bench/README.md). Only gen-0
    changes: young objects are still collected every ``gen0`` net allocations (a few MB at
    most) and older generations every 10 and 100 of those, so cyclic garbage from closed
    connections is still reclaimed within seconds under load. ``0`` changes nothing.
    """
    if not gen0:
        yield
        return
    saved = gc.get_threshold()
    gc.set_threshold(gen0, *saved[1:])
    try:
        yield
    finally:
        gc.set_threshold(*saved)


def _open_verifier(settings: Settings) -> TokenVerifier | None:
    if not settings.signed_tokens:
        return None
    return TokenVerifier(
        secret=settings.jwt_secret,
        public_key=settings.jwt_public_key,
        audience=settings.jwt_audience,
        issuer=settings.jwt_issuer,
    )


def _load_static() -> dict[str, tuple[bytes, str]]:
    files = {}
    for entry in resources.files("roomcast").joinpath("static").iterdir():
        if entry.is_file():
            content_type = mimetypes.guess_type(entry.name)[0] or "application/octet-stream"
            if content_type.startswith("text/") or content_type.endswith("javascript"):
                content_type += "; charset=utf-8"
            files[entry.name] = (entry.read_bytes(), content_type)
    return files
