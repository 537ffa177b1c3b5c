"""The archive in a SQLite file (stdlib :mod:`sqlite3`): the embedded default.

**Threads.** ``sqlite3`` blocks, so every call runs in a worker thread
(``anyio.to_thread``, on Trio and asyncio alike) behind a capacity limiter of one: one
connection, used by one thread at a time. A connection per call would let reads overlap a
commit (WAL allows it), but each would pay the open, the pragmas and a cold page cache,
and a room's position is read once per opening while a commit takes milliseconds; one
connection keeps its cache warm and keeps the ordering simple (a write and the reads
queued after it see it). A cancelled call still finishes its thread (anyio does not
abandon it), so a transaction is never left half done by a cancellation.

**Writes.** A batch's inserts run on the event loop and only its ``COMMIT`` (the fsync)
in the thread. All in a thread, a commit took 6 ms alone but 40-400 ms beside a busy
event loop: every ``sqlite3`` call releases the GIL, and a thread that wants it back
from a loop that never idles waits out the interpreter's switch interval (5 ms) each
time, so at 13,000 messages/s a worker's archive fell behind and dropped. Inserts into
the WAL are page-cache work (a few microseconds a row); the commit is one hand-off to
the thread and back. When another connection holds the file's write lock (``BEGIN
IMMEDIATE`` would wait), the whole batch goes to the thread as before, so the loop never
waits for a lock.

**Durability.** WAL mode with ``synchronous=FULL``: a commit returns once the WAL is on
disk, so a power loss or an OS crash loses no committed batch, and what a crash can lose
is what had not been committed: the batches still queued (see :mod:`.keeper`). With
``NORMAL`` the WAL is synced only at checkpoints, so an OS crash could also take commits
from the last second or more, which is beyond the window SPEC §11 lets a crash lose.
Group commit makes FULL cheap: one fsync per batch, and a batch is everything queued
while the previous commit ran (bench/README.md has the numbers).

**One process.** The file is one machine's and its positions one sequencer's: the
archive holds an exclusive ``flock`` on ``PATH-lock`` while open, so a second server
process on the same file fails at startup with one line. The lock file's first byte also
records (synchronously, without touching the database, which may be the thing that is
failing) that messages were sequenced which the archive may never receive; see
:meth:`SqliteArchive.note_unrecorded`.

**Schema.** ``schema_version`` holds the version; :data:`MIGRATIONS` takes any older file
forward, one transaction per step.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final, TypeVar

import anyio
import anyio.lowlevel
import orjson

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

__all__ = ["MIGRATIONS", "SqliteArchive", "open_sqlite_archive"]

T = TypeVar("T")

#: seconds a statement waits for another connection's lock before it fails (and is retried)
BUSY_TIMEOUT: Final = 1.0
#: rows inserted on the event loop between two checkpoints (about 2.5 ms)
INSERT_CHUNK: Final = 512

#: each version's statements, applied in order to bring a file to the latest version
MIGRATIONS: Final[dict[int, list[str]]] = {
    1: [
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        # a room's current run and latest seq; ``cleared``: its messages up to that seq
        # were deleted (DELETE .../messages), so a late queued one is not kept either
        "CREATE TABLE rooms (room TEXT PRIMARY KEY, epoch TEXT NOT NULL,"
        " seq INTEGER NOT NULL, cleared INTEGER NOT NULL DEFAULT 0)",
        "CREATE TABLE messages (room TEXT NOT NULL, epoch TEXT NOT NULL, seq INTEGER NOT NULL,"
        " ts INTEGER NOT NULL, user TEXT, name TEXT, text TEXT NOT NULL, data TEXT, id TEXT,"
        " PRIMARY KEY (room, epoch, seq)) WITHOUT ROWID",
        "CREATE INDEX messages_by_ts ON messages (ts)",
        "CREATE TABLE missing (room TEXT NOT NULL, epoch TEXT NOT NULL, first INTEGER NOT NULL,"
        " last INTEGER NOT NULL, PRIMARY KEY (room, epoch, first))",
        "INSERT INTO meta VALUES ('clean', '1')",
    ],
}

_INSERT_MESSAGE: Final = (
    "INSERT INTO messages (room, epoch, seq, ts, user, name, text, data, id)"
    " SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9"
    " WHERE ?3 > coalesce((SELECT cleared FROM rooms WHERE room = ?1 AND epoch = ?2), 0)"
    " ON CONFLICT DO NOTHING"
)
_MOVE_ROOM: Final = (
    "INSERT INTO rooms (room, epoch, seq) VALUES (?, ?, ?) ON CONFLICT (room) DO UPDATE SET"
    " seq = CASE WHEN rooms.epoch = excluded.epoch THEN max(rooms.seq, excluded.seq)"
    " ELSE excluded.seq END,"
    " cleared = CASE WHEN rooms.epoch = excluded.epoch THEN rooms.cleared ELSE 0 END,"
    " epoch = excluded.epoch"
)
_COLUMNS: Final = "seq, ts, user, name, text, data, id"


def database_path(url: str) -> str:
    """The file of ``sqlite:///PATH`` (relative to the working directory; an absolute
    path has four slashes, ``sqlite:////var/lib/roomcast.db``).

    :raises ValueError: for another scheme or no path
    """
    prefix = "sqlite:///"
    if not url.startswith(prefix) or len(url) == len(prefix):
        raise ValueError("expected sqlite:///PATH")
    return url[len(prefix) :]


class SqliteArchive:
    """:class:`~.base.Archive` on one SQLite connection (see the module docstring)."""

    def __init__(self, connection: sqlite3.Connection, lock: int, window: int) -> None:
        self._connection = connection
        self._lock = lock
        self._window = window
        self._limiter = anyio.CapacityLimiter(1)
        self._unrecorded = os.pread(lock, 1, 0) == b"1"
        self.recovery = Recovery(clean=True)

    # -- opening ----------------------------------------------------------------------------

    def _recover(self, unarchived_bound: int) -> None:
        """Bring the schema up to date, then settle how the previous run ended: after an
        unclean one, move every room past what it may have sequenced unarchived, so that
        no seq is ever handed out twice in one epoch (see :mod:`.keeper`)."""
        self._migrate()
        with self._transaction() as db:
            clean = db.execute("SELECT value FROM meta WHERE key = 'clean'").fetchone()[0] == "1"
            moved = 0
            if not clean and self._unrecorded:
                moved = db.execute(
                    "UPDATE rooms SET epoch = ?, seq = 0, cleared = 0",
                    (secrets.token_urlsafe(6),),
                ).rowcount
            elif not clean:
                moved = db.execute("UPDATE rooms SET seq = seq + ?", (unarchived_bound,)).rowcount
            db.execute("UPDATE meta SET value = '0' WHERE key = 'clean'")
        self.recovery = Recovery(clean, moved, new_epoch=not clean and self._unrecorded)
        self.note_recorded()

    def _migrate(self) -> None:
        db = self._connection
        db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = db.execute("SELECT max(version) FROM schema_version").fetchone()
        current = row[0] or 0
        for version in sorted(v for v in MIGRATIONS if v > current):
            with self._transaction() as transaction:
                for statement in MIGRATIONS[version]:
                    transaction.execute(statement)
                transaction.execute("INSERT INTO schema_version VALUES (?)", (version,))

    @contextlib.contextmanager
    def _transaction(self) -> Any:
        db = self._connection
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            if db.in_transaction:
                db.rollback()
            raise
        db.execute("COMMIT")

    # -- the interface ----------------------------------------------------------------------

    async def write(self, batch: Sequence[StoredMessage], missing: Sequence[Missing]) -> None:
        """Insert on the event loop, commit in a thread (see the module docstring's
        *Writes*); if another connection holds the file's lock, all of it in a thread."""
        async with self._limiter:  # the connection is this batch's until it is committed
            try:
                if self._begin_nowait():
                    try:
                        await self._insert_in_chunks(batch, missing)
                    except BaseException:
                        self._connection.rollback()
                        raise
                    await anyio.to_thread.run_sync(self._connection.execute, "COMMIT")
                else:
                    await anyio.to_thread.run_sync(self._write, batch, missing)
            except (sqlite3.Error, OSError) as exc:
                if self._connection.in_transaction:
                    self._connection.rollback()
                raise ArchiveUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def _insert_in_chunks(
        self, batch: Sequence[StoredMessage], missing: Sequence[Missing]
    ) -> None:
        """The batch's inserts, :data:`INSERT_CHUNK` rows at a time with a checkpoint
        between, so a big batch holds the event loop a few milliseconds at a time (the
        transaction stays open across them: the connection is this batch's)."""
        for start in range(0, max(len(batch), 1), INSERT_CHUNK):
            self._insert(self._connection, batch[start : start + INSERT_CHUNK], missing)
            missing = ()
            await anyio.lowlevel.checkpoint()

    def _begin_nowait(self) -> bool:
        """``BEGIN IMMEDIATE`` if the write lock is free now; ``False`` (nothing begun)
        if another connection holds it: waiting for it is a thread's job, not the loop's."""
        db = self._connection
        db.execute("PRAGMA busy_timeout = 0")
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY:
                raise
            return False
        finally:
            db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
        return True

    def _write(self, batch: Sequence[StoredMessage], missing: Sequence[Missing]) -> None:
        with self._transaction() as db:
            self._insert(db, batch, missing)

    @staticmethod
    def _insert(
        db: sqlite3.Connection, batch: Sequence[StoredMessage], missing: Sequence[Missing]
    ) -> None:
        latest: dict[str, tuple[str, int]] = {}
        for message in batch:
            latest[message.room] = (message.epoch, message.seq)
        for gap in missing:
            seen = latest.get(gap.room)
            if seen is None or (seen[0] == gap.epoch and seen[1] < gap.last):
                latest[gap.room] = (gap.epoch, gap.last)
        rows = [
            (m.room, m.epoch, m.seq, m.ts, m.user, m.name, m.text, _json(m.data), m.id)
            for m in batch
        ]
        # the rooms first: a message of a room's new epoch is checked against it
        db.executemany(_MOVE_ROOM, [(room, e, s) for room, (e, s) in latest.items()])
        db.executemany(_INSERT_MESSAGE, rows)
        db.executemany(
            "INSERT INTO missing VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
            [(g.room, g.epoch, g.first, g.last) for g in missing],
        )

    async def position(self, room: str) -> Position | None:
        return await self._run(self._position, room)

    def _position(self, room: str) -> Position | None:
        db = self._connection
        found = db.execute("SELECT epoch, seq FROM rooms WHERE room = ?", (room,)).fetchone()
        if found is None:
            return None
        epoch, seq = found
        rows = db.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE room = ? AND epoch = ? AND seq <= ?"
            " ORDER BY seq DESC LIMIT ?",
            (room, epoch, seq, self._window),
        ).fetchall()
        return Position(epoch, seq, unbroken_window(room, seq, rows))

    async def before(self, room: str, epoch: str, before: int, limit: int) -> ArchivedPage:
        return await self._run(self._before, room, epoch, before, limit)

    def _before(self, room: str, epoch: str, before: int, limit: int) -> ArchivedPage:
        rows = self._connection.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE room = ? AND epoch = ? AND seq < ?"
            " ORDER BY seq DESC LIMIT ?",
            (room, epoch, before, limit + 1),
        ).fetchall()
        return newest_page(room, rows, limit)

    async def forget(self, room: str, epoch: str, through: int) -> None:
        await self._run(self._forget, room, epoch, through)

    def _forget(self, room: str, epoch: str, through: int) -> None:
        with self._transaction() as db:
            db.execute(
                "DELETE FROM messages WHERE room = ? AND (epoch <> ? OR seq <= ?)",
                (room, epoch, through),
            )
            db.execute("DELETE FROM missing WHERE room = ?", (room,))
            db.execute(_MOVE_ROOM, (room, epoch, through))
            db.execute(
                "UPDATE rooms SET cleared = max(cleared, ?) WHERE room = ? AND epoch = ?",
                (through, room, epoch),
            )

    async def prune(self, older_than: int) -> int:
        return await self._run(self._prune, older_than)

    def _prune(self, older_than: int) -> int:
        with self._transaction() as db:
            return int(db.execute("DELETE FROM messages WHERE ts < ?", (older_than,)).rowcount)

    async def missing(self, room: str) -> list[Missing]:
        rows = await self._run(
            lambda: self._connection.execute(
                "SELECT room, epoch, first, last FROM missing WHERE room = ? ORDER BY first",
                (room,),
            ).fetchall()
        )
        return [Missing(*row) for row in rows]

    def note_unrecorded(self) -> None:
        self._flag(True)

    def note_recorded(self) -> None:
        self._flag(False)

    def _flag(self, unrecorded: bool) -> None:
        if unrecorded == self._unrecorded:
            return
        with contextlib.suppress(OSError):  # best effort: the flag only narrows the risk
            os.pwrite(self._lock, b"1" if unrecorded else b"0", 0)
            self._unrecorded = unrecorded

    async def mark_clean(self) -> None:
        def mark() -> None:
            with self._transaction() as db:
                db.execute("UPDATE meta SET value = '1' WHERE key = 'clean'")

        await self._run(mark)

    async def _run(self, call: Callable[..., T], *args: Any) -> T:
        """``call(*args)`` in the connection's thread; a database error is
        :class:`ArchiveUnavailable`."""
        try:
            return await anyio.to_thread.run_sync(call, *args, limiter=self._limiter)
        except (sqlite3.Error, OSError) as exc:
            raise ArchiveUnavailable(f"{type(exc).__name__}: {exc}") from exc


def _json(data: dict[str, Any] | None) -> str | None:
    return None if data is None else orjson.dumps(data).decode()


@asynccontextmanager
async def open_sqlite_archive(
    url: str, *, window: int, unarchived_bound: int
) -> AsyncIterator[SqliteArchive]:
    """Open (creating it if need be) the archive at ``url``, settle how the previous run
    ended (moving each room on by ``unarchived_bound`` after a crash), and close it when
    the block exits. ``window``: messages :meth:`SqliteArchive.position` hands.

    :raises ArchiveUnavailable: if the file cannot be opened, is not a roomcast archive,
        or another process has it open
    """
    path = database_path(url)
    archive = await anyio.to_thread.run_sync(_open, path, window)
    try:
        await archive._run(archive._recover, unarchived_bound)
        yield archive
    finally:
        with anyio.move_on_after(5, shield=True):
            await anyio.to_thread.run_sync(_close, archive, limiter=archive._limiter)


def _open(path: str, window: int) -> SqliteArchive:
    try:
        lock = os.open(f"{path}-lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise ArchiveUnavailable(f"cannot open {path}-lock: {exc.strerror}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(lock)
        raise ArchiveUnavailable(f"{path} is in use by another roomcast process") from None
    try:
        if not os.pread(lock, 1, 0):
            os.pwrite(lock, b"0", 0)  # the flag's byte, so that setting it allocates nothing
        connection = sqlite3.connect(
            path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
        )
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("PRAGMA synchronous = FULL")
    except (sqlite3.Error, OSError) as exc:
        os.close(lock)
        raise ArchiveUnavailable(f"cannot open {path}: {exc}") from None
    return SqliteArchive(connection, lock, window)


def _close(archive: SqliteArchive) -> None:
    try:
        archive._connection.close()
    finally:
        os.close(archive._lock)
