"""Scrollback (SPEC §11): ``GET /api/rooms/{room}/history?before=`` and the v2 ``history``
command page backwards through what the broker retains, on the memory broker (both anyio
backends) and on Redis; the request rules without a server."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from roomcast import Settings, create_app
from roomcast.api import ApiError, parse_scrollback_query
from roomcast.client import HistoryRefused, Message, open_connection, open_room
from roomcast.multiroom import HISTORY_BURST
from roomcast.protocol import MAX_PAGE, BadMessage, HistoryRequest, parse_command
from roomcast.testing import TestClient, TestWebSocket, open_test_client

from redis_server import RedisServer
from servers import ServerProcess, spawn_server

KEY = "scrollback-key"
AUTH = {"authorization": f"Bearer {KEY}"}
SETTINGS = Settings(rate_limit=0, api_key=KEY, presence_grace=0, history_size=300)

# -- the request rules (sans I/O) -------------------------------------------------------------


def test_a_before_query_pages_backwards_and_a_since_query_is_left_alone() -> None:
    assert parse_scrollback_query(b"before=51&limit=20") == (51, 20)
    assert parse_scrollback_query(b"before=7") == (7, 50)
    assert parse_scrollback_query(b"since=3&limit=20") is None
    assert parse_scrollback_query(b"") is None


@pytest.mark.parametrize(
    "query",
    [
        *(b"before=", b"before=0", b"before=-3", b"before=x", b"before=%C2%B2"),
        *(b"before=1&since=0", b"before=5&limit=0", b"before=5&limit=201", b"before=5&limit=1e2"),
    ],
)
def test_bad_before_queries_are_refused(query: bytes) -> None:
    with pytest.raises(ApiError) as refused:
        parse_scrollback_query(query)
    assert (refused.value.status, refused.value.code) == (400, "bad_request")


def test_a_history_command_names_a_room_and_optionally_before_limit_and_id() -> None:
    parse = parse_command
    assert parse('{"type": "history", "room": "r"}', max_text=9) == HistoryRequest("r", None, 50)
    frame = '{"type": "history", "room": "r", "before": 9, "limit": 200, "id": "p1"}'
    assert parse(frame, max_text=9) == HistoryRequest("r", 9, MAX_PAGE, "p1")
    for bad in ['"before": 0', '"before": true', '"before": "9"', '"limit": 201', '"limit": 0']:
        with pytest.raises(BadMessage) as refused:
            parse(f'{{"type": "history", "room": "r", {bad}, "id": "p"}}', max_text=9)
        assert (refused.value.code, refused.value.room, refused.value.id) == (
            "bad_request",
            "r",
            "p",
        )


# -- in process: the memory broker on both backends, and Redis ---------------------------------


@pytest.fixture(params=["memory", "redis"])
def settings(request: pytest.FixtureRequest) -> Settings:
    if request.param == "memory":
        return SETTINGS
    redis: RedisServer = request.getfixturevalue("redis_server")
    return dataclasses.replace(SETTINGS, redis_url=redis.url)


@asynccontextmanager
async def served(settings: Settings, **changes: Any) -> AsyncIterator[TestClient]:
    async with open_test_client(create_app(dataclasses.replace(settings, **changes))) as client:
        yield client


async def post_messages(client: TestClient, room: str, count: int) -> None:
    for n in range(1, count + 1):
        response = await client.post(
            f"/api/rooms/{room}/messages", headers=AUTH, json={"text": f"m{n}"}
        )
        assert response.status_code == 200, response.text


async def api_pages(client: TestClient, room: str, limit: int) -> list[dict[str, Any]]:
    """Every page from the newest back, each asked for with ``before`` = the first seq of
    the page after it (the first with a ``before`` past the room's latest seq)."""
    pages, before = [], 10**12
    while True:
        response = await client.get(
            f"/api/rooms/{room}/history",
            headers=AUTH,
            params={"before": str(before), "limit": str(limit)},
        )
        assert response.status_code == 200, response.text
        page = response.json()
        pages.append(page)
        if not page["more"]:
            return pages
        assert page["messages"], "a page that says more must hold messages"
        before = page["messages"][0]["seq"]


def seqs_of(pages: list[dict[str, Any]]) -> list[int]:
    return [message["seq"] for page in reversed(pages) for message in page["messages"]]


@pytest.mark.anyio
async def test_api_pages_reach_the_oldest_retained_message_and_more_is_false_there(
    settings: Settings,
) -> None:
    with anyio.fail_after(60):
        async with served(settings, history_size=100) as client:
            await post_messages(client, "paged", 230)
            pages = await api_pages(client, "paged", limit=40)
    assert seqs_of(pages) == list(range(131, 231))  # the retained 100, once each, in order
    assert [len(page["messages"]) for page in pages] == [40, 40, 20]
    assert [page["more"] for page in pages] == [True, True, False]
    for page in pages:  # seq order within a page, and the same run throughout
        assert [m["seq"] for m in page["messages"]] == sorted(m["seq"] for m in page["messages"])
        assert page["epoch"] == pages[0]["epoch"] is not None
    assert pages[-1]["messages"][0]["text"] == "m131"


@pytest.mark.anyio
async def test_more_turns_false_exactly_at_seq_1_when_everything_is_retained(
    settings: Settings,
) -> None:
    with anyio.fail_after(60):
        async with served(settings) as client:
            await post_messages(client, "whole", 100)
            pages = await api_pages(client, "whole", limit=50)
            empty = await client.get("/api/rooms/never-used/history?before=5", headers=AUTH)
    assert seqs_of(pages) == list(range(1, 101))
    assert [page["more"] for page in pages] == [True, False]  # not a third, empty page
    assert empty.json() == {
        "room": "never-used",
        "epoch": None,
        "before": 5,
        "more": False,
        "messages": [],
    }


async def ask_history(ws: TestWebSocket, **fields: Any) -> dict[str, Any]:
    """Send a ``history`` command; its answer (a ``history`` event or an ``error``)."""
    await ws.send_json({"type": "history", **fields})
    while True:
        event: dict[str, Any] = await ws.receive_json()
        if event["type"] in ("history", "error") and event.get("id") == fields.get("id"):
            return event


@pytest.mark.anyio
async def test_the_v2_history_command_pages_back_to_the_beginning_for_a_member_or_not(
    settings: Settings,
) -> None:
    with anyio.fail_after(60):
        async with served(settings) as client:
            await post_messages(client, "lobby", 120)
            async with client.connect("/ws?name=ann") as member, client.connect("/ws") as reader:
                await member.join("lobby")
                for ws in (member, reader):  # joining is not needed to read
                    seen: list[int] = []
                    page = await ask_history(ws, room="lobby", limit=50, id="newest")
                    assert (page["room"], page["before"]) == ("lobby", None)
                    while True:
                        seen[:0] = [message["seq"] for message in page["messages"]]
                        if not page["more"]:
                            break
                        before = page["messages"][0]["seq"]
                        page = await ask_history(
                            ws, room="lobby", before=before, limit=50, id=f"b{before}"
                        )
                        assert page["before"] == before
                    assert seen == list(range(1, 121))


@pytest.mark.anyio
async def test_history_of_a_room_not_granted_is_forbidden_and_pages_have_a_budget() -> None:
    with anyio.fail_after(30):
        async with served(SETTINGS) as client, client.connect("/ws") as ws:
            refused = await ask_history(ws, room="dm:ann:bob", id="dm")
            assert (refused["type"], refused["error"], refused["room"]) == (
                "error",
                "forbidden",
                "dm:ann:bob",
            )
            answers = [
                await ask_history(ws, room="lobby", id=str(n)) for n in range(3 * HISTORY_BURST)
            ]
    kinds = [answer.get("error", answer["type"]) for answer in answers]
    # the refused one counted too: pages asked for, answered or not, spend the budget
    assert kinds[: HISTORY_BURST - 1] == ["history"] * (HISTORY_BURST - 1)
    assert "rate_limited" in kinds


# -- the Python library: Room.history over a real server -----------------------------------------


@pytest.fixture(scope="module")
def chat_server() -> Iterator[ServerProcess]:
    env = {"ROOMCAST_RATE_LIMIT": "0", "ROOMCAST_HISTORY_SIZE": "1000", "ROOMCAST_API_KEY": KEY}
    with spawn_server(env=env) as server:
        yield server


@pytest.mark.anyio
async def test_the_librarys_room_history_pages_back_to_seq_1(chat_server: ServerProcess) -> None:
    url, room = f"ws://127.0.0.1:{chat_server.port}", f"lib-{uuid.uuid4().hex[:10]}"
    with anyio.fail_after(60):
        async with open_connection(url, name="writer") as writer:
            joined = await writer.join(room)
            for n in range(1, 131):
                await joined.send(f"t{n}")
        async with open_connection(url, name="reader") as reader:
            lobby = await reader.join(room)  # no since: nothing replayed, the past is paged
            pages = [await lobby.history()]
            while pages[-1].more:
                pages.append(await lobby.history(before=pages[-1].messages[0].seq, limit=60))
            newest_two = await lobby.history(limit=2)
            with pytest.raises(HistoryRefused) as refused:
                await lobby.history(before=0)
        async with open_room(url, room) as v1:
            with pytest.raises(HistoryRefused) as unsupported:
                await v1.history()
    assert [len(page.messages) for page in pages] == [50, 60, 20]
    assert [page.more for page in pages] == [True, True, False]
    messages = [message for page in reversed(pages) for message in page.messages]
    assert [m.seq for m in messages] == list(range(1, 131))
    assert [m.text for m in messages] == [f"t{n}" for n in range(1, 131)]
    assert all(isinstance(m, Message) and m.room == room and m.raw for m in messages)
    assert {page.epoch for page in pages} == {lobby.epoch}
    assert [m.seq for m in newest_two.messages] == [129, 130]
    assert (refused.value.code, unsupported.value.code) == ("bad_request", "unsupported")


# -- roomcast history --before ------------------------------------------------------------------


def roomcast_history(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "roomcast", "history", server.http_url(), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "ROOMCAST_API_KEY": KEY},
    )


def test_the_history_command_pages_back_with_before(chat_server: ServerProcess) -> None:
    room = f"cli-{uuid.uuid4().hex[:10]}"
    with httpx.Client(base_url=chat_server.http_url(), headers=AUTH, timeout=10) as http:
        for n in range(1, 121):
            http.post(f"/api/rooms/{room}/messages", json={"text": f"c{n}"}).raise_for_status()
    newest = roomcast_history(chat_server, "--room", room, "--before")
    middle = roomcast_history(chat_server, "--room", room, "--before", "71", "--limit", "60")
    oldest = roomcast_history(chat_server, "--room", room, "--before", "11")
    both = roomcast_history(chat_server, "--room", room, "--before", "5", "--since", "1")
    pages = []
    for result in (newest, middle, oldest):
        assert result.returncode == 0, result.stderr
        pages.append([json.loads(line)["seq"] for line in result.stdout.splitlines()])
    assert pages == [list(range(71, 121)), list(range(11, 71)), list(range(1, 11))]
    assert [r.stderr for r in (newest, middle, oldest)] == [
        "more: --before 71\n",
        "more: --before 11\n",
        "the beginning of the room's history\n",
    ]
    assert both.returncode == 2 and "not both" in both.stderr


# -- beyond the retained window: the archive ---------------------------------------------------


@pytest.mark.anyio
async def test_pages_reach_seq_1_through_the_archive_beyond_the_retained_window(
    tmp_path: Path,
) -> None:
    """A window of 10 and 300 messages: pages come from the window, then the archive
    (the oldest of them just written behind fan-out), nothing twice, nothing missing,
    ``more`` false at seq 1; the v2 command pages the same way after a restart."""
    archived = dataclasses.replace(
        SETTINGS, history_size=10, archive=f"sqlite:///{tmp_path / 'archive.db'}"
    )
    with anyio.fail_after(60):
        async with served(archived) as client:
            await post_messages(client, "deep", 300)
            pages = await api_pages(client, "deep", limit=40)
            # a page that ends exactly at the window's oldest message: more from the archive
            exact = await api_pages(client, "deep", limit=10)
        assert seqs_of(exact) == list(range(1, 301))
        assert seqs_of(pages) == list(range(1, 301))
        assert [page["more"] for page in pages] == [True] * 7 + [False]
        assert pages[-1]["messages"][0]["text"] == "m1"
        async with served(archived) as client, client.connect("/ws?name=ann") as ws:
            seqs, before = [], None
            while True:
                fields = {"room": "deep", "limit": 64, "id": f"p{len(seqs)}"}
                page = await ask_history(ws, **fields, **({"before": before} if before else {}))
                assert page["type"] == "history", page
                seqs = [m["seq"] for m in page["messages"]] + seqs
                if not page["more"]:
                    break
                before = page["messages"][0]["seq"]
        assert seqs == list(range(1, 301))
