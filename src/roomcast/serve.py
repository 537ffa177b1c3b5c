"""``python -m roomcast``: Hypercorn, plus the socket options plain Hypercorn cannot set.

Hypercorn's Trio worker shields socket writes from cancellation, so a sender blocked on a
peer that never reads cannot be cancelled from the app. The kernel can end such a
connection, though: this command binds the listening sockets itself with
``TCP_USER_TIMEOUT`` (which accepted sockets inherit on Linux), so sent data left
unacknowledged for ``ROOMCAST_SEND_TIMEOUT`` seconds aborts the connection, and then hands
the sockets to Hypercorn as ``fd://`` binds. Hypercorn's WebSocket pings keep data in
flight, so a peer that vanished without a FIN is caught by the same timeout.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

from hypercorn.config import Config
from hypercorn.run import run

from .settings import Settings, SettingsError

__all__ = ["bind_socket", "build_config", "main"]

DEFAULT_CONFIG = "hypercorn.toml"
APPLICATION = "roomcast.app:app"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="roomcast",
        description="Serve roomcast with Hypercorn (settings: ROOMCAST_* environment variables). "
        "'roomcast chat URL' runs the terminal client instead.",
    )
    parser.add_argument(
        "--config",
        default=None,
        help=f"Hypercorn TOML config (default: ./{DEFAULT_CONFIG} if present, else built-in)",
    )
    parser.add_argument("-b", "--bind", action="append", help="HOST:PORT to listen on (repeatable)")
    parser.add_argument("-w", "--workers", type=int, help="worker processes")
    parser.add_argument(
        "-k", "--worker-class", choices=["trio", "asyncio", "uvloop"], help="event loop"
    )
    parser.add_argument("--graceful-timeout", type=float, help="seconds to drain on shutdown")
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
    config.application_path = APPLICATION
    if args.bind:
        config.bind = args.bind
    if args.workers is not None:
        config.workers = args.workers
    if args.worker_class:
        config.worker_class = args.worker_class
    if args.graceful_timeout is not None:
        config.graceful_timeout = args.graceful_timeout
    return config


def bind_socket(address: str, send_timeout: float, backlog: int) -> socket.socket:
    """A listening TCP socket with ``TCP_USER_TIMEOUT`` (where the platform has it).

    :raises ValueError: if ``address`` is not ``HOST:PORT`` or ``[IPV6]:PORT``
    """
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--bind {address!r}: expected HOST:PORT")
    host = host.strip("[]") or "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(send_timeout * 1000))
    sock.bind((host, int(port)))
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"roomcast: {exc}", file=sys.stderr)
        return 2
    config = build_config(args)
    binds = []
    sockets = []
    for address in config.bind:
        if address.startswith(("fd://", "unix:")):
            binds.append(address)
            continue
        try:
            sock = bind_socket(address, settings.send_timeout, config.backlog)
        except (OSError, ValueError) as exc:
            print(f"roomcast: cannot listen on {address}: {exc}", file=sys.stderr)
            return 2
        sockets.append(sock)
        binds.append(f"fd://{sock.fileno()}")
    config.bind = binds
    return run(config)
