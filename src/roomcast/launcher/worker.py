"""One worker process of ``python -m roomcast``: the app on the chosen event loop.

A worker is started by the master (:mod:`.supervisor`) with the listening sockets and one
end of a *lifeline*, a socket pair whose other end only the master holds. The worker
writes one report on it (:data:`READY`, or :data:`FAILED` and the reason the app's
lifespan startup gave), and otherwise only waits for it to reach end-of-file. That
happens when the master asks the worker to stop (it closes its end) and also when the
master dies, however it dies (the kernel closes its end): either way the worker shuts
down gracefully, giving every WebSocket 1001, so no worker outlives its master.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import signal
import ssl
import sys
from collections.abc import Awaitable, Callable
from functools import partial
from multiprocessing.connection import Connection
from types import FrameType
from typing import Any, Final

import anyio
import anyio.abc
import trio
from hypercorn.config import Config, Sockets
from hypercorn.utils import LifespanFailureError, LifespanTimeoutError, wrap_app

from ..asgi import ASGIApp, Message, Receive, Scope, Send
from . import trio_server
from .logs import configure_logging
from .spawned import BAD_APP, FAILED, READY, STARTUP_FAILED

__all__ = [
    "FAILED",
    "READY",
    "STARTUP_FAILED",
    "STOP_SIGNALS",
    "EarlyStop",
    "StartupReporter",
    "load_app",
    "run_worker",
    "wait_for_stop",
]


def load_app(path: str) -> Any:
    """The object ``MODULE:ATTR`` names, importable from the working directory as under
    Hypercorn and uvicorn: ``roomcast --app myproject.asgi:app`` run from the folder that
    holds ``myproject/`` (the console script, unlike ``python -m``, does not put it on
    ``sys.path``). Each worker imports it with it (the master only checks its form).

    :raises ValueError: if ``path`` is not ``MODULE:ATTR``
    :raises ImportError: if the module cannot be imported
    :raises AttributeError: if the module has no such attribute
    """
    module, _, attribute = path.partition(":")
    if not module or not attribute:
        raise ValueError("expected MODULE:ATTR, e.g. myproject.asgi:app")
    here = os.getcwd()
    if here not in sys.path:
        sys.path.insert(0, here)
    return getattr(importlib.import_module(module), attribute)


class StartupReporter:
    """Wraps an ASGI app and reports the outcome of its lifespan startup on the lifeline."""

    def __init__(self, app: ASGIApp, lifeline: Connection) -> None:
        self.app = app
        self._lifeline = lifeline
        self.reported = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def reporting_send(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                self.report(READY)
            elif message["type"] == "lifespan.startup.failed":
                self.report(FAILED + str(message.get("message", "")).encode())
            await send(message)

        await self.app(scope, receive, reporting_send)

    def report(self, report: bytes) -> None:
        """Send the one report (later calls do nothing)."""
        if self.reported:
            return
        self.reported = True
        with contextlib.suppress(OSError):  # the master is gone: the lifeline says so
            self._lifeline.send_bytes(report)


#: signals that stop a worker gracefully when they reach it directly, as they do when
#: sent to the master's whole process group (``kill %1``, a service manager, a terminal
#: that hangs up); SIGINT (Ctrl-C) is ignored: the master stops the workers for it
STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGHUP)


class EarlyStop:
    """Stop signals that reach the worker before its event loop listens for them.

    From the moment the app's startup is reported, the master says the server is
    serving, and a signal to the process group (``kill %1`` right after starting, a
    terminal closed) can come before the serving loop opens its signal receiver. Under
    the default action it would end the worker on the spot; this handler, installed
    first thing, notes it, and :func:`wait_for_stop` returns at once.
    """

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._note)

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True


async def wait_for_stop(lifeline: Connection, early: EarlyStop | None = None) -> None:
    """Return once the lifeline reaches end-of-file or this process gets SIGTERM or
    SIGHUP (or got one before, as ``early`` noted).

    The master never writes to a worker, so the lifeline becomes readable only at EOF.
    SIGHUP's default action would end the worker on the spot, without a close frame for
    anyone, whenever a terminal's hang-up reaches the process group.
    """
    async with anyio.create_task_group() as tg:

        async def stop_on_signal(*, task_status: anyio.abc.TaskStatus[None]) -> None:
            with anyio.open_signal_receiver(*STOP_SIGNALS) as signals:
                task_status.started()
                async for _ in signals:
                    tg.cancel_scope.cancel()

        await tg.start(stop_on_signal)
        if early is None or not early.requested:
            await anyio.wait_readable(lifeline.fileno())
        tg.cancel_scope.cancel()


def run_worker(config: Config, sockets: Sockets, lifeline: Connection) -> None:
    """The entry point of a spawned worker process.

    Exits with :data:`STARTUP_FAILED` if the app's lifespan startup failed (the reason is
    already on the lifeline); anything else that ends the worker is a crash, and
    propagates with its traceback.
    """
    # Ctrl-C in a terminal reaches the whole process group: the master handles it and
    # stops the workers through their lifelines.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    early = EarlyStop()
    early.install()
    configure_logging()
    reporter = StartupReporter(_load_app_or_exit(config.application_path, lifeline), lifeline)
    app = wrap_app(reporter, config.wsgi_max_body_size, "asgi")  # type: ignore[arg-type]
    shutdown_trigger = partial(wait_for_stop, lifeline, early)
    try:
        if config.worker_class == "trio":
            trio.run(
                partial(
                    trio_server.serve,
                    app,
                    config,
                    sockets=sockets,
                    shutdown_trigger=shutdown_trigger,
                )
            )
        else:
            _run_asyncio(app, config, sockets, shutdown_trigger)
    except* (LifespanFailureError, LifespanTimeoutError) as group:
        reporter.report(FAILED + str(group.exceptions[0]).encode())
        sys.exit(STARTUP_FAILED)


def _load_app_or_exit(path: str, lifeline: Connection) -> Any:
    """The app ``--app`` names; if it names nothing importable, the reason goes to the
    master as a usage error (its one line on stderr) and the worker exits."""
    try:
        return load_app(path)
    except (ImportError, AttributeError, ValueError) as exc:
        with contextlib.suppress(OSError):
            lifeline.send_bytes(BAD_APP + f"--app {path}: {exc}".encode())
        sys.exit(STARTUP_FAILED)


def _run_asyncio(
    app: Any, config: Config, sockets: Sockets, shutdown_trigger: Callable[[], Awaitable[None]]
) -> None:
    from hypercorn.asyncio.run import worker_serve

    loop_factory = None
    if config.worker_class == "uvloop":
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.get_loop().set_exception_handler(_ignore_expected_errors)
        runner.run(worker_serve(app, config, sockets=sockets, shutdown_trigger=shutdown_trigger))


def _ignore_expected_errors(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Log what the event loop reports, except a failed TLS handshake (the client's) and a
    connection task cancelled at shutdown: Python 3.11's ``asyncio.start_server`` asks a
    cancelled connection task for its exception in a done-callback, which raises
    ``CancelledError`` there and logs a traceback for every connection still open when
    the graceful period ends (fixed in 3.12). The cancellation itself has happened; this is
    only the report of it."""
    if not isinstance(context.get("exception"), ssl.SSLError | asyncio.CancelledError):
        loop.default_exception_handler(context)
