"""The Redis broker: one room, one order, one ``seq`` across workers and machines.

Every message goes through a Lua script that advances the room's counter, appends it to
the room's history and publishes it on the room's channel, in one atomic step; each worker
subscribes to the rooms it serves and fans out each room's events in that order, each
once, whatever is lost, paused or joined meanwhile. Presence, names, connection claims
and the server API's requests live in Redis too, so that every worker and server sees one
room. One :class:`RedisBroker`, whose parts live in modules of their own, each with the
part of the design it implements:

- :mod:`.keys`: a room's keys and presence entries (pure functions), its epoch, how long
  an idle room's data is kept, what Redis Cluster would need;
- :mod:`.calls`: the client, every request bounded in time (:data:`~.calls.REQUEST_TIMEOUT`)
  and turned into :class:`~roomcast.brokers.BrokerUnavailable`, the worker's health;
- :mod:`.control`: requests for every worker on the control channel (disconnect, notify)
  and their reports, typing, connection claims per user;
- :mod:`.delivery`: the subscriber task, the only writer of stream positions: bursts
  fanned out in order, catching up from history, ``history_gap``;
- :mod:`.presence`: presence entries and their upkeep, a user as one member, names held
  room-wide, leaves;
- :mod:`.joining`: a joiner's snapshot and greeting, and why no seq is delivered twice
  or out of order;
- :mod:`.publishing`: order and seq, the bounded queue and each member's share of it,
  one script call per batch, acks in order;
- :mod:`.scripts`: the Lua scripts, in which every write to a room happens, and what
  they publish;
- :mod:`.cluster`: Redis Cluster (``redis+cluster://``): a room's slot, sharded pub/sub,
  calls grouped by slot, what is global on one Redis; :mod:`.idle`, its idle budgets.

Each part is a class built on the parts it needs (control on calls, delivery on control,
presence on delivery, joining on presence; publishing on calls alone), and
:class:`RedisBroker` is joining and publishing together, hooked into the hub. The
subscription connection is :mod:`~roomcast.brokers.subscriber`, the room channels it
holds :mod:`~roomcast.brokers.channels`. The rest of roomcast imports
:class:`RedisBroker`, :func:`open_redis_broker` and the names exported here, not the
modules.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import unquote, urlsplit

import anyio
import coredis
from coredis.exceptions import RedisError
from coredis.retry import NoRetryPolicy

from ...hub import Hub
from ...settings import Settings
from .. import BrokerUnavailable
from . import calls
from .calls import RedisClient
from .cluster import CLUSTER_SCHEME, seed_nodes
from .idle import IdleSweep
from .joining import Joining
from .keys import PRESENCE_TTL
from .keys import _parse_entry as _parse_entry
from .keys import _people as _people
from .keys import _presence_entry as _presence_entry
from .presence import TICK
from .publishing import MEMBER_QUEUE, QUEUE_SIZE, Backlog, Publishing

# (``_parse_entry``, ``_people`` and ``_presence_entry``, the broker's own, are imported
# from here by the tests)
__all__ = [
    "MEMBER_QUEUE",
    "PRESENCE_TTL",
    "QUEUE_SIZE",
    "TICK",
    "Backlog",
    "RedisBroker",
    "open_redis_broker",
]


class RedisBroker(Joining, Publishing, IdleSweep):
    """The :class:`~roomcast.brokers.Broker` of any number of workers and machines:
    joining (on presence, delivery, control and calls) and publishing, over one client.
    The hub tells it of evictions (``announce``), asks it for a room's presence across
    workers (``presence_source``) and tells it when a room's last local member has left
    (``room_emptied``)."""

    name = "redis"

    def __init__(self, settings: Settings, hub: Hub, client: RedisClient) -> None:
        super().__init__(settings, hub, client)
        hub.announce = self._announce
        hub.presence_source = self._presence_state
        hub.room_emptied = self._let_go

    @property
    def healthy(self) -> bool:
        """Redis answers requests and this worker is subscribed."""
        return self._healthy and self._subscribed


def _client(url: str) -> RedisClient:
    """The command client for ``url``: a cluster's for ``redis+cluster://`` seeds (see
    :mod:`.cluster`), else one Redis's."""
    # A script that ran but whose reply was lost must not run again: a retried publish
    # would be a second copy of the message under a new seq. So neither client retries.
    if url.startswith(CLUSTER_SCHEME):
        parsed = urlsplit(url.replace(",", "%2C"))  # (only the credentials are read here)
        return coredis.RedisCluster(
            startup_nodes=seed_nodes(url),
            username=unquote(parsed.username) if parsed.username else None,
            password=unquote(parsed.password) if parsed.password else None,
            decode_responses=True,
            connect_timeout=calls.REQUEST_TIMEOUT,
            stream_timeout=calls.REQUEST_TIMEOUT * 5,
            retry_policy=NoRetryPolicy(),
        )
    return coredis.Redis.from_url(
        url,
        decode_responses=True,
        connect_timeout=calls.REQUEST_TIMEOUT,
        stream_timeout=calls.REQUEST_TIMEOUT * 5,
        client_name=f"roomcast-{os.getpid()}",
        retry_policy=NoRetryPolicy(),
    )


@asynccontextmanager
async def open_redis_broker(settings: Settings, hub: Hub) -> AsyncIterator[RedisBroker]:
    """Connect, subscribe, and keep the broker's tasks (subscriber, publisher, presence
    upkeep, leave announcements) running in one task group until the block exits.

    :raises BrokerUnavailable: if Redis cannot be reached at startup
    """
    assert settings.redis_url is not None
    client = _client(settings.redis_url)
    async with client:
        broker = RedisBroker(settings, hub, client)
        try:  # not _call_raw: this failure is the startup's one line, not a health change
            with anyio.fail_after(calls.REQUEST_TIMEOUT):
                await client.ping()
        except (RedisError, TimeoutError, OSError) as exc:
            raise BrokerUnavailable(f"cannot reach Redis at {settings.redis_url}: {exc}") from None
        async with anyio.create_task_group() as tg:
            try:
                with anyio.fail_after(calls.REQUEST_TIMEOUT * 5):
                    await tg.start(broker._subscribe_forever)
            except TimeoutError:
                raise BrokerUnavailable(
                    f"cannot subscribe to Redis at {settings.redis_url}"
                ) from None
            tg.start_soon(broker._publish_forever)
            tg.start_soon(broker._upkeep_forever)
            tg.start_soon(broker._process_leaves)
            tg.start_soon(broker._send_reports)
            tg.start_soon(broker._sweep_idle_forever)
            yield broker
            tg.cancel_scope.cancel()
