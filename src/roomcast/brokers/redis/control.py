"""What goes to every worker outside a room's stream: the server API's requests on the
control channel, typing, and each verified user's connection claims.

*Disconnect* (the server API). A request on ``<prefix>control`` reaches every subscribed
worker; each ends the user's local memberships (:meth:`~roomcast.hub.Hub.end_user`) and
reports how many on the request's own list, all its queued reports in one script call
(:data:`~.scripts.REPORT`). The requester knows from ``PUBLISH`` how many workers
heard it and waits (``BLPOP``) up to :data:`DISCONNECT_WAIT` for their reports. A notice
to a user (:meth:`Control.notify`) goes the same way: each worker queues it for the user's
v2 connections and reports how many took it.

*Typing* is a ``T`` event on the room's own channel, neither sequenced nor stored: each
worker's subscriber relays it to its members in the room (:mod:`.delivery`) without
touching the room's stream position.

*Connections per user* (``ROOMCAST_MAX_CONNECTIONS_PER_USER``). Each connection of a
verified user claims a place in the user's sorted set (claim id -> expiry) with one script
that first drops lapsed claims and then checks the cap (:data:`~.scripts.CLAIM`).
Claims are refreshed with presence and lapse as presence entries do, so the slots of a
dead server's connections come back within the same bound; a closing connection removes
its claim at once. A claim that lapsed without its connection ending (its worker was
paused that long, or Redis lost the set) is taken back only where the user still has
room; otherwise its connection is revoked (closed 4429): the cap holds either way.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Callable
from typing import Any, Final, TypeVar

import anyio
import orjson

from ... import protocol
from ...hub import Hub, Member
from ...protocol import CloseCode
from ...settings import Settings
from .. import DISCONNECTED, BrokerUnavailable, Claim
from . import scripts
from .calls import Calls, RedisClient
from .cluster import by_slot
from .keys import PRESENCE_TTL, _now_ms, _user_key

__all__ = ["DISCONNECT_WAIT", "Control"]

#: connection claims per refresh call
REFRESH_CLAIMS: Final = 500
#: seconds the server API's disconnect waits for the workers' reports of what they closed
DISCONNECT_WAIT: Final = 1.0
#: reports of closed connections a worker queues for Redis (beyond: not reported)
REPORT_QUEUE: Final = 256
#: milliseconds a disconnect's report list lives (its requester has stopped waiting)
REPORT_TTL_MS: Final = 30_000
#: server API requests to every worker (disconnect, notify) a worker has waiting for
#: reports at once: each wait holds one of the client's 64 pooled connections (BLPOP)
ASKING_AT_ONCE: Final = 8

T = TypeVar("T")


class Control(Calls):
    """Requests for every worker (disconnect, notify) and their reports, typing, and the
    connection claims of verified users."""

    def __init__(self, settings: Settings, hub: Hub, client: RedisClient) -> None:
        super().__init__(settings, hub, client)
        self._report = self._register(scripts.REPORT)
        self._claim = self._register(scripts.CLAIM)
        self._refresh_claims_script = self._register(scripts.REFRESH_CLAIMS)
        #: this worker's connection claims by id, refreshed with presence
        self._claims: dict[str, Claim] = {}
        #: claims whose CLAIM call is in flight: not refreshed (the refresh would take one
        #: that Redis has not counted yet for a lapsed one: put it back, so that CLAIM
        #: counts it against itself, or revoke it at the cap)
        self._pending: set[str] = set()
        #: (more wait here, holding no connection: see :data:`ASKING_AT_ONCE`)
        self._asking = anyio.CapacityLimiter(ASKING_AT_ONCE)
        #: (report list, connections closed) for :meth:`disconnect` requests from any worker
        self._reports_send, self._reports = anyio.create_memory_object_stream[tuple[str, int]](
            REPORT_QUEUE
        )

    # -- connections per user (ROOMCAST_MAX_CONNECTIONS_PER_USER) ---------------------------

    async def claim_connection(self, user: str, limit: int) -> Claim | None:
        """One more connection of ``user``, counted in Redis across every worker and server.

        A claim lives :data:`PRESENCE_TTL` and is refreshed with presence, so the claims of
        a worker that died lapse as its members' presence does, and the user's slots come
        back within that bound.
        """
        claim = Claim(user, secrets.token_urlsafe(9))
        now = _now_ms()
        self._claims[claim.id] = claim
        self._pending.add(claim.id)
        try:
            added = await self._call(
                self._claim,
                [_user_key(user)],
                [now, now + int(PRESENCE_TTL * 1000), limit, claim.id],
            )
        except BaseException:
            self._claims.pop(claim.id, None)  # (a claim made anyway lapses unrefreshed)
            raise
        finally:
            self._pending.discard(claim.id)
        if not added:
            self._claims.pop(claim.id, None)
            return None
        return claim

    async def release_connection(self, claim: Claim) -> None:
        if self._claims.pop(claim.id, None) is None:
            return
        with contextlib.suppress(BrokerUnavailable):
            await self._call_raw(self.client.zrem(_user_key(claim.user), [claim.id]))

    async def _refresh_claims(self) -> None:
        """Extend this worker's claims; revoke those that lapsed and whose places the
        user's other connections have taken meanwhile (their connections close 4429)."""
        claims = [claim for id, claim in self._claims.items() if id not in self._pending]
        now = _now_ms()
        head = [now, now + int(PRESENCE_TTL * 1000), self.settings.max_connections_per_user]
        for group in self._by_slot(claims, key=lambda claim: _user_key(claim.user)):
            for start in range(0, len(group), REFRESH_CLAIMS):
                chunk = group[start : start + REFRESH_CLAIMS]
                keys = [_user_key(claim.user) for claim in chunk]
                refused = await self._call(
                    self._refresh_claims_script, keys, [*head, *(claim.id for claim in chunk)]
                )
                for id in refused:
                    if (claim := self._claims.pop(id, None)) is not None:
                        claim.revoked.cancel()

    def _by_slot(self, items: list[T], key: Callable[[T], str]) -> list[list[T]]:
        """Items for one multi-key script: all in one call on one Redis, a call per hash
        slot in a cluster (a script's keys must share one)."""
        return by_slot(items, key) if self.cluster else [items] if items else []

    # -- the server API (SPEC §8.2) ---------------------------------------------------------

    async def disconnect(self, user: str) -> int:
        """Ask every subscribed worker to close ``user``'s connections, and add up what
        they report within :data:`DISCONNECT_WAIT` (see the module docstring)."""
        return await self._ask_every_worker("D", user)

    async def notify(self, user: str, data: Any) -> int:
        """Ask every subscribed worker to queue a ``notice`` for ``user``'s v2
        connections, and add up what they report within :data:`DISCONNECT_WAIT`."""
        request = orjson.dumps([user, protocol.encode_notice(data)]).decode()
        return await self._ask_every_worker("N", request)

    async def typing(self, member: Member) -> None:
        """Tell the room's other v2 connections on every worker (not sequenced, not
        stored: a ``T`` event on the room's channel, relayed by each subscriber)."""
        encoded = protocol.encode_typing(room=member.room.name, user=member.user, name=member.name)
        channel = self.room_channel(member.room.name)
        message = f"T|{member.client.id}|{encoded}"
        if self.cluster:
            await self._call_raw(self.client.spublish(channel, message))
        else:
            await self._call_raw(self.client.publish(channel, message))

    async def _ask_every_worker(self, kind: str, request: str) -> int:
        """Publish ``kind|<report list>|request`` on the control channel and add up the
        counts the workers push to the report list within :data:`DISCONNECT_WAIT`.

        At most :data:`ASKING_AT_ONCE` wait on a pooled connection (``BLPOP``) at a time:
        1,000 at once had taken every pooled connection, leaving none for the reports they
        waited for (nor for the chat's own calls), so each waited out its whole timeout:
        936 answered 503, the chat stalled 21 s and Redis was marked unavailable. The
        others wait for one of those places within the same :data:`DISCONNECT_WAIT`, then
        take whatever reports have come (``LRANGE``, no wait): queued behind the limiter
        for good, 40 requests with one silent subscriber (a paused server) took 5 s.
        """
        report = f"{self.namespace}reports:{secrets.token_urlsafe(12)}"
        message = f"{kind}|{report}|{request}"
        if self.cluster:  # every worker subscribes it on the shard that owns its slot
            workers = await self._call_raw(self.client.spublish(self.control_channel, message))
        else:
            workers = await self._call_raw(self.client.publish(self.control_channel, message))
        workers = int(workers)
        deadline = anyio.current_time() + DISCONNECT_WAIT
        closed = heard = 0
        asking = False
        with anyio.move_on_after(DISCONNECT_WAIT):
            await self._asking.acquire()
            asking = True
        try:
            while asking and heard < workers:
                remaining = deadline - anyio.current_time()
                if remaining <= 0:  # (BLPOP's timeout 0 would wait forever)
                    break
                popped = await self._call_raw(self.client.blpop([report], remaining))
                if popped is None:
                    break
                closed += int(popped[1])
                heard += 1
        finally:
            if asking:
                self._asking.release()
        if heard < workers:  # the reports that came in meanwhile
            rest = await self._call_raw(self.client.lrange(report, 0, -1))
            closed += sum(int(count) for count in rest[: workers - heard])
        return closed

    def _on_control(self, data: str) -> None:
        """A request from the control channel: ``D|<report list>|<user>`` closes the
        user's local connections, ``N|<report list>|<JSON [user, notice]>`` queues the
        notice for its v2 connections; either queues the count for the report list."""
        kind, _, rest = data.partition("|")
        report, _, request = rest.partition("|")
        if kind == "D":
            closed = self.hub.end_user(request, CloseCode.UNAUTHORIZED, DISCONNECTED)
        elif kind == "N":
            user, notice = orjson.loads(request)
            closed = self.hub.notify(user, notice)
        else:
            return
        # (a full queue: the requester stops waiting without this report, and counts less)
        with contextlib.suppress(anyio.WouldBlock):
            self._reports_send.send_nowait((report, closed))

    async def _send_reports(self) -> None:
        """Push queued disconnect reports, everything queued in one script call."""
        async with self._reports:
            async for first in self._reports:
                batch = [first]
                while True:
                    try:
                        batch.append(self._reports.receive_nowait())
                    except anyio.WouldBlock:
                        break
                for group in self._by_slot(batch, key=lambda report: report[0]):
                    keys = [report for report, _ in group]
                    args = [REPORT_TTL_MS, *(closed for _, closed in group)]
                    try:
                        await self._call(self._report, keys, args)
                    except BrokerUnavailable:
                        continue
