"""``python -m roomcast``: roomcast on Hypercorn, with what plain Hypercorn cannot do.

::

    master  (supervisor.py: binds, raises the fd limit, starts, replaces and stops workers)
    └── N workers  (worker.py: the app on Trio, asyncio or uvloop)
        └── trio_server.py  (Hypercorn's Trio serving loop, every connection contained)

The master binds the listening sockets itself, with ``TCP_USER_TIMEOUT`` (sockets.py),
and hands them to every worker. See each module for why it exists.

This module is the master's, and imports only what the master needs: it reads the
Hypercorn config file itself (:class:`MasterConfig`), and each worker builds Hypercorn's
``Config`` from the same file and flags (:func:`build_config`).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import socket
import sys
import tomllib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn, TypeGuard

from ..settings import Settings, SettingsError
from .logs import configure_logging
from .sockets import bind_socket, raise_open_file_limit
from .supervisor import Listeners, StartupFailed, Supervisor

if TYPE_CHECKING:
    from hypercorn.config import Config

__all__ = ["MasterConfig", "UsageError", "build_config", "main", "read_master_config"]

DEFAULT_CONFIG = "hypercorn.toml"
DEFAULT_APP = "roomcast.app:app"
#: Hypercorn's config without a config file (its own defaults otherwise)
BUILT_IN: dict[str, Any] = {
    "bind": ["127.0.0.1:8000"],
    "worker_class": "trio",
    "websocket_max_message_size": 65536,
    "websocket_ping_interval": 20.0,
    "graceful_timeout": 5.0,
    "errorlog": "-",
}
#: exit status for a command line or configuration that cannot work
USAGE_ERROR = 2

log = logging.getLogger("roomcast.launcher")


class UsageError(ValueError):
    """A command line or configuration the launcher cannot serve; the message says why."""


class _Parser(argparse.ArgumentParser):
    """argparse, except that a bad command line is a :class:`UsageError` (one line from
    :func:`main`) instead of a usage block and an exit from inside the parser."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see roomcast --help)")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """:raises UsageError: for an unknown flag or a value of the wrong kind"""
    parser = _Parser(
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
    """Hypercorn's config: the TOML file (or built-in defaults), then the flags on top.
    Each worker builds it (the master reads what it needs without Hypercorn:
    :func:`read_master_config`).

    :raises UsageError: if the config file cannot be read or parsed
    """
    from hypercorn.config import Config

    config = Config.from_mapping(_config_values(args))
    _apply_flags(config, args)
    return config


@dataclass
class MasterConfig:
    """What the master needs of Hypercorn's configuration, read as Hypercorn reads it
    (every key of the file set as an attribute, a bind's string made a list), without
    Hypercorn: its config module brings ``ssl`` and ``logging.config``, megabytes the
    master would keep for nothing. Values are as the file gives them until :func:`_check`."""

    bind: Any = field(default_factory=lambda: ["127.0.0.1:8000"])
    insecure_bind: Any = field(default_factory=list)
    quic_bind: Any = field(default_factory=list)
    backlog: Any = 100
    workers: Any = 1
    worker_class: Any = "asyncio"
    graceful_timeout: Any = 3.0
    certfile: Any = None
    keyfile: Any = None
    # the keys of hypercorn.toml the docs name: the workers read them (Hypercorn does not
    # check them), so a bad one would fail every connection rather than the start
    websocket_max_message_size: Any = 16 * 1024 * 1024
    websocket_ping_interval: Any = None
    keep_alive_timeout: Any = 5.0
    application_path: str = DEFAULT_APP

    @property
    def ssl_enabled(self) -> bool:
        return self.certfile is not None and self.keyfile is not None


#: Hypercorn's bind settings: a string is one address
_BINDS = ("bind", "insecure_bind", "quic_bind")


def read_master_config(args: argparse.Namespace) -> MasterConfig:
    """The master's :class:`MasterConfig`: the TOML file (or built-in defaults), then the
    flags on top, as :func:`build_config` reads them.

    :raises UsageError: if the config file cannot be read or parsed
    """
    config = MasterConfig()
    for key, value in _config_values(args).items():
        if hasattr(config, key):
            setattr(config, key, [value] if key in _BINDS and isinstance(value, str) else value)
    _apply_flags(config, args)
    return config


def _config_values(args: argparse.Namespace) -> dict[str, Any]:
    """The keys of ``--config`` (default ``./hypercorn.toml`` if present), or
    :data:`BUILT_IN` without a file.

    :raises UsageError: if the config file cannot be read or parsed
    """
    path = args.config or (DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None)
    if path is None:
        return dict(BUILT_IN)
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except OSError as exc:
        raise UsageError(f"--config {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"--config {path}: not valid TOML: {exc}") from None


def _apply_flags(config: Config | MasterConfig, args: argparse.Namespace) -> None:
    if args.bind:
        config.bind = args.bind
    if args.workers is not None:
        config.workers = args.workers
    if args.worker_class:
        config.worker_class = args.worker_class
    if args.graceful_timeout is not None:
        config.graceful_timeout = args.graceful_timeout
    config.application_path = args.app


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT (0); 1 if the server cannot start, 2 for a bad command
    line or setting. Every failure to start is one line on stderr naming the cause."""
    configure_logging()
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        settings = Settings.from_env()
        config = read_master_config(args)
        _check(config, args)
        _check_broker(config, args, settings)
    except (SettingsError, ValueError, OSError) as exc:
        return _fail(str(exc), USAGE_ERROR)
    try:
        sockets = open_sockets(config, settings.send_timeout)
    except (OSError, ValueError) as exc:
        return _fail((exc.strerror if isinstance(exc, OSError) else None) or str(exc), USAGE_ERROR)
    limits = raise_open_file_limit()
    supervisor = Supervisor(
        args,
        sockets,
        workers=config.workers,
        graceful_timeout=config.graceful_timeout,
        # once serving: a bad --app, found by the workers, must be the only line
        on_serving=lambda: _log_file_limit(*limits),
    )
    try:
        return supervisor.run()
    except StartupFailed as exc:
        if exc.usage:
            return _fail(str(exc), USAGE_ERROR)
        return _fail(f"cannot start: {exc}", 1)
    finally:
        sockets.close()


def _log_file_limit(before: int, after: int) -> None:
    if after != before:
        log.info("raised the open-file limit from %d to %d", before, after)


def open_sockets(config: MasterConfig, send_timeout: float) -> Listeners:
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
    if (config.certfile is None) != (config.keyfile is None):
        raise UsageError("certfile and keyfile: set both for TLS, or neither")
    if config.ssl_enabled:
        return Listeners(opened[: len(config.bind)], opened[len(config.bind) :])
    return Listeners([], opened)


def _seconds(value: object) -> TypeGuard[float]:
    """A finite number of seconds as TOML or a flag gives it (a bool is not one)."""
    return type(value) in (int, float) and math.isfinite(value)  # type: ignore[arg-type]


def _check(config: MasterConfig, args: argparse.Namespace) -> None:
    """:raises UsageError: for a configuration the launcher cannot serve (a value from
    the config file is named by its key, one from a flag by the flag)"""
    workers = config.workers
    if type(workers) is not int or workers < 1:
        raise UsageError(f"{_named(args, 'workers', workers)}: at least 1 worker is needed")
    timeout = config.graceful_timeout
    if not _seconds(timeout) or timeout < 0:
        raise UsageError(
            f"{_named(args, 'graceful_timeout', timeout)}: expected seconds (0 or more)"
        )
    size = config.websocket_max_message_size
    if type(size) is not int or size < 1:
        raise UsageError(
            f"websocket_max_message_size = {size!r} (config file): expected bytes (1 or more)"
        )
    for key, allow_none in (("websocket_ping_interval", True), ("keep_alive_timeout", False)):
        value = getattr(config, key)
        if value is None and allow_none:
            continue
        if not _seconds(value) or value <= 0:
            raise UsageError(f"{key} = {value!r} (config file): expected seconds (above 0)")
    if not isinstance(config.bind, list) or not all(isinstance(b, str) for b in config.bind):
        raise UsageError(f"bind {config.bind!r}: expected a list of HOST:PORT")
    module, _, attribute = config.application_path.partition(":")
    if not module or not attribute:  # (the workers import it: a bad module is theirs to say)
        raise UsageError(
            f"--app {config.application_path}: expected MODULE:ATTR, e.g. myproject.asgi:app"
        )
    if config.worker_class not in ("trio", "asyncio", "uvloop"):
        raise UsageError(f"worker_class {config.worker_class!r}: expected trio, asyncio or uvloop")
    if config.worker_class == "uvloop":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            raise UsageError(
                "--worker-class uvloop needs uvloop: pip install 'roomcast[uvloop]'"
            ) from None
    if config.quic_bind:
        raise UsageError("quic_bind: roomcast serves HTTP/1.1 and HTTP/2 over TCP only")
    if (config.certfile is None) != (config.keyfile is None):
        raise UsageError("certfile and keyfile: set both for TLS, or neither")
    if config.ssl_enabled:
        try:  # (only a TLS master imports Hypercorn's config, and ssl with it)
            build_config(args).create_ssl_context()
        except OSError as exc:  # ssl.SSLError included
            raise UsageError(f"certfile/keyfile: {exc.strerror or exc}") from None


def _check_broker(config: MasterConfig, args: argparse.Namespace, settings: Settings) -> None:
    """Several workers share rooms only through Redis: with the in-process broker each
    would keep rooms of its own, and the kernel would spread one room's members over
    them, each seeing part of the room. Refused rather than served split.

    The settings are roomcast's from the environment, also when ``--app`` serves a host
    app that mounts it.

    A SQLite archive is one process's (SPEC §11): with several workers, each would
    archive only the messages it accepted, in a file the others hold locked.

    :raises UsageError: for more than one worker without ``ROOMCAST_REDIS_URL``, or with
        a SQLite ``ROOMCAST_ARCHIVE``
    """
    if config.workers > 1 and settings.redis_url is None:
        raise UsageError(
            f"cannot start: {_named(args, 'workers', config.workers)} needs "
            "ROOMCAST_REDIS_URL: with the in-process broker each worker would hold its "
            "own rooms"
        )
    if config.workers > 1 and settings.archive_url.startswith("sqlite:"):
        raise UsageError(
            f"cannot start: {_named(args, 'workers', config.workers)} with "
            f"ROOMCAST_ARCHIVE={settings.archive_url}: a SQLite archive serves one process; "
            "use postgresql://... or off"
        )


def _named(args: argparse.Namespace, key: str, value: object) -> str:
    """``--flag VALUE`` if the value came from the command line, else ``key = VALUE``
    (from the config file)."""
    if getattr(args, key) is not None:
        shown = f"{value:g}" if isinstance(value, float) else value
        return f"--{key.replace('_', '-')} {shown}"
    return f"{key} = {value!r} (config file)"


def _fail(message: str, status: int) -> int:
    print(f"roomcast: {message}", file=sys.stderr)
    return status
