"""App-level timers on trio's MockClock (autojump): no real sleeps, exact times."""

from __future__ import annotations

import time
from typing import Any

import anyio
import jwt
import pytest
import trio
from trio.testing import MockClock

from roomcast import Settings, create_app
from roomcast.connection import CLOSE_TIMEOUT
from roomcast.identity import LEEWAY, mint_token

from harness import Closed, WebSocketClient, open_asgi_client

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return "trio", {"clock": MockClock(autojump_threshold=0)}


async def test_rate_limit_refills_at_the_configured_rate() -> None:
    app = create_app(Settings(rate_limit=2))  # 2/s, burst of 4
    with anyio.fail_after(60):
        async with open_asgi_client(app) as client, client.websocket("/ws/chat") as ws:
            await ws.receive_json()
            accepted = []
            for second in range(3):
                for i in range(6):
                    await ws.send_json({"text": f"{second}.{i}", "id": f"{second}.{i}"})
                await anyio.wait_all_tasks_blocked()
                await trio.sleep(1)  # jumps the mock clock: the bucket refills 2 tokens
            await ws.send_text("final")
            while True:
                event = await ws.receive_json()
                if event["type"] == "message":
                    accepted.append(event["text"])
                    if event["text"] == "final":
                        break
    # a burst of 4 at t=0, then 2 per mock second; "final" gets the token of the last second
    assert accepted == ["0.0", "0.1", "0.2", "0.3", "1.0", "1.1", "2.0", "2.1", "final"]


async def test_close_on_cancel_is_bounded_when_the_peer_does_not_read() -> None:
    """A handler cancelled at shutdown tries to send 1001 under a shield, but gives up after
    CLOSE_TIMEOUT when the send cannot complete, and the cancellation still propagates."""
    app = create_app(Settings(rate_limit=0))
    with anyio.fail_after(60):
        async with open_asgi_client(app) as client:
            scope = {
                "type": "websocket",
                "path": "/ws/chat",
                "query_string": b"",
                "headers": [],
                "subprotocols": [],
                "state": dict(client.state),
            }
            to_app, app_receive = anyio.create_memory_object_stream[dict[str, Any]](4)
            app_send, from_app = anyio.create_memory_object_stream[dict[str, Any]](0)
            await to_app.send({"type": "websocket.connect"})
            async with anyio.create_task_group() as tg:
                tg.start_soon(app, scope, app_receive.receive, app_send.send)
                assert (await from_app.receive())["type"] == "websocket.accept"
                await anyio.wait_all_tasks_blocked()  # the welcome send now blocks forever
                cancelled_at = trio.current_time()
                tg.cancel_scope.cancel()
            assert trio.current_time() - cancelled_at == pytest.approx(CLOSE_TIMEOUT)
            assert client.runtime.connections == 0
            assert not any(room.members for room in client.runtime.hub.rooms.values())


# -- token expiry and refresh (SPEC §8.1, §8.3) ---------------------------------------------

SECRET = "a-secret-of-at-least-thirty-two-bytes!"
TTL = 60


def token(ttl: float = TTL, **claims: Any) -> str:
    return mint_token(SECRET, sub=claims.pop("sub", "ann"), ttl=ttl, name="Ann", **claims)


def lapses_in(signed: str) -> float:
    """Seconds from now until the server closes a connection holding ``signed``: its
    ``exp`` (wall clock) plus the verifier's leeway, as at connect time."""
    return (
        float(jwt.decode(signed, options={"verify_signature": False})["exp"]) + LEEWAY - time.time()
    )


async def closed_after(ws: WebSocketClient) -> tuple[float, tuple[int, str]]:
    """Mock seconds until the server closes ``ws`` (reading everything before it)."""
    start = trio.current_time()
    try:
        while True:
            await ws.receive()
    except Closed as closed:
        return trio.current_time() - start, (closed.code, closed.reason)


async def test_a_connection_is_closed_when_its_token_expires() -> None:
    app = create_app(Settings(jwt_secret=SECRET, rate_limit=0))
    signed = token()
    with anyio.fail_after(600):
        async with open_asgi_client(app) as client:
            async with client.websocket(f"/ws/chat?room=r&token={signed}") as ws:
                due = lapses_in(signed)
                elapsed, close = await closed_after(ws)
            assert close == (4001, "token expired")
            assert elapsed == pytest.approx(due, abs=0.5)
            assert not any(room.members for room in client.runtime.hub.rooms.values())


async def test_a_refresh_in_time_moves_the_deadline_and_brings_the_new_name() -> None:
    app = create_app(Settings(jwt_secret=SECRET, rate_limit=0))
    first = token()
    with anyio.fail_after(600):
        async with open_asgi_client(app) as client:
            async with client.websocket(f"/ws/chat?room=r&token={first}") as ws:
                await ws.receive_json()  # welcome
                await trio.sleep(TTL - 10)
                renewed = mint_token(SECRET, sub="ann", ttl=2 * TTL, name="Ann B.")
                await ws.send_json({"type": "refresh", "token": renewed})
                await anyio.wait_all_tasks_blocked()
                due, refreshed_at = lapses_in(renewed), trio.current_time()
                await trio.sleep(20)  # past the first token's deadline: still here
                await ws.send_json({"text": "still here", "id": "1"})
                message = await ws.receive_until("message")
                assert (message["from"], message["user"]) == ("Ann B.", "ann")
                _, close = await closed_after(ws)
            assert close == (4001, "token expired")
            # (the mock clock runs ahead of the wall clock: the deadline counts from the refresh)
            assert trio.current_time() - refreshed_at == pytest.approx(due, abs=0.5)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: token(sub="bob"), "the token is for another user"),
        (
            lambda: mint_token("another-secret-of-thirty-two-bytes!!", sub="ann", ttl=600),
            "invalid signature",
        ),
        (lambda: "not.a.token", "malformed token"),
        (lambda: token(ttl=-60), "token expired"),
    ],
)
async def test_a_refused_refresh_gets_bad_token_and_the_old_deadline_stands(
    make: Any, reason: str
) -> None:
    app = create_app(Settings(jwt_secret=SECRET, rate_limit=0))
    signed = token()
    with anyio.fail_after(600):
        async with open_asgi_client(app) as client:
            async with client.websocket(f"/ws/chat?room=r&token={signed}") as ws:
                await ws.receive_json()
                due = lapses_in(signed)
                await ws.send_json({"type": "refresh", "token": make()})
                error = await ws.receive_until("error")
                assert (error["error"], error["message"]) == ("bad_token", reason)
                elapsed, close = await closed_after(ws)
            assert close == (4001, "token expired")
            assert elapsed == pytest.approx(due, abs=0.5)


async def test_a_refresh_that_no_longer_grants_the_room_leaves_it_4403() -> None:
    app = create_app(Settings(jwt_secret=SECRET, rate_limit=0))
    with anyio.fail_after(600):
        async with open_asgi_client(app) as client:
            async with client.websocket(
                f"/ws/chat?room=team-a&token={token(rooms=['team-*'])}"
            ) as ws:
                await ws.receive_json()
                await ws.send_json({"type": "refresh", "token": token(rooms=["lobby"])})
                elapsed, close = await closed_after(ws)
            assert close == (4403, "not allowed in #team-a")
            assert elapsed < 1


async def test_a_refresh_to_a_name_another_member_has_is_refused() -> None:
    app = create_app(Settings(jwt_secret=SECRET, rate_limit=0))
    bob = mint_token(SECRET, sub="bob", ttl=TTL, name="Bob")
    with anyio.fail_after(600):
        async with (
            open_asgi_client(app) as client,
            client.websocket(f"/ws/chat?room=r&token={bob}") as bob_ws,
            client.websocket(f"/ws/chat?room=r&token={token()}") as ann_ws,
        ):
            await bob_ws.receive_json()
            await ann_ws.receive_json()
            renamed = mint_token(SECRET, sub="ann", ttl=TTL, name="B\u043eb")  # a Cyrillic o
            await ann_ws.send_json({"type": "refresh", "token": renamed})
            error = await ann_ws.receive_until("error")
            assert (error["error"], error["message"]) == (
                "bad_token",
                "the name B\u043eb is taken in #r",
            )


async def test_refresh_without_signed_tokens_is_a_bad_token() -> None:
    app = create_app(Settings(rate_limit=0))
    with anyio.fail_after(60):
        async with open_asgi_client(app) as client, client.websocket("/ws/chat") as ws:
            await ws.receive_json()
            await ws.send_json({"type": "refresh", "token": token()})
            error = await ws.receive_until("error")
            assert (error["error"], error["message"]) == (
                "bad_token",
                "this server does not use signed tokens",
            )


async def test_refreshes_are_limited_to_one_a_second() -> None:
    """Each refresh costs a signature check: a client cannot make the server do them at
    the speed it can send frames (a burst of 3, then one a second)."""
    app = create_app(Settings(jwt_secret=SECRET, rate_limit=0))
    with anyio.fail_after(60):
        async with (
            open_asgi_client(app) as client,
            client.websocket(f"/ws/chat?room=r&token={token()}") as ws,
        ):
            await ws.receive_json()
            for _ in range(5):
                await ws.send_json({"type": "refresh", "token": "not.a.token"})
            await trio.sleep(1)
            await ws.send_json({"type": "refresh", "token": "not.a.token"})
            errors = [(await ws.receive_until("error"))["error"] for _ in range(6)]
    assert errors == ["bad_token"] * 3 + ["rate_limited"] * 2 + ["bad_token"]
