"""Brokers: where a room's order, history and presence live.

A broker sequences messages (one ``seq`` per room), keeps history for resume, tracks
presence, and hands every message to the :class:`~roomcast.hub.Hub` of each process that
has members in the room; the hub does the local, synchronous fan-out.

- :class:`~roomcast.brokers.memory.MemoryBroker`: one process, no external service.
- :class:`~roomcast.brokers.redis.RedisBroker`: any number of workers and machines.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Protocol

import anyio

from ..hub import Hub, Member
from ..protocol import ChatMessage
from ..settings import Settings

__all__ = ["Broker", "BrokerUnavailable", "open_broker"]


class BrokerUnavailable(Exception):
    """The broker cannot take the request now (Redis is down); nothing was published."""


class Broker(Protocol):
    name: str
    hub: Hub

    @property
    def healthy(self) -> bool:
        """Whether the broker can take messages right now (``/healthz``)."""
        ...

    async def join(
        self, room: str, name: str | None, *, since: int | None, epoch: str | None
    ) -> Member:
        """Add a member; its greeting holds ``welcome`` and any resume replay.

        :raises RoomFull: if the room is at capacity
        :raises BrokerUnavailable: if the broker cannot be reached
        """
        ...

    async def leave(self, member: Member) -> None:
        """Remove a member (idempotent) and tell the room. Called in ``finally`` blocks:
        implementations bound their own time and never raise for a broker outage."""
        ...

    async def publish(self, member: Member, message: ChatMessage) -> int | None:
        """Sequence and fan out a message, then ack it to the sender if it has an ``id``.
        Returns the seq, or ``None`` if the member is no longer in the room.

        :raises BrokerUnavailable: if the message could not be accepted
        """
        ...


@asynccontextmanager
async def open_broker(settings: Settings, hub: Hub) -> AsyncIterator[Broker]:
    """The broker the settings ask for, and the hub's presence notices
    (:meth:`Hub.run_presence`), running until the block exits.

    :raises BrokerUnavailable: if the configured Redis cannot be reached
    """
    async with AsyncExitStack() as stack:
        broker: Broker
        if settings.redis_url is None:
            from .memory import MemoryBroker

            broker = MemoryBroker(hub)
        else:
            from .redis import open_redis_broker

            broker = await stack.enter_async_context(open_redis_broker(settings, hub))
        tg = await stack.enter_async_context(anyio.create_task_group())
        tg.start_soon(hub.run_presence)
        yield broker
        tg.cancel_scope.cancel()
