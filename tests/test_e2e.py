"""End to end: real Hypercorn (Trio worker unless a test says otherwise) on a port-0
socket, real clients (trio-websocket, websockets, and a bare socket where a client must
misbehave)."""

from __future__ import annotations

import gc
import json
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
import trio
import trio.lowlevel
from trio_websocket import open_websocket_url
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosedError, InvalidStatus

from roomcast import Settings, create_app
from roomcast.hub import Hub, Member

from rawws import open_raw_websocket
from servers import ThreadedServer, serve_in_thread

TRIO = pytest.mark.parametrize("anyio_backend", ["trio"])
ASYNCIO = pytest.mark.parametrize("anyio_backend", ["asyncio"])
pytestmark = pytest.mark.anyio

SETTINGS = Settings(rate_limit=0, room_capacity=3, tokens=None)


@pytest.fixture(scope="module", params=["trio", "asyncio"])
def server(request: pytest.FixtureRequest) -> Iterator[ThreadedServer]:
    """The app on Hypercorn's Trio worker and on its asyncio worker."""
    with serve_in_thread(create_app(SETTINGS), worker_class=request.param) as server:
        yield server


@pytest.fixture(scope="module")
def trio_server() -> Iterator[ThreadedServer]:
    with serve_in_thread(create_app(SETTINGS), worker_class="trio") as server:
        yield server


async def receive_json(ws: Any) -> dict[str, Any]:
    message = await ws.get_message() if hasattr(ws, "get_message") else await ws.recv()
    data: dict[str, Any] = json.loads(message)
    return data


@TRIO
async def test_three_clients_see_every_message_in_one_order(server: ThreadedServer) -> None:
    url = server.url("/ws/chat?room=order")
    with trio.fail_after(20):
        async with (
            open_websocket_url(url + "&name=a") as a,
            open_websocket_url(url + "&name=b") as b,
            open_websocket_url(url + "&name=c") as c,
        ):
            clients = [a, b, c]
            for ws in clients:
                while (await receive_json(ws))["type"] != "welcome":
                    pass
            per_sender = 30
            received: dict[int, list[tuple[int, str]]] = {0: [], 1: [], 2: []}

            async def read(index: int) -> None:
                ws = clients[index]
                while len(received[index]) < 3 * per_sender:
                    event = await receive_json(ws)
                    if event["type"] == "message":
                        received[index].append((event["seq"], event["text"]))

            async def talk(index: int) -> None:
                for i in range(per_sender):
                    await clients[index].send_message(json.dumps({"text": f"{index}:{i}"}))
                    await trio.lowlevel.checkpoint()

            async with trio.open_nursery() as nursery:
                for index in range(3):
                    nursery.start_soon(read, index)
                    nursery.start_soon(talk, index)
    orders = list(received.values())
    assert orders[0] == orders[1] == orders[2]
    seqs = [seq for seq, _ in orders[0]]
    assert seqs == list(range(seqs[0], seqs[0] + 3 * per_sender))
    for sender in range(3):  # each sender's own messages keep their order
        texts = [t for _, t in orders[0] if t.startswith(f"{sender}:")]
        assert texts == [f"{sender}:{i}" for i in range(per_sender)]


@TRIO
async def test_rooms_are_isolated(server: ThreadedServer) -> None:
    with trio.fail_after(10):
        async with (
            open_websocket_url(server.url("/ws/chat?room=iso1")) as one,
            open_websocket_url(server.url("/ws/chat?room=iso2")) as two,
        ):
            assert (await receive_json(one))["type"] == "welcome"
            assert (await receive_json(two))["type"] == "welcome"
            await one.send_message("for room one")
            assert (await receive_json(one))["text"] == "for room one"
            await two.send_message("for room two")
            event = await receive_json(two)  # room two sees only its own message
            assert (event["text"], event["room"], event["seq"]) == ("for room two", "iso2", 1)


@ASYNCIO
async def test_echo_and_binary_echo(server: ThreadedServer) -> None:
    with anyio.fail_after(10):
        async with connect(server.url("/ws/echo")) as ws:
            await ws.send("Hello, WebSocket!")
            assert await ws.recv() == "Echo: Hello, WebSocket!"
            await ws.send(b"\x00\x01\xfe")
            assert await ws.recv() == b"\x00\x01\xfe"
        async with connect(server.url("/ws/binary")) as ws:
            await ws.send(b"\xff")
            assert await ws.recv() == b"\xff"
            await ws.send("naïve")
            assert await ws.recv() == "naïve".encode()


async def close_code(url: str, **kwargs: Any) -> tuple[int, str]:
    async with connect(url, **kwargs) as ws:
        with pytest.raises(ConnectionClosedError):
            while True:
                await ws.recv()
        assert ws.close_code is not None
        return ws.close_code, ws.close_reason or ""


@ASYNCIO
async def test_close_codes(server: ThreadedServer) -> None:
    with anyio.fail_after(20):
        assert (await close_code(server.url("/ws/elsewhere")))[0] == 4004
        code, reason = await close_code(server.url("/ws/chat?room=no%20spaces"))
        assert code == 4400 and "room" in reason
        url = server.url("/ws/chat?room=full")
        async with connect(url), connect(url), connect(url):
            assert await close_code(url) == (4003, "room full")


@ASYNCIO
async def test_token_4001(server: ThreadedServer) -> None:
    with serve_in_thread(
        create_app(Settings(tokens=frozenset({"s3cret"}))), worker_class=server.worker_class
    ) as secured:
        with anyio.fail_after(10):
            assert (await close_code(secured.url("/ws/chat")))[0] == 4001
            assert (await close_code(secured.url("/ws/chat?token=nope")))[0] == 4001
            headers = {"Authorization": "Bearer s3cret"}
            async with connect(secured.url("/ws/chat"), additional_headers=headers) as ws:
                assert json.loads(await ws.recv())["type"] == "welcome"
            async with connect(secured.url("/ws/chat?token=s3cret")) as ws:
                assert json.loads(await ws.recv())["type"] == "welcome"


@ASYNCIO
async def test_foreign_origin_gets_403_at_the_handshake(server: ThreadedServer) -> None:
    with anyio.fail_after(10):
        with pytest.raises(InvalidStatus) as refused:
            async with connect(server.url("/ws/chat"), origin="http://evil.example"):  # type: ignore[arg-type]
                pass
        assert refused.value.response.status_code == 403
        same = f"http://127.0.0.1:{server.port}"
        async with connect(server.url("/ws/chat"), origin=same) as ws:  # type: ignore[arg-type]
            assert json.loads(await ws.recv())["type"] == "welcome"


def open_outboxes(hub: Hub) -> int:
    """Members of ``hub`` still alive anywhere in the process with an open outbox (call it
    in the server's thread)."""
    gc.collect()
    return sum(
        1
        for obj in gc.get_objects()
        if isinstance(obj, Member)
        and obj.id.startswith(hub.node)
        and obj._outbox_send.statistics().open_send_streams
    )


async def eventually(condition: Any, seconds: float = 10.0) -> None:
    """Poll ``condition`` until it holds (the server runs in another thread and loop, so
    there is no event to wait on); fail after ``seconds``."""
    with anyio.fail_after(seconds):
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(0.01)


def members(server: ThreadedServer) -> int:
    hub = server.runtime.hub
    return server.run_sync(lambda: sum(len(room.members) for room in hub.rooms.values()))


@ASYNCIO
async def test_abrupt_disconnects_leave_nothing_behind(server: ThreadedServer) -> None:
    runtime = server.runtime
    await eventually(lambda: runtime.connections == 0)
    tasks_before = server.task_count()

    def connect_and_kill(count: int) -> None:
        for i in range(count):
            ws = open_raw_websocket(server.port, f"/ws/chat?room=abrupt&name=n{i}")
            assert json.loads(ws.next_message())["type"] == "welcome"
            if i % 2:
                ws.send_text("last words")  # half of them die mid-conversation
            ws.kill()

    with anyio.fail_after(60):
        await anyio.to_thread.run_sync(connect_and_kill, 200)
    await eventually(lambda: runtime.connections == 0 and members(server) == 0)
    assert runtime.hub.stats.joins == runtime.hub.stats.leaves
    await eventually(lambda: server.task_count() <= tasks_before)
    assert server.task_count() == tasks_before
    assert server.run_sync(lambda: open_outboxes(runtime.hub)) == 0


@TRIO
async def test_a_client_that_never_reads_is_evicted_and_the_room_flows_on() -> None:
    settings = Settings(rate_limit=0, outbox_size=8, max_text=30_000)
    with serve_in_thread(
        create_app(settings), worker_class="trio", websocket_max_message_size=65536
    ) as server:
        hub = server.runtime.hub
        url = server.url("/ws/chat?room=stall")
        stalled = await trio.to_thread.run_sync(
            lambda: open_raw_websocket(
                server.port, "/ws/chat?room=stall&name=stalled", receive_buffer=4096
            )
        )
        try:
            big = "x" * 29_000
            seqs: dict[str, list[int]] = {"a": [], "b": []}
            with trio.fail_after(60):
                async with (
                    open_websocket_url(url + "&name=a", max_message_size=2**20) as a,
                    open_websocket_url(url + "&name=b", max_message_size=2**20) as b,
                ):
                    progress = trio.lowlevel.ParkingLot()

                    async def read(name: str, ws: Any, until: trio.Event) -> None:
                        while True:
                            event = await receive_json(ws)
                            if event["type"] == "message":
                                seqs[name].append(event["seq"])
                                progress.unpark_all()
                                if event["text"] == "done":
                                    until.set()
                                    return

                    async def both_received(count: int) -> None:
                        # healthy readers keep up: never more than a few messages ahead
                        while min(len(seqs["a"]), len(seqs["b"])) < count - 2:
                            await progress.park()

                    done_a, done_b = trio.Event(), trio.Event()
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(read, "a", a, done_a)
                        nursery.start_soon(read, "b", b, done_b)
                        sent = 0
                        while server.run_sync(
                            lambda: any(m.name == "stalled" for m in hub.rooms["stall"].members)
                        ):
                            assert sent < 2000, "the stalled client was never evicted"
                            await a.send_message(json.dumps({"text": big}))
                            sent += 1
                            await both_received(sent)
                        evicted_after = sent
                        for _ in range(50):  # the room keeps flowing after the eviction
                            await a.send_message(json.dumps({"text": "after"}))
                            sent += 1
                            await both_received(sent)
                        await a.send_message(json.dumps({"text": "done"}))
                        await done_a.wait()
                        await done_b.wait()
            total = evicted_after + 51
            assert seqs["a"] == seqs["b"] == list(range(1, total + 1))
            assert hub.stats.evictions == 1
            # The stalled client finally reads: what was in flight, then the 4008 close frame.
            code, reason, messages = await trio.to_thread.run_sync(stalled.read_until_close)
            assert (code, reason) == (4008, "too slow: outbox overflowed")
            assert 1 <= messages <= evicted_after + 2
        finally:  # a stalled peer would otherwise hold the server's shutdown
            stalled.sock.close()
