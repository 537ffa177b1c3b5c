"""The Redis broker's Lua scripts, under the name they had before they moved into its
package: :mod:`roomcast.brokers.redis.scripts` (code that imports this keeps working)."""

from .redis.scripts import (
    CLAIM,
    IDLE,
    IDLE_BYTES,
    JOIN,
    LEAVE,
    PRESENCE,
    PUBLISH,
    READ,
    REFRESH_CLAIMS,
    RENAME,
    REPORT,
    TAKEN,
    UPKEEP,
)

__all__ = [
    "CLAIM",
    "IDLE",
    "IDLE_BYTES",
    "JOIN",
    "LEAVE",
    "PRESENCE",
    "PUBLISH",
    "READ",
    "REFRESH_CLAIMS",
    "RENAME",
    "REPORT",
    "TAKEN",
    "UPKEEP",
]
