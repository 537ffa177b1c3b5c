"""The archive on served processes (``python -m roomcast``, Trio and asyncio workers): a
room's sequence across a clean restart and across a crash, and an archive that cannot be
written while people chat. Real clients: httpx for the server API and /metrics, httpx-ws
for the chat protocol."""

from __future__ import annotations

import re
import signal
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import orjson
import pytest
from httpx_ws import AsyncWebSocketSession, aconnect_ws

from roomcast.archive.keeper import unarchived_bound

from servers import ServerProcess, spawn_server

pytestmark = pytest.mark.anyio
KEY = "k"


def environment(tmp_path: Path) -> dict[str, str]:
    return {
        "ROOMCAST_ARCHIVE": f"sqlite:///{tmp_path / 'chat.db'}",
        "ROOMCAST_API_KEY": KEY,
        "ROOMCAST_RATE_LIMIT": "0",
    }


def serve(tmp_path: Path, backend: str) -> Any:
    return spawn_server(["--worker-class", backend], env=environment(tmp_path))


@asynccontextmanager
async def api(server: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=server.http_url(), headers=headers) as client:
        yield client


async def post(client: httpx.AsyncClient, room: str, text: str) -> int:
    response = await client.post(f"/api/rooms/{room}/messages", json={"text": text})
    response.raise_for_status()
    return int(response.json()["seq"])


async def events(ws: AsyncWebSocketSession, count: int) -> list[dict[str, Any]]:
    return [orjson.loads(await ws.receive_text()) for _ in range(count)]


async def next_message(ws: AsyncWebSocketSession) -> dict[str, Any]:
    while True:
        event: dict[str, Any] = orjson.loads(await ws.receive_text())
        if event["type"] in ("message", "error"):
            return event


def stop(server: ServerProcess, sig: int) -> None:
    server.terminate(sig)
    server.process.wait(timeout=30)


async def test_a_clean_restart_keeps_the_epoch_and_the_next_message_is_301(
    tmp_path: Path, anyio_backend: str
) -> None:
    with anyio.fail_after(90):
        with serve(tmp_path, anyio_backend) as server:
            async with api(server) as client:
                for n in range(1, 301):
                    assert await post(client, "lobby", f"m{n}") == n
                history = (await client.get("/api/rooms/lobby/history?since=299")).json()
            epoch = history["epoch"]
            stop(server, signal.SIGTERM)
        with serve(tmp_path, anyio_backend) as server:
            query = f"room=lobby&name=back&since=300&epoch={epoch}"
            async with (
                api(server) as client,
                aconnect_ws(server.url(f"/ws/chat?{query}"), client) as ws,
            ):
                (welcome,) = await events(ws, 1)
                assert (welcome["type"], welcome["epoch"], welcome["seq"]) == (
                    "welcome",
                    epoch,
                    300,
                )
                assert await post(client, "lobby", "after the restart") == 301
                event = await next_message(ws)  # no history_gap before it
                assert (event["type"], event["seq"], event["text"]) == (
                    "message",
                    301,
                    "after the restart",
                )


async def test_a_crash_in_a_burst_reuses_no_seq_and_says_history_gap(
    tmp_path: Path, anyio_backend: str
) -> None:
    seen: dict[int, str] = {}
    with anyio.fail_after(90):
        with serve(tmp_path, anyio_backend) as server:
            async with (
                api(server) as client,
                aconnect_ws(server.url("/ws/chat?room=burst&name=w"), client) as ws,
            ):
                (welcome,) = await events(ws, 1)
                epoch = welcome["epoch"]
                async with anyio.create_task_group() as tg:

                    async def burst() -> None:
                        for n in range(10_000):
                            await post(client, "burst", f"b{n}")

                    tg.start_soon(burst)
                    while len(seen) < 400:
                        event = await next_message(ws)
                        seen[event["seq"]] = event["text"]
                    stop(server, signal.SIGKILL)  # mid-burst: nothing is drained
                    tg.cancel_scope.cancel()
        last_seen = max(seen)
        with sqlite3.connect(tmp_path / "chat.db") as db:
            archived = dict(
                db.execute(
                    "SELECT seq, text FROM messages WHERE room = 'burst' AND epoch = ?", (epoch,)
                )
            )
        assert all(seen[seq] == text for seq, text in archived.items() if seq in seen)
        lost = last_seen - max(archived, default=0)
        assert 0 <= lost <= unarchived_bound()  # the documented window
        with serve(tmp_path, anyio_backend) as server:
            query = f"room=burst&name=back&since={last_seen}&epoch={epoch}"
            async with (
                api(server) as client,
                aconnect_ws(server.url(f"/ws/chat?{query}"), client) as ws,
            ):
                welcome, gap = await events(ws, 2)
                assert welcome["epoch"] == epoch and welcome["seq"] > last_seen
                assert (gap["error"], gap["since"], gap["first"]) == (
                    "history_gap",
                    last_seen,
                    welcome["seq"] + 1,
                )
                seq = await post(client, "burst", "after the crash")
                assert seq > last_seen  # never another message under a seq someone saw
                assert (await next_message(ws))["seq"] == seq


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match is not None, f"{name} not in /metrics"
    return float(match[1])


async def until(client: httpx.AsyncClient, name: str, wanted: Callable[[float], bool]) -> None:
    """Poll the server's /metrics (another process: nothing to wait on but its answers)
    until ``name`` is as ``wanted``."""
    for _ in range(600):
        if wanted(metric((await client.get("/metrics")).text, name)):
            return
        await anyio.sleep(0.1)
    raise AssertionError(f"{name} never got there")


async def test_an_archive_that_cannot_be_written_never_stops_chat_and_catches_up(
    tmp_path: Path, anyio_backend: str
) -> None:
    with anyio.fail_after(90):
        with serve(tmp_path, anyio_backend) as server:
            async with (
                api(server) as client,
                aconnect_ws(server.url("/ws/chat?room=busy&name=w"), client) as ws,
            ):
                await events(ws, 1)
                locker = sqlite3.connect(tmp_path / "chat.db", isolation_level=None)
                locker.execute("BEGIN EXCLUSIVE")  # another process holds the file's lock
                try:
                    for n in range(1, 101):
                        assert await post(client, "busy", f"m{n}") == n
                        assert (await next_message(ws))["seq"] == n  # chat goes on
                    await until(client, "roomcast_archive_failures_total", lambda v: v >= 2)
                    assert metric((await client.get("/metrics")).text, "roomcast_archive_lag") > 0
                finally:
                    locker.execute("ROLLBACK")
                    locker.close()
                await until(client, "roomcast_archive_lag", lambda v: v == 0)
                text = (await client.get("/metrics")).text
                assert metric(text, "roomcast_archive_written_total") == 100
                assert metric(text, "roomcast_archive_missed_total") == 0
        said = server.text
        assert said.count("the archive cannot store messages") == 1, said
        assert said.count("the archive stores messages again") == 1, said
        with sqlite3.connect(tmp_path / "chat.db") as db:
            (count,) = db.execute("SELECT count(*) FROM messages WHERE room = 'busy'").fetchone()
        assert count == 100
