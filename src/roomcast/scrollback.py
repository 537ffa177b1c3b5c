"""Scrollback (SPEC §11): a page of a room's messages before a ``seq``, newest page first.

One function, :func:`scrollback`, answers every client that scrolls back: the server API's
``GET /api/rooms/{room}/history?before=S&limit=N`` and protocol v2's ``history`` command
(the browser page, ``roomcast chat``, ``Room.history`` in the Python library). Keeping it
one function keeps one set of rules (the page's order, its bounds, what ``more`` means)
and one place where the durable archive plugs in. A page comes first from what the
broker retains for resume (§4.3: the hub's history in memory, the room's history list in
Redis): it holds the newest messages, including those the archive has not committed yet
(the keeper writes behind fan-out). Where a page reaches past the window's oldest message,
the archive (``ROOMCAST_ARCHIVE``, when configured) fills in the older ones of the same
epoch, and says whether there are more; without an archive the window is all there is.

A page holds ``message`` events in seq order (oldest first), whichever client asks:
a client prepends a page as one block above what it shows and pages on with
``before=`` the first seq it holds, so seq order is what every client wants, and it is
the order of a join's replay and of the ``since`` history too. ``more`` says whether
messages before the page exist (are still retained): a client shows "the beginning"
exactly when it is false.
"""

from __future__ import annotations

import sys
from bisect import bisect_left
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import anyio
import orjson

from .archive import ArchivedPage
from .brokers import Broker

if TYPE_CHECKING:
    from .runtime import Runtime

__all__ = ["PAGE_CHARS", "Page", "retained_page", "scrollback"]

#: a page stops at this many characters of events (keeping at least one message): 200 messages
#: at ROOMCAST_MAX_TEXT could be megabytes, and a page is one event in one outbox slot
PAGE_CHARS: Final = 512 * 1024
#: longest a page waits for this worker's newest messages to reach the archive
SETTLE_TIMEOUT: Final = 1.0


@dataclass(frozen=True, slots=True)
class Page:
    """Messages of one room before a seq: encoded ``message`` events in seq order."""

    messages: list[str]
    #: whether earlier messages exist (the client may ask for the page before this one)
    more: bool
    #: the run of the room's sequence the seqs belong to (``None``: the room has no history)
    epoch: str | None


async def scrollback(runtime: Runtime, room: str, before: int | None, limit: int) -> Page:
    """Up to ``limit`` of ``room``'s messages with a seq below ``before`` (the newest ones
    when ``before`` is ``None``, or beyond the room's latest seq), in seq order.

    ``limit`` is the caller's to validate (1 to :data:`~.protocol.MAX_PAGE`).

    :raises BrokerUnavailable: if the broker cannot be reached
    :raises ArchiveUnavailable: if the page needs the archive and it cannot answer
    """
    page = await retained_page(runtime.broker, room, before, limit, runtime.settings.history_size)
    if runtime.archive is None or page.more or page.epoch is None:
        return page
    # The page reaches the window's oldest message: older ones of this run are archived.
    wanted = limit - len(page.messages)
    archived = await _archived_before(runtime, room, page, before, max(wanted, 1))
    if not wanted:  # a full page: the archive only says whether there is more
        return Page(page.messages, bool(archived.messages), page.epoch)
    messages = archived.messages + page.messages
    start = _start_within_budget(messages, 0, len(messages))
    return Page(messages[start:], archived.more or start > 0, page.epoch)


async def _archived_before(
    runtime: Runtime, room: str, window: Page, before: int | None, limit: int
) -> ArchivedPage:
    """The archive's page before the window's oldest message (or ``before``, when the
    window holds none). The archive is written behind fan-out: a message that has just
    left the window may not be committed yet, so while this worker still has messages on
    their way to the archive and the answer does not reach the window, wait for the next
    commit and ask again, for at most :data:`SETTLE_TIMEOUT`. (Another server's messages,
    with Redis, are not waited for: the rare page that asks for them within their commit
    window misses them.)"""
    archive, keeper = runtime.archive, runtime.keeper
    assert archive is not None and window.epoch is not None
    oldest = _seq_of(window.messages[0]) if window.messages else before or sys.maxsize
    archived = await archive.before(room, window.epoch, oldest, limit)
    with anyio.move_on_after(SETTLE_TIMEOUT):
        while keeper is not None and keeper.lag and window.messages:
            if archived.messages and _seq_of(archived.messages[-1]) == oldest - 1:
                break
            await keeper.wait_for_commit()
            archived = await archive.before(room, window.epoch, oldest, limit)
    return archived


async def retained_page(
    broker: Broker, room: str, before: int | None, limit: int, history_size: int
) -> Page:
    """:func:`scrollback` from what ``broker`` retains (at most ``history_size`` messages
    per room): the whole window is read, as a ``since=0`` history request reads it, and
    cut here, so the brokers need no query of their own for it.

    :raises BrokerUnavailable: if the broker cannot be reached
    """
    history = await broker.history(room, 0, max(history_size, 1))
    events = history.events
    end = len(events) if before is None else bisect_left(events, before, key=_seq_of)
    start = _start_within_budget(events, max(0, end - limit), end)
    return Page(events[start:end], start > 0, history.epoch)


def _start_within_budget(events: list[str], start: int, end: int) -> int:
    """Move the page's start up (dropping its oldest messages, which the next page
    brings) until it holds at most :data:`PAGE_CHARS`; it keeps its newest message."""
    size = sum(len(event) for event in events[start:end])
    while size > PAGE_CHARS and start < end - 1:
        size -= len(events[start])
        start += 1
    return start


def _seq_of(event: str) -> int:
    seq: int = orjson.loads(event)["seq"]
    return seq
