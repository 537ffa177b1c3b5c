"""Protocol v2 at full speed, on both brokers and both worker classes: one connection in
100 rooms receives every room's messages exactly once and in order while other
connections send into those rooms and churn (join and leave rooms) as fast as they can;
every receiver counts duplicates and gaps per room. With Redis the rooms span two servers
(a Trio and an asyncio worker) and the reader's server is not the senders' only one."""

from __future__ import annotations

import dataclasses
import json
import random
from collections import defaultdict
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest
import trio
import trio.lowlevel
from trio_websocket import WebSocketConnection, open_websocket_url

from roomcast import Settings, create_app

from redis_server import RedisServer
from servers import ThreadedServer, serve_in_thread

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["trio"])]

ROOMS = 100
SENDERS = 4
PER_ROOM = 40  # messages each room gets
CHURNERS = 4


@pytest.fixture(params=["memory-trio", "memory-asyncio", "redis"])
def servers(request: pytest.FixtureRequest) -> Iterator[list[ThreadedServer]]:
    # An outbox that holds the whole run (4,000 messages and the churn's notices): the
    # reader shares this process's cores with the servers, and this test is about order
    # and exactly-once, not about evicting a reader that falls behind (test_stalled.py).
    settings = Settings(rate_limit=0, tokens=None, presence_grace=0, outbox_size=16_384)
    kinds = ["trio"] if request.param == "memory-trio" else ["asyncio"]
    if request.param == "redis":
        redis: RedisServer = request.getfixturevalue("redis_server")
        settings = dataclasses.replace(settings, redis_url=redis.url)
        kinds = ["trio", "asyncio"]
    with ExitStack() as stack:
        yield [
            stack.enter_context(serve_in_thread(create_app(settings), worker_class=kind))
            for kind in kinds
        ]


async def send(ws: WebSocketConnection, **command: Any) -> None:
    await ws.send_message(json.dumps(command))


async def join_all(ws: WebSocketConnection, rooms: list[str]) -> None:
    """Join ``rooms``, all requests first, then read until every welcome is in."""
    for room in rooms:
        await send(ws, type="join", room=room)
    pending = set(rooms)
    while pending:
        event = json.loads(await ws.get_message())
        assert event["type"] != "error", event
        if event["type"] == "welcome":
            pending.discard(event["room"])


async def test_one_connection_in_100_rooms_gets_every_message_once_in_order(
    servers: list[ThreadedServer],
) -> None:
    rooms = [f"load{i}" for i in range(ROOMS)]
    seen: dict[str, list[int]] = defaultdict(list)
    with trio.fail_after(120):
        async with open_websocket_url(servers[0].url("/ws?name=reader")) as reader:
            await join_all(reader, rooms)

            async def read() -> None:
                while sum(len(seqs) for seqs in seen.values()) < ROOMS * PER_ROOM:
                    event = json.loads(await reader.get_message())
                    assert event["type"] not in ("error", "left"), event
                    if event["type"] == "message":
                        seen[event["room"]].append(event["seq"])

            async def sender(index: int) -> None:
                server = servers[index % len(servers)]
                mine = rooms[index::SENDERS]
                async with open_websocket_url(server.url(f"/ws?name=s{index}")) as ws:
                    await join_all(ws, mine)
                    acks = 0

                    async def drain() -> None:
                        nonlocal acks
                        while acks < len(mine) * PER_ROOM:
                            event = json.loads(await ws.get_message())
                            assert event["type"] != "error", event
                            acks += event["type"] == "ack"

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(drain)
                        for n in range(PER_ROOM):
                            for room in mine:
                                await send(ws, type="message", room=room, text=f"{n}", id=f"{n}")

            async def churner(index: int) -> None:
                server = servers[(index + 1) % len(servers)]
                rng = random.Random(index)
                async with open_websocket_url(server.url(f"/ws?name=c{index}")) as ws:
                    done = trio.Event()

                    async def drain() -> None:
                        with trio.move_on_after(110):
                            while not done.is_set():
                                await ws.get_message()

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(drain)
                        for _ in range(200):
                            room = rng.choice(rooms)
                            await send(ws, type="join", room=room)
                            await trio.lowlevel.checkpoint()
                            await send(ws, type="leave", room=room)
                        done.set()
                        nursery.cancel_scope.cancel()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                for i in range(CHURNERS):
                    nursery.start_soon(churner, i)
                for i in range(SENDERS):
                    nursery.start_soon(sender, i)
    duplicates = {room: len(seqs) - len(set(seqs)) for room, seqs in seen.items()}
    assert not any(duplicates.values()), duplicates
    assert {room: seqs for room, seqs in seen.items()} == {
        room: list(range(1, PER_ROOM + 1)) for room in rooms
    }
