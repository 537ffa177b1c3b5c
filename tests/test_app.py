"""The ASGI app in process, through the harness, on both anyio backends."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel
import orjson
import pytest

from roomcast import Settings, create_app
from roomcast.identity import mint_token
from roomcast.protocol import BATCH_SUBPROTOCOL, CloseCode
from roomcast.runtime import open_runtime

from harness import ASGIClient, Closed, Denied, open_asgi_client

pytestmark = pytest.mark.anyio

FAST = Settings(rate_limit=0)


@pytest.fixture
async def client(request: pytest.FixtureRequest) -> AsyncIterator[ASGIClient]:
    marker = request.node.get_closest_marker("settings")
    settings = marker.args[0] if marker else FAST
    with anyio.fail_after(10):
        async with open_asgi_client(create_app(settings)) as client:
            yield client


def settings(value: Settings) -> Any:
    return pytest.mark.settings(value)


class TestHTTP:
    async def test_index_serves_the_chat_page(self, client: ASGIClient) -> None:
        response = await client.get("/")
        assert response.status == 200
        assert response.headers["content-type"] == "text/html; charset=utf-8"
        assert int(response.headers["content-length"]) == len(response.body)
        assert b"<html" in response.body.lower()

    async def test_healthz(self, client: ASGIClient) -> None:
        response = await client.get("/healthz")
        assert (response.status, response.headers["content-type"]) == (200, "application/json")
        assert orjson.loads(response.body)["status"] == "ok"

    async def test_metrics(self, client: ASGIClient) -> None:
        async with client.websocket("/ws/chat?room=m") as ws:
            await ws.receive_json()
            await ws.send_text("hello")
            await ws.receive_until("message")
            response = await client.get("/metrics")
        assert response.status == 200 and response.headers["content-type"].startswith("text/plain")
        text = response.body.decode()
        for line in (
            "roomcast_connections 1.0",
            "roomcast_rooms 1.0",
            "roomcast_messages_in_total 1.0",
        ):
            assert line in text

    @pytest.mark.parametrize("path", ["/nope", "/static/../app.py", "/ws/chatx", "/healthz/x"])
    async def test_anything_else_is_404(self, client: ASGIClient, path: str) -> None:
        response = await client.get(path)
        assert (response.status, response.body) == (404, b"Not Found")
        assert response.headers["content-type"].startswith("text/plain")
        assert response.headers["content-length"] == "9"

    @pytest.mark.parametrize("path", ["/ws/chat", "/ws/echo", "/ws/binary"])
    async def test_a_websocket_endpoint_over_plain_http_is_426(
        self, client: ASGIClient, path: str
    ) -> None:
        response = await client.get(f"{path}?room=lobby")
        assert response.status == 426
        assert response.headers["upgrade"] == "websocket"
        assert response.headers["content-type"] == "text/plain; charset=utf-8"
        assert int(response.headers["content-length"]) == len(response.body)
        assert response.body.decode() == (
            f"Upgrade Required: {path} is a WebSocket endpoint; connect with ws://\n"
        )
        head = await client.get(path, method="HEAD")
        assert (head.status, head.body) == (426, b"")
        assert head.headers["content-length"] == response.headers["content-length"]

    async def test_head_and_wrong_method(self, client: ASGIClient) -> None:
        head = await client.get("/healthz", method="HEAD")
        assert head.status == 200 and head.body == b"" and int(head.headers["content-length"]) > 0
        post = await client.get("/", method="POST")
        assert post.status == 405 and post.headers["allow"] == "GET, HEAD"


async def test_bad_setting_fails_startup_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ROOMCAST_OUTBOX_SIZE", "lots")
    with anyio.fail_after(5), pytest.raises(RuntimeError, match="ROOMCAST_OUTBOX_SIZE"):
        async with open_asgi_client(create_app()):
            pass


class TestEndpoints:
    async def test_echo(self, client: ASGIClient) -> None:
        async with client.websocket("/ws/echo") as ws:
            await ws.send_text("hi")
            assert await ws.receive() == "Echo: hi"
            await ws.send_bytes(b"\x00\xff")
            assert await ws.receive() == b"\x00\xff"

    async def test_binary(self, client: ASGIClient) -> None:
        async with client.websocket("/ws/binary") as ws:
            await ws.send_bytes(b"\x01\x02")
            assert await ws.receive() == b"\x01\x02"
            await ws.send_text("é")
            assert await ws.receive() == "é".encode()

    async def test_unknown_path_is_accepted_then_closed_4004(self, client: ASGIClient) -> None:
        async with client.websocket("/ws/nowhere") as ws:
            with pytest.raises(Closed) as closed:
                await ws.receive()
        assert closed.value.code == CloseCode.UNKNOWN_PATH
        assert "/ws/nowhere" in closed.value.reason


class TestAdmission:
    @settings(Settings(tokens=frozenset({"s3cret"})))
    async def test_token_required(self, client: ASGIClient) -> None:
        async with client.websocket("/ws/chat") as ws:
            assert await ws.expect_close() == (4001, "missing or invalid token")
        async with client.websocket("/ws/chat?token=wrong") as ws:
            assert (await ws.expect_close())[0] == 4001
        async with client.websocket("/ws/chat?token=s3cret") as ws:
            assert (await ws.receive_json())["type"] == "welcome"
        headers = [(b"authorization", b"Bearer s3cret")]
        async with client.websocket("/ws/echo", headers=headers) as ws:
            await ws.send_text("x")
            assert await ws.receive() == "Echo: x"

    async def test_foreign_origin_is_refused_at_the_handshake(self, client: ASGIClient) -> None:
        with pytest.raises(Denied):
            async with client.websocket("/ws/chat", headers=[(b"origin", b"http://evil.example")]):
                pass
        async with client.websocket("/ws/chat", headers=[(b"origin", b"http://testserver")]) as ws:
            assert (await ws.receive_json())["type"] == "welcome"

    @settings(Settings(allowed_origins=frozenset({"https://app.example"})))
    async def test_listed_origin_is_allowed(self, client: ASGIClient) -> None:
        async with client.websocket(
            "/ws/echo", headers=[(b"origin", b"https://app.example")]
        ) as ws:
            await ws.send_text("x")
            assert await ws.receive() == "Echo: x"

    @pytest.mark.parametrize("query", ["room=bad%20name", "room=", "name=%07bell", "since=x"])
    async def test_invalid_query_closes_4400(self, client: ASGIClient, query: str) -> None:
        async with client.websocket(f"/ws/chat?{query}") as ws:
            code, reason = await ws.expect_close()
        assert code == 4400 and reason

    @settings(Settings(room_capacity=2, rate_limit=0))
    async def test_room_full_closes_4003(self, client: ASGIClient) -> None:
        async with client.websocket("/ws/chat?room=r"), client.websocket("/ws/chat?room=r"):
            async with client.websocket("/ws/chat?room=r") as third:
                assert await third.expect_close() == (4003, "room full")
            async with client.websocket("/ws/chat?room=other") as elsewhere:
                assert (await elsewhere.receive_json())["type"] == "welcome"


class TestChat:
    async def test_conversation(self, client: ASGIClient) -> None:
        async with client.websocket("/ws/chat?room=r&name=ann") as ann:
            assert (await ann.receive_json())["members"] == ["ann"]
            async with client.websocket("/ws/chat?room=r&name=bob") as bob:
                welcome = await bob.receive_json()
                assert (welcome["members"], welcome["count"]) == (["ann", "bob"], 2)
                joined = await ann.receive_json()
                assert (joined["type"], joined["message"], joined["count"]) == (
                    "system",
                    "bob joined #r",
                    2,
                )
                await bob.send_json({"text": "hi <b>", "id": "b1"})
                for ws in (ann, bob):
                    message = await ws.receive_json()
                    assert {
                        k: message[k] for k in ("type", "text", "room", "seq", "from", "id")
                    } == {
                        "type": "message",
                        "text": "hi <b>",
                        "room": "r",
                        "seq": 1,
                        "from": "bob",
                        "id": "b1",
                    }
                    assert isinstance(message["ts"], int)
                assert await bob.receive_json() == {"type": "ack", "id": "b1", "seq": 1}
                await ann.send_text("plain text")
                assert (await bob.receive_json())["text"] == "plain text"
            left = await ann.receive_until("system")
            assert (left["event"], left["message"], left["count"]) == ("leave", "bob left #r", 1)

    @settings(Settings(max_text=5, rate_limit=0))
    async def test_bad_messages_get_errors_and_the_connection_stays(
        self, client: ASGIClient
    ) -> None:
        async with client.websocket("/ws/chat") as ws:
            assert (await ws.receive_json())["limits"] == {"text": 5}  # ROOMCAST_MAX_TEXT
            await ws.send_bytes(b"\x00")
            assert (await ws.receive_json())["error"] == "binary_unsupported"
            await ws.send_json({"text": "toolong", "id": "t1"})
            refused = await ws.receive_json()
            assert (refused["error"], refused["id"]) == ("too_long", "t1")
            await ws.send_json({"text": "ok", "id": 7})
            assert (await ws.receive_json())["error"] == "bad_id"
            await ws.send_text("   ")
            await ws.send_text("fine")
            assert (await ws.receive_json())["text"] == "fine"
            assert client.runtime.hub.stats.drops == 3

    @settings(Settings(rate_limit=1))
    async def test_rate_limit_refuses_each_excess_message(self, client: ASGIClient) -> None:
        async with client.websocket("/ws/chat") as ws:
            await ws.receive_json()
            for i in range(6):
                await ws.send_json({"text": f"m{i}", "id": f"i{i}"})
            await ws.send_text("no id")
            events = [await ws.receive_json() for _ in range(9)]
        # a burst of 2 accepted (message + ack each), then each excess message refused by id
        assert [e["type"] for e in events[:4]] == ["message", "ack", "message", "ack"]
        refused = events[4:]
        assert {e["error"] for e in refused} == {"rate_limited"}
        assert [e.get("id") for e in refused] == ["i2", "i3", "i4", "i5", None]
        assert client.runtime.hub.stats.messages_in == 2
        assert client.runtime.hub.stats.drops == 5

    async def test_disconnect_leaves_the_room(self, client: ASGIClient) -> None:
        hub = client.runtime.hub
        async with client.websocket("/ws/chat?room=r") as ws:
            await ws.receive_json()
            assert len(hub.rooms["r"].members) == 1
            await ws.disconnect()
            with anyio.fail_after(5):
                while "r" in hub.rooms:
                    await anyio.lowlevel.checkpoint()
        assert client.runtime.connections == 0


class TestBatch:
    async def test_subprotocol_is_negotiated_only_when_offered(self, client: ASGIClient) -> None:
        async with client.websocket("/ws/chat", subprotocols=[BATCH_SUBPROTOCOL]) as ws:
            assert ws.subprotocol == BATCH_SUBPROTOCOL
        async with client.websocket("/ws/chat", subprotocols=["other"]) as ws:
            assert ws.subprotocol is None
        async with client.websocket("/ws/echo", subprotocols=[BATCH_SUBPROTOCOL]) as ws:
            assert ws.subprotocol is None

    async def test_backlog_goes_out_in_one_frame_lone_events_at_once(
        self, client: ASGIClient
    ) -> None:
        async with client.websocket(
            "/ws/chat?room=b", subprotocols=[BATCH_SUBPROTOCOL], buffer=1
        ) as reader:
            assert orjson.loads(await reader.receive())["type"] == "welcome"
            async with client.websocket("/ws/chat?room=b") as talker:
                await talker.receive_json()
                await reader.receive()  # the join notice, alone in its frame
                await talker.send_text("lone")
                assert [orjson.loads(x)["text"] for x in (await reader.receive()).split("\n")] == [
                    "lone"
                ]
                for i in range(20):
                    await talker.send_text(f"m{i}")
                await talker.receive_until("message")
                # the reader was not reading while 20 events arrived: they come in few frames
                texts: list[str] = []
                frames = 0
                while len(texts) < 20:
                    frame = await reader.receive()
                    frames += 1
                    texts += [orjson.loads(line)["text"] for line in frame.split("\n")]
                assert texts == [f"m{i}" for i in range(20)]
                assert frames <= 3


class TestSlowConsumer:
    @settings(Settings(outbox_size=4, rate_limit=0))
    async def test_stalled_member_is_evicted_4008_and_the_room_goes_on(
        self, client: ASGIClient
    ) -> None:
        hub = client.runtime.hub
        async with (
            client.websocket("/ws/chat?room=s&name=slow", buffer=1) as slow,
            client.websocket("/ws/chat?room=s&name=fast") as fast,
        ):
            await fast.receive_json()
            seen = []
            for i in range(20):
                await fast.send_text(f"m{i}")
                while (event := await fast.receive_json())["type"] != "message":
                    seen.append(event)
                assert event["seq"] == i + 1  # no gap, no stall
            assert hub.stats.evictions == 1
            assert [m.name for m in hub.rooms["s"].members] == ["fast"]
            # the leave is announced with the room's next presence notice
            while not any(e["type"] == "system" for e in seen):
                seen.append(await fast.receive_json())
            assert [(e["type"], e["left"], e["count"]) for e in seen] == [("system", ["slow"], 1)]
            # the slow client, reading at last, gets what was queued, then 4008
            code, reason = await slow.expect_close()
            assert (code, reason) == (4008, "too slow: outbox overflowed")

    @settings(Settings(outbox_size=4, rate_limit=0))
    async def test_a_member_evicted_while_it_sends_still_gets_4008(
        self, client: ASGIClient
    ) -> None:
        """The receive loop notices the eviction first (at its next frame); it must leave
        the sender to drain the outbox and send 4008, not cancel it mid-write."""
        async with client.websocket("/ws/chat?room=s&name=chatty", buffer=1) as chatty:
            for i in range(10):  # each queues a message and an ack in its own outbox
                await chatty.send_text(f"m{i}")
            await anyio.wait_all_tasks_blocked()
            assert client.runtime.hub.stats.evictions == 1
            assert await chatty.expect_close() == (4008, "too slow: outbox overflowed")


class TestLifespan:
    async def test_the_gc_threshold_is_raised_while_serving_and_restored_after(self) -> None:
        before = gc.get_threshold()
        async with open_runtime(Settings(gc_threshold=12_345)):
            assert gc.get_threshold() == (12_345, *before[1:])
        assert gc.get_threshold() == before

    async def test_a_gc_threshold_of_0_changes_nothing(self) -> None:
        before = gc.get_threshold()
        async with open_runtime(Settings(gc_threshold=0)):
            assert gc.get_threshold() == before


SECRET = "a-secret-of-at-least-thirty-two-bytes!"


@pytest.mark.parametrize(
    "last_frame",
    [b"binary", "x" * 5000, '{"type": "refresh", "token": "not.a.token"}'],
    ids=["binary", "too-long", "bad-refresh"],
)
@settings(Settings(rate_limit=0, jwt_secret=SECRET))
async def test_a_frame_that_races_the_end_of_its_membership_costs_nothing(
    client: ASGIClient, last_frame: str | bytes
) -> None:
    """The server ends a membership (here the server API's disconnect) while the client's
    next frame is on its way; that frame would get an ``error``, but the outbox is closed.
    The connection still ends with the close code it was given, and nothing raises."""
    token = mint_token(SECRET, sub="ann", ttl=600)
    for _ in range(10):
        async with client.websocket(f"/ws/chat?room=r&token={token}") as ws:
            await ws.receive_json()
            await anyio.wait_all_tasks_blocked()  # the receive loop waits for a frame
            assert await client.runtime.broker.disconnect("ann") == 1
            if isinstance(last_frame, bytes):
                await ws.send_bytes(last_frame)
            else:
                await ws.send_text(last_frame)
            assert await ws.expect_close() == (4001, "disconnected by the server")
