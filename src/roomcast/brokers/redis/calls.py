"""The broker's calls to Redis: one client, every request bounded in time, health from
the answers.

Every request a worker makes (a script, a read, a ``PUBLISH``) goes through
:meth:`Calls._call_raw`: it may take at most :data:`REQUEST_TIMEOUT`, and any Redis error,
lost connection or timeout becomes :class:`~roomcast.brokers.BrokerUnavailable`, which its
caller turns into what a client is told. Whether the last request was answered is half of
the worker's health (:attr:`~roomcast.brokers.redis.RedisBroker.healthy`; the other half is
the subscription, :mod:`.delivery`). The client retries nothing
(:func:`~roomcast.brokers.redis.open_redis_broker`): a script that ran but whose reply was
lost must not run again.

:class:`Calls` is the base of every part of the broker: it holds what they all use (the
settings, the hub, the client, the namespace of this broker's channels and report lists,
the idle budgets every script that changes presence or history enforces). Each part
registers the scripts it calls (:mod:`.scripts`) itself.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Final

import anyio
import coredis
from coredis.exceptions import RedisError

from ...hub import Hub
from ...settings import Settings
from .. import BrokerUnavailable
from .cluster import cluster_script

__all__ = ["REQUEST_TIMEOUT", "Calls", "RedisClient"]

#: the command client: one Redis, or a Redis Cluster (:mod:`.cluster`)
RedisClient = coredis.Redis[str] | coredis.RedisCluster[str]

log = logging.getLogger("roomcast.redis")

#: longest a request to Redis may take before the caller is told it is unavailable (the
#: other parts read it as ``calls.REQUEST_TIMEOUT``, when they need it: one value for all)
REQUEST_TIMEOUT: Final = 2.0


class Calls:
    """The client and the one way every part of the broker calls Redis."""

    def __init__(self, settings: Settings, hub: Hub, client: RedisClient) -> None:
        self.settings = settings
        self.hub = hub
        self.client = client
        #: Redis Cluster: sharded pub/sub, calls grouped by hash slot (:mod:`.cluster`)
        self.cluster = isinstance(client, coredis.RedisCluster)
        pool = client.connection_pool
        #: every channel and report list this broker uses starts with it
        self.namespace = f"roomcast:{pool.connection_kwargs.get('db') or 0}:"
        self.channel_prefix = self.namespace + "room:"
        #: requests for every worker (the server API's disconnect); in a cluster, one
        #: sharded channel in a fixed slot
        self.control_channel = self.namespace + ("{control}" if self.cluster else "control")
        self._healthy = True

    def room_channel(self, room: str) -> str:
        """A room's channel; in a cluster it carries the room's hash tag, so it lives on
        the shard that holds the room's keys."""
        return self.channel_prefix + (f"{{{room}}}" if self.cluster else room)

    def room_of_channel(self, channel: str) -> str | None:
        """The room of a room channel (:meth:`room_channel`), ``None`` for another one."""
        if not channel.startswith(self.channel_prefix):
            return None
        room = channel[len(self.channel_prefix) :]
        return room[1:-1] if self.cluster else room

    def _register(self, script: str) -> Any:
        """A script as this broker runs it (sharded publishing in a cluster)."""
        return self.client.register_script(cluster_script(script) if self.cluster else script)

    def _idle_args(self) -> list[str | int]:
        """The idle budgets every script that changes presence or history enforces
        (``ROOMCAST_IDLE_ROOMS``, ``ROOMCAST_IDLE_HISTORY_BYTES``)."""
        return [self.settings.idle_rooms, self.settings.idle_history_bytes]

    async def _call(self, script: Any, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return await self._call_raw(script(keys=list(keys), args=list(args)))

    async def _call_raw(self, request: Any) -> Any:
        """Await a Redis request within :data:`REQUEST_TIMEOUT`, tracking health.

        :raises BrokerUnavailable: on any Redis error or timeout
        """
        try:
            with anyio.fail_after(REQUEST_TIMEOUT):
                result = await request
        except (RedisError, TimeoutError, OSError) as exc:
            reason = str(exc) or type(exc).__name__  # (a timeout says nothing)
            if self._healthy:
                log.warning("Redis unavailable: %s", reason)
            self._healthy = False
            raise BrokerUnavailable(reason) from exc
        if not self._healthy:
            log.warning("Redis reachable again")
        self._healthy = True
        return result
