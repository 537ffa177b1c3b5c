"""Scrollback (SPEC §11): a page of a room's messages before a ``seq``, newest page first.

One function, :func:`scrollback`, answers every client that scrolls back: the server API's
``GET /api/rooms/{room}/history?before=S&limit=N`` and protocol v2's ``history`` command
(the browser page, ``roomcast chat``, ``Room.history`` in the Python library). Keeping it
one function keeps one set of rules (the page's order, its bounds, what ``more`` means)
and one place where the durable archive plugs in: today a page comes from what the
broker retains for resume (§4.3: the hub's history in memory, the room's history list in
Redis); an archive, when one is configured, will be asked first, and the retained window
stays the answer without one.

A page holds ``message`` events in seq order (oldest first), whichever client asks:
a client prepends a page as one block above what it shows and pages on with
``before=`` the first seq it holds, so seq order is what every client wants, and it is
the order of a join's replay and of the ``since`` history too. ``more`` says whether
messages before the page exist (are still retained): a client shows "the beginning"
exactly when it is false.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import orjson

from .brokers import Broker

if TYPE_CHECKING:
    from .runtime import Runtime

__all__ = ["PAGE_CHARS", "Page", "retained_page", "scrollback"]

#: a page stops at this many characters of events (keeping at least one message): 200 messages
#: at ROOMCAST_MAX_TEXT could be megabytes, and a page is one event in one outbox slot
PAGE_CHARS: Final = 512 * 1024


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
    """
    return await retained_page(runtime.broker, room, before, limit, runtime.settings.history_size)


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
