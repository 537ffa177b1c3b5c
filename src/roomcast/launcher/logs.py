"""Log lines of the master and the workers, in Hypercorn's format, on stderr."""

from __future__ import annotations

import logging
import sys

__all__ = ["configure_logging"]

FORMAT = "%(asctime)s [%(process)d] [%(levelname)s] %(message)s"
DATE_FORMAT = "[%Y-%m-%d %H:%M:%S %z]"


def configure_logging() -> None:
    """Send roomcast's own log records (``roomcast.*``, INFO and up) to stderr, formatted
    like Hypercorn's error log, so one process's output reads as one log."""
    logger = logging.getLogger("roomcast")
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
