"""``roomcast.client`` against a real server, on both anyio backends.

Every receiver here checks what it gets: seqs in order with no duplicate and no gap the
library did not report. Connections are cut mid-stream (a proxy resets them), and the
server is restarted under a reader; the library must resume and say what was lost.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import anyio
import pytest

from roomcast.client import (
    HistoryGap,
    Message,
    MessageRefused,
    Reconnecting,
    Room,
    RoomUnavailable,
    Welcome,
    open_room,
)

from proxy import open_proxy
from servers import ServerProcess, spawn_server

pytestmark = pytest.mark.anyio

ENV = {"ROOMCAST_RATE_LIMIT": "0", "ROOMCAST_HISTORY_SIZE": "1000"}


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with spawn_server(env=ENV) as server:
        yield server


class Reader:
    """Collects a room's messages, checking that each follows the last."""

    def __init__(self, room: Room) -> None:
        self.room = room
        self.seqs: list[int] = []
        self.texts: list[str] = []
        self.events: list[object] = []

    async def read_until(self, text: str | None = None, *, kind: type | None = None) -> None:
        """Read until a message with ``text`` (or an event of ``kind``) arrives."""
        async for event in self.room:
            self.events.append(event)
            if isinstance(event, Message):
                if self.seqs:
                    assert event.seq == self.seqs[-1] + 1, (event.seq, self.seqs[-1])
                self.seqs.append(event.seq)
                self.texts.append(event.text)
            elif isinstance(event, HistoryGap):
                self.seqs.clear()  # reported: the next seq starts a new run
            if (isinstance(event, Message) and event.text == text) or (
                kind is not None and isinstance(event, kind)
            ):
                return


async def test_send_returns_the_seq_and_every_member_reads_every_message(
    server: ServerProcess,
) -> None:
    url = f"ws://127.0.0.1:{server.port}"
    with anyio.fail_after(20):
        async with (
            open_room(url, "lib-basic", name="writer") as writer,
            open_room(url, "lib-basic", name="reader", batch=False) as reader_room,
        ):
            reader = Reader(reader_room)
            seqs = [await writer.send(f"m{i}") for i in range(100)]
            assert seqs == list(range(seqs[0], seqs[0] + 100))
            await reader.read_until("m99")
            assert reader.seqs == seqs
            assert reader.texts == [f"m{i}" for i in range(100)]


async def test_cut_connections_resume_with_nothing_lost_or_repeated(
    server: ServerProcess,
) -> None:
    """The reader and a second writer sit behind a proxy that resets their connections
    three times while messages flow; both resume in the same epoch: no gap, no
    duplicate, and every message sent through the cuts is sent exactly once."""
    url = f"ws://127.0.0.1:{server.port}"
    with anyio.fail_after(60):
        async with (
            open_proxy(server.port) as proxy,
            open_room(url, "lib-cut", name="writer") as writer,
            open_room(proxy.url(), "lib-cut", name="reader") as reader_room,
            open_room(proxy.url(), "lib-cut", name="flaky") as flaky,
        ):
            reader = Reader(reader_room)
            flaky_seqs: list[int] = []

            async def write() -> None:
                for i in range(300):
                    await writer.send(f"w{i}")
                    if i % 100 == 50:
                        await reader_room.wait_connected()  # each cut finds both connected
                        await flaky.wait_connected()
                        await proxy.cut()
                    if i % 10 == 0:
                        flaky_seqs.append(await flaky.send(f"f{i}"))
                await writer.send("end")

            async with anyio.create_task_group() as tg:
                tg.start_soon(write)
                await reader.read_until("end")
            assert proxy.cuts == 3
            assert sum(isinstance(e, Reconnecting) for e in reader.events) == 3
            assert not any(isinstance(e, HistoryGap) for e in reader.events)
            assert reader.seqs == list(range(reader.seqs[0], reader.seqs[0] + len(reader.seqs)))
            assert [t for t in reader.texts if t.startswith("w")] == [f"w{i}" for i in range(300)]
            assert [t for t in reader.texts if t.startswith("f")] == [
                f"f{i}" for i in range(0, 300, 10)
            ]
            assert len(set(flaky_seqs)) == 30
            assert reader_room.duplicates == 0


async def test_a_server_restart_is_reported_as_a_history_gap_and_the_room_goes_on() -> None:
    with spawn_server(env=ENV) as first:
        port = first.port
        url = f"ws://127.0.0.1:{port}"
        with anyio.fail_after(60):
            async with open_room(url, "lib-restart", name="reader") as room:
                reader = Reader(room)
                await room.send("before")
                await reader.read_until("before")
                first.terminate()
                first.process.wait(timeout=10)
                with spawn_server(env=ENV, port=port):
                    await reader.read_until(kind=HistoryGap)
                    kinds = [type(e) for e in reader.events]
                    assert kinds[-3:] == [Reconnecting, Welcome, HistoryGap]
                    gap = reader.events[-1]
                    assert isinstance(gap, HistoryGap) and gap.restarted
                    seq = await room.send("after")
                    assert seq == 1  # a new run of the room
                    await reader.read_until("after")
                    assert room.duplicates == 0


async def test_a_refused_message_raises_and_the_room_stays_usable(server: ServerProcess) -> None:
    url = f"ws://127.0.0.1:{server.port}"
    with anyio.fail_after(20):
        async with open_room(url, "lib-refused") as room:
            with pytest.raises(MessageRefused) as refused:
                await room.send("x" * 5000)
            assert refused.value.code == "too_long"
            assert await room.send("fine") >= 1


async def test_a_room_the_server_refuses_raises_at_once(server: ServerProcess) -> None:
    with anyio.fail_after(20), pytest.raises(RoomUnavailable) as unavailable:
        async with open_room(f"ws://127.0.0.1:{server.port}", "bad room!"):
            pass
    assert unavailable.value.code == 4400


# -- opening a room where an earlier session left off ----------------------------------------


def fresh_room() -> str:
    """A room no other test (or backend) has used, so its seq starts at 1."""
    return f"lib-{uuid.uuid4().hex[:12]}"


async def fill(url: str, room: str, count: int) -> str:
    """Send ``count`` messages (``m1``...) into a new ``room``; returns its epoch."""
    async with open_room(url, room, name="filler") as filler:
        for n in range(1, count + 1):
            assert await filler.send(f"m{n}") == n
        assert filler.epoch is not None
        return filler.epoch


async def read_events(room: Room, until: str) -> list[object]:
    """The room's events up to the message ``until`` (the welcome included)."""
    events: list[object] = []
    async for event in room:
        events.append(event)
        if isinstance(event, Message) and event.text == until:
            return events
    raise AssertionError(f"the room ended before {until!r}: {events}")


def texts(events: list[object]) -> list[str]:
    return [event.text for event in events if isinstance(event, Message)]


@pytest.mark.parametrize("with_epoch", [True, False])
async def test_opening_with_since_replays_what_came_after_it(
    server: ServerProcess, with_epoch: bool
) -> None:
    """``since`` (with or without the epoch) opens the room, replays the messages after
    it, then goes live: a message sent now comes once, after the replay."""
    url, room = f"ws://127.0.0.1:{server.port}", fresh_room()
    with anyio.fail_after(20):
        epoch = await fill(url, room, 5)
        async with open_room(url, room, since=3, epoch=epoch if with_epoch else None) as resumed:
            assert await resumed.send("live") == 6
            events = await read_events(resumed, "live")
            assert isinstance(events[0], Welcome)
            assert texts(events) == ["m4", "m5", "live"]
            assert not any(isinstance(e, HistoryGap) for e in events)
            assert resumed.connected and (resumed.seq, resumed.epoch) == (6, epoch)


async def test_opening_with_since_0_replays_the_whole_history(server: ServerProcess) -> None:
    url, room = f"ws://127.0.0.1:{server.port}", fresh_room()
    with anyio.fail_after(20):
        await fill(url, room, 3)
        async with open_room(url, room, since=0) as resumed:
            events = await read_events(resumed, "m3")
            assert texts(events) == ["m1", "m2", "m3"]
            await resumed.wait_connected()


@pytest.mark.parametrize("since", [3, 9])
async def test_a_wrong_epoch_is_a_history_gap_then_the_whole_replay(
    server: ServerProcess, since: int
) -> None:
    """An epoch that is not the room's (its sequence restarted): ``history_gap`` from the
    new run's start, then everything it holds, whether ``since`` is below the room's seq
    or past it. The gap says the history restarted; nothing counts as a duplicate."""
    url, room = f"ws://127.0.0.1:{server.port}", fresh_room()
    with anyio.fail_after(20):
        epoch = await fill(url, room, 5)
        async with open_room(url, room, since=since, epoch="not-" + epoch) as resumed:
            events = await read_events(resumed, "m5")
            assert [type(e) for e in events[:2]] == [Welcome, HistoryGap]
            gap = events[1]
            assert isinstance(gap, HistoryGap)
            assert (gap.epoch, gap.since, gap.first, gap.restarted) == (epoch, since, 1, True)
            assert texts(events) == ["m1", "m2", "m3", "m4", "m5"]
            assert await resumed.send("live") == 6
            assert texts(await read_events(resumed, "live")) == ["live"]
            assert resumed.duplicates == 0


async def test_a_room_opened_with_since_resumes_after_a_cut(server: ServerProcess) -> None:
    url, room = f"ws://127.0.0.1:{server.port}", fresh_room()
    with anyio.fail_after(30):
        epoch = await fill(url, room, 5)
        async with (
            open_proxy(server.port) as proxy,
            open_room(url, room, name="writer") as writer,
            open_room(proxy.url(), room, since=3, epoch=epoch) as resumed,
        ):
            assert texts(await read_events(resumed, "m5")) == ["m4", "m5"]
            await proxy.cut()
            await writer.send("after the cut")
            events = await read_events(resumed, "after the cut")
            assert [type(e) for e in events[:2]] == [Reconnecting, Welcome]
            assert texts(events) == ["after the cut"]
            assert not any(isinstance(e, HistoryGap) for e in events)
            assert resumed.duplicates == 0


async def test_a_first_connection_that_fails_raises_even_with_since(
    server: ServerProcess,
) -> None:
    with anyio.fail_after(20), pytest.raises(RoomUnavailable) as unavailable:
        async with open_room(f"ws://127.0.0.1:{server.port}", "bad room!", since=3, epoch="e"):
            pass
    assert unavailable.value.code == 4400
