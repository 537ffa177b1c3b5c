"""The Redis broker under load, across two server processes on one redis-server (one on
Hypercorn's Trio worker, one on its asyncio worker): every member sees every message
exactly once and in order, also while one server is paused (SIGSTOP) and must catch up;
a server that stops answering or dies takes its members out of the room, each verified
user with its last connection."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack, ExitStack, contextmanager

import psutil
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from roomcast.brokers.redis import PRESENCE_TTL, TICK
from roomcast.identity import mint_token

from chatload import Client, connect_all, delivery_faults, read_forever, run_load, text_of
from redis_server import RedisServer
from servers import ServerProcess, spawn_server

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["trio"])]

PER_SENDER = 300
WINDOW = 8
#: the most a load may take before the test reports what each client is missing
LOAD_TIME = 30
#: seconds a server stays stopped
PAUSE = 3.0


@contextmanager
def two_servers_on(redis: RedisServer, **env: str) -> Iterator[list[ServerProcess]]:
    """Two ``python -m roomcast`` processes (one worker each) sharing ``redis``: one on
    Hypercorn's Trio worker, one on its asyncio worker."""
    env = {"ROOMCAST_REDIS_URL": redis.url, "ROOMCAST_RATE_LIMIT": "0", **env}
    with ExitStack() as stack:
        yield [
            stack.enter_context(
                spawn_server(["--workers", "1", "--worker-class", worker_class], env=env)
            )
            for worker_class in ("trio", "asyncio")
        ]


@pytest.fixture
def two_servers(redis_server: RedisServer) -> Iterator[list[ServerProcess]]:
    with two_servers_on(redis_server) as servers:
        yield servers


async def pause(
    server: ServerProcess,
    redis: RedisServer | None = None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Stop every process of ``server`` for :data:`PAUSE` seconds (started once they are
    stopped). With ``redis``, Redis also drops the stopped server's subscription at once,
    as it does when a subscriber falls too far behind: the server must then catch up from
    history."""
    group = os.getpgid(server.process.pid)
    os.killpg(group, signal.SIGSTOP)
    try:
        if redis is not None:
            assert redis.kill_subscribers(pids_of(server)) == 1
        task_status.started()
        await trio.sleep(PAUSE)  # the pause itself is what is being tested
    finally:
        os.killpg(group, signal.SIGCONT)


def spread(servers: list[ServerProcess], room: str, members: int) -> list[Client]:
    """``members`` clients alternating between the servers, every other pair batching."""
    return [
        Client(servers[i % 2].url(f"/ws/chat?room={room}&name=m{i}"), batch=(i // 2) % 2 == 1)
        for i in range(members)
    ]


def assert_exactly_once_in_order(clients: list[Client], senders: int) -> None:
    total = PER_SENDER * senders
    first = clients[0].welcome["seq"] + 1
    faults = {i: f for i, c in enumerate(clients) if (f := delivery_faults(c, first, total))}
    assert not faults, f"delivery faults per client: {faults}"
    reference = clients[0].messages
    assert all(c.messages == reference for c in clients), "members disagree on the order"
    for sender in range(senders):  # each sender's messages keep the order it sent them in
        own = [text for _, text in reference if text.startswith(f"s{sender}:")]
        assert own == [text_of(sender, n) for n in range(PER_SENDER)]


async def test_two_servers_deliver_exactly_once_in_order(
    two_servers: list[ServerProcess],
) -> None:
    clients = spread(two_servers, "stress", 24)
    senders = clients[:4]
    with trio.fail_after(LOAD_TIME + 10):
        async with AsyncExitStack() as stack:
            await connect_all(stack, clients)
            with trio.move_on_after(LOAD_TIME) as load:  # then say what is missing
                await run_load(clients, senders, per_sender=PER_SENDER, window=WINDOW)
    assert_exactly_once_in_order(clients, len(senders))
    assert not load.cancelled_caught
    for sender in senders:  # acks: one per message, in the order sent, seqs increasing
        assert [id for id, _ in sender.acks] == [str(n) for n in range(PER_SENDER)]
        seqs = [seq for _, seq in sender.acks]
        assert seqs == sorted(seqs)


def pids_of(server: ServerProcess) -> set[int]:
    """The server's processes: the one started and every worker below it."""
    root = psutil.Process(server.process.pid)
    return {root.pid} | {child.pid for child in root.children(recursive=True)}


@pytest.mark.parametrize(
    "backlog",
    ["kept", "dropped"],
    ids=["backlog-kept-by-redis", "subscriber-dropped-by-redis"],
)
async def test_a_paused_server_catches_up(redis_server: RedisServer, backlog: str) -> None:
    """Kept: the paused server works through its pub/sub backlog. Dropped: Redis cuts off
    the paused subscriber, so the server must re-read what it missed from history after
    it resubscribes."""
    history = str(PER_SENDER * 3)  # everything stays in history: nothing is lost
    drop = redis_server if backlog == "dropped" else None
    with two_servers_on(redis_server, ROOMCAST_HISTORY_SIZE=history) as servers:
        clients = spread(servers, "paused", 24)
        senders = clients[:3]  # two on the running server, one on the paused one
        with trio.fail_after(LOAD_TIME + 10):
            async with AsyncExitStack() as stack:
                await connect_all(stack, clients)
                subscription = redis_server.subscribers(pids_of(servers[1]))
                started = time.monotonic()
                with trio.move_on_after(LOAD_TIME) as load:
                    await run_load(
                        clients,
                        senders,
                        per_sender=PER_SENDER,
                        window=WINDOW,
                        during=lambda: pause(servers[1], drop),
                    )
                assert time.monotonic() - started >= PAUSE
                resubscribed = redis_server.subscribers(pids_of(servers[1])) != subscription
    assert_exactly_once_in_order(clients, len(senders))
    assert not load.cancelled_caught
    assert resubscribed == (backlog == "dropped")  # kept: the backlog alone caught it up


async def test_a_paused_server_without_the_history_says_history_gap(
    redis_server: RedisServer,
) -> None:
    """History too short for what the dropped subscriber missed: its members are told
    ``history_gap`` once, and what they do get is still in order and never twice."""
    with two_servers_on(redis_server, ROOMCAST_HISTORY_SIZE="20") as servers:
        clients = spread(servers, "gap", 8)
        sender = clients[0]
        on_paused = clients[1::2]
        with trio.fail_after(LOAD_TIME + 10):
            async with AsyncExitStack() as stack:
                await connect_all(stack, clients)
                async with trio.open_nursery() as nursery:
                    for client in clients:
                        nursery.start_soon(read_forever, client)
                    await nursery.start(pause, servers[1], redis_server)
                    await run_load([], [sender], per_sender=PER_SENDER, window=WINDOW)
                    last = sender.acks[-1][1]
                    for client in clients:
                        await client.wait_for(
                            lambda c=client: bool(c.messages) and c.messages[-1][0] == last  # type: ignore[misc]
                        )
                    nursery.cancel_scope.cancel()
    for client in on_paused:
        seqs = [seq for seq, _ in client.messages]
        assert seqs == sorted(set(seqs)), "duplicates or out of order"
        gaps = [e for e in client.errors if e["error"] == "history_gap"]
        assert len(gaps) == 1 and len(client.errors) == 1
        # everything before the gap and everything from its first retained seq arrived
        gap = gaps[0]
        assert set(range(seqs[0], gap["since"] + 1)) <= set(seqs)
        assert set(range(gap["first"], last + 1)) <= set(seqs)
    for client in clients[0::2]:
        assert not client.errors


def counted(client: Client, count: int) -> Callable[[], bool]:
    """Whether the last presence notice ``client`` got says ``count`` members."""
    return lambda: bool(client.notices) and client.notices[-1]["count"] == count


async def all_see(clients: list[Client], count: int) -> None:
    for client in clients:
        await client.wait_for(counted(client, count))


async def test_a_stopped_then_dead_server_takes_its_members_out_of_the_room(
    redis_server: RedisServer,
) -> None:
    """The other server's members see every member of a server that stops answering leave
    (named in the room's coalesced notices, the count going down) within PRESENCE_TTL +
    TICK seconds; when it is resumed they come back; when it is SIGKILLed they leave again,
    in the same time, and let go of their names: ``D0`` is refused while d0 is there, and
    welcome once the dead server's d0 has left."""
    with two_servers_on(redis_server) as (alive, doomed):
        stayers = [Client(alive.url(f"/ws/chat?room=p&name=a{i}"), batch=i == 1) for i in range(3)]
        goners = [Client(doomed.url(f"/ws/chat?room=p&name=d{i}"), batch=False) for i in range(5)]
        group = os.getpgid(doomed.process.pid)
        # the documented bound, plus a little for a busy machine's scheduling
        within = PRESENCE_TTL + TICK + 2
        with trio.fail_after(3 * within):
            async with AsyncExitStack() as stack:
                await connect_all(stack, stayers)
                async with trio.open_nursery() as nursery:
                    for client in stayers:
                        nursery.start_soon(read_forever, client)
                    async with AsyncExitStack() as doomed_stack:
                        await connect_all(doomed_stack, goners)
                        await all_see(stayers, 8)
                        assert await refused_name(alive.url("/ws/chat?room=p&name=D0")) == 4400
                        marks = [len(client.notices) for client in stayers]
                        os.killpg(group, signal.SIGSTOP)
                        try:
                            with trio.fail_after(within):
                                await all_see(stayers, 3)
                        finally:
                            os.killpg(group, signal.SIGCONT)
                        stopped = [len(client.notices) for client in stayers]
                        with trio.fail_after(within):  # refreshed, then added back
                            await all_see(stayers, 8)
                        resumed = [len(client.notices) for client in stayers]
                        os.killpg(group, signal.SIGKILL)
                        killed = time.monotonic()
                        with trio.fail_after(within):
                            await all_see(stayers, 3)
                        took = time.monotonic() - killed
                    nursery.cancel_scope.cancel()
                newcomer = Client(alive.url("/ws/chat?room=p&name=D0"), batch=False)
                await connect_all(stack, [newcomer])
    print(f"\nthe dead server's members left after {took:.1f} s")
    doomed_names = [f"d{i}" for i in range(5)]
    for n, client in enumerate(stayers):
        phases = [
            client.notices[marks[n] : stopped[n]],  # stopped
            client.notices[stopped[n] : resumed[n]],  # resumed
            client.notices[resumed[n] :],  # killed
        ]
        expected = [([], doomed_names, 3), (doomed_names, [], 8), ([], doomed_names, 3)]
        for phase, (came, went, count) in zip(phases, expected, strict=True):
            assert sorted(name for notice in phase for name in notice["joined"]) == came
            assert sorted(name for notice in phase for name in notice["left"]) == went
            assert phase[-1]["count"] == count
            assert sorted(phase[-1]["members"]) == sorted(["a0", "a1", "a2", *came])
            assert all(3 <= notice["count"] <= 8 for notice in phase)
    assert newcomer.welcome["count"] == 4
    assert sorted(newcomer.welcome["members"]) == ["D0", "a0", "a1", "a2"]


async def refused_name(url: str) -> int | None:
    """The close code of a connection to ``url`` that is refused, ``None`` if welcomed."""
    async with open_websocket_url(url) as ws:
        try:
            await ws.get_message()
        except ConnectionClosed as closed:
            return closed.reason.code
    return None


async def take_name(stack: AsyncExitStack, url: str, within: float) -> WebSocketConnection:
    """A connection to ``url`` once its name is free (refused 4400 until then), within
    ``within`` seconds (a deadline, not a cancel scope: the connection outlives this)."""
    deadline = trio.current_time() + within
    while True:
        assert trio.current_time() < deadline, "the name was not let go in time"
        ws = await stack.enter_async_context(open_websocket_url(url))
        try:
            await ws.get_message()  # welcome
        except ConnectionClosed as closed:
            assert closed.reason.code == 4400
            await trio.sleep(0.1)  # another process's presence lapsing: nothing to wait on
        else:
            return ws


async def test_a_name_taken_while_its_server_was_stopped_ends_its_member(
    redis_server: RedisServer,
) -> None:
    """Ann's server stops answering: once her presence lapses, her name is free and ANN
    takes it on the other server. When Ann's server comes back, she is the one refused,
    4400, as a joiner with that name would be; ANN keeps the name."""
    with two_servers_on(redis_server) as (alive, stopped):
        group = os.getpgid(stopped.process.pid)
        within = PRESENCE_TTL + TICK + 2
        with trio.fail_after(3 * within):
            async with open_websocket_url(stopped.url("/ws/chat?room=q&name=ann")) as ann:
                await ann.get_message()  # welcome
                os.killpg(group, signal.SIGSTOP)
                try:
                    async with AsyncExitStack() as stack:
                        lookalike = alive.url("/ws/chat?room=q&name=ANN")
                        taker = await take_name(stack, lookalike, within)
                        os.killpg(group, signal.SIGCONT)
                        with pytest.raises(ConnectionClosed) as ended:
                            while True:
                                await ann.get_message()
                        assert ended.value.reason.code == 4400
                        assert ended.value.reason.reason == "the name ann is taken in #q"
                        assert await refused_name(stopped.url("/ws/chat?room=q&name=Ann")) == 4400
                        await taker.send_message("still ANN")
                        while (event := json.loads(await taker.get_message()))["type"] != "message":
                            pass
                        assert event["from"] == "ANN"
                finally:
                    os.killpg(group, signal.SIGCONT)


async def all_connect(urls: list[str]) -> bool:
    """Whether connections to all of ``urls`` at once are welcomed (``False``: one was
    refused 4429, the per-user cap)."""
    async with AsyncExitStack() as stack:
        for url in urls:
            ws = await stack.enter_async_context(open_websocket_url(url))
            try:
                await ws.get_message()
            except ConnectionClosed as closed:
                assert closed.reason.code == 4429, closed.reason
                return False
    return True


async def test_a_dead_server_takes_out_the_users_whose_every_tab_it_held(
    redis_server: RedisServer,
) -> None:
    """Ann has a tab on each server, Zed two on the one that is SIGKILLed: within
    PRESENCE_TTL + TICK seconds Zed leaves, once, and Ann stays (one tab is alive). Zed's
    two connections were his whole per-user cap: the dead server's claims lapse with its
    presence, so he gets both back on the live one."""
    secret = "a-secret-of-at-least-thirty-two-bytes!"
    env = {"ROOMCAST_JWT_SECRET": secret, "ROOMCAST_MAX_CONNECTIONS_PER_USER": "2"}
    with two_servers_on(redis_server, **env) as (alive, doomed):

        def tab(server: ServerProcess, user: str) -> Client:
            token = mint_token(secret, sub=user, name=user.capitalize(), ttl=600)
            return Client(server.url(f"/ws/chat?room=k&token={token}"), batch=False)

        bob, ann = tab(alive, "bob"), tab(alive, "ann")
        doomed_tabs = [tab(doomed, user) for user in ("ann", "zed", "zed")]
        within = PRESENCE_TTL + TICK + 2
        with trio.fail_after(3 * within):
            async with AsyncExitStack() as stack:
                await connect_all(stack, [bob, ann])
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(read_forever, bob)
                    async with AsyncExitStack() as doomed_stack:
                        await connect_all(doomed_stack, doomed_tabs)
                        assert doomed_tabs[-1].welcome["count"] == 3
                        await all_see([bob], 3)
                        mark = len(bob.notices)
                        os.killpg(os.getpgid(doomed.process.pid), signal.SIGKILL)
                        with trio.fail_after(within):
                            await all_see([bob], 2)
                    zed = tab(alive, "zed").url
                    with trio.fail_after(TICK + 2):
                        while not await all_connect([zed, zed]):  # noqa: ASYNC110
                            await trio.sleep(0.05)  # the dead server's claims lapse on their own
                    nursery.cancel_scope.cancel()
    after = bob.notices[mark:]
    assert [name for notice in after for name in notice["left"]] == ["Zed"]
    assert sum(n["leaves"] for n in after) == 1 and not any(n["joins"] for n in after)
    assert sorted(after[-1]["members"]) == ["Ann", "Bob"]
