"""The queue between a connection and its ASGI app on Hypercorn's Trio worker.

Hypercorn gives each app a ``trio.open_memory_channel(max_app_queue_size)``: its state,
two channel ends, a deque and two ordered dicts of waiting tasks, built for any number
of senders and receivers and kept for the connection's whole life. A connection has one
sender (its protocol, which puts what the peer sent) and one app that receives, and an
idle WebSocket spends its life with that app waiting in ``receive``: the channel and its
waiter were 3.2 KB of the 30 traced per idle connection (issue 24).

:class:`AppInbox` keeps the channel's semantics for that use: bounded (a full inbox
makes ``put`` wait, which is what stops Hypercorn reading a peer whose app is behind),
first in first out, a value handed straight to a waiting receiver, both calls
checkpoints, and cancellation of a waiting call loses nothing. It holds a list of
events, and the waiting tasks only while they wait.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio.task_group import TaskGroup, _handle
from hypercorn.typing import AppWrapper, ASGIReceiveEvent, ASGISendEvent, Scope
from outcome import Value

__all__ = ["AppInbox", "InboxTaskGroup"]


class AppInbox:
    """A bounded first-in-first-out queue of ASGI receive events for one app.

    The same behaviour as a ``trio`` memory channel of ``capacity`` that is never closed,
    in a few objects: waiting tasks are kept only while they wait.
    """

    __slots__ = ("_capacity", "_events", "_receivers", "_senders")

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._events: list[ASGIReceiveEvent] = []
        #: tasks waiting in :meth:`receive`, oldest first (``None`` until one waits)
        self._receivers: list[trio.lowlevel.Task] | None = None
        #: tasks waiting in :meth:`put`, with what each puts, oldest first
        self._senders: list[tuple[trio.lowlevel.Task, ASGIReceiveEvent]] | None = None

    def put_nowait(self, event: ASGIReceiveEvent) -> None:
        """Hand ``event`` to a waiting receiver, or queue it.

        :raises trio.WouldBlock: the inbox holds ``capacity`` events already
        """
        if self._receivers:
            trio.lowlevel.reschedule(self._receivers.pop(0), Value(event))
        elif len(self._events) < self._capacity:
            self._events.append(event)
        else:
            raise trio.WouldBlock

    async def put(self, event: ASGIReceiveEvent) -> None:
        """Queue ``event``, waiting while the inbox is full (the app is behind)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            self.put_nowait(event)
        except trio.WouldBlock:
            pass
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        senders = self._senders
        if senders is None:
            senders = self._senders = []
        waiting = (trio.lowlevel.current_task(), event)
        senders.append(waiting)

        def abort(_: Any) -> trio.lowlevel.Abort:
            senders.remove(waiting)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def receive_nowait(self) -> ASGIReceiveEvent:
        """The oldest event, letting the oldest waiting sender's in behind the rest.

        :raises trio.WouldBlock: nothing is queued
        """
        if self._senders:
            task, event = self._senders.pop(0)
            self._events.append(event)
            trio.lowlevel.reschedule(task)
        if not self._events:
            raise trio.WouldBlock
        return self._events.pop(0)

    async def receive(self) -> ASGIReceiveEvent:
        """The oldest event, waiting for one if none is queued: the app's ``receive``."""
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            event = self.receive_nowait()
        except trio.WouldBlock:
            pass
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return event
        receivers = self._receivers
        if receivers is None:
            receivers = self._receivers = []
        task = trio.lowlevel.current_task()
        receivers.append(task)

        def abort(_: Any) -> trio.lowlevel.Abort:
            receivers.remove(task)
            return trio.lowlevel.Abort.SUCCEEDED

        received: ASGIReceiveEvent = await trio.lowlevel.wait_task_rescheduled(abort)
        return received


class InboxTaskGroup(TaskGroup):
    """Hypercorn's per-connection task group, whose apps receive from an :class:`AppInbox`
    instead of a memory channel (``hardening.install`` puts it in Hypercorn's place)."""

    async def spawn_app(
        self,
        app: AppWrapper,
        config: Config,
        scope: Scope,
        send: Callable[[ASGISendEvent | None], Awaitable[None]],
    ) -> Callable[[ASGIReceiveEvent], Awaitable[None]]:
        inbox = AppInbox(config.max_app_queue_size)
        assert self._nursery is not None
        self._nursery.start_soon(
            _handle,
            app,
            config,
            scope,
            inbox.receive,
            send,
            trio.to_thread.run_sync,
            trio.from_thread.run,
        )
        return inbox.put

    def try_spawn(self, func: Callable[[], Awaitable[None]]) -> bool:
        """Start ``func`` as a task of this connection, unless the connection is ending
        (its task group closed to new tasks): then ``False``."""
        if self._nursery is None:
            return False
        try:
            self._nursery.start_soon(func)
        except RuntimeError:  # "Nursery is closed to new arrivals"
            return False
        return True
