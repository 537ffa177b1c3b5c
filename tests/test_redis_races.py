"""Races and stalls around Redis, found by trying to break the Redis broker's guarantees:
a leave while Redis stalls, a claim refresh that overtakes the claim, a revoked v2
connection, server API requests behind a worker that never reports, and a DELETE of an
idle room's messages against the idle budget."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from roomcast import Settings, create_app
from roomcast.brokers import Claim
from roomcast.brokers.redis import RedisBroker, open_redis_broker
from roomcast.hub import Hub
from roomcast.identity import mint_token
from roomcast.testing import open_test_client

from redis_server import RedisServer
from servers import ThreadedServer, serve_in_thread

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["trio"])]

SECRET = "a-secret-of-at-least-thirty-two-bytes!"
API_KEY = "s3cret-api-key"
ANNS_CLAIMS = "roomcast:user:ann:connections"
#: Redis loses ann's claims and two connections of hers elsewhere take their places
TAKEN = "redis.call('DEL', KEYS[1]); redis.call('ZADD', KEYS[1], ARGV[1], 'x', ARGV[1], 'y')"


def v2_url(server: ThreadedServer, user: str) -> str:
    return server.url(f"/ws?token={token_of(user)}")


def v1_url(server: ThreadedServer, user: str, room: str = "r") -> str:
    return server.url(f"/ws/chat?room={room}&token={token_of(user)}")


def token_of(user: str) -> str:
    return mint_token(SECRET, sub=user, name=user.capitalize(), ttl=600)


async def until(ws: WebSocketConnection, wanted: Callable[[dict[str, Any]], bool]) -> None:
    while not wanted(json.loads(await ws.get_message())):
        pass


async def join(ws: WebSocketConnection, room: str) -> None:
    await ws.send_message(json.dumps({"type": "join", "room": room}))
    await until(ws, lambda e: e["type"] == "welcome" and e["room"] == room)


def far_future_ms() -> str:
    return str(int(time.time() * 1000) + 600_000)


async def take_anns_claims(redis_server: RedisServer) -> None:
    taken = (TAKEN, "1", ANNS_CLAIMS, far_future_ms())
    await trio.to_thread.run_sync(redis_server.command, "EVAL", *taken)


async def test_a_leave_while_redis_stalls_answers_every_message_before_left(
    redis_server: RedisServer,
) -> None:
    """Five messages queued behind a stalled Redis, then ``leave``: each gets its error
    (or ack) before ``left``. Waiting two calls' time from the leave was too short: the
    second batch's refusals came just after it, for a member that had left."""
    settings = Settings(redis_url=redis_server.url, rate_limit=0)
    with serve_in_thread(create_app(settings)) as server, trio.fail_after(30):
        async with open_websocket_url(server.url("/ws?name=ann")) as ann:
            await join(ann, "a")
            os.kill(redis_server.process.pid, signal.SIGSTOP)
            try:
                for i in range(5):
                    message = {"type": "message", "room": "a", "text": "hi", "id": str(i)}
                    await ann.send_message(json.dumps(message))
                await ann.send_message(json.dumps({"type": "leave", "room": "a"}))
                answered = []
                while (event := json.loads(await ann.get_message()))["type"] != "left":
                    if event["type"] in ("ack", "error"):
                        answered.append(event["id"])
            finally:
                os.kill(redis_server.process.pid, signal.SIGCONT)
            assert answered == ["0", "1", "2", "3", "4"]


async def test_claims_that_lapsed_while_others_took_their_places_are_closed_4429(
    redis_server: RedisServer,
) -> None:
    """A server paused past the claims' lifetime (or a Redis that lost them) finds, when it
    refreshes, that the user's other connections have taken its connections' places: it
    closes them 4429 instead of putting its claims back over the cap (a user held twice
    the cap for good). Here Redis loses ann's claims and two other connections take them."""
    settings = Settings(
        redis_url=redis_server.url, rate_limit=0, jwt_secret=SECRET, max_connections_per_user=2
    )
    with serve_in_thread(create_app(settings)) as server, trio.fail_after(20):
        async with (
            open_websocket_url(v1_url(server, "ann")) as one,
            open_websocket_url(v1_url(server, "ann")) as two,
        ):
            for ws in (one, two):
                await until(ws, lambda e: e["type"] == "welcome")
            await take_anns_claims(redis_server)
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await one.get_message()
            assert (closed.value.reason.code, closed.value.reason.reason) == (
                4429,
                "too many connections for this user",
            )
        members = await trio.to_thread.run_sync(
            redis_server.command, "ZRANGE", ANNS_CLAIMS, "0", "-1"
        )
        assert members == [b"x", b"y"]  # none of the revoked claims came back


async def test_a_revoked_v2_connection_is_closed_4429_and_leaves_every_room(
    redis_server: RedisServer,
) -> None:
    settings = Settings(
        redis_url=redis_server.url,
        rate_limit=0,
        jwt_secret=SECRET,
        max_connections_per_user=2,
        presence_grace=0,
    )
    with serve_in_thread(create_app(settings)) as server, trio.fail_after(30):
        async with (
            open_websocket_url(v2_url(server, "bob")) as bob,
            open_websocket_url(v2_url(server, "ann")) as ann,
        ):
            for room in ("a", "b"):
                await join(bob, room)
                await join(ann, room)
            await take_anns_claims(redis_server)
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await ann.get_message()
            assert closed.value.reason.code == 4429
            left: set[str] = set()
            while left != {"a", "b"}:
                event = json.loads(await bob.get_message())
                if event["type"] == "system" and event["event"] == "leave":
                    left.add(event["room"])


async def claim_overtaken_by_a_refresh(broker: RedisBroker) -> Claim | None:
    """``claim_connection`` for ann, with this worker's claim refresh run in Redis before
    the claim's own script: it must not count a claim Redis has not taken yet."""
    refreshed = trio.Event()
    call = broker._call

    async def claim_after_the_refresh(script: Any, keys: Any, args: Any) -> Any:
        if script is broker._claim:
            await refreshed.wait()
        return await call(script, keys, args)

    broker._call = claim_after_the_refresh  # type: ignore[method-assign]
    outcome: list[Claim | None] = []

    async def claim() -> None:
        outcome.append(await broker.claim_connection("ann", 2))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(claim)
        await trio.testing.wait_all_tasks_blocked()
        await broker._refresh_claims()
        refreshed.set()
    return outcome[0]


@pytest.mark.parametrize("held", [1, 2])
async def test_a_claim_refresh_that_overtakes_a_claim_leaves_it_alone(
    redis_server: RedisServer, held: int
) -> None:
    """At the cap, the claim is refused (not a KeyError out of ``claim_connection``);
    below it, it is granted (the refresh had put it in, so it counted against itself)."""
    settings = Settings(redis_url=redis_server.url, rate_limit=0, max_connections_per_user=2)
    others = [arg for n in range(held) for arg in (far_future_ms(), f"other{n}")]
    await trio.to_thread.run_sync(redis_server.command, "ZADD", ANNS_CLAIMS, *others)
    with trio.fail_after(10):
        async with open_redis_broker(settings, Hub()) as broker:
            claim = await claim_overtaken_by_a_refresh(broker)
    assert (claim is not None) is (held == 1)
    members = await trio.to_thread.run_sync(redis_server.command, "ZCARD", ANNS_CLAIMS)
    assert members == 2


async def test_server_api_requests_behind_a_worker_that_never_reports_wait_once(
    redis_server: RedisServer,
) -> None:
    """A subscriber of the control channel that never reports (a paused server) makes
    each request wait out its 1 s; queued 8 at a time behind it, 40 had taken 5 s."""
    settings = Settings(redis_url=redis_server.url, rate_limit=0, api_key=API_KEY)
    auth = {"authorization": f"Bearer {API_KEY}"}
    took: list[float] = []
    with socket.create_connection(("127.0.0.1", redis_server.port)) as silent:
        silent.sendall(b"*2\r\n$9\r\nSUBSCRIBE\r\n$18\r\nroomcast:0:control\r\n")
        assert silent.recv(100).startswith(b"*3")
        with trio.fail_after(30):
            async with open_test_client(settings=settings, timeout=30) as client:
                start = trio.current_time()

                async def notify(n: int) -> None:
                    path = f"/api/users/u{n}/notify"
                    response = await client.post(path, headers=auth, json={"data": n})
                    assert response.status_code == 200, response.text
                    took.append(trio.current_time() - start)

                async with trio.open_nursery() as nursery:
                    for n in range(40):
                        nursery.start_soon(notify, n)
    assert max(took) < 2.5


async def test_deleting_an_idle_rooms_messages_keeps_the_idle_budget_in_step(
    redis_server: RedisServer,
) -> None:
    settings = Settings(redis_url=redis_server.url, rate_limit=0, api_key=API_KEY)
    auth = {"authorization": f"Bearer {API_KEY}"}
    with trio.fail_after(20):
        async with open_test_client(settings=settings, timeout=10) as client:
            for room in ("idle1", "idle2"):
                async with client.connect(f"/ws/chat?room={room}&name=ann") as ann:
                    await ann.receive_event()
                    await ann.send_message(f"kept in {room}")
                while not await trio.to_thread.run_sync(  # noqa: ASYNC110
                    redis_server.command, "ZSCORE", "roomcast:idle", room
                ):
                    await trio.sleep(0.01)  # the leave is the server's, after the close
            response = await client.delete("/api/rooms/idle1/messages", headers=auth)
            assert response.status_code == 200
    idle = await trio.to_thread.run_sync(redis_server.command, "ZRANGE", "roomcast:idle", "0", "-1")
    held = await trio.to_thread.run_sync(redis_server.command, "GET", "roomcast:idle-bytes")
    kept = await trio.to_thread.run_sync(
        redis_server.command, "GET", "roomcast:{idle2}:history-bytes"
    )
    assert idle == [b"idle2"] and held == kept
