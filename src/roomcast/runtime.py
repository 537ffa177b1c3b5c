"""The runtime: everything that lives from lifespan startup to shutdown (settings, hub,
broker, metrics, the token verifier, the static files), and :func:`open_runtime`, which
creates and ends it. The ASGI app (:mod:`.app`), the server API (:mod:`.api`) and the
metrics (:mod:`.metrics`) all take it from the lifespan state."""

from __future__ import annotations

import gc
import logging
import mimetypes
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Final

import anyio
from prometheus_client import CollectorRegistry

from . import metrics
from .admission import default_max_connections
from .archive import Archive, ArchiveUnavailable, open_archive
from .archive.keeper import Keeper
from .brokers import Broker, open_broker
from .hooks import HookCalls, HookRunner
from .hub import Hub
from .identity import TokenVerifier
from .protocol import CloseCode
from .settings import Settings, SettingsError
from .stored import Consumer, StoredFeed
from .webhooks import StoredDelivery, WebhookCalls, open_webhooks

if TYPE_CHECKING:  # imported when served by Hypercorn only: it imports Hypercorn
    from .launcher.hardening import IdleDeflaters
    from .launcher.pinger import Pinger

__all__ = ["STATE_KEY", "Runtime", "gc_threshold", "open_runtime"]

log = logging.getLogger("roomcast")

#: where the runtime waits in the ASGI lifespan state for every request
STATE_KEY: Final = "roomcast"
#: seconds a thread waiting for the GIL waits at most while an archive is open
SWITCH_INTERVAL: Final = 0.0005
#: seconds a clean shutdown gives the archive to commit what is queued
#: (within the launcher's STOP_MARGIN: a full queue takes well under a second)
ARCHIVE_DRAIN_TIMEOUT: Final = 4.0
#: seconds between two passes of ``ROOMCAST_ARCHIVE_DAYS``'s retention
PRUNE_INTERVAL: Final = 3600.0


@dataclass(eq=False)
class Runtime:
    """Everything that lives from lifespan startup to shutdown."""

    settings: Settings
    hub: Hub
    broker: Broker
    #: the application's hooks with SPEC §10's rules around them (``None``: no hooks)
    hooks: HookRunner | None = None
    #: the archive (SPEC §11; ``None``: ``ROOMCAST_ARCHIVE=off``), and what feeds it
    archive: Archive | None = None
    keeper: Keeper | None = None
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
    #: the permessage-deflate compressors this app's connections hold between messages,
    #: freed once idle (``None``: not served by a hardened Hypercorn); each connection's
    #: stream finds them here through the lifespan state in its scope
    idle_deflaters: IdleDeflaters | None = None
    #: pings this app's WebSockets from one task (``None``: not served by a hardened
    #: Hypercorn: its own ping task per connection), found as ``idle_deflaters`` is
    pinger: Pinger | None = None

    def __post_init__(self) -> None:
        self.max_connections = self.settings.max_connections or default_max_connections()
        self.verifier = _open_verifier(self.settings)
        self.shared_metrics = metrics.open_shared_metrics()
        self.registry = metrics.open_registry(self)
        self.static = _load_static()


@asynccontextmanager
async def open_runtime(
    settings: Settings | None = None, hooks: HookCalls | None = None
) -> AsyncIterator[Runtime]:
    """Create the runtime (reading the environment if no settings are given) with the
    application's ``hooks``, if any, or the webhooks the settings name; on exit, end every
    membership with :attr:`CloseCode.GOING_AWAY`.

    :raises SettingsError: if a ``ROOMCAST_*`` variable holds an unusable value
    :raises BrokerUnavailable: if the configured Redis cannot be reached
    :raises ArchiveUnavailable: if the configured archive cannot be opened
    """
    settings = Settings.from_env() if settings is None else settings
    async with _hook_calls(settings, hooks) as calls, _open_runtime(settings, calls) as runtime:
        yield runtime


@asynccontextmanager
async def _hook_calls(
    settings: Settings, hooks: HookCalls | None
) -> AsyncIterator[HookCalls | None]:
    """The application's hooks or, with ``ROOMCAST_WEBHOOK_URL``, the webhooks (their
    HTTP client lives as long as the runtime). Not both: two sets of rules for one event
    would need an order and a way to combine answers, and an app with Python hooks has
    no use for HTTP ones, so the combination is refused rather than guessed at."""
    if settings.webhook_url is None:
        yield hooks
        return
    settings.check()  # (settings given in Python are not checked by from_env)
    if hooks is not None:
        raise SettingsError(
            "ROOMCAST_WEBHOOK_URL: this app has Python hooks (create_app(hooks=...)); "
            "use those or webhooks, not both"
        )
    async with open_webhooks(settings) as webhooks:
        yield webhooks


@asynccontextmanager
async def _open_runtime(settings: Settings, hooks: HookCalls | None) -> AsyncIterator[Runtime]:
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
    runner = None
    if hooks is not None:
        runner = HookRunner(hooks, timeout=settings.hook_timeout, max_text=settings.max_text)
    feed = StoredFeed()
    if runner is not None and "stored" in runner.present:
        feed.subscribe("stored hook", _stored_consumer(runner))
    with gc_threshold(settings.gc_threshold), _switch_interval(settings.archive_url):
        async with open_archive(settings) as archive:
            keeper = None if archive is None else Keeper(archive, feed)
            hub.stored = feed if feed.wanted else None
            async with (
                open_broker(settings, hub, keeper) as broker,
                anyio.create_task_group() as tg,
            ):
                runtime = Runtime(settings, hub, broker, runner, archive, keeper)
                if _harden_hypercorn(settings):
                    from .launcher.hardening import IdleDeflaters
                    from .launcher.pinger import Pinger

                    runtime.idle_deflaters = IdleDeflaters()
                    tg.start_soon(runtime.idle_deflaters.run)
                    runtime.pinger = Pinger()
                    tg.start_soon(runtime.pinger.run)
                if runtime.shared_metrics is not None:
                    tg.start_soon(_share_metrics, runtime, runtime.shared_metrics)
                if feed.wanted:
                    tg.start_soon(feed.run)
                if archive is not None and settings.archive_days is not None:
                    tg.start_soon(_prune, archive, settings.archive_days)
                try:
                    yield runtime
                finally:
                    hub.close_all(CloseCode.GOING_AWAY, "server shutting down")
                    if keeper is not None:
                        with anyio.move_on_after(ARCHIVE_DRAIN_TIMEOUT, shield=True):
                            await keeper.finish()
                    tg.cancel_scope.cancel()


async def _prune(archive: Archive, days: float) -> None:
    """``ROOMCAST_ARCHIVE_DAYS``: delete older messages now and every
    :data:`PRUNE_INTERVAL` (a failed pass waits for the next)."""
    while True:
        older_than = int((time.time() - days * 86400) * 1000)
        try:
            pruned = await archive.prune(older_than)
        except ArchiveUnavailable as exc:
            log.warning("roomcast: the archive's retention pass failed (%s)", exc)
        else:
            if pruned:
                log.info(
                    "roomcast: the archive deleted %d messages older than %g days", pruned, days
                )
        await anyio.sleep(PRUNE_INTERVAL)


def _stored_consumer(runner: HookRunner) -> Consumer:
    """What drains the ``stored`` hook's queue: a webhook's posts are retried until the
    receiver takes them (a receiver restarting must not lose messages); a Python hook's
    failure is the application's bug, logged and skipped."""
    if isinstance(runner.calls, WebhookCalls):
        return StoredDelivery(runner.calls, timeout=runner.timeout)
    return runner.stored


def _harden_hypercorn(settings: Settings) -> bool:
    """Served by Hypercorn (plain ``hypercorn`` or the launcher): mend, once per process,
    what Hypercorn 0.18 breaks of roomcast's guarantees (:mod:`.launcher.hardening`).
    Called after the broker opened: a failed startup logs one line. Returns whether the
    mends are installed."""
    if "hypercorn.protocol" in sys.modules:
        from .launcher import hardening

        return hardening.install(settings.send_timeout, settings.compression)
    return False


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


@contextmanager
def _switch_interval(archive_url: str) -> Iterator[None]:
    """With an archive, let a waiting thread have the GIL after :data:`SWITCH_INTERVAL`
    rather than CPython's 5 ms; restore it after.

    The archive commits in a thread (:mod:`.archive.sqlite`, :mod:`.archive.postgres`).
    Each time that thread wants the GIL back (after every database call), a busy event
    loop keeps it for a whole switch interval. Beside a saturated loop, 5 ms per hand-off
    made commits of a few hundred messages take 40 ms to over a second, and a worker
    sending 15,000 messages/s overflowed the archive's queue by 11,000 to 34,000 messages
    in 3 s; at 0.5 ms it dropped none, commits took about 10 ms, and the loop's own rate
    did not move (``python -m bench.experiments.archive.saturated_loop``). With no thread
    waiting, the interval costs nothing: it only bounds how long a waiter waits.
    """
    if archive_url == "off":
        yield
        return
    saved = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL)
    try:
        yield
    finally:
        sys.setswitchinterval(saved)


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
