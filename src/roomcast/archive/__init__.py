"""The archive (SPEC §11): every accepted message kept durably, beyond the retained window.

- :mod:`.base`: the interface (:class:`Archive`) and its values;
- :mod:`.sqlite`: SQLite, the embedded default (``sqlite:///roomcast.db``);
- :mod:`.keeper`: the consumer of the stored feed (group commit, retries, what a crash can
  lose);
- :mod:`.positions`: rooms the in-process broker opens from the archive.

:func:`open_archive` opens the one ``ROOMCAST_ARCHIVE`` names.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ..settings import Settings
from ..stored import QUEUE_SIZE
from .base import Archive, ArchivedPage, ArchiveUnavailable, Missing, Position, Recovery
from .keeper import unarchived_bound

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
        raise ArchiveUnavailable(
            "ROOMCAST_ARCHIVE: PostgreSQL archives are not available in this version yet"
        )
    from .sqlite import open_sqlite_archive

    async with open_sqlite_archive(
        url, window=settings.history_size, unarchived_bound=unarchived_bound(QUEUE_SIZE)
    ) as archive:
        yield archive
