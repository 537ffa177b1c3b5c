"""The feed of stored messages: every message this worker sequenced, in its final form,
handed to consumers (the ``stored`` hook, SPEC §10; the archive, §11) off the fan-out path.

::

    hub / broker ── put() ──> StoredFeed ──> bounded queue ──> drain task ──> consumer
       (synchronous, never waits)       └──> bounded queue ──> drain task ──> consumer

Whoever sequences a message (the in-process hub after its fan-out; with Redis, the worker
whose publish script answered with the seqs) calls :meth:`StoredFeed.put` once per
message, synchronously: it appends to each consumer's bounded queue and returns. A full
queue drops the message for that consumer only (counted in
:attr:`Subscription.dropped`, logged once per overflow), so a slow consumer costs
nothing but its own completeness: fan-out never waits on it, nor do consumers on each
other. Each consumer's queue is drained by one task in the runtime's task group, in seq
order per room, in batches (a consumer that writes to a database wants them whole).

What a consumer can miss (the README says how an application fills the gap from ``seq``
and the history API): messages dropped on overflow, those still queued when the process
dies, and, with Redis, those whose publish call timed out after Redis had run it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .protocol import ChatMessage

__all__ = ["BATCH_MAX", "QUEUE_SIZE", "Consumer", "StoredFeed", "StoredMessage", "Subscription"]

log = logging.getLogger("roomcast")

#: messages waiting for one consumer before further ones are dropped for it: at the default
#: rate limit that is minutes of one busy room, seconds of a worker at full speed
QUEUE_SIZE: Final = 10_000
#: the most messages handed to a consumer at once
BATCH_MAX: Final = 512


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """An accepted message as every member, the history and the API see it."""

    room: str
    seq: int
    #: the run of the room's sequence (``welcome.epoch``): ``seq`` counts within it
    epoch: str
    #: the sender's verified user id; ``None`` when anonymous
    user: str | None
    #: the sender's display name (``from``); the server API's ``from``
    name: str | None
    text: str
    #: what a ``message`` hook added to the message, if anything
    data: dict[str, Any] | None
    #: server time in milliseconds since the Unix epoch
    ts: int
    #: the sender's own id for the message, if it gave one
    id: str | None

    @classmethod
    def of(
        cls,
        room: str,
        seq: int,
        epoch: str,
        message: ChatMessage,
        name: str | None,
        user: str | None,
        ts: int,
    ) -> StoredMessage:
        """The stored form of ``message`` (after its ``message`` hook) once sequenced."""
        return cls(room, seq, epoch, user, name, message.text, message.data, ts, message.id)


#: takes a batch of stored messages, oldest first (per room, in seq order)
Consumer = Callable[[Sequence[StoredMessage]], Awaitable[None]]


@dataclass(eq=False)
class Subscription:
    """One consumer's place in the feed: its bounded queue and what it lost."""

    name: str
    consumer: Consumer
    size: int
    #: told of every message offered and whether the queue took it (the archive keeps
    #: track of what it has not stored yet, and of exactly which seqs it missed)
    observer: Callable[[StoredMessage, bool], None] | None = None
    #: the most messages handed to the consumer at once
    batch: int = BATCH_MAX
    #: messages dropped because the queue was full (or closed)
    dropped: int = 0
    _send: MemoryObjectSendStream[StoredMessage] = field(init=False, repr=False)
    _receive: MemoryObjectReceiveStream[StoredMessage] = field(init=False, repr=False)
    _overflowing: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        self._send, self._receive = anyio.create_memory_object_stream[StoredMessage](self.size)
        #: set once :meth:`drain` has handed over everything queued before :meth:`close`
        self.drained = anyio.Event()

    @property
    def queued(self) -> int:
        """Messages waiting for the consumer (not counting the batch it is working on)."""
        return self._receive.statistics().current_buffer_used

    def close(self) -> None:
        """Take no more messages: :meth:`drain` hands over what is queued, then ends
        (a clean shutdown); later ones are dropped."""
        self._send.close()

    def offer(self, message: StoredMessage) -> None:
        try:
            self._send.send_nowait(message)
        except anyio.ClosedResourceError:
            self.dropped += 1  # shutting down: nobody will take it
            if self.observer is not None:
                self.observer(message, False)
        except anyio.WouldBlock:
            self.dropped += 1
            if self.observer is not None:
                self.observer(message, False)
            if not self._overflowing:  # once per overflow, not once per message
                self._overflowing = True
                log.warning(
                    "roomcast: the %s queue is full (%d messages): messages from seq %d "
                    "of #%s on are not handed to it until it catches up",
                    self.name,
                    self.size,
                    message.seq,
                    message.room,
                )
        else:
            self._overflowing = False
            if self.observer is not None:
                self.observer(message, True)

    async def drain(self) -> None:
        """Hand what is queued to the consumer, a batch at a time, until cancelled."""
        async with self._receive:
            async for first in self._receive:
                batch = [first]
                while len(batch) < self.batch:
                    try:
                        batch.append(self._receive.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):  # (closed: the last batch)
                        break
                await self.consumer(batch)
        self.drained.set()


class StoredFeed:
    """Every message this worker sequenced, for the consumers subscribed before it runs."""

    def __init__(self) -> None:
        self.subscriptions: list[Subscription] = []

    @property
    def wanted(self) -> bool:
        """Whether anyone consumes the feed (else nobody needs to build its messages)."""
        return bool(self.subscriptions)

    def subscribe(
        self,
        name: str,
        consumer: Consumer,
        *,
        size: int = QUEUE_SIZE,
        observer: Callable[[StoredMessage, bool], None] | None = None,
        batch: int = BATCH_MAX,
    ) -> Subscription:
        """Give ``consumer`` every message put from now on, through a queue of ``size``,
        at most ``batch`` at once (``observer``: see :attr:`Subscription.observer`)."""
        subscription = Subscription(name, consumer, size, observer, batch)
        self.subscriptions.append(subscription)
        return subscription

    def put(self, message: StoredMessage) -> None:
        """Queue a message for every consumer; never waits (see the module docstring)."""
        for subscription in self.subscriptions:
            subscription.offer(message)

    async def run(self) -> None:
        """Drain every consumer's queue, each in a task of its own, until cancelled."""
        async with anyio.create_task_group() as tg:
            for subscription in self.subscriptions:
                tg.start_soon(subscription.drain)
