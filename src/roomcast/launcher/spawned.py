"""What the master and the workers it spawns share: a worker's entry point and the
reports a worker sends on its lifeline.

The master imports this module and nothing of the worker's: a spawned process is handed
the entry point by name and imports :mod:`.worker` (the app, Hypercorn, the event loop)
itself, so the master stays at what it needs (sockets, signals, its processes).
"""

from __future__ import annotations

import argparse
import socket
from multiprocessing.connection import Connection
from typing import Final

__all__ = ["BAD_APP", "FAILED", "READY", "STARTUP_FAILED", "start_worker"]

READY: Final = b"ready"
FAILED: Final = b"failed:"
#: a failure that is the command line's (``--app`` names nothing importable): the master
#: answers it as a usage error (status 2), with the report as its one line
BAD_APP: Final = FAILED + b"usage:"
#: a worker's exit status when the app's lifespan startup failed (reported on the lifeline)
STARTUP_FAILED: Final = 3


def start_worker(
    args: argparse.Namespace,
    secure: list[socket.socket],
    insecure: list[socket.socket],
    lifeline: Connection,
) -> None:
    """The entry point of a spawned worker: Hypercorn's config from the same command line
    and config file the master read, then :func:`.worker.run_worker`."""
    from hypercorn.config import Sockets

    from . import build_config
    from .worker import run_worker

    run_worker(build_config(args), Sockets(secure, insecure, []), lifeline)
