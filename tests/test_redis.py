"""The Redis broker against a real redis-server: two servers share rooms, resume works on
both brokers, a Redis outage in the middle of traffic is survived, Redis losing its data
starts a new run, a stalled Redis holds senders back (bounded queue) and then acks in
order, and the broker reaches Redis however the URL says (password, ACL user, socket)."""

from __future__ import annotations

import dataclasses
import json
import os
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, ExitStack, asynccontextmanager
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import quote, urlsplit

import anyio
import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from roomcast import Settings, create_app
from roomcast.brokers import Person, redis_scripts
from roomcast.brokers import redis as redis_broker
from roomcast.brokers.redis import (
    MEMBER_QUEUE,
    QUEUE_SIZE,
    Backlog,
    RedisBroker,
    _parse_entry,
    _people,
    _presence_entry,
)
from roomcast.client import HistoryGap
from roomcast.connection import RENAME_UNAVAILABLE
from roomcast.hub import Hub
from roomcast.identity import mint_token
from roomcast.names import skeleton
from roomcast.testing import open_test_client

from chatload import Client, connect_all, read_forever, send_all
from redis_server import RedisServer, redis_command, run_redis
from servers import ThreadedServer, serve_in_thread

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["trio"])]

SECRET = "a-secret-of-at-least-thirty-two-bytes!"
KEY = "s3cret-api-key"


@asynccontextmanager
async def chat(url: str) -> AsyncIterator[tuple[WebSocketConnection, dict[str, Any]]]:
    async with open_websocket_url(url) as ws:
        welcome = json.loads(await ws.get_message())
        assert welcome["type"] == "welcome"
        yield ws, welcome


async def next_of(ws: WebSocketConnection, kind: str) -> dict[str, Any]:
    while True:
        event: dict[str, Any] = json.loads(await ws.get_message())
        if event["type"] == kind:
            return event


async def test_a_presence_entry_carries_any_user_id_and_name() -> None:
    hub = Hub()
    odd = hub.join("r", "a:b|c", user="id:with\nnewline|and:colons")
    anonymous = hub.join("r", None)
    tab = hub.join("r", "a:b|c", user=odd.user)
    entries = [_presence_entry(member) for member in (odd, anonymous, tab)]
    assert not any("\n" in entry for entry in entries)
    assert _parse_entry(entries[0]) == (odd.id, Person(odd.user, "a:b|c"))
    assert _parse_entry(entries[1]) == (anonymous.id, Person(None, None))
    assert _people(entries) == [Person(odd.user, "a:b|c"), Person(None, None)]
    assert _parse_entry("n-1:old:style") == ("n-1", Person(None, "old:style"))  # before users
    assert _parse_entry('n-2:["u","Bo"]') == ("n-2", Person("u", "Bo"))  # before skeletons
    assert json.loads(entries[0].partition(":")[2])[2:] == list(skeleton("a:b|c"))


async def test_delivery_publishing_and_presence_each_live_in_a_module_of_their_own() -> None:
    """Issue 21 ("keep the house readable"): the Redis broker is a package whose parts each
    own one concern and say which in their docstring, none of them the 1,250-line module it
    was; everything roomcast and the tests import from ``roomcast.brokers.redis`` is still
    there. The request timeout is set in one place, :mod:`.calls`, which every part reads
    when it needs it (so a test that stretches it stretches it for all)."""
    from roomcast.brokers.redis import calls, control, delivery, joining, keys, presence, publishing

    exported = {"MEMBER_QUEUE", "PRESENCE_TTL", "QUEUE_SIZE", "TICK", "Backlog", "RedisBroker"}
    assert exported | {"open_redis_broker"} <= set(redis_broker.__all__)
    owners: list[tuple[ModuleType, list[Any]]] = [
        (keys, [keys._keys, _parse_entry, _people, _presence_entry, keys._seq_of]),
        (calls, [RedisBroker._call, RedisBroker._call_raw, RedisBroker._idle_args]),
        (control, [RedisBroker.disconnect, RedisBroker.notify, RedisBroker.claim_connection]),
        (delivery, [RedisBroker._subscribe_forever, RedisBroker._on_burst, RedisBroker._advance]),
        (delivery, [RedisBroker._catch_up, RedisBroker._tell_gaps, RedisBroker._let_go]),
        (presence, [RedisBroker.rename, RedisBroker._upkeep, RedisBroker._remove_presence]),
        (joining, [RedisBroker.join, RedisBroker.leave, RedisBroker._greet]),
        (publishing, [RedisBroker.publish, RedisBroker._publish_batch, RedisBroker.post, Backlog]),
    ]
    for module, parts in owners:
        assert {part.__module__ for part in parts} == {module.__name__}
        assert module.__doc__ and module.__file__ is not None
        source = await anyio.Path(module.__file__).read_text(encoding="utf-8")
        assert len(source.splitlines()) < 500
        assert module is calls or not hasattr(module, "REQUEST_TIMEOUT")
    assert not hasattr(redis_broker, "REQUEST_TIMEOUT")


@pytest.fixture
def two_servers(redis_server: RedisServer) -> Iterator[list[ThreadedServer]]:
    settings = Settings(redis_url=redis_server.url, rate_limit=0)
    with ExitStack() as stack:
        yield [
            stack.enter_context(serve_in_thread(create_app(settings), worker_class=kind))
            for kind in ("trio", "asyncio")
        ]


async def test_clients_on_two_servers_see_one_order_and_one_seq(
    two_servers: list[ThreadedServer],
) -> None:
    a, b = two_servers
    urls = [
        a.url("/ws/chat?room=shared&name=a1"),
        b.url("/ws/chat?room=shared&name=b1"),
        a.url("/ws/chat?room=shared&name=a2"),
        b.url("/ws/chat?room=shared&name=b2"),
    ]
    per_client = 25
    total = per_client * len(urls)
    with trio.fail_after(30):
        async with (
            chat(urls[0]) as (c0, _),
            chat(urls[1]) as (c1, _),
            chat(urls[2]) as (c2, _),
            chat(urls[3]) as (c3, w3),
        ):
            clients = [c0, c1, c2, c3]
            # presence crosses servers: the last to join sees everyone, on both servers
            assert sorted(w3["members"]) == ["a1", "a2", "b1", "b2"] and w3["count"] == 4
            seen: list[list[tuple[int, str]]] = [[] for _ in clients]

            async def read(i: int) -> None:
                while len(seen[i]) < total:
                    event = await next_of(clients[i], "message")
                    seen[i].append((event["seq"], event["text"]))

            async def talk(i: int) -> None:
                for n in range(per_client):
                    await clients[i].send_message(json.dumps({"text": f"{i}:{n}", "id": f"{n}"}))

            async with trio.open_nursery() as nursery:
                for i in range(len(clients)):
                    nursery.start_soon(read, i)
                    nursery.start_soon(talk, i)
    assert seen[0] == seen[1] == seen[2] == seen[3]
    assert [seq for seq, _ in seen[0]] == list(range(1, total + 1))
    for i in range(len(clients)):
        own = [t for _, t in seen[0] if t.startswith(f"{i}:")]
        assert own == [f"{i}:{n}" for n in range(per_client)]


async def test_presence_notices_cross_servers(two_servers: list[ThreadedServer]) -> None:
    a, b = two_servers
    with trio.fail_after(15):
        async with chat(a.url("/ws/chat?room=p&name=ann")) as (ann, _):
            async with chat(b.url("/ws/chat?room=p&name=bob")) as (_, welcome):
                assert welcome["count"] == 2
                assert welcome["limits"] == {"text": 4000}  # as from the in-process hub
                # (ann's own join reaches her server through Redis too, and can share a
                # notice with bob's: read until the notice that counts him)
                *_, joined = await notices_until(ann, lambda n: n["count"] == 2)
                assert (joined["event"], joined["joined"][-1], joined["user"]) == (
                    "join",
                    "bob",
                    None,
                )
                assert sorted(joined["members"]) == ["ann", "bob"]  # everyone's, from Redis
            left = await next_of(ann, "system")
            assert (left["event"], left["name"], left["count"]) == ("leave", "bob", 1)
            assert left["members"] == ["ann"]


async def test_a_reload_onto_the_other_server_is_welcomed_not_refused(
    two_servers: list[ThreadedServer],
) -> None:
    """A page in a room of its own reloads onto the other server: its leave empties the
    room in Redis (which forgets a room without history) while its new join is in flight.
    The joining worker then heard the old run's leave and got a new run's snapshot, and
    refused the join with 1011 (5 in 300 over the network); it now starts over."""
    a, b = two_servers
    with trio.fail_after(60):
        for i in range(300):
            async with chat(a.url(f"/ws/chat?room=reload{i}")):
                pass
            async with chat(b.url(f"/ws/chat?room=reload{i}")):  # (closed 1011: raises)
                pass


def as_user(server: ThreadedServer, room: str, user: str) -> str:
    """The chat URL of a connection of ``user`` (named after it, capitalised)."""
    token = mint_token(SECRET, sub=user, name=user.capitalize(), ttl=600)
    return server.url(f"/ws/chat?room={room}&token={token}")


async def notices_until(
    ws: WebSocketConnection, done: Callable[[dict[str, Any]], bool]
) -> list[dict[str, Any]]:
    """The presence notices ``ws`` reads until one for which ``done`` holds."""
    notices = [await next_of(ws, "system")]
    while not done(notices[-1]):
        notices.append(await next_of(ws, "system"))
    return notices


async def test_a_user_is_one_member_across_servers(redis_server: RedisServer) -> None:
    """Ann's tabs on two servers: the room sees her join once, counts her once, and sees
    her leave when her last tab goes, not her first; the API lists her once."""
    settings = Settings(redis_url=redis_server.url, rate_limit=0, jwt_secret=SECRET, api_key=KEY)
    with ExitStack() as stack:
        a, b = [
            stack.enter_context(serve_in_thread(create_app(settings), worker_class=kind))
            for kind in ("trio", "asyncio")
        ]
        with trio.fail_after(30):
            async with chat(as_user(a, "tabs", "bob")) as (bob, _):
                async with chat(as_user(a, "tabs", "ann")) as (_, first):
                    [joined] = await notices_until(bob, lambda n: n["count"] == 2)
                    assert (joined["event"], joined["user"], joined["joins"]) == ("join", "ann", 1)
                    async with chat(as_user(b, "tabs", "ann")) as (_, second):
                        assert (first["count"], second["count"]) == (2, 2)
                        assert sorted(second["members"]) == ["Ann", "Bob"]
                        async with httpx.AsyncClient(
                            headers={"authorization": f"Bearer {KEY}"}
                        ) as api:
                            presence = (
                                await api.get(b.http_url("/api/rooms/tabs/presence"))
                            ).json()
                            rooms = (await api.get(a.http_url("/api/rooms"))).json()["rooms"]
                        assert presence["count"] == 2
                        assert sorted(m["user"] for m in presence["members"]) == ["ann", "bob"]
                        assert {"name": "tabs", "count": 2} in rooms
                    # her tab on b has left Redis's presence: the tab on a is all she has there
                    zcard = ("ZCARD", "roomcast:{tabs}:presence")
                    while await trio.to_thread.run_sync(redis_server.command, *zcard) != 2:  # noqa: ASYNC110
                        await trio.sleep(0.01)  # another thread's server: nothing to wait on
                    async with chat(as_user(b, "tabs", "cy")) as (_, marker):
                        assert marker["count"] == 3
                        notices = await notices_until(bob, lambda n: "Cy" in n["joined"])
                        assert sum(n["joins"] for n in notices) == 1  # cy's, not ann's 2nd tab
                        assert sum(n["leaves"] for n in notices) == 0  # ann's 1st leaving tab
                        assert notices[-1]["count"] == 3
                    await notices_until(bob, lambda n: n["count"] == 2)
                [left] = await notices_until(bob, lambda n: n["count"] == 1)
                assert (left["event"], left["user"], left["left"]) == ("leave", "ann", ["Ann"])
                assert left["members"] == ["Bob"]


async def test_the_per_user_connection_cap_spans_servers(redis_server: RedisServer) -> None:
    """ROOMCAST_MAX_CONNECTIONS_PER_USER counts a user's connections on every server: with a
    cap of 3, two on one server and one on the other leave no room for a fourth anywhere,
    and a slot freed on one server can be taken on the other."""
    settings = Settings(
        redis_url=redis_server.url, rate_limit=0, jwt_secret=SECRET, max_connections_per_user=3
    )
    with ExitStack() as stack:
        a, b = [
            stack.enter_context(serve_in_thread(create_app(settings), worker_class=kind))
            for kind in ("trio", "asyncio")
        ]
        with trio.fail_after(30):
            async with AsyncExitStack() as tabs:
                for server, room in ((a, "one"), (a, "two"), (b, "three")):
                    await tabs.enter_async_context(chat(as_user(server, room, "ann")))
                for server in (a, b):
                    async with open_websocket_url(as_user(server, "four", "ann")) as fourth:
                        with pytest.raises(ConnectionClosed) as refused:
                            await fourth.get_message()
                    assert refused.value.reason.code == 4429
                async with chat(as_user(b, "four", "bob")):  # ann's slots are hers alone
                    pass
            # all three of ann's are closed: her slots come back (on either server)
            zcard = ("ZCARD", "roomcast:user:ann:connections")
            while await trio.to_thread.run_sync(redis_server.command, *zcard) != 0:  # noqa: ASYNC110
                await trio.sleep(0.01)  # another thread's server: nothing to wait on
            async with AsyncExitStack() as tabs:
                for server in (b, b, a):
                    await tabs.enter_async_context(chat(as_user(server, "again", "ann")))


async def test_a_burst_of_server_api_disconnects_starves_neither_them_nor_the_chat(
    redis_server: RedisServer,
) -> None:
    """Each disconnect waits for the workers' reports on a pooled connection (BLPOP): 300
    at once took all 64, the reports they waited for had none left, every one waited out
    its timeout (503), and a chat message meanwhile was refused ``unavailable``."""
    settings = Settings(redis_url=redis_server.url, rate_limit=0, api_key=KEY)
    auth = {"authorization": f"Bearer {KEY}"}
    statuses: list[int] = []
    with anyio.fail_after(30):
        async with (
            open_test_client(settings=settings) as client,
            client.connect("/ws/chat?room=r&name=ann") as ann,
        ):
            await ann.receive_event()

            async def disconnect(n: int) -> None:
                response = await client.post(f"/api/users/u{n}/disconnect", headers=auth)
                statuses.append(response.status_code)

            async with anyio.create_task_group() as tg:
                for n in range(300):
                    tg.start_soon(disconnect, n)
                await anyio.wait_all_tasks_blocked()
                ack = await ann.send_message("still here")  # raises if refused
                assert ack.seq == 1
    assert statuses == [200] * 300


async def test_a_crowd_over_two_servers_is_announced_in_few_notices(
    redis_server: RedisServer,
) -> None:
    """Joins and leaves from both workers are coalesced by each worker; every member
    converges on the room's count and names, and the one that stays sees the room empty."""
    settings = Settings(redis_url=redis_server.url, rate_limit=0, presence_interval=0.2)
    crowd = 120
    with ExitStack() as stack:
        servers = [
            stack.enter_context(serve_in_thread(create_app(settings), worker_class=kind))
            for kind in ("trio", "asyncio")
        ]
        notices = 0
        with trio.fail_after(60):
            async with chat(servers[0].url("/ws/chat?room=crowd&name=stays")) as (stays, _):
                async with AsyncExitStack() as joined:
                    for n in range(crowd):
                        url = servers[n % 2].url(f"/ws/chat?room=crowd&name=c{n}")
                        await joined.enter_async_context(chat(url))
                    seen = await next_of(stays, "system")
                    notices += 1
                    while seen["count"] != crowd + 1:
                        seen = await next_of(stays, "system")
                        notices += 1
                    assert len(seen["members"]) == 100  # the first 100 names Redis has
                while seen["count"] != 1:
                    seen = await next_of(stays, "system")
                    notices += 1
                assert seen["members"] == ["stays"]
        assert notices < crowd // 2  # one per change would be 240


async def test_history_has_a_byte_budget_on_both_brokers(broker_settings: Settings) -> None:
    budget = 40_000  # five messages of 8 KB (2,000 emoji), in memory and in Redis's UTF-8
    settings = dataclasses.replace(broker_settings, history_bytes=budget, max_text=4000)
    with serve_in_thread(create_app(settings)) as server, trio.fail_after(20):
        url = server.url("/ws/chat?room=bytes")
        async with chat(url) as (talker, welcome):
            for n in range(8):
                await talker.send_message(f"{n}" + "\U0001f600" * 2000)
            for _ in range(8):
                await next_of(talker, "message")
            async with chat(url + f"&since=0&epoch={welcome['epoch']}") as (back, _):
                gap = json.loads(await back.get_message())
                assert (gap["type"], gap["error"]) == ("error", "history_gap")
                kept = [await next_of(back, "message") for _ in range(8 - gap["first"] + 1)]
        assert [e["seq"] for e in kept] == list(range(gap["first"], 9))
        assert 1 <= len(kept) <= budget // 8_000


@pytest.fixture(params=["memory", "redis"])
def broker_settings(request: pytest.FixtureRequest) -> Iterator[Settings]:
    if request.param == "memory":
        yield Settings(rate_limit=0, history_size=10)
    else:
        redis: RedisServer = request.getfixturevalue("redis_server")
        yield Settings(rate_limit=0, history_size=10, redis_url=redis.url)


async def test_delete_forgets_the_retained_messages_wherever_they_are_read(
    broker_settings: Settings,
) -> None:
    """``DELETE /api/rooms/{room}/messages``: another server's history and a resume there
    no longer have them (with Redis it answered 200 and deleted nothing); a room someone is
    in keeps its epoch and seq; an idle one is forgotten."""
    settings = dataclasses.replace(broker_settings, api_key=KEY)
    auth = {"authorization": f"Bearer {KEY}"}
    with anyio.fail_after(20):
        async with (
            open_test_client(settings=settings) as a,
            open_test_client(settings=settings) as other,
        ):
            b = other if settings.redis_url is not None else a  # in-process: one server
            async with b.connect("/ws/chat?room=del&name=bo") as bo:
                welcome = await bo.receive_event()
                for text in ("one", "two", "three"):
                    await a.post("/api/rooms/del/messages", json={"text": text}, headers=auth)
                deleted = await a.delete("/api/rooms/del/messages", headers=auth)
                assert deleted.json() == {"room": "del", "epoch": welcome.epoch, "seq": 3}
                history = (await b.get("/api/rooms/del/history?since=0", headers=auth)).json()
                assert (history["epoch"], history["seq"], history["messages"]) == (
                    welcome.epoch,
                    3,
                    [],
                )
                query = f"room=del&since=0&epoch={welcome.epoch}"
                async with b.connect(f"/ws/chat?{query}") as resumed:
                    await resumed.receive_event()  # its welcome
                    gap = await resumed.receive_event()
                    assert isinstance(gap, HistoryGap) and not gap.restarted
                    assert (gap.since, gap.first) == (0, 4)
            async with a.connect("/ws/chat?room=idle") as ws:
                await ws.receive_event()
                await ws.send_message("kept while idle")
            await a.post("/api/rooms/idle/messages", json={"text": "x"}, headers=auth)
            deleted = await a.delete("/api/rooms/idle/messages", headers=auth)
            assert deleted.json()["seq"] == 2
            history = (await b.get("/api/rooms/idle/history?since=0", headers=auth)).json()
            assert (history["messages"], history["seq"]) == ([], 0)  # forgotten, as any empty room


def _redis_port(settings: Settings) -> int | None:
    return None if settings.redis_url is None else urlsplit(settings.redis_url).port


async def emptied(server: ThreadedServer, settings: Settings, room: str) -> None:
    """Wait until the room's last member has left through the broker (another thread's
    server finishes the leave after the close handshake)."""

    def empty() -> bool:
        if (port := _redis_port(settings)) is not None:
            return redis_command(port, "EXISTS", f"roomcast:{{{room}}}:presence") == 0
        found = server.runtime.hub.rooms.get(room)
        return found is None or not found.members

    while not await trio.to_thread.run_sync(empty):  # noqa: ASYNC110
        await trio.sleep(0.01)  # another thread's server: nothing to wait on


def retained(server: ThreadedServer, settings: Settings) -> tuple[dict[str, int], int]:
    """The history bytes each room retains (rooms with none left out) and what the broker
    counts for its idle rooms, as the broker holds them: Redis's keys, or the hub."""
    if (port := _redis_port(settings)) is None:
        hub = server.runtime.hub
        held = {name: room.history.bytes for name, room in hub.rooms.items() if room.history}
        return held, hub.idle_bytes
    held = {}
    keys = redis_command(port, "KEYS", "roomcast:{*}:history")
    assert isinstance(keys, list)
    for key in keys:
        entries = redis_command(port, "LRANGE", key.decode(), "0", "-1")
        assert isinstance(entries, list)
        counted = redis_command(port, "GET", key.decode() + "-bytes")
        assert isinstance(counted, bytes)
        held[key.decode().partition("{")[2].rpartition("}")[0]] = int(counted)
        assert int(counted) == sum(len(entry) for entry in entries)
    idle = redis_command(port, "GET", redis_scripts.IDLE_BYTES)
    return held, int(idle or 0) if isinstance(idle, bytes) or idle is None else -1


async def post_and_leave(server: ThreadedServer, settings: Settings, room: str, text: str) -> str:
    """Join ``room``, post ``text``, leave; the room's epoch."""
    async with chat(server.url(f"/ws/chat?room={room}")) as (ws, welcome):
        await ws.send_message(text)
        await next_of(ws, "message")
    await emptied(server, settings, room)
    epoch: str = welcome["epoch"]
    return epoch


async def test_only_the_most_recently_emptied_rooms_keep_history(
    broker_settings: Settings,
) -> None:
    """``ROOMCAST_IDLE_ROOMS`` on both brokers: of five rooms emptied one after another,
    the last three keep their history; resuming into a forgotten one is a gap into a new
    run."""
    settings = dataclasses.replace(broker_settings, idle_rooms=3)
    with serve_in_thread(create_app(settings)) as server, trio.fail_after(20):
        rooms = [f"idle{n}" for n in range(5)]
        epochs = [await post_and_leave(server, settings, room, f"in {room}") for room in rooms]
        assert sorted(retained(server, settings)[0]) == rooms[2:]
        for room, epoch in zip(rooms[:2], epochs, strict=False):
            async with chat(server.url(f"/ws/chat?room={room}&since=1&epoch={epoch}")) as (
                back,
                welcome,
            ):
                assert welcome["epoch"] != epoch and welcome["seq"] == 0
                gap = json.loads(await back.get_message())
                assert (gap["error"], gap["epoch"], gap["first"]) == (
                    "history_gap",
                    welcome["epoch"],
                    1,
                )  # (it leaves no history: the room is forgotten again at once)
        for room, epoch in zip(rooms[2:], epochs[2:], strict=True):
            async with chat(server.url(f"/ws/chat?room={room}&since=0&epoch={epoch}")) as (
                back,
                welcome,
            ):
                assert (welcome["epoch"], welcome["seq"]) == (epoch, 1)
                assert (await next_of(back, "message"))["text"] == f"in {room}"


async def test_idle_rooms_retain_at_most_the_idle_byte_budget(broker_settings: Settings) -> None:
    """``ROOMCAST_IDLE_HISTORY_BYTES`` on both brokers: what the rooms without members hold
    together stays within it (counted, and in fact), least recently emptied dropped first."""
    budget = 6_000  # a few rooms of one 1,000-character message each
    settings = dataclasses.replace(broker_settings, idle_history_bytes=budget)
    with serve_in_thread(create_app(settings)) as server, trio.fail_after(20):
        rooms = [f"bytes{n}" for n in range(8)]
        for room in rooms:
            await post_and_leave(server, settings, room, room + "x" * 1_000)
            held, counted = retained(server, settings)
            assert sum(held.values()) == counted <= budget
        kept = sorted(held)
        assert 2 <= len(kept) < len(rooms) and kept == rooms[len(rooms) - len(kept) :]


async def test_one_client_cannot_make_the_broker_retain_more_than_the_budget(
    broker_settings: Settings,
) -> None:
    """An anonymous client posting the longest messages into room after room: the rooms it
    leaves behind hold at most the idle byte budget, on Redis as in memory (keys and
    bytes counted where they are held)."""
    budget = 100_000
    settings = dataclasses.replace(
        broker_settings, idle_history_bytes=budget, max_text=4000, history_size=100
    )
    longest = "\U0001f600" * 4000  # 16 KB of UTF-8
    with serve_in_thread(create_app(settings)) as server, trio.fail_after(30):
        for n in range(20):
            room = f"spam{n}"
            async with chat(server.url(f"/ws/chat?room={room}")) as (ws, _):
                for _ in range(3):
                    await ws.send_message(longest)
                for _ in range(3):
                    await next_of(ws, "message")
            await emptied(server, settings, room)
        held, counted = retained(server, settings)
        assert sum(held.values()) == counted <= budget
        if (port := _redis_port(settings)) is not None:
            keys = redis_command(port, "KEYS", "roomcast:{*")
            assert isinstance(keys, list)
            assert {key.decode().partition("{")[2].rpartition("}")[0] for key in keys} == set(held)
            assert redis_command(port, "ZCARD", redis_scripts.IDLE) == len(held)


async def test_a_forgotten_room_starts_a_new_run_on_every_worker(redis_server: RedisServer) -> None:
    """A room forgotten while idle and joined again on two servers (one of which had a
    member there before): both follow the new run from seq 1."""
    settings = Settings(redis_url=redis_server.url, rate_limit=0, idle_rooms=1)
    with ExitStack() as stack, trio.fail_after(20):
        a, b = (stack.enter_context(serve_in_thread(create_app(settings))) for _ in range(2))
        epoch = await post_and_leave(a, settings, "again", "first run")
        await post_and_leave(b, settings, "other", "evicts again")
        assert sorted(retained(a, settings)[0]) == ["other"]
        url = "/ws/chat?room=again"
        async with chat(a.url(url + f"&since=1&epoch={epoch}")) as (back, welcome):
            assert welcome["epoch"] != epoch
            assert json.loads(await back.get_message())["error"] == "history_gap"
            async with chat(b.url(url)) as (there, _):
                await back.send_message("second run")
                for ws in (back, there):
                    message = await next_of(ws, "message")
                    assert (message["seq"], message["text"]) == (1, "second run")


async def test_resume_receives_exactly_the_missed_messages(broker_settings: Settings) -> None:
    with serve_in_thread(create_app(broker_settings)) as server, trio.fail_after(20):
        url = server.url("/ws/chat?room=resume")
        async with chat(url + "&name=stayer") as (stayer, _):
            async with chat(url + "&name=leaver") as (leaver, welcome):
                await leaver.send_message("before")
                last = (await next_of(leaver, "message"))["seq"]
                epoch = welcome["epoch"]
            for n in range(5):
                await stayer.send_message(f"missed {n}")
            for _ in range(5):
                await next_of(stayer, "message")
            async with chat(url + f"&name=leaver&since={last}&epoch={epoch}") as (back, again):
                assert again["epoch"] == epoch and again["seq"] == last + 5
                await stayer.send_message("live")
                replayed = [await next_of(back, "message") for _ in range(6)]
        assert [e["text"] for e in replayed] == [f"missed {n}" for n in range(5)] + ["live"]
        assert [e["seq"] for e in replayed] == list(range(last + 1, last + 7))


async def test_resume_past_the_history_is_a_gap(broker_settings: Settings) -> None:
    with serve_in_thread(create_app(broker_settings)) as server, trio.fail_after(20):
        url = server.url("/ws/chat?room=gap")
        async with chat(url) as (talker, welcome):
            for n in range(15):  # history keeps 10
                await talker.send_message(f"m{n}")
            for _ in range(15):
                await next_of(talker, "message")
            async with chat(url + f"&since=2&epoch={welcome['epoch']}") as (back, _):
                gap = json.loads(await back.get_message())
                assert (gap["type"], gap["error"], gap["first"]) == ("error", "history_gap", 6)
                assert [(await next_of(back, "message"))["seq"] for _ in range(10)] == list(
                    range(6, 16)
                )


def health(server: ThreadedServer) -> int:
    try:
        with urllib.request.urlopen(server.http_url("/healthz"), timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


async def test_redis_outage_mid_traffic(redis_server: RedisServer) -> None:
    settings = Settings(redis_url=redis_server.url, rate_limit=0, history_size=1000)
    with serve_in_thread(create_app(settings)) as server, trio.fail_after(60):
        url = server.url("/ws/chat?room=outage")
        async with chat(url + "&name=talker") as (talker, welcome), chat(url) as (listener, _):
            acked: list[int] = []
            for n in range(20):
                await talker.send_message(json.dumps({"text": f"before {n}", "id": f"b{n}"}))
                acked.append((await next_of(talker, "ack"))["seq"])
            assert await trio.to_thread.run_sync(health, server) == 200

            redis_server.kill()
            await talker.send_message(json.dumps({"text": "while down", "id": "d"}))
            error = await next_of(talker, "error")
            assert error["error"] == "unavailable"  # told, not silently dropped
            while await trio.to_thread.run_sync(health, server) != 503:  # noqa: ASYNC110
                await trio.sleep(0.1)  # another thread's server: nothing to wait on but HTTP

            redis_server.start()  # same port, same append-only file
            while await trio.to_thread.run_sync(health, server) != 200:  # noqa: ASYNC110
                await trio.sleep(0.1)
            after = None
            while after is None:  # the subscription comes back by itself
                await talker.send_message(json.dumps({"text": "after", "id": "a"}))
                event = json.loads(await talker.get_message())
                while event["type"] not in ("ack", "error"):
                    event = json.loads(await talker.get_message())
                if event["type"] == "ack":
                    after = event["seq"]
                else:
                    await trio.sleep(0.2)
            assert after > acked[-1]
            listened = []
            while not listened or listened[-1]["text"] != "after":
                event = json.loads(await listener.get_message())
                if event["type"] in ("message", "error"):
                    listened.append(event)
        got = [e["seq"] for e in listened if e["type"] == "message"]
        gaps = [e for e in listened if e["type"] == "error"]
        missing = [seq for seq in acked if seq not in got]
        assert not missing or gaps, "a member missed acked messages without being told"

        # every message acked before the outage is in history after it
        async with chat(url + f"&since=0&epoch={welcome['epoch']}") as (late, again):
            assert again["epoch"] == welcome["epoch"]
            replay = [await next_of(late, "message") for _ in range(again["seq"])]
        texts = {e["seq"]: e["text"] for e in replay}
        assert all(texts[seq] == f"before {n}" for n, seq in enumerate(acked))


async def send_until_acked(ws: WebSocketConnection, text: str) -> int:
    """Send ``text`` until the broker acknowledges it (it answers ``unavailable`` while it
    reconnects); returns its seq."""
    while True:
        await ws.send_message(json.dumps({"text": text, "id": text}))
        event = json.loads(await ws.get_message())
        while event["type"] not in ("ack", "error") or event.get("id") != text:
            event = json.loads(await ws.get_message())
        if event["type"] == "ack":
            seq: int = event["seq"]
            return seq
        await trio.sleep(0.2)  # another thread's server reconnecting: nothing to wait on


async def test_redis_losing_its_data_starts_a_new_run(redis_server: RedisServer) -> None:
    """Redis restarts empty (no persistence): members are told ``history_gap`` with the
    new epoch, then receive the new run from seq 1; a client resuming with the old epoch
    is told too."""
    settings = Settings(redis_url=redis_server.url, rate_limit=0)
    with serve_in_thread(create_app(settings)) as server, trio.fail_after(60):
        url = server.url("/ws/chat?room=reset")
        async with chat(url + "&name=talker") as (talker, welcome), chat(url) as (listener, _):
            for n in range(3):
                assert await send_until_acked(talker, f"old {n}") == n + 1
            assert [(await next_of(listener, "message"))["seq"] for _ in range(3)] == [1, 2, 3]

            redis_server.kill()
            redis_server.forget()
            redis_server.start()
            while await trio.to_thread.run_sync(health, server) != 200:  # noqa: ASYNC110
                await trio.sleep(0.1)
            after = await send_until_acked(talker, "new")

            gap = json.loads(await listener.get_message())
            while gap["type"] == "system":
                gap = json.loads(await listener.get_message())
            assert gap["error"] == "history_gap" and gap["epoch"] != welcome["epoch"]
            assert (gap["since"], gap["first"]) == (3, 1)
            new = [await next_of(listener, "message") for _ in range(after)]
            assert [e["seq"] for e in new] == list(range(1, after + 1))
            assert new[-1]["text"] == "new"

        resume = f"&since=3&epoch={welcome['epoch']}"
        async with chat(url + resume) as (back, again):
            assert again["epoch"] == gap["epoch"] and again["seq"] == after
            told = json.loads(await back.get_message())
            assert (told["error"], told["epoch"]) == ("history_gap", gap["epoch"])
            assert (await next_of(back, "message"))["seq"] == 1


async def test_a_stalled_redis_holds_senders_back_then_acks_in_order(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While Redis does not answer, flooding senders fill their worker's bounded queue (a
    single one only its own share of it) and then wait, their frames left in their
    sockets; when Redis answers again every message is acknowledged, in the order each
    sender sent them, and the room's seqs are each given once."""
    monkeypatch.setattr(redis_broker.calls, "REQUEST_TIMEOUT", 30.0)  # slow, not unavailable
    settings = Settings(redis_url=redis_server.url, rate_limit=0, outbox_size=8192)
    senders = QUEUE_SIZE // MEMBER_QUEUE + 2  # more than the queue holds
    per_sender = MEMBER_QUEUE + 1  # one more than a sender's share
    with serve_in_thread(create_app(settings)) as server, trio.fail_after(60):
        broker = server.runtime.broker
        assert isinstance(broker, RedisBroker)

        async def backlog_once(check: Callable[[Backlog], bool]) -> Backlog:
            while True:  # another thread's server: poll it
                backlog = await trio.to_thread.run_sync(server.run_sync, lambda: broker.backlog)
                if check(backlog):
                    return backlog
                await trio.sleep(0.01)

        url = server.url("/ws/chat?room=slow")
        clients = [Client(url + f"&name=f{n}", batch=n % 2 == 0) for n in range(senders)]
        async with AsyncExitStack() as stack:
            await connect_all(stack, clients)
            redis_server.pause()
            try:
                async with trio.open_nursery() as nursery:
                    for client in clients:
                        nursery.start_soon(read_forever, client)
                    nursery.start_soon(send_all, clients[0], 0, per_sender, per_sender)
                    alone = await backlog_once(lambda backlog: backlog.waiting == 1)
                    assert alone.queued <= MEMBER_QUEUE  # one sender: only its share
                    for n, client in enumerate(clients[1:], 1):
                        nursery.start_soon(send_all, client, n, per_sender, per_sender)
                    full = await backlog_once(lambda backlog: backlog.waiting == senders)
                    assert full.queued == QUEUE_SIZE  # full, not growing
                    assert not any(client.acks for client in clients)
                    redis_server.resume()
                    for client in clients:
                        await client.wait_for(lambda c=client: len(c.acks) == per_sender)  # type: ignore[misc]
                    nursery.cancel_scope.cancel()
            finally:
                redis_server.resume()
    for client in clients:
        assert [id for id, _ in client.acks] == [f"{n}" for n in range(per_sender)]
        assert not client.errors
    seqs = sorted(seq for client in clients for _, seq in client.acks)
    assert seqs == list(range(1, senders * per_sender + 1))


@pytest.mark.parametrize("access", ["password", "acl-user", "unix-socket"])
async def test_the_broker_reaches_redis_the_way_the_url_says(
    tmp_path: os.PathLike[str], access: str
) -> None:
    """Commands (coredis) and the subscriber (roomcast's own connection) both follow the
    URL: a password, an ACL user, a Unix socket."""
    directory = Path(tmp_path) / "redis"
    socket_path = directory / "redis.sock"
    extra = {
        "password": ["--requirepass", "s3cret"],
        "acl-user": [
            *("--user", "default", "off"),
            *("--user", "chat", "on", ">pw", "~*", "&*", "+@all"),
        ],
        "unix-socket": ["--unixsocket", str(socket_path), "--unixsocketperm", "700"],
    }[access]
    with run_redis(directory, extra) as redis:
        url = {
            "password": f"redis://:s3cret@127.0.0.1:{redis.port}/0",
            "acl-user": f"redis://chat:pw@127.0.0.1:{redis.port}/0",
            "unix-socket": f"unix://{socket_path}?db=0",
        }[access]
        settings = Settings(redis_url=url, rate_limit=0)
        with serve_in_thread(create_app(settings)) as server, trio.fail_after(15):
            room = server.url("/ws/chat?room=url")
            async with chat(room + "&name=a") as (a, _), chat(room + "&name=b") as (b, _):
                await a.send_message("through the subscriber")
                assert (await next_of(b, "message"))["text"] == "through the subscriber"
                assert await trio.to_thread.run_sync(health, server) == 200


# -- names are claimed room-wide (roomcast.names) -------------------------------------------


async def refused(url: str) -> tuple[int, str]:
    """The close code and reason of a connection to ``url`` that is refused."""
    async with open_websocket_url(url) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            await ws.get_message()
    return closed.value.reason.code, closed.value.reason.reason or ""


async def names_let_go(redis: RedisServer, room: str) -> None:
    """Wait until no name is held in ``room`` (another thread's server leaves)."""
    hlen = ("HLEN", f"roomcast:{{{room}}}:names")
    while await trio.to_thread.run_sync(redis.command, *hlen) != 0:  # noqa: ASYNC110
        await trio.sleep(0.01)  # another thread's server: nothing to wait on


async def test_a_name_is_held_in_the_whole_room_across_servers(
    two_servers: list[ThreadedServer], redis_server: RedisServer
) -> None:
    """Anonymous alice on one server: ``ALICE`` and a Cyrillic ``\u0430lice`` are refused
    4400 on the other; once alice has left, ``ALICE`` may come in there."""
    a, b = two_servers
    with trio.fail_after(15):
        async with chat(a.url("/ws/chat?room=n&name=alice")):
            for lookalike in ("ALICE", "\u0430lice"):
                code, reason = await refused(b.url(f"/ws/chat?room=n&name={quote(lookalike)}"))
                assert (code, reason) == (4400, f"the name {lookalike} is taken in #n")
            async with chat(b.url("/ws/chat?room=n&name=bob")) as (_, welcome):
                assert sorted(welcome["members"]) == ["alice", "bob"]
        await names_let_go(redis_server, "n")  # (bob's too)
        async with chat(b.url("/ws/chat?room=n&name=ALICE")) as (_, welcome):
            assert welcome["members"] == ["ALICE"]


@pytest.fixture
def two_signed_servers(redis_server: RedisServer) -> Iterator[list[ThreadedServer]]:
    settings = Settings(redis_url=redis_server.url, rate_limit=0, jwt_secret=SECRET)
    with ExitStack() as stack:
        yield [
            stack.enter_context(serve_in_thread(create_app(settings), worker_class=kind))
            for kind in ("trio", "asyncio")
        ]


def named(server: ThreadedServer, room: str, user: str, name: str) -> str:
    """The chat URL of a connection of ``user`` named ``name``."""
    token = mint_token(SECRET, sub=user, name=name, ttl=600)
    return server.url(f"/ws/chat?room={room}&token={token}")


async def test_a_users_tabs_on_two_servers_share_its_name(
    two_signed_servers: list[ThreadedServer],
) -> None:
    """Ann's name is hers on every server: another user calling itself ``ANN`` is refused
    on the server where she has no tab, and her own second tab there is welcome."""
    a, b = two_signed_servers
    with trio.fail_after(15):
        async with chat(named(a, "t", "ann", "Ann")):
            code, reason = await refused(named(b, "t", "eve", "ANN"))
            assert (code, reason) == (4400, "the name ANN is taken in #t")
            async with chat(named(b, "t", "ann", "Ann")) as (_, welcome):
                assert (welcome["members"], welcome["count"]) == (["Ann"], 1)


async def refresh(ws: WebSocketConnection, user: str, name: str) -> dict[str, Any]:
    """Refresh ``ws``'s token for a new ``name``, then send a message: the refusal, or the
    message as the room sees it (refreshes and messages are handled in order)."""
    token = mint_token(SECRET, sub=user, name=name, ttl=600)
    await ws.send_message(json.dumps({"type": "refresh", "token": token}))
    await ws.send_message(json.dumps({"text": f"as {name}"}))
    event: dict[str, Any] = json.loads(await ws.get_message())
    while event["type"] not in ("error", "message") or event.get("text", f"as {name}") != (
        f"as {name}"
    ):
        event = json.loads(await ws.get_message())
    return event


async def test_a_rename_is_claimed_in_the_whole_room(
    two_signed_servers: list[ThreadedServer], redis_server: RedisServer
) -> None:
    """Bob (on b) cannot take Ann's name (on a) by refreshing his token: ``bad_token``,
    and he keeps his. Renamed to Rob, his old name is free everywhere and the new one
    his: Redis's presence lists him as Rob, and ``ROB`` is refused on a."""
    a, b = two_signed_servers
    with trio.fail_after(15):
        async with chat(named(a, "r", "ann", "Ann")), chat(named(b, "r", "bob", "Bob")) as (bob, _):
            refused_rename = await refresh(bob, "bob", "ANN")
            assert (refused_rename["error"], refused_rename["message"]) == (
                "bad_token",
                "the name ANN is taken in #r",
            )
            kept = await refresh(bob, "bob", "Bob")  # (the same name: nothing to claim)
            assert kept["from"] == "Bob"
            renamed = await refresh(bob, "bob", "Rob")
            assert (renamed["type"], renamed["from"]) == ("message", "Rob")
            async with chat(named(a, "r", "cy", "BOB")) as (_, welcome):
                assert sorted(welcome["members"]) == ["Ann", "BOB", "Rob"]
            code, reason = await refused(named(a, "r", "dee", "ROB"))
            assert (code, reason) == (4400, "the name ROB is taken in #r")


async def test_a_rename_without_redis_is_a_bad_token(redis_server: RedisServer) -> None:
    settings = Settings(redis_url=redis_server.url, rate_limit=0, jwt_secret=SECRET)
    with serve_in_thread(create_app(settings)) as server, trio.fail_after(20):
        async with chat(named(server, "d", "ann", "Ann")) as (ann, _):
            redis_server.kill()
            event = await refresh(ann, "ann", "Anna")
            assert (event["type"], event["error"]) == ("error", "bad_token")
            assert event["message"] == RENAME_UNAVAILABLE
            redis_server.start()
            while (event := await refresh(ann, "ann", "Ann"))["type"] != "message":  # noqa: ASYNC110
                await trio.sleep(0.2)  # another thread's server reconnecting
            assert event["from"] == "Ann"  # the name it kept


async def test_a_tab_reloaded_onto_another_server_is_not_announced(
    two_servers: list[ThreadedServer],
) -> None:
    """Alice's tab on one server reloads and comes back on the other (a load balancer's
    choice): the watcher's worker hears her leave and her join through Redis and announces
    neither; her leave for good is announced once the grace is over."""
    from test_presence import reload_and_leave

    a, b = two_servers
    grace = Settings().presence_grace
    with trio.fail_after(30):
        await reload_and_leave(
            lambda name, n: (a, b)[n % 2].url(f"/ws/chat?room=reload&name={name}"), grace
        )
