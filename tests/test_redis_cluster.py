"""Cluster mode (``ROOMCAST_REDIS_URL=redis+cluster://...``, issue 25) on a local 3-master
Redis Cluster: the exactly-once stress of :mod:`test_redis_stress` across two servers,
rooms spread over every master (each message crossing one shard), and the control
channel's disconnect reaching every worker."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack, ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from redis_cluster import ClusterNode, RedisCluster, run_cluster
from roomcast.brokers.redis.cluster import slot_of
from test_redis_stress import LOAD_TIME, PER_SENDER, WINDOW, assert_exactly_once_in_order

from chatload import Client, connect_all, delivery_faults, read_forever, run_load
from servers import ServerProcess, spawn_server

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["trio"])]


@contextmanager
def two_servers_on_cluster(cluster: RedisCluster, **env: str) -> Iterator[list[ServerProcess]]:
    """Two ``python -m roomcast`` processes (Trio and asyncio workers) on the cluster."""
    env = {"ROOMCAST_REDIS_URL": cluster.url, "ROOMCAST_RATE_LIMIT": "0", **env}
    with ExitStack() as stack:
        yield [
            stack.enter_context(
                spawn_server(["--workers", "1", "--worker-class", worker_class], env=env)
            )
            for worker_class in ("trio", "asyncio")
        ]


async def test_the_local_cluster_has_three_masters_sharing_every_slot(
    redis_cluster: RedisCluster,
) -> None:
    masters = redis_cluster.masters()
    assert len(masters) == 3
    assert all(node.info("cluster")["cluster_state"] == "ok" for node in masters)
    assert all(node.info("cluster")["cluster_slots_assigned"] == "16384" for node in masters)


async def test_two_servers_on_a_cluster_deliver_exactly_once_in_order(
    redis_cluster: RedisCluster,
) -> None:
    with two_servers_on_cluster(redis_cluster) as servers:
        clients = [
            Client(servers[i % 2].url(f"/ws/chat?room=stress&name=m{i}"), batch=(i // 2) % 2 == 1)
            for i in range(24)
        ]
        senders = clients[:4]
        with trio.fail_after(LOAD_TIME + 10):
            async with AsyncExitStack() as stack:
                await connect_all(stack, clients)
                with trio.move_on_after(LOAD_TIME) as load:
                    await run_load(clients, senders, per_sender=PER_SENDER, window=WINDOW)
    assert_exactly_once_in_order(clients, len(senders))
    assert not load.cancelled_caught
    for sender in senders:
        assert [id for id, _ in sender.acks] == [str(n) for n in range(PER_SENDER)]


async def test_rooms_spread_over_every_master_and_each_message_crosses_one_shard(
    redis_cluster: RedisCluster,
) -> None:
    """30 rooms, a member on each server in each, one message each: every master holds
    some rooms' keys (whole rooms), and each room's events (two joins, one message) are
    published once, with SPUBLISH, by the master that holds the room: every master
    publishes some, none publishes a classic PUBLISH (which every node would carry)."""
    rooms = [f"r{n}" for n in range(30)]
    masters = redis_cluster.masters()
    with two_servers_on_cluster(redis_cluster) as servers:
        before = [(node.published(), node.published("publish")) for node in masters]
        with trio.fail_after(LOAD_TIME + 10):
            for room in rooms:
                pair = [
                    Client(server.url(f"/ws/chat?room={room}&name={room}-{i}"), batch=False)
                    for i, server in enumerate(servers)
                ]
                async with AsyncExitStack() as stack:
                    await connect_all(stack, pair)
                    await run_load(pair, pair[:1], per_sender=1, window=1)
        after = [(node.published(), node.published("publish")) for node in masters]
    per_master = [
        {key.partition("{")[2].partition("}")[0] for key in node.keys("roomcast:{*}:seq")}
        for node in masters
    ]
    assert all(per_master), f"a master holds no room: {per_master}"
    assert sorted(room for held in per_master for room in held) == sorted(rooms)
    sharded = [spublished - was for (spublished, _), (was, _) in zip(after, before, strict=True)]
    classic = [published - was for (_, published), (_, was) in zip(after, before, strict=True)]
    print(f"\nrooms per master {[len(held) for held in per_master]}, SPUBLISH per master {sharded}")
    assert all(sharded) and not any(classic)
    # two joins and a message per room; its leaves may or may not have run yet
    assert 3 * len(rooms) <= sum(sharded) <= 5 * len(rooms)


async def test_disconnect_reaches_every_worker_of_a_cluster(
    redis_cluster: RedisCluster,
) -> None:
    """The server API's disconnect goes out on the sharded control channel: both servers
    close the user's connections and both report back; a DELETE of a room's messages
    on one is seen on the other."""
    from roomcast.identity import mint_token

    secret = "a-secret-of-at-least-thirty-two-bytes!"
    env = {"ROOMCAST_JWT_SECRET": secret, "ROOMCAST_API_KEY": "k" * 32}
    with two_servers_on_cluster(redis_cluster, **env) as servers:
        token = mint_token(secret, sub="ann", name="Ann", ttl=600)
        tabs = [
            Client(server.url(f"/ws/chat?room=d&token={token}"), batch=False) for server in servers
        ]
        with trio.fail_after(LOAD_TIME):
            async with AsyncExitStack() as stack:
                await connect_all(stack, tabs)
                async with httpx.AsyncClient() as http:
                    answer = await http.post(
                        servers[0].url("/api/users/ann/disconnect"),
                        headers={"Authorization": "Bearer " + "k" * 32},
                    )
                    assert answer.status_code == 200, answer.text
                    assert answer.json()["closed"] == 2
                    await forget_on_one_and_check_on_the_other(http, servers, "k" * 32)


async def forget_on_one_and_check_on_the_other(
    http: httpx.AsyncClient, servers: list[ServerProcess], key: str
) -> None:
    """The server API's DELETE of a room's messages, on a cluster: gone for every server."""
    auth = {"Authorization": f"Bearer {key}"}
    for text in ("one", "two"):
        posted = await http.post(
            servers[0].http_url("/api/rooms/kept/messages"), json={"text": text}, headers=auth
        )
        assert posted.status_code == 200, posted.text
    deleted = await http.delete(servers[1].http_url("/api/rooms/kept/messages"), headers=auth)
    assert (deleted.status_code, deleted.json()["seq"]) == (200, 2)
    history = await http.get(servers[0].http_url("/api/rooms/kept/history?since=0"), headers=auth)
    assert history.json()["messages"] == []


def room_on(cluster: RedisCluster, owner: ClusterNode, prefix: str) -> str:
    """A room name whose slot ``owner`` serves."""
    for n in range(10_000):
        if cluster.owner_of(slot_of("{" + f"{prefix}{n}" + "}")) is owner:
            return f"{prefix}{n}"
    raise LookupError("no such room name")


def assert_no_silent_gap(client: Client, last: int) -> None:
    """What ``client`` received is in order and never twice, and every seq it did not
    receive (between its welcome and ``last``) falls in a ``history_gap`` it was told."""
    seqs = [seq for seq, _ in client.messages]
    assert seqs == sorted(set(seqs)), "duplicates or out of order"
    gaps = [e for e in client.errors if e["error"] == "history_gap"]
    assert len(gaps) == len(client.errors), client.errors[:3]
    told = {seq for gap in gaps for seq in range(gap["since"] + 1, gap["first"])}
    missing = set(range(client.welcome["seq"] + 1, last + 1)) - set(seqs)
    assert missing <= told, f"{len(missing - told)} seqs missing without a history_gap"


async def test_a_slot_migrated_during_traffic_costs_its_room_no_duplicate_and_no_silent_gap(
    redis_cluster: RedisCluster,
) -> None:
    """A room's slot is resharded to another master (IMPORTING/MIGRATING, MIGRATE of its
    keys, SETSLOT NODE) while members on two servers send and count: each member gets
    every message once and in order (a ``history_gap`` allowed, silence not), and a room
    on the third master sees nothing at all."""
    source, target, third = redis_cluster.masters()
    moving, still = room_on(redis_cluster, source, "mv"), room_on(redis_cluster, third, "st")
    with two_servers_on_cluster(redis_cluster, ROOMCAST_HISTORY_SIZE="2000") as servers:
        movers = [
            Client(servers[i % 2].url(f"/ws/chat?room={moving}&name=m{i}"), batch=i % 4 > 1)
            for i in range(8)
        ]
        stayers = [
            Client(servers[i % 2].url(f"/ws/chat?room={still}&name=s{i}"), batch=i % 4 > 1)
            for i in range(4)
        ]
        moved: list[int] = []

        async def reshard() -> None:
            await movers[0].wait_for(lambda: len(movers[0].acks) >= PER_SENDER // 3)
            slot = slot_of("{" + moving + "}")
            moved.append(await trio.to_thread.run_sync(redis_cluster.migrate, slot, target))

        with trio.fail_after(LOAD_TIME + 10):
            async with AsyncExitStack() as stack:
                await connect_all(stack, movers + stayers)
                with trio.move_on_after(LOAD_TIME) as load:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(
                            partial(
                                run_load, stayers, stayers[:2], per_sender=PER_SENDER, window=WINDOW
                            )
                        )
                        await run_load(
                            movers,
                            movers[:2],
                            per_sender=PER_SENDER,
                            window=WINDOW,
                            during=reshard,
                        )
    assert moved and moved[0] > 0, "the room's keys did not move"
    assert redis_cluster.owner_of(slot_of("{" + moving + "}")) is target
    assert target.keys(f"roomcast:{{{moving}}}:*")
    assert not load.cancelled_caught, {
        i: delivery_faults(c, c.welcome["seq"] + 1, 2 * PER_SENDER) for i, c in enumerate(movers)
    }
    last = max(seq for sender in movers[:2] for _, seq in sender.acks)
    gaps = sum(len(client.errors) for client in movers)
    print(f"\n{moved[0]} keys moved at seq ~{PER_SENDER // 3}, last seq {last}, gaps {gaps}")
    for client in movers:
        assert_no_silent_gap(client, last)
    assert_exactly_once_in_order(stayers, 2)


@dataclass(eq=False)
class Timeline(Client):
    """A member that also keeps every event it received in order (messages and errors
    interleaved), so a test can check each message against the gaps announced before it."""

    events: list[dict[str, Any]] = field(default_factory=list)

    def record(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        super().record(event)


def silent_faults(client: Timeline) -> list[str]:
    """Where ``client``'s stream broke without a word: each message must be the seq right
    after the previous one of its run, unless a ``history_gap`` just moved it on (to
    ``first`` in the gap's epoch, which may be a new run)."""
    epoch, last = client.welcome["epoch"], client.welcome["seq"]
    faults = []
    for event in client.events:
        if event["type"] == "error" and event["error"] == "history_gap":
            if event["epoch"] == epoch and event["first"] <= last:
                faults.append(f"gap back to {event['first']} after {last}")
            epoch, last = event["epoch"], event["first"] - 1
        elif event["type"] == "message":
            if event["seq"] != last + 1:
                faults.append(f"{event['seq']} after {last} in {epoch}")
            last = event["seq"]
    return faults


def answered(client: Client, id: str) -> bool:
    """Whether ``client``'s last ack or error answers its message ``id``."""
    return any(a == id for a, _ in client.acks[-1:]) or any(
        e.get("id") == id for e in client.errors[-1:]
    )


async def send_through(client: Client, n: int, prefix: str) -> None:
    """Send message ``n`` (text ``<prefix>:<n>``), again under a new id while the server
    refuses it ``unavailable``, until it is acknowledged."""
    assert client.ws is not None
    for attempt in itertools.count():
        id = f"{n}.{attempt}"
        await client.ws.send_message(json.dumps({"text": f"{prefix}:{n}", "id": id}))
        await client.wait_for(partial(answered, client, id))
        if client.acks and client.acks[-1][0] == id:
            return
        await trio.sleep(0.1)  # the client's own backoff while the cluster fails over


async def received(members: list[Timeline], text: str) -> None:
    for member in members:
        await member.wait_for(lambda m=member: bool(m.messages) and m.messages[-1][1] == text)  # type: ignore[misc]


async def test_a_master_killed_mid_traffic_its_rooms_resume_and_the_others_see_no_gap(
    tmp_path: Path,
) -> None:
    """3 masters with a replica each; a room's master is killed (SIGKILL) while members
    on two servers send and count. Its room resumes once the replica has taken over (its
    members told ``history_gap`` for what the cluster lost, never silence, never a seq
    twice), and a room on another master, busy throughout, sees no gap at all."""
    with run_cluster(tmp_path, masters=3, replicas=1) as cluster:
        doomed, healthy, _ = cluster.masters()
        killed, still = room_on(cluster, doomed, "k"), room_on(cluster, healthy, "h")
        with two_servers_on_cluster(cluster, ROOMCAST_HISTORY_SIZE="2000") as servers:
            members, stayers = (
                [
                    Timeline(servers[i % 2].url(f"/ws/chat?room={room}&name=m{i}"), batch=i % 4 > 1)
                    for i in range(6)
                ]
                for room in (killed, still)
            )
            count, sent, outage = 120, 0, 0.0
            done = trio.Event()

            async def kill_mid_traffic() -> None:
                await members[0].wait_for(lambda: len(members[0].acks) >= count // 4)
                doomed.kill()

            async def talk_in_the_healthy_room() -> None:
                nonlocal sent
                while not done.is_set():
                    await send_through(stayers[0], sent, "h")
                    sent += 1
                    await trio.sleep(0.01)  # a steady conversation, not a flood

            with trio.fail_after(LOAD_TIME + 30):
                async with AsyncExitStack() as stack:
                    everyone: list[Client] = [*members, *stayers]
                    await connect_all(stack, everyone)
                    async with trio.open_nursery() as nursery:
                        for member in members + stayers:
                            nursery.start_soon(read_forever, member)
                        nursery.start_soon(kill_mid_traffic)
                        nursery.start_soon(talk_in_the_healthy_room)
                        for n in range(count):
                            started = trio.current_time()
                            await send_through(members[0], n, "k")
                            outage = max(outage, trio.current_time() - started)
                        await received(members, f"k:{count - 1}")
                        done.set()
                        await received(stayers, f"h:{sent - 1}")
                        nursery.cancel_scope.cancel()
    assert doomed.process is None
    faults = {i: f for i, member in enumerate(members) if (f := silent_faults(member))}
    assert not faults, f"silent gaps or repeats per member: {faults}"
    gaps = sum(len(member.errors) for member in members[1:])
    print(
        f"\nkilled room: resumed within {outage:.1f} s, history_gaps {gaps}; healthy room: {sent}"
    )
    for stayer in stayers:
        assert not stayer.errors and not silent_faults(stayer)
        assert [text for _, text in stayer.messages] == [f"h:{n}" for n in range(sent)]


def rooms_kept(cluster: RedisCluster) -> set[str]:
    """The rooms whose keys some master holds."""
    return {
        key.partition("{")[2].partition("}")[0]
        for node in cluster.masters()
        for key in node.keys("roomcast:{*}:seq")
    }


def history_bytes(cluster: RedisCluster, rooms: set[str]) -> int:
    """The history bytes ``rooms`` hold together (each room's own count)."""
    held = 0
    for node in cluster.masters():
        for room in rooms:
            size = node.command("GET", f"roomcast:{{{room}}}:history-bytes")
            held += int(size) if isinstance(size, bytes) else 0
    return held


def left(cluster: RedisCluster, room: str) -> bool:
    """Whether ``room``'s last member's leave is in (its presence is gone: it is idle)."""
    return not any(node.keys(f"roomcast:{{{room}}}:presence") for node in cluster.masters())


async def until(condition: Callable[[], bool]) -> None:
    """Poll another process's state (a cluster's keys) until ``condition`` holds."""
    while True:
        if condition():
            return
        await trio.sleep(0.05)


@pytest.mark.parametrize("budget", ["rooms", "bytes"])
async def test_idle_budgets_hold_across_the_cluster(
    redis_cluster: RedisCluster, budget: str
) -> None:
    """Ten rooms spread over every master are each left with history, one after the
    other: the sweep forgets the least recently emptied until the idle rooms are at most
    3 (or hold at most 1000 bytes of history), wherever they live; a room with a member
    in it is never forgotten."""
    rooms = [f"idle{n}" for n in range(10)]
    assert len({redis_cluster.owner_of(slot_of("{" + room + "}")) for room in rooms}) == 3
    env = (
        {"ROOMCAST_IDLE_ROOMS": "3"}
        if budget == "rooms"
        else {"ROOMCAST_IDLE_HISTORY_BYTES": "1000"}
    )

    def within() -> bool:
        idle = rooms_kept(redis_cluster) - {"occupied"}
        return len(idle) <= 3 if budget == "rooms" else history_bytes(redis_cluster, idle) <= 1000

    with two_servers_on_cluster(redis_cluster, **env) as servers:
        with trio.fail_after(LOAD_TIME):
            async with AsyncExitStack() as stay:
                occupant = Client(servers[0].url("/ws/chat?room=occupied&name=o"), batch=False)
                await connect_all(stay, [occupant])
                await run_load([occupant], [occupant], per_sender=1, window=1, pad=300)
                for n, room in enumerate(rooms):
                    async with AsyncExitStack() as stack:
                        member = Client(servers[n % 2].url(f"/ws/chat?room={room}&name=m"), False)
                        await connect_all(stack, [member])
                        await run_load([member], [member], per_sender=1, window=1, pad=300)
                    await until(partial(left, redis_cluster, room))
                await until(within)
                kept = rooms_kept(redis_cluster)
    idle = sorted(kept - {"occupied"}, key=rooms.index)
    print(f"\nidle rooms kept: {idle}")
    assert "occupied" in kept
    assert idle and idle == rooms[-len(idle) :], "not the most recently emptied rooms"
    if budget == "rooms":
        assert len(idle) == 3


async def test_seqs_a_failover_lost_are_never_reused_silently(
    redis_cluster: RedisCluster,
) -> None:
    """What a failover to a replica that had not copied the last writes leaves behind,
    made deterministic: the room's master forgets its last 3 messages (counter and
    history rewound, as on the replica) and drops every subscriber. The members had those
    messages, and the next ones would take the same seqs: the workers find the counter
    behind what they delivered, end the run, and every member is told ``history_gap``
    with a new epoch before the next message, which every member then gets."""
    with two_servers_on_cluster(redis_cluster) as servers:
        room = "rewound"
        members = [
            Timeline(servers[i % 2].url(f"/ws/chat?room={room}&name=m{i}"), batch=i % 4 > 1)
            for i in range(4)
        ]
        master = redis_cluster.owner_of(slot_of("{" + room + "}"))
        with trio.fail_after(LOAD_TIME):
            async with AsyncExitStack() as stack:
                everyone: list[Client] = [*members]
                await connect_all(stack, everyone)
                async with trio.open_nursery() as nursery:
                    for member in members:
                        nursery.start_soon(read_forever, member)
                    for n in range(10):
                        await send_through(members[0], n, "k")
                    await received(members, "k:9")
                    last = members[0].acks[-1][1]
                    master.command("SET", f"roomcast:{{{room}}}:seq", str(last - 3))
                    master.command("RPOP", f"roomcast:{{{room}}}:history", "3")
                    master.command("CLIENT", "KILL", "TYPE", "pubsub")
                    for member in members:
                        await member.wait_for(lambda m=member: bool(m.errors))  # type: ignore[misc]
                    await send_through(members[0], 10, "k")
                    await received(members, "k:10")
                    nursery.cancel_scope.cancel()
    for member in members:
        gaps = [e for e in member.errors if e["error"] == "history_gap"]
        assert len(gaps) == len(member.errors) == 1
        assert gaps[0]["epoch"] != member.welcome["epoch"]
        assert not silent_faults(member)
        assert [text for _, text in member.messages] == [f"k:{n}" for n in range(11)]


async def test_a_master_whose_subscribers_drop_resubscribes_rooms_of_many_slots(
    redis_cluster: RedisCluster,
) -> None:
    """Three rooms in three slots of one master, members on both servers; the master
    drops every subscriber (as after a network blip): each worker resubscribes all its
    rooms there (one ``SSUBSCRIBE`` per slot: one for all was refused ``CROSSSLOT``), and
    a message in each room reaches every member."""
    master = redis_cluster.masters()[0]
    rooms = [room_on(redis_cluster, master, prefix) for prefix in ("a", "b", "c")]
    with two_servers_on_cluster(redis_cluster) as servers:
        members = [
            Timeline(servers[i % 2].url(f"/ws/chat?room={room}&name=m{i}"), batch=False)
            for room in rooms
            for i in range(2)
        ]
        with trio.fail_after(LOAD_TIME):
            async with AsyncExitStack() as stack:
                everyone: list[Client] = [*members]
                await connect_all(stack, everyone)
                async with trio.open_nursery() as nursery:
                    for member in members:
                        nursery.start_soon(read_forever, member)
                    assert master.command("CLIENT", "KILL", "TYPE", "pubsub") == 2
                    for index, sender in enumerate(members[::2]):
                        await send_through(sender, index, "after")
                    for index in range(len(rooms)):
                        await received(members[2 * index : 2 * index + 2], f"after:{index}")
                    nursery.cancel_scope.cancel()
    for member in members:
        assert not member.errors and not silent_faults(member)


async def refused_with(url: str) -> int:
    """The close code of a connection to ``url`` that the server refuses."""
    async with open_websocket_url(url) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            await ws.get_message()
    assert closed.value.reason is not None
    return closed.value.reason.code


async def test_caps_and_names_hold_across_servers_on_a_cluster(
    redis_cluster: RedisCluster,
) -> None:
    """As on one Redis: a user's connections are counted on every server (a cap of 2: a
    third is refused 4429 on either), and a name held in a room on one server is refused
    (4400) to another member on the other, lookalike included."""
    from roomcast.identity import mint_token

    secret = "a-secret-of-at-least-thirty-two-bytes!"
    env = {"ROOMCAST_JWT_SECRET": secret, "ROOMCAST_MAX_CONNECTIONS_PER_USER": "2"}
    with two_servers_on_cluster(redis_cluster, **env) as (a, b), trio.fail_after(LOAD_TIME):

        def as_user(server: ServerProcess, room: str, user: str, name: str) -> str:
            token = mint_token(secret, sub=user, name=name, ttl=600)
            return server.url(f"/ws/chat?room={room}&token={token}")

        async with AsyncExitStack() as stack:
            for server, room in ((a, "cap1"), (b, "cap2")):
                ws = await stack.enter_async_context(
                    open_websocket_url(as_user(server, room, "ann", "Ann"))
                )
                assert json.loads(await ws.get_message())["type"] == "welcome"
            for server in (a, b):
                assert await refused_with(as_user(server, "cap3", "ann", "Ann")) == 4429
            # ann's name in cap1 (on a's worker) is hers room-wide: bob may not take it on b
            assert await refused_with(as_user(b, "cap1", "bob", "ANN")) == 4400
            assert await refused_with(as_user(b, "cap1", "bob", "\u0410nn")) == 4400
            ws = await stack.enter_async_context(
                open_websocket_url(as_user(b, "cap1", "bob", "Bob"))
            )
            assert json.loads(await ws.get_message())["type"] == "welcome"
