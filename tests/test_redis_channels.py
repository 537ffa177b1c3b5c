"""A worker subscribes to the rooms it serves, and only those (issue 21).

Unit tests of :class:`~roomcast.brokers.channels.RoomChannels` against a recording
subscription, then the broker against a real redis-server on both backends: what
``PUBSUB CHANNELS`` shows while members join and leave, how many commands a crowd of
joins and leaves costs, and exactly-once delivery to members joining a room whose
channel is subscribed and let go again and again while another worker publishes into it
at full speed.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest
from anyio import wait_all_tasks_blocked
from anyio.abc import TaskGroup
from anyio.lowlevel import checkpoint

from roomcast import Settings
from roomcast.brokers.channels import CHUNK, RoomChannels
from roomcast.brokers.redis import RedisBroker, open_redis_broker
from roomcast.hub import Hub, Member
from roomcast.protocol import ChatMessage

from redis_server import RedisServer, redis_command

pytestmark = pytest.mark.anyio


class Recording:
    """A subscription that records the commands it is given."""

    def __init__(self) -> None:
        self.commands: list[tuple[str, list[str]]] = []

    async def subscribe(self, channels: list[str]) -> None:
        self.commands.append(("SUBSCRIBE", channels))

    async def unsubscribe(self, channels: list[str]) -> None:
        self.commands.append(("UNSUBSCRIBE", channels))


@asynccontextmanager
async def writing(channels: RoomChannels) -> AsyncIterator[Recording]:
    recording = Recording()
    async with anyio.create_task_group() as tg:
        tg.start_soon(channels.keep_subscribed, recording)
        yield recording
        tg.cancel_scope.cancel()


async def test_wishes_made_together_go_out_as_one_command() -> None:
    channels = RoomChannels()
    async with writing(channels) as sent:
        events = [channels.want(f"room:{i}") for i in range(CHUNK + 5)]
        await wait_all_tasks_blocked()
        assert [(kind, len(names)) for kind, names in sent.commands] == [
            ("SUBSCRIBE", CHUNK),
            ("SUBSCRIBE", 5),
        ]
        assert not any(event.is_set() for event in events)
        for i in range(CHUNK + 5):
            channels.confirmed(f"room:{i}")
        assert all(event.is_set() for event in events) and channels.ready
        for i in range(CHUNK + 5):
            channels.release(f"room:{i}")
        await wait_all_tasks_blocked()
        assert [kind for kind, _ in sent.commands[2:]] == ["UNSUBSCRIBE", "UNSUBSCRIBE"]


async def test_a_channel_wanted_again_before_its_unsubscribe_went_out_costs_nothing() -> None:
    channels = RoomChannels()
    async with writing(channels) as sent:
        channels.want("a")
        await wait_all_tasks_blocked()
        channels.confirmed("a")
        channels.release("a")
        again = channels.want("a")
        assert again.is_set()
        await wait_all_tasks_blocked()
        assert sent.commands == [("SUBSCRIBE", ["a"])]


async def test_a_channel_is_ready_only_after_the_answer_to_its_last_subscribe() -> None:
    """SUBSCRIBE, UNSUBSCRIBE, SUBSCRIBE before any answer: the first answer belongs to
    a subscription that the UNSUBSCRIBE undid, so it must not make the channel ready."""
    channels = RoomChannels()
    async with writing(channels) as sent:
        channels.want("a")
        await wait_all_tasks_blocked()
        channels.release("a")
        await wait_all_tasks_blocked()
        ready = channels.want("a")
        await wait_all_tasks_blocked()
        assert sent.commands == [("SUBSCRIBE", ["a"]), ("UNSUBSCRIBE", ["a"]), ("SUBSCRIBE", ["a"])]
        channels.confirmed("a")
        assert not ready.is_set()
        channels.confirmed("a")
        assert ready.is_set()


async def test_a_new_connection_subscribes_every_wanted_channel_again() -> None:
    channels = RoomChannels()
    async with writing(channels) as sent:
        for name in "abc":
            channels.want(name)
        await wait_all_tasks_blocked()
        for name in "abc":
            channels.confirmed(name)
        channels.release("b")
        channels.restart()
        assert not channels.ready
        await wait_all_tasks_blocked()
        assert sent.commands[-1] == ("SUBSCRIBE", ["a", "c"])
        channels.confirmed("a")
        channels.confirmed("c")
        assert channels.ready


# -- against a real redis-server ---------------------------------------------------------


@asynccontextmanager
async def broker_on(url: str) -> AsyncIterator[RedisBroker]:
    hub = Hub(outbox_size=4096)
    async with open_redis_broker(Settings(redis_url=url), hub) as broker:
        yield broker


def room_channels(port: int) -> set[str]:
    reply = redis_command(port, "PUBSUB", "CHANNELS", "roomcast:0:room:*")
    assert isinstance(reply, list)
    return {channel.decode() for channel in reply if isinstance(channel, bytes)}


async def until_channels(port: int, expected: set[str]) -> None:
    """Wait for Redis to have read the worker's (UNSUBSCRIBE) commands: state in another
    process, so it is polled."""
    with anyio.fail_after(5):
        while room_channels(port) != expected:  # noqa: ASYNC110
            await anyio.sleep(0.01)


def subscribe_calls(port: int) -> int:
    info = redis_command(port, "INFO", "commandstats")
    assert isinstance(info, bytes)
    for line in info.decode().splitlines():
        if line.startswith("cmdstat_subscribe:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


async def join_all(broker: RedisBroker, rooms: list[str]) -> list[Member]:
    members: list[Member] = []

    async def join(room: str) -> None:
        members.append(await broker.join(room, None, since=None, epoch=None))

    async with anyio.create_task_group() as tg:
        for room in rooms:
            tg.start_soon(join, room)
    return members


async def test_a_worker_holds_the_channels_of_the_rooms_it_serves(
    redis_server: RedisServer,
) -> None:
    with anyio.fail_after(20):
        async with broker_on(redis_server.url) as broker:
            assert room_channels(redis_server.port) == set()
            a, b, b2 = await join_all(broker, ["a"]) + await join_all(broker, ["b", "b"])
            assert room_channels(redis_server.port) == {"roomcast:0:room:a", "roomcast:0:room:b"}
            await broker.leave(a)
            await broker.leave(b)
            await until_channels(redis_server.port, {"roomcast:0:room:b"})
            await broker.leave(b2)
            await until_channels(redis_server.port, set())


async def test_a_crowd_joining_many_rooms_at_once_subscribes_in_one_command(
    redis_server: RedisServer,
) -> None:
    rooms = [f"crowd-{i}" for i in range(500)]
    with anyio.fail_after(30):
        async with broker_on(redis_server.url) as broker:
            await wait_all_tasks_blocked()  # the subscriber's writer has settled in
            before = subscribe_calls(redis_server.port)
            members = await join_all(broker, rooms)
            assert subscribe_calls(redis_server.port) - before == 1
            assert len(room_channels(redis_server.port)) == 500
            async with anyio.create_task_group() as tg:
                for member in members:
                    tg.start_soon(broker.leave, member)
            await until_channels(redis_server.port, set())
            info = redis_command(redis_server.port, "INFO", "commandstats")
            assert isinstance(info, bytes)
            unsubscribes = [
                line for line in info.decode().splitlines() if "cmdstat_unsubscribe:" in line
            ]
            assert unsubscribes and "calls=1," in unsubscribes[0]


async def read_messages(member: Member, count: int) -> list[int]:
    """The seqs of the next ``count`` messages in the member's greeting and outbox,
    after checking the greeting starts with its welcome; returns [welcome seq, ...]."""
    client = member.client
    while not client.greeting:
        await client.wait_for_events()
    welcome = json.loads(client.greeting[0])
    assert welcome["type"] == "welcome"
    seqs = [welcome["seq"]]
    queued = client.greeting[1:]
    client.greeting.clear()
    while len(seqs) <= count:
        while not queued:
            try:
                queued.append(client.outbox.receive_nowait())
            except anyio.WouldBlock:
                await client.wait_for_events()
        event = json.loads(queued.pop(0))
        if event["type"] == "message":
            seqs.append(event["seq"])
    return seqs


async def publish_forever(broker: RedisBroker, room: str, tg: TaskGroup) -> None:
    (sender,) = await join_all(broker, [room])
    tg.start_soon(drain, sender)
    for i in range(10**9):
        await broker.publish(sender, ChatMessage(f"m{i}", None))
        if i % 16 == 0:
            await checkpoint()


async def drain(member: Member) -> None:
    while True:
        try:
            member.client.outbox.receive_nowait()
        except anyio.WouldBlock:
            await member.client.wait_for_events()


async def test_joiners_of_a_room_subscribed_again_and_again_miss_nothing(
    redis_server: RedisServer,
) -> None:
    """Worker B publishes into a room at full speed; on worker A a member joins, reads
    50 messages, leaves (A lets the channel go), 60 times over: each time its messages
    follow its welcome's seq with no gap and no repeat."""
    with anyio.fail_after(60):
        async with (
            broker_on(redis_server.url) as a,
            broker_on(redis_server.url) as b,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(publish_forever, b, "busy", tg)
            for _ in range(60):
                (member,) = await join_all(a, ["busy"])
                seqs = await read_messages(member, 50)
                assert seqs[1:] == list(range(seqs[0] + 1, seqs[0] + 51)), seqs
                await a.leave(member)
            tg.cancel_scope.cancel()
