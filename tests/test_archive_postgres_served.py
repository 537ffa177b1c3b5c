"""The PostgreSQL archive on served processes: two servers (a Trio worker and an asyncio
worker) sharing Redis and one database. Senders at full speed over both servers: every seq
archived exactly once, and ``before`` pages reach seq 1 beyond Redis's retained window.
PostgreSQL stopped for 5 s during traffic: chat goes on, /metrics shows the archive's
failures and lag, and it catches up or records exactly the seqs it missed."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import AsyncExitStack, ExitStack, contextmanager

import anyio
import httpx
import orjson
import psycopg
import pytest
from httpx_ws import aconnect_ws

from roomcast.archive.postgres import open_postgres_archive

from chatload import Client, connect_all, run_load
from postgres_server import run_postgres
from redis_server import RedisServer
from servers import ServerProcess, spawn_server
from test_archive_served import metric, next_message, until

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["trio"])]

KEY = "k"
RETAINED = 50
PER_SENDER = 150
SENDERS = 4


@contextmanager
def two_servers(redis: RedisServer, archive: str) -> Iterator[list[ServerProcess]]:
    env = {
        "ROOMCAST_REDIS_URL": redis.url,
        "ROOMCAST_ARCHIVE": archive,
        "ROOMCAST_API_KEY": KEY,
        "ROOMCAST_RATE_LIMIT": "0",
        "ROOMCAST_HISTORY_SIZE": str(RETAINED),
    }
    with ExitStack() as stack:
        yield [
            stack.enter_context(spawn_server(["--worker-class", worker], env=env))
            for worker in ("trio", "asyncio")
        ]


def archived_rows(url: str, room: str) -> list[tuple[int, str, str]]:
    with psycopg.connect(url) as db:
        return db.execute(
            "SELECT seq, epoch, text FROM messages WHERE room = %s ORDER BY seq", (room,)
        ).fetchall()


async def written(servers: list[ServerProcess]) -> float:
    total = 0.0
    async with httpx.AsyncClient() as client:
        for server in servers:
            text = (await client.get(server.http_url("/metrics"))).text
            total += metric(text, "roomcast_archive_written_total")
    return total


async def test_two_servers_archive_each_seq_once_and_pages_reach_seq_1(
    redis_server: RedisServer, postgres_url: str
) -> None:
    total = PER_SENDER * SENDERS
    with two_servers(redis_server, postgres_url) as servers, anyio.fail_after(120):
        clients = [
            Client(servers[i % 2].url(f"/ws/chat?room=busy&name=m{i}"), batch=i % 4 > 1)
            for i in range(8)
        ]
        async with AsyncExitStack() as connections:
            await connect_all(connections, clients)
            await run_load(clients, clients[:SENDERS], per_sender=PER_SENDER, window=8)
        while await written(servers) < total:  # noqa: ASYNC110 (other processes write)
            await anyio.sleep(0.1)
        await anyio.sleep(0.5)  # one too many would show now
        assert await written(servers) == total  # neither server wrote a message twice
        async with httpx.AsyncClient(headers={"authorization": f"Bearer {KEY}"}) as api:
            retained = (await api.get(servers[0].http_url("/api/rooms/busy/history"))).json()
            # the server API's scrollback: Redis's window, then the archive, down to seq 1
            served, before = [], clients[0].welcome["seq"] + 1 + total
            while True:
                query = f"/api/rooms/busy/history?before={before}&limit=200"
                page = (await api.get(servers[1].http_url(query))).json()
                served = [m["seq"] for m in page["messages"]] + served
                if not page["more"]:
                    break
                before = page["messages"][0]["seq"]
        assert served == list(range(1, total + 1))
    first = clients[0].welcome["seq"] + 1
    rows = await anyio.to_thread.run_sync(archived_rows, postgres_url, "busy")
    received = dict(clients[0].messages)
    assert [seq for seq, _, _ in rows] == list(range(first, first + total))
    assert all(received[seq] == text for seq, _, text in rows)
    epoch = retained["epoch"]
    assert {e for _, e, _ in rows} == {epoch}
    assert len(retained["messages"]) == RETAINED < total  # Redis keeps the newest 50 only
    pages = []
    async with open_postgres_archive(postgres_url, window=0, sequencer=False) as archive:
        before, more = first + total, True
        while more:
            page = await archive.before("busy", epoch, before, 200)
            pages.append([orjson.loads(m)["seq"] for m in page.messages])
            before, more = pages[-1][0], page.more
    assert [seq for page in reversed(pages) for seq in page] == list(range(1, total + 1))
    assert [len(page) for page in pages] == [200, 200, 200]


async def test_postgres_stopped_for_5_s_chat_goes_on_and_the_archive_catches_up(
    redis_server: RedisServer,
) -> None:
    with run_postgres() as postgres:
        url = postgres.database()
        with two_servers(redis_server, url) as servers, anyio.fail_after(120):
            async with (
                httpx.AsyncClient(headers={"authorization": f"Bearer {KEY}"}) as api,
                aconnect_ws(servers[0].url("/ws/chat?room=busy&name=w"), api) as ws,
            ):
                await ws.receive_text()  # welcome
                sent = 0

                async def send(count: int) -> None:
                    nonlocal sent
                    for _ in range(count):
                        sent += 1
                        server = servers[sent % 2]
                        path = "/api/rooms/busy/messages"
                        response = await api.post(server.http_url(path), json={"text": f"m{sent}"})
                        assert response.json()["seq"] == sent
                        assert (await next_message(ws))["seq"] == sent  # chat goes on

                await send(50)
                await anyio.to_thread.run_sync(postgres.stop)  # pg_ctl stop -m fast
                back = anyio.current_time() + 5
                while anyio.current_time() < back:  # whole messages: a cut one would desync
                    await send(1)
                for server in servers:
                    scrape = (await api.get(server.http_url("/metrics"))).text
                    assert metric(scrape, "roomcast_archive_failures_total") >= 1
                    assert metric(scrape, "roomcast_archive_lag") > 0
                await anyio.to_thread.run_sync(postgres.start)
                await send(50)
                for server in servers:
                    metrics = httpx.AsyncClient(base_url=server.http_url())
                    async with metrics:
                        await until(metrics, "roomcast_archive_lag", lambda v: v == 0)
                missed = 0.0
                for server in servers:
                    scrape = (await api.get(server.http_url("/metrics"))).text
                    missed += metric(scrape, "roomcast_archive_missed_total")
            for server in servers:
                server.terminate(signal.SIGTERM)
                server.process.wait(timeout=30)
                said = server.text
                assert said.count("the archive cannot store messages") == 1, said
                assert said.count("the archive stores messages again") == 1, said
        seqs = {seq for seq, _, _ in await anyio.to_thread.run_sync(archived_rows, url, "busy")}
        with psycopg.connect(url) as db:
            gaps = db.execute("SELECT first, last FROM missing WHERE room = 'busy'").fetchall()
    lost = {seq for first, last in gaps for seq in range(first, last + 1)}
    assert seqs | lost == set(range(1, sent + 1)) and not seqs & lost
    assert len(lost) == missed
    assert sent > 150  # traffic went on through the outage
