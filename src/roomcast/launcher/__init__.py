"""``python -m roomcast``: roomcast on Hypercorn, with what plain Hypercorn cannot do.

::

    master  (supervisor.py: binds, raises the fd limit, starts, replaces and stops workers)
    └── N workers  (worker.py: the app on Trio, asyncio or uvloop)
        └── trio_server.py  (Hypercorn's Trio serving loop, every connection contained)

The master binds the listening sockets itself, with ``TCP_USER_TIMEOUT`` (sockets.py),
and hands them to every worker. See each module for why it exists.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import socket
import sys

from hypercorn.config import Config, Sockets

from ..settings import Settings, SettingsError
from .logs import configure_logging
from .sockets import bind_socket, raise_open_file_limit
from .supervisor import StartupFailed, Supervisor

__all__ = ["build_config", "main"]

DEFAULT_CONFIG = "hypercorn.toml"
DEFAULT_APP = "roomcast.app:app"
#: exit status for a command line or configuration that cannot work
USAGE_ERROR = 2

log = logging.getLogger("roomcast.launcher")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="roomcast",
        description="Serve roomcast with Hypercorn (settings: ROOMCAST_* environment variables).",
        epilog="other commands (each with --help):\n"
        "  roomcast chat URL [--room R] [--name N]   the terminal client\n"
        "  roomcast publish URL --room R TEXT        publish through the server API\n"
        "  roomcast history URL --room R             a room's retained messages\n"
        "  roomcast token --sub U [--rooms P]        mint a signed token for a user",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        default=None,
        help=f"Hypercorn TOML config (default: ./{DEFAULT_CONFIG} if present, else built-in)",
    )
    parser.add_argument("-b", "--bind", action="append", help="HOST:PORT to listen on (repeatable)")
    parser.add_argument("-w", "--workers", type=int, help="worker processes (default 1)")
    parser.add_argument(
        "-k", "--worker-class", choices=["trio", "asyncio", "uvloop"], help="event loop"
    )
    parser.add_argument("--graceful-timeout", type=float, help="seconds to drain on shutdown")
    parser.add_argument(
        "--app",
        default=DEFAULT_APP,
        metavar="MODULE:ATTR",
        help=f"the ASGI app to serve, e.g. one that mounts roomcast (default: {DEFAULT_APP})",
    )
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> Config:
    path = args.config or (DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None)
    if path is not None:
        config = Config.from_toml(path)
    else:
        config = Config()
        config.bind = ["127.0.0.1:8000"]
        config.worker_class = "trio"
        config.websocket_max_message_size = 65536
        config.websocket_ping_interval = 20.0
        config.graceful_timeout = 5.0
        config.errorlog = "-"
    if args.bind:
        config.bind = args.bind
    if args.workers is not None:
        config.workers = args.workers
    if args.worker_class:
        config.worker_class = args.worker_class
    if args.graceful_timeout is not None:
        config.graceful_timeout = args.graceful_timeout
    config.application_path = args.app
    return config


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT (0); 1 if the server cannot start, 2 for a bad command
    line or setting. Every failure to start is one line on stderr naming the cause."""
    configure_logging()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        settings = Settings.from_env()
        config = build_config(args)
        _check(config)
    except (SettingsError, ValueError, OSError) as exc:
        return _fail(str(exc), USAGE_ERROR)
    before, after = raise_open_file_limit()
    if after != before:
        log.info("raised the open-file limit from %d to %d", before, after)
    try:
        sockets = open_sockets(config, settings.send_timeout)
    except (OSError, ValueError) as exc:
        return _fail((exc.strerror if isinstance(exc, OSError) else None) or str(exc), USAGE_ERROR)
    try:
        return Supervisor(config, sockets, workers=config.workers).run()
    except StartupFailed as exc:
        return _fail(f"cannot start: {exc}", 1)
    finally:
        for sock in [*sockets.secure_sockets, *sockets.insecure_sockets]:
            sock.close()


def open_sockets(config: Config, send_timeout: float) -> Sockets:
    """The listening sockets for ``config``'s binds: TLS ones for ``bind`` when a
    certificate is configured (plain ones for ``insecure_bind``), as Hypercorn does.

    :raises OSError: if an address cannot be bound
    :raises ValueError: if a bind is not ``HOST:PORT`` or ``fd://N``
    """
    opened: list[socket.socket] = []
    try:
        for address in [*config.bind, *config.insecure_bind]:
            try:
                opened.append(bind_socket(address, send_timeout, config.backlog))
            except OSError as exc:
                raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror}") from None
    except BaseException:
        for sock in opened:
            sock.close()
        raise
    if config.ssl_enabled:
        return Sockets(opened[: len(config.bind)], opened[len(config.bind) :], [])
    return Sockets([], opened, [])


def _check(config: Config) -> None:
    """:raises ValueError: for a configuration the launcher cannot serve"""
    if config.workers < 1:
        raise ValueError(f"--workers {config.workers}: at least 1 worker is needed")
    module, _, attribute = config.application_path.partition(":")
    try:
        getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ValueError(f"--app {config.application_path}: {exc}") from None
    if config.worker_class not in ("trio", "asyncio", "uvloop"):
        raise ValueError(f"worker_class {config.worker_class!r}: expected trio, asyncio or uvloop")
    if config.worker_class == "uvloop":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            raise ValueError(
                "--worker-class uvloop needs uvloop: pip install 'roomcast[uvloop]'"
            ) from None
    if config.quic_bind:
        raise ValueError("quic_bind: roomcast serves HTTP/1.1 and HTTP/2 over TCP only")


def _fail(message: str, status: int) -> int:
    print(f"roomcast: {message}", file=sys.stderr)
    return status
