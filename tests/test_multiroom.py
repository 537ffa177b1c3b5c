"""Protocol v2 (``/ws``): one connection in many rooms, on real Hypercorn (Trio and asyncio
workers) with trio-websocket clients. What one room's members see (order, exactly once,
presence) holds per room as in v1; problems with one room are ``error`` events with its
name, never a close; one outbox per connection, so a stalled client is evicted once."""

from __future__ import annotations

import dataclasses
import json
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.lowlevel
from trio_websocket import WebSocketConnection, open_websocket_url

from roomcast import Settings, create_app
from roomcast.identity import mint_token

from rawws import open_raw_websocket
from redis_server import RedisServer
from servers import ThreadedServer, serve_in_thread, spawn_server

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["trio"])]

SETTINGS = Settings(rate_limit=0, tokens=None, presence_grace=0, max_rooms_per_connection=8)


@pytest.fixture(params=["trio", "asyncio", "redis"])
def server(request: pytest.FixtureRequest) -> Iterator[ThreadedServer]:
    """The in-process broker on Hypercorn's Trio and asyncio workers, and Redis (Trio)."""
    settings, worker = SETTINGS, request.param
    if request.param == "redis":
        redis: RedisServer = request.getfixturevalue("redis_server")
        settings, worker = dataclasses.replace(SETTINGS, redis_url=redis.url), "trio"
    with serve_in_thread(create_app(settings), worker_class=worker) as server:
        yield server


class V2:
    """A ``/ws`` client that keeps every event it reads, by room."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []
        self.seqs: dict[str, list[int]] = defaultdict(list)

    async def send(self, **command: Any) -> None:
        await self.ws.send_message(json.dumps(command))

    async def next(self) -> dict[str, Any]:
        event: dict[str, Any] = json.loads(await self.ws.get_message())
        self.events.append(event)
        if event["type"] == "message":
            self.seqs[event["room"]].append(event["seq"])
        return event

    async def until(self, **match: Any) -> dict[str, Any]:
        """Read until an event with all of ``match``'s fields."""
        while True:
            event = await self.next()
            if all(event.get(key) == value for key, value in match.items()):
                return event

    async def join(self, room: str, **extra: Any) -> dict[str, Any]:
        """Join ``room``; its ``welcome`` (fails on an error about the room instead)."""
        await self.send(type="join", room=room, **extra)
        while True:
            event = await self.next()
            if event.get("room") == room and event["type"] in ("welcome", "error"):
                assert event["type"] == "welcome", event
                return event


@asynccontextmanager
async def connect(server: ThreadedServer, query: str = "") -> AsyncIterator[V2]:
    async with open_websocket_url(server.url(f"/ws{query}")) as ws:
        yield V2(ws)


async def test_one_connection_in_three_rooms_gets_each_rooms_messages_in_order(
    server: ThreadedServer,
) -> None:
    with trio.fail_after(20):
        async with connect(server, "?name=ann") as ann, connect(server, "?name=bo") as bo:
            for room in ("a", "b", "c"):
                welcome = await ann.join(room)
                assert (welcome["count"], welcome["members"]) == (1, ["ann"])
            await bo.join("b")
            for i in range(20):
                for room in ("a", "b", "c"):
                    await ann.send(type="message", room=room, text=f"{room}{i}", id=f"{room}{i}")
            while sum(len(seqs) for seqs in ann.seqs.values()) < 60:
                await ann.next()
            assert dict(ann.seqs) == {room: list(range(1, 21)) for room in "abc"}
            acks = [e for e in ann.events if e["type"] == "ack"]
            assert {a["room"] for a in acks} <= {"a", "b", "c"}
            while len(bo.seqs["b"]) < 20:
                await bo.next()
            assert dict(bo.seqs) == {"b": list(range(1, 21))}  # only the room it is in


async def test_a_message_sent_just_before_leaving_is_acked_before_the_left(
    server: ThreadedServer,
) -> None:
    """With Redis the message is sequenced after the receive loop has moved on to the
    leave: the ack must still come, and before ``left`` (it used to be dropped, the
    message sequenced all the same: a client resending what was not acked duplicated it)."""
    with trio.fail_after(20):
        async with connect(server, "?name=eve") as eve:
            for i in range(20):
                room = f"quick{i}"
                await eve.join(room)
                await eve.send(type="message", room=room, text="hi", id=f"m{i}")
                await eve.send(type="leave", room=room)
                events = []
                while not events or events[-1]["type"] != "left":
                    events.append(await eve.next())
                answers = [e for e in events if e["type"] in ("ack", "error")]
                assert answers == [{"type": "ack", "room": room, "id": f"m{i}", "seq": 1}], events


async def test_leaving_one_room_touches_no_other(server: ThreadedServer) -> None:
    with trio.fail_after(20):
        async with connect(server, "?name=cy") as cy, connect(server, "?name=di") as di:
            await cy.join("l1")
            await cy.join("l2")
            await di.join("l1")
            await di.join("l2")
            await cy.send(type="leave", room="l1")
            left = await cy.until(type="left")
            assert (left["room"], left["code"]) == ("l1", 1000)
            # (with Redis, cy's join notice can still be due: then one notice has both)
            notice = await di.until(type="system", room="l1", count=1)
            assert "cy" in notice["left"]
            await cy.send(type="message", room="l2", text="still here")
            message = await di.until(type="message", room="l2")
            assert message["from"] == "cy"
            await cy.send(type="message", room="l1", text="gone", id="x")
            error = await cy.until(type="error")
            assert (error["error"], error["room"], error["id"]) == ("not_member", "l1", "x")


async def test_problems_with_one_room_are_errors_not_closes(server: ThreadedServer) -> None:
    with trio.fail_after(20):
        async with connect(server, "?name=ed") as ed:
            await ed.join("e1")
            cases: list[tuple[dict[str, Any], str]] = [
                ({"type": "join", "room": "e1"}, "already_member"),
                ({"type": "join", "room": "bad room!"}, "bad_room"),
                ({"type": "join", "room": "dm:ann:bo"}, "forbidden"),
                ({"type": "leave", "room": "e9"}, "not_member"),
                ({"type": "typing", "room": "e9"}, "not_member"),
                ({"type": "jump", "room": "e1"}, "unknown_type"),
                ({"type": "join", "room": "e2", "since": -1}, "bad_request"),
                ({"type": "message", "room": "e1", "text": "x" * 4001}, "too_long"),
            ]
            for command, code in cases:
                await ed.send(**command)
                assert (await ed.until(type="error"))["error"] == code, command
            await ed.ws.send_message("plain text")
            assert (await ed.until(type="error"))["error"] == "unknown_type"
            await ed.ws.send_message(b"\x00")
            assert (await ed.until(type="error"))["error"] == "binary_unsupported"
            for i in range(2, 9):
                await ed.join(f"e{i}")
            await ed.send(type="join", room="e9")
            error = await ed.until(type="error")
            assert (error["error"], error["room"]) == ("too_many_rooms", "e9")
            await ed.send(type="message", room="e8", text="the connection is fine")
            assert (await ed.until(type="message"))["text"] == "the connection is fine"


async def test_resume_per_room(server: ThreadedServer) -> None:
    with trio.fail_after(20):
        async with connect(server, "?name=fe") as fe:
            welcome = await fe.join("r1")
            for i in range(5):
                await fe.send(type="message", room="r1", text=f"m{i}")
            while len(fe.seqs["r1"]) < 5:
                await fe.next()
        # (another name: with Redis, the first connection's may be held a moment longer)
        async with connect(server, "?name=fe2") as again:
            resumed = await again.join("r1", since=2, epoch=welcome["epoch"])
            assert resumed["seq"] == 5
            while len(again.seqs["r1"]) < 3:
                await again.next()
            assert again.seqs["r1"] == [3, 4, 5]
            await again.send(type="join", room="r2", since=7, epoch="other")
            gap = await again.until(type="error", room="r2")
            assert gap["error"] == "history_gap"


async def test_typing_goes_to_the_others_of_the_room_only(server: ThreadedServer) -> None:
    with trio.fail_after(20):
        async with (
            connect(server, "?name=gu") as gu,
            connect(server, "?name=ha") as ha,
            open_websocket_url(server.url("/ws/chat?room=t1&name=v1")) as v1,
        ):
            await gu.join("t1")
            await ha.join("t1")
            for _ in range(5):
                await gu.send(type="typing", room="t1")
            await gu.send(type="message", room="t1", text="done typing")
            await ha.until(type="message", room="t1")
            typing = [e for e in ha.events if e["type"] == "typing"]
            assert typing == [{"type": "typing", "room": "t1", "user": None, "name": "gu"}]
            assert not [e for e in gu.events if e["type"] == "typing"]
            while json.loads(await v1.get_message())["type"] != "message":
                pass  # a v1 member gets no typing events (its protocol has none)


# -- signed tokens: grants, direct messages, refresh -------------------------------------------

SECRET = "multiroom-secret-for-the-tests-only"
SIGNED = Settings(rate_limit=0, jwt_secret=SECRET, presence_grace=0)


@pytest.fixture(params=["memory", "redis"])
def signed_server(request: pytest.FixtureRequest) -> Iterator[ThreadedServer]:
    settings = SIGNED
    if request.param == "redis":
        redis: RedisServer = request.getfixturevalue("redis_server")
        settings = dataclasses.replace(SIGNED, redis_url=redis.url)
    with serve_in_thread(create_app(settings), worker_class="trio") as server:
        yield server


def token(sub: str, *, rooms: list[str] | None = None, ttl: float = 600) -> str:
    return mint_token(SECRET, sub=sub, ttl=ttl, rooms=rooms)


async def test_a_direct_room_is_for_its_two_users_only(signed_server: ThreadedServer) -> None:
    room = "dm:ann:bob"
    with trio.fail_after(20):
        async with (
            connect(signed_server, f"?token={token('ann')}") as ann,
            connect(signed_server, f"?token={token('bob', rooms=['lobby'])}") as bob,
            connect(signed_server, f"?token={token('cat')}") as cat,
        ):
            await ann.join(room)
            await bob.join(room)  # no grant needed: it is his
            await cat.send(type="join", room=room)
            refused = await cat.until(type="error")
            assert (refused["error"], refused["room"]) == ("forbidden", room)
            await cat.send(type="join", room="dm:bob:ann")  # not sorted: no such room
            assert (await cat.until(type="error"))["error"] == "bad_room"
            await ann.send(type="message", room=room, text="just us")
            message = await bob.until(type="message", room=room)
            assert (message["user"], message["text"]) == ("ann", "just us")


async def test_welcome_and_notices_list_the_people_with_their_user_ids(
    signed_server: ThreadedServer,
) -> None:
    """A member list gives user ids beside names (``people``), so that a client can open a
    direct room (``dm:A:B`` names ids) from it; ``members`` stays as v1 clients read it."""
    room = "people"
    with trio.fail_after(20):
        async with connect(signed_server, f"?token={token('ann')}") as ann:
            welcome = await ann.join(room)
            assert welcome["people"] == [{"user": "ann", "name": "ann"}]
            async with connect(signed_server, f"?token={token('bob')}") as bob:
                welcome = await bob.join(room)
                assert welcome["members"] == ["ann", "bob"]
                assert welcome["people"] == [
                    {"user": "ann", "name": "ann"},
                    {"user": "bob", "name": "bob"},
                ]
                notice = await ann.until(type="system", room=room)
                assert (notice["members"], notice["people"]) == (
                    welcome["members"],
                    welcome["people"],
                )


async def test_the_other_user_of_a_direct_room_hears_it_was_opened(
    signed_server: ThreadedServer,
) -> None:
    """ann opens a direct room while bob is not in it: bob's connections get a notice
    saying so (through the broker's notify: any worker, any server); bob joining it while
    ann is there tells ann nothing, nor does a resume."""
    room = "dm:ann:bob"
    opened = {"roomcast": "dm", "room": room, "user": "ann", "name": "ann"}
    with trio.fail_after(20):
        async with (
            connect(signed_server, f"?token={token('ann')}") as ann,
            connect(signed_server, f"?token={token('bob')}") as bob,
            connect(signed_server, f"?token={token('bob')}") as bob_tab,
        ):
            welcome = await ann.join(room)
            assert welcome["count"] == 1
            for connection in (bob, bob_tab):
                assert await connection.until(type="notice") == {"type": "notice", "data": opened}
            await bob.join(room)
            await bob.send(type="message", room=room, text="hi ann")
            await ann.until(type="message", text="hi ann")
            await ann.send(type="leave", room=room)
            await ann.until(type="left")
            await ann.join(room, since=welcome["seq"], epoch=welcome["epoch"])  # bob is there
            await ann.send(type="message", room=room, text="back")
            await bob.until(type="message", text="back")
            await bob.send(type="leave", room=room)
            await bob.until(type="left")
            await ann.send(type="leave", room=room)
            await ann.until(type="left")
            await ann.join(room, since=1, epoch=welcome["epoch"])  # a resume: nothing
            await ann.send(type="message", room=room, text="resumed")
            await ann.until(type="message", text="resumed")
            await bob.join("elsewhere")  # (its echo comes after any notice queued before it)
            await bob.send(type="message", room="elsewhere", text="flush")
            await bob.until(type="message", text="flush")
            assert [e for e in bob.events if e["type"] == "notice"] == [
                {"type": "notice", "data": opened}
            ]
            assert not [e for e in ann.events if e["type"] == "notice"]


async def test_anonymous_connections_cannot_enter_direct_rooms(server: ThreadedServer) -> None:
    with trio.fail_after(10):
        async with connect(server, "?name=ann") as anonymous:
            await anonymous.send(type="join", room="dm:ann:bob")
            assert (await anonymous.until(type="error"))["error"] == "forbidden"


async def test_a_refresh_that_drops_a_grant_leaves_only_that_room(
    signed_server: ThreadedServer,
) -> None:
    with trio.fail_after(20):
        granted = token("eve", rooms=["g1", "g2", "g3"])
        async with connect(signed_server, f"?token={granted}") as eve:
            for room in ("g1", "g2", "g3"):
                await eve.join(room)
            await eve.send(type="join", room="g4")
            assert (await eve.until(type="error"))["error"] == "forbidden"
            await eve.send(type="refresh", token=token("eve", rooms=["g1", "g3"]))
            left = await eve.until(type="left")
            assert (left["room"], left["code"]) == ("g2", 4403)
            for room in ("g1", "g3"):
                await eve.send(type="message", room=room, text=f"in {room}")
                assert (await eve.until(type="message"))["room"] == room
            await eve.send(type="message", room="g2", text="no")
            assert (await eve.until(type="error"))["error"] == "not_member"


# -- one outbox per connection: a stalled client in 50 rooms -----------------------------------


@pytest.mark.parametrize("broker", ["memory", "redis"])
async def test_a_stalled_client_in_50_rooms_is_evicted_once_and_the_rooms_go_on(
    broker: str, request: pytest.FixtureRequest
) -> None:
    # (an outbox that holds a burst of the talker's own 50 echoes, which Redis delivers at once)
    settings = Settings(rate_limit=0, tokens=None, presence_grace=0, outbox_size=256)
    if broker == "redis":
        redis: RedisServer = request.getfixturevalue("redis_server")
        settings = dataclasses.replace(settings, redis_url=redis.url)
    rooms = [f"s{i}" for i in range(50)]
    with serve_in_thread(create_app(settings), worker_class="trio") as server, trio.fail_after(60):
        stalled = await trio.to_thread.run_sync(
            lambda: open_raw_websocket(server.port, "/ws?name=stalled", receive_buffer=4096)
        )
        try:
            for room in rooms:
                stalled.send_text(json.dumps({"type": "join", "room": room}))
            async with connect(server, "?name=talker") as talker:
                for room in rooms:
                    await talker.join(room)
                leaves: dict[str, int] = defaultdict(int)
                everyone_left = trio.Event()
                echoes = [0]
                echoed = [trio.Event()]

                async def read() -> None:  # the talker reads all along: only the stalled one lags
                    while sum(leaves.values()) < len(rooms):
                        event = await talker.next()
                        if event["type"] == "system":  # (Redis may tell a late join with it)
                            leaves[event["room"]] += event["left"].count("stalled")
                        elif event["type"] == "message":
                            echoes[0] += 1
                            echoed[0].set()
                            echoed[0] = trio.Event()
                    everyone_left.set()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(read)
                    text = "x" * 3000
                    for sent in range(len(rooms), 61 * len(rooms), len(rooms)):
                        for room in rooms:
                            await talker.send(type="message", room=room, text=text)
                        if server.run_sync(lambda: stalled_gone(server)):
                            break
                        # one round in flight at most (its 50 echoes): the talker, which shares
                        # this process's cores with the server, keeps up with its own flood
                        while echoes[0] < sent - len(rooms):
                            await echoed[0].wait()
                    await everyone_left.wait()
                assert leaves == {room: 1 for room in rooms}
                assert server.run_sync(lambda: server.runtime.hub.stats.evictions) == 1
                await talker.send(type="message", room="s7", text="the room goes on")
                assert (await talker.until(type="message", text="the room goes on"))["room"] == "s7"
            code, _, _ = await trio.to_thread.run_sync(stalled.read_until_close)
            assert code == 4008
        finally:  # (a failure above must not leave the server a peer it cannot close)
            stalled.sock.close()


def stalled_gone(server: ThreadedServer) -> bool:
    return server.runtime.hub.stats.evictions > 0


# -- notices from the server API, typing that never costs anything -----------------------------


async def test_a_notice_reaches_every_v2_connection_of_its_user(
    signed_server_with_api: ThreadedServer,
) -> None:
    server = signed_server_with_api
    with trio.fail_after(20):
        async with (
            connect(server, f"?token={token('ivy')}") as tab1,
            connect(server, f"?token={token('ivy')}") as tab2,
            connect(server, f"?token={token('jo')}") as other,
        ):
            await tab1.join("n1")  # in a room or not, a connection of ivy's gets it
            answer = await trio.to_thread.run_sync(
                post, server, "/api/users/ivy/notify", {"data": {"mention": "#n1"}}
            )
            assert answer == {"delivered": 2}
            for tab in (tab1, tab2):
                notice = await tab.until(type="notice")
                assert notice == {"type": "notice", "data": {"mention": "#n1"}}
            await other.send(type="join", room="n2")
            await other.until(type="welcome")
            assert not [e for e in other.events if e["type"] == "notice"]


async def test_the_notice_key_of_roomcasts_own_notices_is_reserved(
    signed_server_with_api: ThreadedServer,
) -> None:
    """An application's notice may not pass for roomcast's own (a direct room opened):
    data with a ``roomcast`` member is refused; any other data goes through."""
    server = signed_server_with_api
    with trio.fail_after(20):
        with pytest.raises(urllib.error.HTTPError) as refused:
            body = {"data": {"roomcast": "dm", "room": "dm:ann:bob", "user": "ann"}}
            await trio.to_thread.run_sync(post, server, "/api/users/bob/notify", body)
        assert refused.value.code == 400
        for data in ({"kind": "dm"}, ["roomcast"], "roomcast"):
            answer = await trio.to_thread.run_sync(
                post, server, "/api/users/bob/notify", {"data": data}
            )
            assert answer == {"delivered": 0}


@pytest.fixture(params=["memory", "redis"])
def signed_server_with_api(request: pytest.FixtureRequest) -> Iterator[ThreadedServer]:
    settings = dataclasses.replace(SIGNED, api_key=API_KEY)
    if request.param == "redis":
        redis: RedisServer = request.getfixturevalue("redis_server")
        settings = dataclasses.replace(settings, redis_url=redis.url)
    with serve_in_thread(create_app(settings), worker_class="trio") as server:
        yield server


API_KEY = "api-key-for-the-tests"


def post(server: ThreadedServer, path: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        server.http_url(path),
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        answer: dict[str, Any] = json.loads(response.read())
        return answer


async def test_a_thousand_typing_events_into_100_slow_readers_evict_nobody() -> None:
    """Typing is dropped for a busy reader, never queued past half its outbox: 100 readers
    that never read, in a room where someone types 1,000 times, are not evicted for it.
    (A member's typing is relayed at most once a second, so the thousand are also relayed
    straight from the hub, as a thousand typists would have them.)"""
    settings = dataclasses.replace(SETTINGS, outbox_size=16)
    with serve_in_thread(create_app(settings), worker_class="trio") as server, trio.fail_after(60):
        readers = []
        for i in range(100):
            reader = await trio.to_thread.run_sync(
                lambda i=i: open_raw_websocket(server.port, f"/ws?name=r{i}", receive_buffer=4096)
            )
            reader.send_text(json.dumps({"type": "join", "room": "quiet"}))
            readers.append(reader)
        async with connect(server, "?name=typist") as typist:
            await typist.join("quiet")
            for _ in range(1000):
                await typist.send(type="typing", room="quiet")
            hub = server.runtime.hub

            def type_a_thousand_times() -> None:
                room = hub.rooms["quiet"]
                for _ in range(1000):
                    hub.relay_typing(room, '{"type":"typing","room":"quiet"}', origin="")

            server.run_sync(type_a_thousand_times)
            await typist.send(type="message", room="quiet", text="still here")
            await typist.until(type="message", text="still here")
            assert server.run_sync(lambda: hub.stats.evictions) == 0
            assert server.run_sync(lambda: len(hub.rooms["quiet"].members)) == 101
            queued = server.run_sync(
                lambda: max(m.client.queued for m in hub.rooms["quiet"].members)
            )
            assert queued <= settings.outbox_size // 2 + 1  # typing filled half, then stopped
        for reader in readers:
            reader.sock.close()


async def test_sigterm_closes_a_connection_in_many_rooms_once_with_1001() -> None:
    with trio.fail_after(60):
        await trio.to_thread.run_sync(_sigterm_closes_once)


def _sigterm_closes_once() -> None:
    with spawn_server(env={"ROOMCAST_RATE_LIMIT": "0"}) as server:
        ws = open_raw_websocket(server.port, "/ws?name=stays")
        for room in ("x1", "x2", "x3"):
            ws.send_text(json.dumps({"type": "join", "room": room}))
        welcomes = 0
        while welcomes < 3:
            welcomes += json.loads(ws.next_message())["type"] == "welcome"
        server.terminate()
        code, reason, messages = ws.read_until_close()
        assert (code, reason, messages) == (1001, "server shutting down", 0)
        ws.sock.settimeout(5)
        assert ws.sock.recv(65536) == b""  # one close, then the end of the connection
        assert server.process.wait(timeout=15) == 0


async def test_the_129th_join_is_refused_by_default() -> None:
    settings = dataclasses.replace(SETTINGS, max_rooms_per_connection=128)
    with serve_in_thread(create_app(settings), worker_class="trio") as server, trio.fail_after(30):
        async with connect(server, "?name=many") as many:
            for i in range(128):
                await many.send(type="join", room=f"m{i}")
            while sum(e["type"] == "welcome" for e in many.events) < 128:
                await many.next()
            await many.send(type="join", room="m128")
            refused = await many.until(type="error")
            assert (refused["error"], refused["room"]) == ("too_many_rooms", "m128")
            await many.send(type="leave", room="m0")
            await many.until(type="left")
            await many.join("m128")  # a place came free
