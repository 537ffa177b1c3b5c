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

__all__ = ["REQUEST_TIMEOUT", "Calls"]

log = logging.getLogger("roomcast.redis")

#: longest a request to Redis may take before the caller is told it is unavailable (the
#: other parts read it as ``calls.REQUEST_TIMEOUT``, when they need it: one value for all)
REQUEST_TIMEOUT: Final = 2.0


class Calls:
    """The client and the one way every part of the broker calls Redis."""

    def __init__(self, settings: Settings, hub: Hub, client: coredis.Redis[str]) -> None:
        self.settings = settings
        self.hub = hub
        self.client = client
        pool = client.connection_pool
        #: every channel and report list this broker uses starts with it
        self.namespace = f"roomcast:{pool.connection_kwargs.get('db') or 0}:"
        self.channel_prefix = self.namespace + "room:"
        #: requests for every worker (the server API's disconnect)
        self.control_channel = self.namespace + "control"
        self._healthy = True

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
            if self._healthy:
                log.warning("Redis unavailable: %s", exc)
            self._healthy = False
            raise BrokerUnavailable(str(exc) or type(exc).__name__) from exc
        if not self._healthy:
            log.warning("Redis reachable again")
        self._healthy = True
        return result
