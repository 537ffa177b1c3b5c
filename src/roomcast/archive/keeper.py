"""The archive's consumer of the stored feed: group commit, retries, and exact accounting.

::

    hub / broker ── StoredFeed.put ──> the archive's bounded queue ──> Keeper.write ──> Archive
                                   └─> Keeper.offered (synchronous: what is not archived yet)

Everything queued while a commit runs, and until :data:`COMMIT_INTERVAL` after the
previous one started, goes into the next one: one transaction per batch
(up to :data:`COMMIT_MAX` messages), on the worker that
sequenced the messages, off the fan-out path. A failing commit (disk full, a locked file,
a server restarting) is retried with the same batch, backing off up to
:data:`MAX_BACKOFF`; chat never waits for it. Meanwhile the queue fills, and beyond it the
feed drops messages for the archive: each dropped seq is recorded as a :class:`Missing`
range, written with the next successful commit, so the archive knows exactly which seqs
it lacks. ``/metrics`` shows the queue (lag), failed commits and missed messages; the log
says once that the archive fails and once that it has recovered.

**What a crash can lose, and why no seq is handed out twice.** The archive holds each
room's position as of its last commit. On the memory broker a room's sequence continues
from there after a restart, so a crash must not let it hand out a seq a client already
saw (seq 301, lost with the crash, must never name another message). What can be
sequenced and not committed is bounded while the archive keeps up: the queue
(``QUEUE_SIZE``) plus the batch being written (:data:`COMMIT_MAX`). So after an unclean stop
every room continues at its archived seq plus :func:`unarchived_bound` and is restored
without a retained window: a client resuming in it gets ``history_gap`` (and pages back
through the archive for what was committed). That over-reports for rooms that lost
nothing, which is the price of not knowing which rooms were busy when the process died,
and it is documented. When the queue has dropped messages the bound no longer holds; the
archive then notes it outside the database (:meth:`Archive.note_unrecorded`) until the
dropped seqs are recorded, and a crash in that state gives every room a new epoch at the
next start instead: resuming clients get ``history_gap`` with the new epoch, and again no
seq is reused within an epoch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Final

import anyio

from ..stored import BATCH_MAX, QUEUE_SIZE, StoredFeed, StoredMessage, Subscription
from .base import Archive, ArchiveUnavailable, Missing, Position

__all__ = ["MAX_BACKOFF", "Keeper", "unarchived_bound"]

log = logging.getLogger("roomcast")

#: the longest wait between two attempts at a failing commit, in seconds
MAX_BACKOFF: Final = 2.0
#: the shortest time from one commit's start to the next one's while fewer than a batch
#: are queued: a busy server commits what arrived in that time at once (a few commits a
#: second instead of one per message), and a crash loses at most about that much more
COMMIT_INTERVAL: Final = 0.1
FIRST_BACKOFF: Final = 0.05
#: seconds a room's opening waits for its archived position before the room starts a new
#: epoch instead (an archive that is down must not keep anyone out of a room)
POSITION_TIMEOUT: Final = 3.0


#: the most messages in one commit: a saturated worker's commits each carry what arrived
#: while the previous one ran, so the fixed cost of a commit (the fsync, the hand-off to
#: its thread) is paid per thousands of messages, not per 512 (at 512 a worker sending
#: 13,000 messages/s was just kept up with, and one slow fsync overflowed the queue)
COMMIT_MAX: Final = 4096


def unarchived_bound(queue_size: int = QUEUE_SIZE) -> int:
    """The most messages of one room that can be sequenced and not yet committed while
    the archive keeps up: a full queue and the batch being written."""
    return queue_size + COMMIT_MAX


class Keeper:
    """Consumes the stored feed into ``archive`` (see the module docstring)."""

    def __init__(self, archive: Archive, feed: StoredFeed, *, size: int = QUEUE_SIZE) -> None:
        self.archive = archive
        self.subscription: Subscription = feed.subscribe(
            "archive", self.write, size=size, observer=self.offered, batch=COMMIT_MAX
        )
        #: rooms with messages sequenced here and not yet committed: (epoch, newest seq)
        self.unarchived: dict[str, tuple[str, int]] = {}
        #: seq ranges dropped by the queue, not yet recorded, by (room, epoch)
        self._missing: dict[tuple[str, str], list[list[int]]] = {}
        #: messages the queue took (``lag`` is those not written yet)
        self._queued = 0
        self._failing = False
        #: set (and replaced) at every commit and failed attempt
        self._progress: anyio.Event | None = None
        #: set when a full batch is queued while the next one gathers
        self._batch_ready: anyio.Event | None = None
        #: messages committed, commits, seconds spent committing, failed commits, messages
        #: dropped by the queue (never archived)
        self.written: int = 0
        self.commits: int = 0
        self.commit_seconds: float = 0.0
        self.failures: int = 0
        self.missed: int = 0

    @property
    def lag(self) -> int:
        """Messages sequenced and not committed yet (queued, or in the batch at work)."""
        return self._queued - self.written

    async def caught_up(self) -> None:
        """Wait until everything offered so far is committed (or recorded as missing)."""
        while self.lag or self._missing:
            await self.wait_for_commit()

    async def wait_for_commit(self) -> None:
        """Wait for the next commit (or failed attempt)."""
        if self._progress is None:
            self._progress = anyio.Event()
        await self._progress.wait()

    def _progressed(self) -> None:
        if self._progress is not None:
            self._progress.set()
            self._progress = None

    # -- the feed ---------------------------------------------------------------------------

    def offered(self, message: StoredMessage, kept: bool) -> None:
        """Track a message the feed offered the archive (synchronous, on the fan-out
        path: a dict store, and a range extended if the queue dropped it)."""
        self.unarchived[message.room] = (message.epoch, message.seq)
        if kept:
            self._queued += 1
            if self._batch_ready is not None and self.subscription.queued >= BATCH_MAX:
                self._batch_ready.set()
            return
        self.missed += 1
        ranges = self._missing.setdefault((message.room, message.epoch), [])
        if ranges and ranges[-1][1] == message.seq - 1:
            ranges[-1][1] = message.seq
        else:
            ranges.append([message.seq, message.seq])
        self.archive.note_unrecorded()

    async def write(self, batch: Sequence[StoredMessage]) -> None:
        """Commit ``batch`` with every missed range so far, retrying until it succeeds
        (or the drain task is cancelled at shutdown)."""
        missing: list[Missing] = []
        backoff = FIRST_BACKOFF
        while True:
            missing += self._take_missing()
            started = time.perf_counter()
            try:
                await self.archive.write(batch, missing)
            except ArchiveUnavailable as exc:
                self._failed(exc)
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            self.commit_seconds += time.perf_counter() - started
            break
        self._committed(batch, missing)
        if self.subscription.queued < BATCH_MAX:  # a full batch waiting goes at once
            await self._gather(COMMIT_INTERVAL - (time.perf_counter() - started))

    async def _gather(self, seconds: float) -> None:
        """Let the next batch gather for ``seconds``, or until a full batch is queued:
        a trickle is committed a few times a second, a flood as fast as commits go (a
        plain sleep capped a busy worker at about a batch and a half per interval, and
        its archive fell behind and dropped at 13,000 messages/s)."""
        self._batch_ready = anyio.Event()
        try:
            with anyio.move_on_after(seconds):
                await self._batch_ready.wait()
        finally:
            self._batch_ready = None

    def _take_missing(self) -> list[Missing]:
        taken = [
            Missing(room, epoch, first, last)
            for (room, epoch), ranges in self._missing.items()
            for first, last in ranges
        ]
        self._missing.clear()
        return taken

    def _failed(self, exc: ArchiveUnavailable) -> None:
        self.failures += 1
        self._progressed()
        if not self._failing:
            self._failing = True
            log.warning(
                "roomcast: the archive cannot store messages (%s); chat goes on, the "
                "archive retries, and messages beyond its queue of %d are recorded as "
                "missing",
                exc,
                self.subscription.size,
            )

    def _committed(self, batch: Sequence[StoredMessage], missing: Sequence[Missing]) -> None:
        self.commits += 1
        self.written += len(batch)
        if self._failing:
            self._failing = False
            log.warning("roomcast: the archive stores messages again")
        done = [(m.room, m.epoch, m.seq) for m in batch]
        done += [(gap.room, gap.epoch, gap.last) for gap in missing]
        for room, epoch, seq in done:
            pending = self.unarchived.get(room)
            if pending is not None and pending[0] == epoch and pending[1] <= seq:
                del self.unarchived[room]
        if not self._missing:
            self.archive.note_recorded()
        self._progressed()

    # -- positions --------------------------------------------------------------------------

    async def position(self, room: str) -> Position | None:
        """Where ``room`` stands: the archive's position, unless messages sequenced here
        are still on their way to it (then the newest of those, with no window: what
        the archive holds would replay with a hole in it).

        :raises ArchiveUnavailable: if the archive cannot answer
        """
        earlier = self.unarchived.get(room)
        archived = await self.archive.position(room)
        # the newest after the await; if a commit removed it meanwhile, what was read may
        # predate that commit, so the earlier one still bounds the room
        pending = self.unarchived.get(room) or earlier
        if pending is None:
            return archived
        epoch, seq = pending
        if archived is not None and archived.epoch == epoch and archived.seq >= seq:
            return archived
        return Position(epoch, seq)

    # -- shutdown ---------------------------------------------------------------------------

    async def finish(self) -> None:
        """At a clean shutdown: take no more messages, commit what is queued and any
        missed ranges, then mark the archive clean. Cancelled (its caller's bound) or
        failing, the archive stays unclean and the next start treats it as a crash."""
        self.subscription.close()
        await self.subscription.drained.wait()
        try:
            missing = self._take_missing()
            if missing:
                await self.archive.write([], missing)
                self.archive.note_recorded()
            await self.archive.mark_clean()
        except ArchiveUnavailable as exc:
            log.warning("roomcast: the archive could not be closed cleanly (%s)", exc)
