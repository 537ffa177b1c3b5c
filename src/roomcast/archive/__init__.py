"""The archive (SPEC §11): every accepted message kept durably, beyond the retained window.

- :mod:`.base`: the interface (:class:`Archive`) and its values;
- :mod:`.sqlite`: SQLite, the embedded default (``sqlite:///roomcast.db``);
- :mod:`.postgres`: PostgreSQL (``postgresql://...``), which several servers share;
- :mod:`.keeper`: the consumer of the stored feed (group commit, retries, what a crash can
  lose);
- :mod:`.positions`: rooms the in-process broker opens from the archive.

:func:`open_archive` opens the one ``ROOMCAST_ARCHIVE`` names.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ..settings import Settings
from ..stored import QUEUE_SIZE
from .base import Archive, ArchivedPage, ArchiveUnavailable, Missing, Position, Recovery
from .keeper import unarchived_bound

log = logging.getLogger("roomcast")

__all__ = [
    "Archive",
    "ArchiveUnavailable",
    "ArchivedPage",
    "Missing",
    "Position",
    "Recovery",
    "open_archive",
]


@asynccontextmanager
async def open_archive(settings: Settings) -> AsyncIterator[Archive | None]:
    """The archive ``settings.archive_url`` names, open until the block exits (``None``
    when it is ``off``).

    :raises ArchiveUnavailable: if it cannot be opened (one line saying why)
    """
    url = settings.archive_url
    if url == "off":
        yield None
        return
    if not url.startswith("sqlite:"):
        async with _open_postgres(settings) as archive:
            yield archive
        return
    from .sqlite import open_sqlite_archive

    async with open_sqlite_archive(
        url, window=settings.history_size, unarchived_bound=unarchived_bound(QUEUE_SIZE)
    ) as archive:
        _tell(url, archive.recovery)
        yield archive


@asynccontextmanager
async def _open_postgres(settings: Settings) -> AsyncIterator[Archive]:
    """The PostgreSQL archive: the rooms' sequencer of record on the in-process broker,
    a shared store of messages with Redis (which keeps the sequences)."""
    try:
        from .postgres import open_postgres_archive, redacted
    except ImportError:
        raise ArchiveUnavailable(
            "ROOMCAST_ARCHIVE=postgresql://... needs psycopg: pip install 'roomcast[postgres]'"
        ) from None
    async with open_postgres_archive(
        settings.archive_url,
        window=settings.history_size,
        sequencer=settings.redis_url is None,
    ) as archive:
        _tell(redacted(settings.archive_url), archive.recovery)
        yield archive


def _tell(url: str, recovery: Recovery) -> None:
    """One line after an unclean stop: what the archive did about it."""
    if recovery.clean or not recovery.rooms_moved:
        return
    if recovery.new_epoch:
        done = "every room starts a new epoch"
    else:
        done = f"every room continues {unarchived_bound(QUEUE_SIZE)} seqs on"
    log.warning(
        "roomcast: %s was not closed cleanly (a crash?): %s (%d rooms), and clients "
        "resuming in them are told history_gap",
        url,
        done,
        recovery.rooms_moved,
    )
