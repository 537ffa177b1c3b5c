"""The archive in PostgreSQL (psycopg 3): what several servers sharing Redis use.

**Driver and threads.** roomcast serves on Trio and on asyncio, and both PostgreSQL
drivers that speak async (psycopg's ``AsyncConnection``, asyncpg) run on asyncio only.
So this uses psycopg's blocking connection in a worker thread (``anyio.to_thread``, the
same on both backends), as :mod:`.sqlite` does with ``sqlite3``, behind a capacity
limiter of one: one connection per server process, used by one thread at a time. A pool
(``psycopg_pool``) would let reads overlap a commit, but the keeper commits one batch at
a time anyway, reads are rare and short (a room's opening, a scrollback page), and one
connection per worker keeps PostgreSQL's connection count at the number of workers
across all servers; reconnecting after PostgreSQL restarts is also in one place (a
broken connection is dropped, and the next call opens a new one). A cancelled call still
finishes its thread; ``connect_timeout`` and ``statement_timeout`` bound how long that
takes when the server is gone.

**Writes.** A batch is one transaction of three statements whatever its size (each
column sent as an array and ``unnest``-ed server side): the rooms' positions (in room
order, so two servers' transactions touching the same rooms cannot deadlock), the
messages (``ON CONFLICT DO NOTHING`` on ``(room, epoch, seq)``: a retried batch cannot
store a seq twice), the missing ranges. With Redis each message is archived by the one
worker that published it (the stored feed), so several servers write into one database
with no coordination beyond that key. Durability is the server's: a commit returns once
PostgreSQL has flushed its WAL (``synchronous_commit``, on by default).

**Two roles.** With Redis, sequences live in Redis: the archive only stores and answers
scrollback, any number of servers share it, and there is nothing to recover at startup.
With the in-process broker (one server), the archive is the rooms' sequencer of record,
as SQLite is: it holds a session advisory lock (a second such server on the same
database is refused at startup with one line), keeps the ``clean`` mark, and after an
unclean stop it applies :mod:`.keeper`'s rule for when dropped messages may not have been
recorded: every room starts a new epoch. SQLite can tell the two cases apart because it
flags unrecorded drops synchronously in its lock file; PostgreSQL has no file of ours,
and the drops happen precisely while the database cannot be written, so it assumes the
worst rather than risk handing out a seq twice in one epoch.

**Schema.** ``schema_version`` holds the version; :data:`MIGRATIONS` takes any older
database forward in one transaction under a transaction advisory lock, so servers
starting at once migrate it once.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit, urlunsplit

import anyio
import orjson
import psycopg

from ..stored import StoredMessage
from .base import (
    ArchivedPage,
    ArchiveUnavailable,
    Missing,
    Position,
    Recovery,
    newest_page,
    unbroken_window,
)

__all__ = ["MIGRATIONS", "PostgresArchive", "open_postgres_archive", "redacted"]

T = TypeVar("T")

#: seconds to open a connection before the call fails (and the keeper retries)
CONNECT_TIMEOUT: Final = 3
#: milliseconds a statement may run before it fails (a lock held elsewhere, a stuck disk)
STATEMENT_TIMEOUT_MS: Final = 10_000
#: advisory lock keys: ``roomcast`` and ``roomcasm`` as big-endian integers
SEQUENCER_LOCK: Final = int.from_bytes(b"roomcast", "big")
MIGRATION_LOCK: Final = int.from_bytes(b"roomcasm", "big")

#: each version's statements, applied in order to bring a database to the latest version
MIGRATIONS: Final[dict[int, list[str]]] = {
    1: [
        "CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL)",
        # as in SQLite: ``cleared``: messages up to that seq were deleted, so a late one
        # still queued is not kept either
        "CREATE TABLE rooms (room text PRIMARY KEY, epoch text NOT NULL, seq bigint NOT NULL,"
        " cleared bigint NOT NULL DEFAULT 0)",
        "CREATE TABLE messages (room text NOT NULL, epoch text NOT NULL, seq bigint NOT NULL,"
        ' ts bigint NOT NULL, "user" text, name text, text text NOT NULL, data json,'
        " id text, PRIMARY KEY (room, epoch, seq))",
        "CREATE INDEX messages_by_ts ON messages (ts)",
        "CREATE TABLE missing (room text NOT NULL, epoch text NOT NULL, first bigint NOT NULL,"
        " last bigint NOT NULL, PRIMARY KEY (room, epoch, first))",
        "INSERT INTO meta VALUES ('clean', '1')",
    ],
}

_MOVE_ROOMS: Final = (
    "INSERT INTO rooms (room, epoch, seq)"
    " SELECT * FROM unnest(%s::text[], %s::text[], %s::bigint[])"
    " ON CONFLICT (room) DO UPDATE SET"
    " seq = CASE WHEN rooms.epoch = excluded.epoch THEN greatest(rooms.seq, excluded.seq)"
    " ELSE excluded.seq END,"
    " cleared = CASE WHEN rooms.epoch = excluded.epoch THEN rooms.cleared ELSE 0 END,"
    " epoch = excluded.epoch"
)
_INSERT_MESSAGES: Final = (
    'INSERT INTO messages (room, epoch, seq, ts, "user", name, text, data, id)'
    " SELECT m.room, m.epoch, m.seq, m.ts, m.usr, m.name, m.text, m.data::json, m.id"
    " FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::bigint[], %s::text[],"
    " %s::text[], %s::text[], %s::text[], %s::text[])"
    " AS m(room, epoch, seq, ts, usr, name, text, data, id)"
    " LEFT JOIN rooms r ON r.room = m.room AND r.epoch = m.epoch"
    " WHERE m.seq > coalesce(r.cleared, 0)"
    " ON CONFLICT DO NOTHING"
)
_INSERT_MISSING: Final = (
    "INSERT INTO missing SELECT * FROM"
    " unnest(%s::text[], %s::text[], %s::bigint[], %s::bigint[]) ON CONFLICT DO NOTHING"
)
_COLUMNS: Final = 'seq, ts, "user", name, text, data::text, id'


def redacted(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def _one_line(exc: BaseException) -> str:
    """libpq's messages span lines (a hint on the next one): one line for the log."""
    return " ".join(str(exc).split()) or type(exc).__name__


class PostgresArchive:
    """:class:`~.base.Archive` on one PostgreSQL connection at a time (see the module
    docstring). ``sequencer``: the in-process broker takes rooms' positions from it."""

    def __init__(self, url: str, window: int, *, sequencer: bool) -> None:
        self._url = url
        self._window = window
        self._sequencer = sequencer
        self._connection: psycopg.Connection[Any] | None = None
        self._limiter = anyio.CapacityLimiter(1)
        self.recovery = Recovery(clean=True)

    # -- the connection ---------------------------------------------------------------------

    def _connected(self) -> psycopg.Connection[Any]:
        """The open connection, or a new one (holding the sequencer's lock if need be)."""
        if self._connection is not None and not self._connection.closed:
            return self._connection
        connection = psycopg.connect(
            self._url,
            autocommit=True,  # transactions are explicit: no reader left idle in one
            connect_timeout=CONNECT_TIMEOUT,
            application_name="roomcast",
        )
        try:
            connection.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")
            if self._sequencer:
                locked = connection.execute(
                    "SELECT pg_try_advisory_lock(%s)", (SEQUENCER_LOCK,)
                ).fetchone()
                if not locked or not locked[0]:
                    raise ArchiveUnavailable(
                        "the database is in use by another roomcast process with the "
                        "in-process broker (several servers need ROOMCAST_REDIS_URL)"
                    )
        except BaseException:
            connection.close()
            raise
        self._connection = connection
        return connection

    def _close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if self._sequencer and not connection.broken:
            # the server releases a session's locks when its backend exits, a moment after
            # the socket closes: unlocked now, the next opening cannot find it still held
            with contextlib.suppress(psycopg.Error):
                connection.execute("SELECT pg_advisory_unlock_all()")
        connection.close()

    async def _run(self, call: Callable[..., T], *args: Any) -> T:
        """``call(connection, *args)`` in a worker thread; a database error is
        :class:`ArchiveUnavailable`, and a connection it broke is dropped."""

        def in_thread() -> T:
            connection = self._connected()
            try:
                return call(connection, *args)
            except psycopg.OperationalError:
                self._close()  # gone or unusable: the next call reconnects
                raise

        try:
            return await anyio.to_thread.run_sync(in_thread, limiter=self._limiter)
        except psycopg.Error as exc:
            raise ArchiveUnavailable(_one_line(exc)) from exc

    # -- opening ----------------------------------------------------------------------------

    def _recover(self, db: psycopg.Connection[Any]) -> None:
        """Bring the schema up to date; as the sequencer, settle how the previous run
        ended (every room a new epoch after an unclean one: the module docstring)."""
        with db.transaction():
            db.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
            row = db.execute("SELECT max(version) FROM schema_version").fetchone()
            current = row[0] if row and row[0] is not None else 0
            for version in sorted(v for v in MIGRATIONS if v > current):
                for statement in MIGRATIONS[version]:
                    db.execute(statement)
                db.execute("INSERT INTO schema_version VALUES (%s)", (version,))
        if not self._sequencer:
            return
        with db.transaction():
            row = db.execute("SELECT value FROM meta WHERE key = 'clean'").fetchone()
            clean = row is not None and row[0] == "1"
            moved = 0
            if not clean:
                moved = db.execute(
                    "UPDATE rooms SET epoch = %s, seq = 0, cleared = 0",
                    (secrets.token_urlsafe(6),),
                ).rowcount
            db.execute("UPDATE meta SET value = '0' WHERE key = 'clean'")
        self.recovery = Recovery(clean, moved, new_epoch=not clean)

    # -- the interface ----------------------------------------------------------------------

    async def write(self, batch: Sequence[StoredMessage], missing: Sequence[Missing]) -> None:
        await self._run(self._write, batch, missing)

    @staticmethod
    def _write(
        db: psycopg.Connection[Any], batch: Sequence[StoredMessage], missing: Sequence[Missing]
    ) -> None:
        latest: dict[str, tuple[str, int]] = {}
        for message in batch:
            latest[message.room] = (message.epoch, message.seq)
        for gap in missing:
            seen = latest.get(gap.room)
            if seen is None or (seen[0] == gap.epoch and seen[1] < gap.last):
                latest[gap.room] = (gap.epoch, gap.last)
        rooms = sorted(latest)  # one order for every server: no deadlock between two
        with db.transaction():
            # the rooms first: a message of a room's new epoch is checked against it
            db.execute(
                _MOVE_ROOMS,
                (rooms, [latest[r][0] for r in rooms], [latest[r][1] for r in rooms]),
            )
            if batch:
                db.execute(_INSERT_MESSAGES, _message_columns(batch))
            if missing:
                db.execute(
                    _INSERT_MISSING,
                    (
                        [g.room for g in missing],
                        [g.epoch for g in missing],
                        [g.first for g in missing],
                        [g.last for g in missing],
                    ),
                )

    async def position(self, room: str) -> Position | None:
        return await self._run(self._position, room)

    def _position(self, db: psycopg.Connection[Any], room: str) -> Position | None:
        found = db.execute("SELECT epoch, seq FROM rooms WHERE room = %s", (room,)).fetchone()
        if found is None:
            return None
        epoch, seq = found
        rows = db.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE room = %s AND epoch = %s AND seq <= %s"
            " ORDER BY seq DESC LIMIT %s",
            (room, epoch, seq, self._window),
        ).fetchall()
        return Position(epoch, seq, unbroken_window(room, seq, rows))

    async def before(self, room: str, epoch: str, before: int, limit: int) -> ArchivedPage:
        return await self._run(self._before, room, epoch, before, limit)

    @staticmethod
    def _before(
        db: psycopg.Connection[Any], room: str, epoch: str, before: int, limit: int
    ) -> ArchivedPage:
        rows = db.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE room = %s AND epoch = %s AND seq < %s"
            " ORDER BY seq DESC LIMIT %s",
            (room, epoch, before, limit + 1),
        ).fetchall()
        return newest_page(room, rows, limit)

    async def forget(self, room: str, epoch: str, through: int) -> None:
        await self._run(self._forget, room, epoch, through)

    @staticmethod
    def _forget(db: psycopg.Connection[Any], room: str, epoch: str, through: int) -> None:
        with db.transaction():
            db.execute(_MOVE_ROOMS, ([room], [epoch], [through]))
            db.execute(
                "UPDATE rooms SET cleared = greatest(cleared, %s) WHERE room = %s AND epoch = %s",
                (through, room, epoch),
            )
            db.execute(
                "DELETE FROM messages WHERE room = %s AND (epoch <> %s OR seq <= %s)",
                (room, epoch, through),
            )
            db.execute("DELETE FROM missing WHERE room = %s", (room,))

    async def prune(self, older_than: int) -> int:
        def prune(db: psycopg.Connection[Any]) -> int:
            return db.execute("DELETE FROM messages WHERE ts < %s", (older_than,)).rowcount

        return await self._run(prune)

    async def missing(self, room: str) -> list[Missing]:
        def missing(db: psycopg.Connection[Any]) -> list[Missing]:
            rows = db.execute(
                "SELECT room, epoch, first, last FROM missing WHERE room = %s ORDER BY first",
                (room,),
            ).fetchall()
            return [Missing(*row) for row in rows]

        return await self._run(missing)

    def note_unrecorded(self) -> None:
        """Nothing to note: as the sequencer, every unclean stop is taken as the worst
        case (the module docstring); with Redis, sequences are not the archive's."""

    def note_recorded(self) -> None:
        """See :meth:`note_unrecorded`."""

    async def mark_clean(self) -> None:
        if not self._sequencer:
            return  # several servers share the database: no one of them can vouch for it

        def mark(db: psycopg.Connection[Any]) -> None:
            db.execute("UPDATE meta SET value = '1' WHERE key = 'clean'")

        await self._run(mark)


def _message_columns(batch: Sequence[StoredMessage]) -> tuple[list[Any], ...]:
    return (
        [m.room for m in batch],
        [m.epoch for m in batch],
        [m.seq for m in batch],
        [m.ts for m in batch],
        [m.user for m in batch],
        [m.name for m in batch],
        [m.text for m in batch],
        [None if m.data is None else orjson.dumps(m.data).decode() for m in batch],
        [m.id for m in batch],
    )


@asynccontextmanager
async def open_postgres_archive(
    url: str, *, window: int, sequencer: bool
) -> AsyncIterator[PostgresArchive]:
    """Connect to the archive at ``url``, create or migrate its schema, settle how the
    previous run ended if ``sequencer`` (the in-process broker's), and disconnect when the
    block exits. ``window``: messages :meth:`PostgresArchive.position` hands.

    :raises ArchiveUnavailable: (one line, without the password) if PostgreSQL cannot be
        reached, the URL is not a usable one, or, as the sequencer, another roomcast
        process sequences with this database
    """
    archive = PostgresArchive(url, window, sequencer=sequencer)
    try:
        try:
            await archive._run(archive._recover)
        except ArchiveUnavailable as exc:
            raise ArchiveUnavailable(f"cannot open {redacted(url)}: {exc}") from None
        yield archive
    finally:
        with anyio.move_on_after(5, shield=True):
            await anyio.to_thread.run_sync(archive._close, limiter=archive._limiter)
