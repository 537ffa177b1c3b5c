"""roomcast.testing, the in-process test client for applications, on both anyio backends.

These tests read as an application's own would: an app built with ``create_app``, a
client from ``open_test_client``, v1 and v2 connections, the server API.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from roomcast import Settings, create_app
from roomcast.asgi import Message as ASGIMessage
from roomcast.asgi import Receive, Scope, Send
from roomcast.client.events import Ack, Message, Presence, Welcome
from roomcast.identity import mint_token
from roomcast.protocol import BATCH_SUBPROTOCOL
from roomcast.testing import (
    Close,
    HandshakeRejected,
    JoinRefused,
    LifespanFailed,
    MessageRefused,
    ReceiveTimeout,
    WebSocketClosed,
    open_test_client,
)

import mounted
from servers import ROOT

pytestmark = pytest.mark.anyio

FAST = Settings(rate_limit=0)
SECRET = "a-test-secret-of-32-bytes-or-more!"


class TestChat:
    async def test_v1_join_message_and_ack(self) -> None:
        with anyio.fail_after(10):
            async with (
                open_test_client(settings=FAST) as client,
                client.connect("/ws/chat?room=lobby&name=ann") as ann,
            ):
                welcome = await ann.receive_event()
                assert isinstance(welcome, Welcome)
                assert (welcome.room, welcome.seq, welcome.members) == ("lobby", 0, ("ann",))
                async with client.connect("/ws/chat", params={"room": "lobby", "name": "bo"}) as bo:
                    assert isinstance(await bo.receive_event(), Welcome)
                    ack = await ann.send_message("hello", id="m1")
                    assert ack == Ack(id="m1", seq=1)
                    # what came before the ack stays queued, in order
                    joined = await ann.receive_event()
                    assert isinstance(joined, Presence) and joined.joined == ("bo",)
                    echo, heard = await ann.receive_event(), await bo.receive_event()
                    for message in (echo, heard):
                        assert isinstance(message, Message)
                        assert (message.seq, message.text, message.sender) == (1, "hello", "ann")

    async def test_v2_joins_two_rooms_over_one_connection(self) -> None:
        with anyio.fail_after(10):
            async with (
                open_test_client(settings=FAST) as client,
                client.connect("/ws?name=ann") as ann,
                client.connect("/ws/chat?room=news&name=bo") as bo,
            ):
                lobby, news = await ann.join("lobby"), await ann.join("news")
                assert (lobby.room, news.room, news.members) == ("lobby", "news", ("bo", "ann"))
                ack = await ann.send_message("in the lobby", room="lobby")
                assert (ack.room, ack.seq) == ("lobby", 1)
                ack = await ann.send_message("in the news", room="news")
                assert (ack.room, ack.seq) == ("news", 1)
                texts = [await ann.receive_event() for _ in range(2)]
                assert [(m.room, m.text) for m in texts if isinstance(m, Message)] == [
                    ("lobby", "in the lobby"),
                    ("news", "in the news"),
                ]
                assert isinstance(await bo.receive_event(), Welcome)
                heard = await bo.receive_event()
                assert isinstance(heard, Presence)  # ann joined #news
                heard = await bo.receive_event()
                assert isinstance(heard, Message) and heard.text == "in the news"
                left = await ann.leave("lobby")
                assert (left.room, left.code) == ("lobby", 1000)

    async def test_a_refused_join_and_a_refused_message_raise(self) -> None:
        with anyio.fail_after(10):
            async with (
                open_test_client(settings=Settings(rate_limit=0, max_text=5)) as client,
                client.connect("/ws") as ws,
            ):
                with pytest.raises(JoinRefused) as refused:
                    await ws.join("no spaces allowed")
                assert refused.value.error == "bad_room"
                await ws.join("lobby")
                with pytest.raises(MessageRefused) as too_long:
                    await ws.send_message("longer than five", room="lobby", id="x")
                assert too_long.value.code == "too_long"
                assert (await ws.send_message("short", room="lobby")).seq == 1

    async def test_batched_frames_are_read_one_event_at_a_time(self) -> None:
        with anyio.fail_after(10):
            async with (
                open_test_client(settings=FAST) as client,
                client.connect("/ws?name=ann", subprotocols=[BATCH_SUBPROTOCOL]) as ws,
            ):
                assert ws.subprotocol == BATCH_SUBPROTOCOL
                await ws.join("lobby")
                for n in range(1, 4):
                    assert (await ws.send_message(f"m{n}", room="lobby")).seq == n
                seqs = []
                for _ in range(3):
                    event = await ws.receive_event()
                    assert isinstance(event, Message)
                    seqs.append(event.seq)
                assert seqs == [1, 2, 3]


class TestClosing:
    async def test_a_bad_room_is_closed_4400(self) -> None:
        with anyio.fail_after(10):
            async with (
                open_test_client(settings=FAST) as client,
                client.connect("/ws/chat?room=not%20a%20room") as ws,
            ):
                close = await ws.wait_closed()
                assert close.code == 4400
                assert (ws.close_code, ws.close_reason) == (4400, close.reason)
                with pytest.raises(WebSocketClosed) as closed:
                    await ws.receive_event()
                assert closed.value.code == 4400
                with pytest.raises(WebSocketClosed):
                    await ws.send_text("too late")

    async def test_signed_tokens_close_4001_without_a_token(self) -> None:
        token = mint_token(SECRET, sub="u1", name="Ann", ttl=60)
        with anyio.fail_after(10):
            async with open_test_client(settings=Settings(jwt_secret=SECRET)) as client:
                async with client.connect("/ws/chat?room=lobby") as anonymous:
                    assert await anonymous.wait_closed() == Close(4001, "missing token")
                bearer = {"authorization": f"Bearer {token}"}
                async with client.connect("/ws/chat?room=lobby", headers=bearer) as ann:
                    assert isinstance(await ann.receive_event(), Welcome)
                    await ann.send_message("signed")
                    echo = await ann.receive_event()
                    assert isinstance(echo, Message) and (echo.user, echo.sender) == ("u1", "Ann")

    async def test_shutdown_closes_open_connections_with_1001(self) -> None:
        with anyio.fail_after(10):
            async with (
                open_test_client(settings=FAST) as client,
                client.connect("/ws/chat?room=lobby") as v1,
                client.connect("/ws") as in_a_room,
                client.connect("/ws") as in_no_room,
                client.connect("/ws/echo") as echo,
            ):
                assert isinstance(await v1.receive_event(), Welcome)
                await in_a_room.join("lobby")
                await client.shutdown()
                for ws in (v1, in_a_room, in_no_room, echo):
                    assert await ws.wait_closed() == Close(1001, "server shutting down")
                with pytest.raises(RuntimeError):
                    await client.get("/healthz")

    async def test_a_client_that_stops_reading_is_evicted_4008(self) -> None:
        settings = Settings(rate_limit=0, outbox_size=4)
        with anyio.fail_after(10):
            async with (
                open_test_client(settings=settings) as client,
                client.connect("/ws/chat?room=lobby", max_buffer=2) as stalled,
                client.connect("/ws/chat?room=lobby") as talker,
            ):
                for n in range(20):
                    await talker.send_message(f"m{n}")
                assert (await stalled.wait_closed()).code == 4008

    async def test_a_refused_handshake_raises(self) -> None:
        with anyio.fail_after(10):
            async with open_test_client(settings=FAST) as client:
                with pytest.raises(HandshakeRejected) as rejected:
                    async with client.connect("/ws", headers={"origin": "http://evil.example"}):
                        pass
                assert rejected.value.status == 403
            async with open_test_client(settings=Settings(max_connections=1)) as client:
                async with client.connect("/ws"):
                    with pytest.raises(HandshakeRejected) as busy:
                        async with client.connect("/ws"):
                            pass
                assert busy.value.status == 503 and b"too many connections" in busy.value.body


class TestHTTP:
    async def test_the_server_api_with_a_key(self) -> None:
        key = {"authorization": "Bearer k3y"}
        with anyio.fail_after(10):
            async with (
                open_test_client(settings=Settings(api_key="k3y")) as client,
                client.connect("/ws/chat?room=lobby&name=ann") as ann,
            ):
                await ann.receive_event()
                path = "/api/rooms/lobby/messages"
                refused = await client.post(path, json={"text": "hi"})
                assert refused.status_code == 401
                posted = await client.post(path, json={"text": "hi", "from": "ops"}, headers=key)
                assert (posted.status_code, posted.json()) == (200, {"seq": 1})
                heard = await ann.receive_event()
                assert isinstance(heard, Message) and (heard.text, heard.sender) == ("hi", "ops")
                history = await client.get(
                    "/api/rooms/lobby/history", params={"since": "0"}, headers=key
                )
                assert [m["text"] for m in history.json()["messages"]] == ["hi"]
                assert history.headers["content-type"] == "application/json"

    async def test_a_host_app_that_mounts_roomcast(self) -> None:
        with anyio.fail_after(10):
            async with open_test_client(mounted.build()) as client:
                assert (await client.get("/")).text == "the host app"
                async with client.connect("/chat/ws/chat?room=lobby") as ws:
                    assert isinstance(await ws.receive_event(), Welcome)


class Recorder:
    """roomcast, with every scope it is given kept: what a ``connect`` hook would read."""

    def __init__(self) -> None:
        self.app = create_app(FAST)
        self.scopes: list[Scope] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scopes.append(scope)
        await self.app(scope, receive, send)


class TestScope:
    async def test_headers_cookies_query_and_client_reach_the_app(self) -> None:
        recorder = Recorder()
        request: dict[str, Any] = {
            "params": {"room": "lobby", "name": "ann"},
            "headers": {"X-Product": "shop", "user-agent": "pytest"},
            "cookies": {"session": "s3cr3t", "theme": "dark"},
            "client": ("203.0.113.7", 4242),
        }
        with anyio.fail_after(10):
            async with open_test_client(recorder) as client:
                async with client.connect("/ws/chat", **request) as ws:
                    assert isinstance(await ws.receive_event(), Welcome)
                await client.get("/healthz", **request)
        lifespan, websocket, http = recorder.scopes
        assert lifespan["type"] == "lifespan"
        for scope in (websocket, http):
            assert scope["query_string"] == b"room=lobby&name=ann"
            assert scope["client"] == ("203.0.113.7", 4242)
            assert scope["headers"] == [
                (b"host", b"testserver"),
                (b"x-product", b"shop"),
                (b"user-agent", b"pytest"),
                (b"cookie", b"session=s3cr3t; theme=dark"),
            ]
            assert "roomcast" in scope["state"]  # the runtime the lifespan started
        assert (websocket["path"], websocket["scheme"]) == ("/ws/chat", "ws")
        assert (http["method"], http["path"]) == ("GET", "/healthz")


async def refusing_lifespan(scope: Scope, receive: Receive, send: Send) -> None:
    await receive()
    await send({"type": "lifespan.startup.failed", "message": "no database"})


async def raising_app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await receive()
        await send({"type": "lifespan.startup.complete"})
        await receive()
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["type"] == "websocket":
        message: ASGIMessage = await receive()
        await send({"type": "websocket.accept"})
        message = await receive()
        raise LookupError(f"the app failed on {message.get('text')}")
    raise LookupError("the app failed on a request")


class TestFailures:
    async def test_a_read_that_gets_nothing_times_out_with_what_it_waited_for(self) -> None:
        with anyio.fail_after(10):
            async with open_test_client(settings=FAST, timeout=0.2) as client:
                async with client.connect("/ws?name=ann") as ws:
                    with pytest.raises(
                        ReceiveTimeout, match=r"/ws: waited 0\.2 s for a text frame"
                    ):
                        await ws.receive_event()
                async with client.connect("/ws/echo") as echo:
                    with pytest.raises(ReceiveTimeout, match=r"/ws/echo: .* the welcome to #lobby"):
                        await echo.join("lobby")
                    # what came meanwhile is still there to read
                    assert await echo.receive_text() == 'Echo: {"type":"join","room":"lobby"}'

    async def test_a_failed_startup_raises_lifespan_failed(self) -> None:
        with anyio.fail_after(10), pytest.raises(LifespanFailed, match="no database"):
            async with open_test_client(refusing_lifespan):
                pass

    async def test_an_exception_in_the_app_reaches_the_test(self) -> None:
        with anyio.fail_after(10):
            async with open_test_client(raising_app) as client:
                with pytest.raises(LookupError, match="a request"):
                    await client.get("/")
                async with client.connect("/anything") as ws:
                    await ws.send_text("boom")
                    with pytest.raises(LookupError, match="boom"):
                        await ws.receive_text()
                    assert ws.close_code == 1011

    async def test_an_exception_in_the_block_comes_out_as_it_is(self) -> None:
        with anyio.fail_after(10), pytest.raises(ZeroDivisionError):
            async with open_test_client(settings=FAST) as client, client.connect("/ws"):
                _ = 1 / 0


class TestReadme:
    @staticmethod
    def example() -> str:
        readme = (Path(ROOT) / "README.md").read_text()
        title = "## Testing your application with roomcast.testing"
        section = readme.split(title, 1)[1].split("\n## ", 1)[0]
        (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
        return code

    def test_the_readme_example_passes_as_written(self, tmp_path: Path) -> None:
        """Run by pytest as a user's test module would be: on its own, in a folder of
        its own (no conftest of ours), both backends from the example's fixture."""
        module = tmp_path / "test_example.py"
        module.write_text(self.example())
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(module)]
        result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "6 passed" in result.stdout
