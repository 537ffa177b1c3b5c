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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import anyio

from ..hub import Client, Hub, Member
from ..protocol import ChatMessage
from ..settings import Settings

if TYPE_CHECKING:
    from ..archive.keeper import Keeper

__all__ = [
    "DISCONNECTED",
    "UNAVAILABLE_NOTICE",
    "Broker",
    "BrokerUnavailable",
    "Claim",
    "History",
    "Person",
    "open_broker",
]

#: the ``error`` text for a message the broker could not accept
UNAVAILABLE_NOTICE = "message not sent: the chat service is unavailable; try again shortly"
#: the close reason (with 4001) of a connection the server API disconnected
DISCONNECTED = "disconnected by the server"


class BrokerUnavailable(Exception):
    """The broker cannot take the request now (Redis is down); nothing was published."""


@dataclass(frozen=True, slots=True)
class History:
    """A page of a room's retained messages (encoded ``message`` events, oldest first)."""

    epoch: str | None  # None: the room has no history
    seq: int  # the room's latest seq
    first: int  # the first seq still retained (seq + 1 when none is)
    events: list[str]


class Person(NamedTuple):
    """A room's member as a person: a verified ``user`` once however many connections
    (tabs) it has there, or one anonymous connection (``user`` ``None``)."""

    user: str | None
    name: str | None


@dataclass(frozen=True, eq=False)
class Claim:
    """One connection of a verified ``user``, counted against the per-user limit until it
    is released (:meth:`Broker.claim_connection`); ``id`` is the broker's own.

    The connection runs inside ``revoked``. A broker that finds it can no longer keep the
    claim cancels it, and the connection is closed 4429: with Redis, a claim that lapsed
    (its server paused past the claims' lifetime, or Redis lost them) and whose place the
    user's other connections took meanwhile.
    """

    user: str
    id: str
    revoked: anyio.CancelScope = field(default_factory=anyio.CancelScope)


class Broker(Protocol):
    name: str
    hub: Hub

    @property
    def healthy(self) -> bool:
        """Whether the broker can take messages right now (``/healthz``)."""
        ...

    async def join(
        self,
        room: str,
        name: str | None,
        *,
        since: int | None,
        epoch: str | None,
        user: str | None = None,
        client: Client | None = None,
    ) -> Member:
        """Add a member (of ``client``, a v2 connection, or of a new v1 one); the client's
        greeting gets its ``welcome`` and any resume replay.

        :raises RoomFull: if the room is at capacity
        :raises NameTaken: if another member's name looks like ``name``
        :raises BrokerUnavailable: if the broker cannot be reached
        """
        ...

    async def leave(self, member: Member) -> None:
        """Remove a member (idempotent) and tell the room. Called in ``finally`` blocks:
        implementations bound their own time and never raise for a broker outage."""
        ...

    async def rename(self, member: Member, name: str) -> None:
        """Give a member a new display name (a refreshed token's ``name``, SPEC §8.3),
        claimed in its room wherever the broker's members are; nothing changes if it is
        refused (nor if the member has left).

        :raises NameTaken: if another member's name looks like ``name``
        :raises BrokerUnavailable: if the broker cannot be reached
        """
        ...

    async def publish(self, member: Member, message: ChatMessage) -> None:
        """Sequence and fan out a message (nothing if the member has left the room).

        The sender gets an ``ack`` (if the message has an ``id``) or an ``unavailable``
        error for each message, in the order it sent them, in its outbox. A broker may
        return before the message is sequenced, waiting only for room in a bounded queue.
        """
        ...

    async def answered(self, member: Member) -> None:
        """Wait until every message the member published has its ``ack`` or error in its
        outbox (bounded; at once where publishing sequences before it returns). A client's
        own ``leave`` waits for it: an answer for a member that has left goes nowhere, and
        a sender that never hears of a message Redis sequenced would send it again."""
        ...

    # -- the server API (SPEC §8.2) ---------------------------------------------------------

    async def post(self, room: str, message: ChatMessage, sender: str | None) -> int:
        """Publish into ``room`` from outside it, as a member named ``sender`` would.

        :raises BrokerUnavailable: if the message could not be accepted
        """
        ...

    async def clear_history(self, room: str) -> tuple[str, int] | None:
        """Forget ``room``'s retained messages (the server API's DELETE); its epoch and
        seq stay while anyone is in it, so a client resuming from before gets
        ``history_gap``. Returns the room's ``(epoch, seq)``, ``None`` if the broker does
        not hold it.

        :raises BrokerUnavailable: if the broker cannot be reached
        """
        ...

    async def history(self, room: str, since: int, limit: int) -> History:
        """Up to ``limit`` retained messages after ``since``.

        :raises BrokerUnavailable: if the broker cannot be reached
        """
        ...

    async def presence(self, room: str) -> list[Person]:
        """The room's members, each verified user once (SPEC §8.1).

        :raises BrokerUnavailable: if the broker cannot be reached
        """
        ...

    async def rooms(self) -> dict[str, int]:
        """Rooms with members, and how many people (each verified user once).

        :raises BrokerUnavailable: if the broker cannot be reached
        """
        ...

    async def claim_connection(self, user: str, limit: int) -> Claim | None:
        """Count a new connection of the verified ``user``: ``None`` if it already has
        ``limit`` (``ROOMCAST_MAX_CONNECTIONS_PER_USER``, 4429), on every worker and server
        the broker spans, else the claim to release when the connection ends.

        :raises BrokerUnavailable: if the broker cannot be reached
        """
        ...

    async def release_connection(self, claim: Claim) -> None:
        """Stop counting a connection (idempotent; never raises: a claim the broker cannot
        release now lapses on its own)."""
        ...

    async def disconnect(self, user: str) -> int:
        """Close every connection of the verified ``user``, on every worker and server,
        with 4001 :data:`DISCONNECTED`; returns how many were closed (a broker spanning
        processes counts those that reported back in time).

        Not a ban: the user may connect again (with a token that is still valid).

        :raises BrokerUnavailable: if the broker cannot be reached
        """
        ...

    async def notify(self, user: str, data: Any) -> int:
        """Give every v2 connection of the verified ``user``, on every worker and server,
        a ``notice`` carrying ``data``; returns how many took it (a broker spanning
        processes counts those that reported back in time).

        :raises BrokerUnavailable: if the broker cannot be reached
        """
        ...

    async def typing(self, member: Member) -> None:
        """Tell the member's room's other v2 connections, wherever they are, that it is
        typing (never stored, never sequenced, dropped for busy readers).

        :raises BrokerUnavailable: if the broker cannot be reached
        """
        ...


@asynccontextmanager
async def open_broker(
    settings: Settings, hub: Hub, keeper: Keeper | None = None
) -> AsyncIterator[Broker]:
    """The broker the settings ask for, and the hub's presence notices
    (:meth:`Hub.run_presence`), running until the block exits. With Redis, sequences live
    in Redis; the in-process broker takes its rooms' positions from ``keeper``'s archive.

    :raises BrokerUnavailable: if the configured Redis cannot be reached
    """
    async with AsyncExitStack() as stack:
        broker: Broker
        if settings.redis_url is None:
            from .memory import MemoryBroker

            broker = MemoryBroker(hub, keeper)
        else:
            from .redis import open_redis_broker

            broker = await stack.enter_async_context(open_redis_broker(settings, hub))
        tg = await stack.enter_async_context(anyio.create_task_group())
        tg.start_soon(hub.run_presence)
        yield broker
        tg.cancel_scope.cancel()
