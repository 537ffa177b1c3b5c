"""A room's retained messages for resume, bounded by count and by bytes (sans I/O).

A count alone does not bound memory: 100 messages of 4,000 characters are 0.4 MB of ASCII
or 1.6 MB of emoji, and a client can leave that behind in every room it passes through.
So each room's history also has a byte budget, and the hub keeps one more budget for the
history of all rooms without members.
"""

from __future__ import annotations

import sys
from collections import deque
from typing import Final

__all__ = ["ENTRY_OVERHEAD", "History", "entry_size"]

#: what a retained message costs beside its event string: the ``(seq, event)`` tuple, the
#: seq and the deque slot (CPython, 64-bit)
ENTRY_OVERHEAD: Final = 96


def entry_size(encoded: str) -> int:
    """Bytes one retained event holds in memory (a str of non-ASCII text takes 2 or 4
    bytes per character, so this is not its UTF-8 length)."""
    return sys.getsizeof(encoded) + ENTRY_OVERHEAD


class History:
    """The newest messages of one room: at most ``max_count`` of them and ``max_bytes``
    (:func:`entry_size`) in all; the oldest go first. ``entries`` holds ``(seq, event)``
    in seq order."""

    __slots__ = ("bytes", "entries", "max_bytes", "max_count")

    def __init__(self, max_count: int, max_bytes: int) -> None:
        self.entries: deque[tuple[int, str]] = deque()
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.bytes = 0

    def __len__(self) -> int:
        return len(self.entries)

    def append(self, seq: int, encoded: str) -> int:
        """Keep a message, then drop the oldest beyond either bound (a message bigger than
        the whole budget is not kept at all). Returns how many bytes the history grew by
        (negative if it shrank)."""
        before = self.bytes
        self.entries.append((seq, encoded))
        self.bytes += entry_size(encoded)
        while self.entries and (len(self.entries) > self.max_count or self.bytes > self.max_bytes):
            _, dropped = self.entries.popleft()
            self.bytes -= entry_size(dropped)
        return self.bytes - before
