"""What every archive offers (:class:`Archive`), and the values it trades in.

The interface speaks in rooms, epochs, seqs and encoded ``message`` events, never in SQL:
each implementation (:mod:`.sqlite`; PostgreSQL later) keeps its own SQL, its own
connection handling and its own way of staying off the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from .. import protocol
from ..stored import StoredMessage

__all__ = [
    "Archive",
    "ArchiveUnavailable",
    "ArchivedPage",
    "Missing",
    "Position",
    "Recovery",
    "encode_stored",
    "newest_page",
    "row_event",
    "unbroken_window",
]


class ArchiveUnavailable(Exception):
    """The archive cannot do this now (disk full, file locked, server gone): nothing was
    changed, and the same call may succeed later."""


@dataclass(frozen=True, slots=True)
class Missing:
    """Seqs ``first`` to ``last`` of a room's ``epoch`` that were sequenced and never
    archived (the archive's queue was full)."""

    room: str
    epoch: str
    first: int
    last: int


@dataclass(frozen=True, slots=True)
class Position:
    """Where a room stands in the archive: its current ``epoch``, its latest ``seq``, and
    its newest messages (``(seq, encoded event)``, seq order) for ``since`` resume.

    ``window`` ends at ``seq`` or is empty: when the archive cannot vouch for the
    messages just before ``seq`` (after a crash) it hands none, so that a resuming client
    is told ``history_gap`` instead of being replayed a window with a hole in it.
    """

    epoch: str
    seq: int
    window: list[tuple[int, str]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ArchivedPage:
    """Up to ``limit`` messages before a seq, oldest first; ``more``: older ones exist."""

    messages: list[str]
    more: bool


@dataclass(frozen=True, slots=True)
class Recovery:
    """How the previous run ended, as the archive found it when it opened."""

    #: the previous run closed the archive cleanly (everything it sequenced is archived)
    clean: bool
    #: rooms whose sequence was moved on (or given a new epoch) because the previous run
    #: may have sequenced messages the archive never received
    rooms_moved: int = 0
    #: the previous run had missed messages it never recorded: every room got a new epoch
    new_epoch: bool = False


class Archive(Protocol):
    """A durable store of every archived message and of each room's position.

    Every method may raise :class:`ArchiveUnavailable`; none of them blocks the event
    loop. Calls may overlap (an implementation serialises what it must).
    """

    @property
    def recovery(self) -> Recovery:
        """How the previous run ended (read when the archive opened)."""
        ...

    async def write(self, batch: Sequence[StoredMessage], missing: Sequence[Missing]) -> None:
        """Keep ``batch`` (per room in seq order) and record ``missing``, and move each
        room's position on, all in one transaction. Writing the same message twice keeps
        it once, so a batch that failed can simply be written again."""
        ...

    async def position(self, room: str) -> Position | None:
        """The room's position and newest messages (at most ``window`` of them, as
        opened), or ``None`` for a room the archive has never seen."""
        ...

    async def before(self, room: str, epoch: str, before: int, limit: int) -> ArchivedPage:
        """Up to ``limit`` of the room's messages of ``epoch`` with a seq below
        ``before``, the newest such, in seq order."""
        ...

    async def forget(self, room: str, epoch: str, through: int) -> None:
        """Delete the room's messages of ``epoch`` up to seq ``through`` (and any of an
        older epoch), now and when a queued one arrives later; its position stays, so
        its sequence goes on."""
        ...

    async def prune(self, older_than: int) -> int:
        """Delete messages whose ``ts`` (ms since the Unix epoch) is older; returns how
        many went."""
        ...

    async def missing(self, room: str) -> list[Missing]:
        """The seq ranges of ``room`` recorded as never archived."""
        ...

    def note_unrecorded(self) -> None:
        """Synchronously, without failing: messages were sequenced that the archive may
        never learn of (its queue dropped them). A crash before they are recorded makes
        the next opening start every room afresh rather than trust its positions."""
        ...

    def note_recorded(self) -> None:
        """Everything noted by :meth:`note_unrecorded` has been recorded since."""
        ...

    async def mark_clean(self) -> None:
        """Everything this run sequenced is archived: the next opening may trust the
        positions as they are."""
        ...


def encode_stored(
    room: str,
    seq: int,
    text: str,
    name: str | None,
    ts: int,
    id: str | None,
    user: str | None,
    data: dict[str, object] | None,
) -> str:
    """The ``message`` event of an archived message, as members received it."""
    return protocol.encode_message(
        room=room, seq=seq, text=text, sender=name, ts=ts, id=id, user=user, data=data
    )


def row_event(room: str, row: tuple[Any, ...]) -> str:
    """The ``message`` event of an archived row ``(seq, ts, user, name, text, data, id)``,
    ``data`` as JSON text (both implementations select these columns)."""
    seq, ts, user, name, text, data, id = row
    return encode_stored(
        room, seq, text, name, ts, id, user, None if data is None else orjson.loads(data)
    )


def unbroken_window(room: str, seq: int, rows: Sequence[tuple[Any, ...]]) -> list[tuple[int, str]]:
    """A room's retained window from its archived rows ending at ``seq``, newest first:
    the unbroken run that ends at ``seq``, oldest first (a hole, a missing range, ends
    it: what is before it would replay with a gap nobody is told of)."""
    window: list[tuple[int, str]] = []
    expected = seq
    for row in rows:
        if row[0] != expected:
            break
        window.append((row[0], row_event(room, row)))
        expected -= 1
    window.reverse()
    return window


def newest_page(room: str, rows: Sequence[tuple[Any, ...]], limit: int) -> ArchivedPage:
    """A page from up to ``limit + 1`` rows read newest first: the newest ``limit`` in seq
    order, and whether there was one more (older) row."""
    page = [row_event(room, row) for row in rows[:limit]]
    page.reverse()
    return ArchivedPage(page, more=len(rows) > limit)
