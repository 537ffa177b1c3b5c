"""``roomcast.client.open_connection`` (protocol v2: many rooms over one connection) against
a real server, on both anyio backends.

Every reader checks what it gets per room: seqs in order, no duplicate, no gap the library
did not report. The connection is cut under its rooms (a proxy resets it) and the server
is restarted; every room must resume on its own ``since``/``epoch``.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterator

import anyio
import pytest

from roomcast.client import (
    Connection,
    HistoryGap,
    JoinRefused,
    Left,
    Message,
    Presence,
    Reconnecting,
    Room,
    RoomClosed,
    Typing,
    Welcome,
    dm_room,
    open_connection,
    open_room,
)
from roomcast.identity import mint_token

from proxy import open_proxy
from servers import ServerProcess, spawn_server

pytestmark = pytest.mark.anyio

ENV = {"ROOMCAST_RATE_LIMIT": "0", "ROOMCAST_HISTORY_SIZE": "1000", "ROOMCAST_PRESENCE_GRACE": "0"}
SECRET = "client-v2-secret-for-the-tests-only"


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with spawn_server(env=ENV) as server:
        yield server


@pytest.fixture(scope="module")
def signed_server() -> Iterator[ServerProcess]:
    with spawn_server(env={**ENV, "ROOMCAST_JWT_SECRET": SECRET}) as server:
        yield server


def fresh(prefix: str) -> str:
    """A room no other test (or backend) has used, so its seq starts at 1."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def url_of(server: ServerProcess) -> str:
    return f"ws://127.0.0.1:{server.port}"


class Reader:
    """Collects a connection's events by room, checking that each message follows the
    last one of its room (a reported gap starts a new run)."""

    def __init__(self) -> None:
        self.seqs: dict[str, list[int]] = defaultdict(list)
        self.texts: dict[str, list[str]] = defaultdict(list)
        self.events: list[object] = []

    def take(self, event: object) -> None:
        self.events.append(event)
        if isinstance(event, Message):
            seqs = self.seqs[event.room]
            if seqs:
                assert event.seq == seqs[-1] + 1, (event.room, event.seq, seqs[-1])
            seqs.append(event.seq)
            self.texts[event.room].append(event.text)
        elif isinstance(event, HistoryGap):
            assert event.room is not None
            self.seqs[event.room].clear()

    async def read(self, source: Connection | Room, until: object) -> None:
        """Read ``source`` until ``until(self)`` holds."""
        async for event in source:
            self.take(event)
            if until(self):  # type: ignore[operator]
                return
        raise AssertionError(f"ended early: {self.events[-5:]}")

    async def read_to_end(self, source: Connection | Room) -> None:
        async for event in source:
            self.take(event)


async def test_one_connection_in_three_rooms_gets_each_rooms_messages_in_order(
    server: ServerProcess,
) -> None:
    rooms = [fresh("v2-three") for _ in range(3)]
    with anyio.fail_after(30):
        async with open_connection(url_of(server), name="reader") as conn:
            joined = [await conn.join(room) for room in rooms]
            assert [room.name for room in joined] == rooms
            assert set(conn.rooms) == set(rooms)
            async with (
                open_room(url_of(server), rooms[0], name="w0") as w0,
                open_room(url_of(server), rooms[1], name="w1") as w1,
            ):
                writers = {rooms[0]: w0, rooms[1]: w1, rooms[2]: joined[2]}

                async def write(room: str) -> None:
                    for i in range(50):
                        await writers[room].send(f"{room}:{i}")

                reader = Reader()
                async with anyio.create_task_group() as tg:
                    for room in rooms:
                        tg.start_soon(write, room)
                    await reader.read(
                        conn, lambda r: all(len(r.seqs[room]) == 50 for room in rooms)
                    )
            for room in rooms:
                assert reader.seqs[room] == list(range(1, 51))
                assert reader.texts[room] == [f"{room}:{i}" for i in range(50)]
            welcomes = [e for e in reader.events if isinstance(e, Welcome)]
            assert sorted(w.room for w in welcomes) == sorted(rooms)


async def test_a_room_reads_its_own_events_and_leaving_touches_no_other(
    server: ServerProcess,
) -> None:
    a, b = fresh("v2-a"), fresh("v2-b")
    with anyio.fail_after(30):
        async with (
            open_connection(url_of(server), name="cy") as cy,
            open_connection(url_of(server), name="di") as di,
        ):
            cy_a, cy_b = await cy.join(a), await cy.join(b)
            with pytest.raises(ValueError):
                await cy.join(a)
            di_b = await di.join(b)
            assert await cy_a.send("in a") == 1
            assert await cy_b.send("in b", id="my-own-id") == 1
            own = Reader()
            await own.read(cy_b, lambda r: r.texts[b] == ["in b"])
            assert {getattr(e, "room", None) for e in own.events} == {b}  # nothing of room a
            assert [type(e) for e in own.events if not isinstance(e, Presence)] == [
                Welcome,
                Message,
            ]
            own_message = own.events[-1]
            assert isinstance(own_message, Message) and own_message.id == "my-own-id"

            await cy.leave(cy_a)
            assert a not in cy.rooms
            rest = Reader()
            await rest.read_to_end(cy_a)  # what came, then Left 1000
            assert [type(e) for e in rest.events] == [Welcome, Message, Left]  # only room a
            left = rest.events[-1]
            assert isinstance(left, Left) and (left.room, left.code) == (a, 1000)
            with pytest.raises(RoomClosed):
                await cy_a.send("gone")

            await di.typing(di_b)
            await di_b.send("b goes on")
            seen = Reader()
            await seen.read(cy_b, lambda r: r.texts[b][-1:] == ["b goes on"])
            assert [e.name for e in seen.events if isinstance(e, Typing)] == ["di"]

            again = await cy.join(a)  # a new membership, its own events
            assert await again.send("back in a") == 2
            back = Reader()
            await back.read(again, lambda r: r.texts[a] == ["back in a"])

            with pytest.raises(JoinRefused) as refused:
                await cy.join("dm:ann:bob")  # anonymous: not his
            assert (refused.value.error, refused.value.code) == ("forbidden", 4403)
            with pytest.raises(JoinRefused) as bad:
                await cy.join("bad room!")
            assert bad.value.error == "bad_room"
            assert set(cy.rooms) == {a, b}


async def test_every_room_resumes_after_the_connection_is_cut(server: ServerProcess) -> None:
    """A connection in three rooms behind a proxy that resets it three times while
    writers fill every room: each room resumes on its own seq, with nothing lost or
    repeated, and what the connection sent through the cuts is sent exactly once."""
    rooms = [fresh("v2-cut") for _ in range(3)]
    with anyio.fail_after(60):
        async with (
            open_proxy(server.port) as proxy,
            open_connection(proxy.url(), name="reader") as conn,
            open_connection(url_of(server), name="writer") as writer,
        ):
            mine = {room: await conn.join(room) for room in rooms}
            theirs = {room: await writer.join(room) for room in rooms}
            sent: dict[str, list[int]] = defaultdict(list)

            async def write() -> None:
                for i in range(150):
                    for room in rooms:
                        await theirs[room].send(f"w{i}")
                    if i % 50 == 25:
                        for member in mine.values():
                            await member.wait_connected()  # each cut finds them all caught up
                        await proxy.cut()
                    if i % 10 == 0:
                        for room in rooms:
                            sent[room].append(await mine[room].send(f"f{i}"))
                for room in rooms:
                    await theirs[room].send("end")

            reader = Reader()
            async with anyio.create_task_group() as tg:
                tg.start_soon(write)
                await reader.read(
                    conn, lambda r: all(r.texts[room][-1:] == ["end"] for room in rooms)
                )
            assert proxy.cuts == 3
            reconnecting = [e for e in reader.events if isinstance(e, Reconnecting)]
            assert sorted(e.room or "" for e in reconnecting) == sorted(rooms * 3)
            assert not any(isinstance(e, HistoryGap) for e in reader.events)
            for room in rooms:
                texts = reader.texts[room]
                assert [t for t in texts if t.startswith("w")] == [f"w{i}" for i in range(150)]
                assert [t for t in texts if t.startswith("f")] == [
                    f"f{i}" for i in range(0, 150, 10)
                ]
                assert len(set(sent[room])) == 15
                assert reader.seqs[room] == list(range(1, len(reader.seqs[room]) + 1))
                assert mine[room].duplicates == 0


async def test_a_server_restart_resumes_every_room_with_a_history_gap() -> None:
    rooms = ["v2-restart-1", "v2-restart-2"]
    with spawn_server(env=ENV) as first:
        port = first.port
        with anyio.fail_after(60):
            async with open_connection(url_of(first), name="reader") as conn:
                joined = [await conn.join(room) for room in rooms]
                for room in joined:
                    await room.send("before")
                reader = Reader()
                await reader.read(conn, lambda r: all(r.texts[room] for room in rooms))
                first.terminate()
                first.process.wait(timeout=10)
                with spawn_server(env=ENV, port=port):
                    await reader.read(
                        conn,
                        lambda r: sum(isinstance(e, HistoryGap) for e in r.events) == 2,
                    )
                    gaps = [e for e in reader.events if isinstance(e, HistoryGap)]
                    assert sorted(g.room or "" for g in gaps) == rooms
                    assert all(g.restarted for g in gaps)
                    for room in joined:
                        assert await room.send("after") == 1  # a new run of the room
                        assert room.duplicates == 0


async def test_a_refresh_that_drops_a_grant_ends_that_room_only(
    signed_server: ServerProcess,
) -> None:
    """The token source's second token no longer grants g2: the refresh the connection
    sends before the first expires makes the server leave g2 (``left`` 4403). g2's
    iteration ends with ``RoomClosed`` 4403; g1 and g3 go on over the same connection."""
    rooms = [fresh("g1"), fresh("g2"), fresh("g3")]
    tokens = [mint_token(SECRET, sub="eve", ttl=2, rooms=rooms)]

    async def token_source() -> str:
        if tokens:
            return tokens.pop()
        return mint_token(SECRET, sub="eve", ttl=600, rooms=[rooms[0], rooms[2]])

    with anyio.fail_after(30):
        async with open_connection(url_of(signed_server), token=token_source) as conn:
            assert conn.user == "eve"
            g1, g2, g3 = [await conn.join(room) for room in rooms]
            events: list[object] = []
            with pytest.raises(RoomClosed) as closed:
                async for event in g2:
                    events.append(event)
            assert closed.value.code == 4403
            assert isinstance(events[-1], Left) and events[-1].code == 4403
            assert set(conn.rooms) == {rooms[0], rooms[2]}
            for room in (g1, g3):
                seq = await room.send("still here")
                async for event in room:
                    if isinstance(event, Message) and event.seq == seq:
                        break
            with pytest.raises(JoinRefused) as refused:
                await conn.join(rooms[1])
            assert refused.value.code == 4403


async def test_a_direct_room_between_two_signed_users(signed_server: ServerProcess) -> None:
    def token(user: str) -> str:
        return mint_token(SECRET, sub=user, ttl=600, rooms=["lobby"])

    room = dm_room("zed", "amy")
    assert room == "dm:amy:zed"
    with anyio.fail_after(20):
        async with (
            open_connection(url_of(signed_server), token=token("amy")) as amy,
            open_connection(url_of(signed_server), token=token("zed")) as zed,
        ):
            assert dm_room(amy.user or "", "zed") == room
            to_zed = await amy.join(room)
            from_amy = await zed.join(room)
            seq = await to_zed.send("just us")
            async for event in from_amy:
                if isinstance(event, Message) and event.seq == seq:
                    assert (event.user, event.text) == ("amy", "just us")
                    break


async def test_no_task_outlives_the_block(server: ServerProcess) -> None:
    with anyio.fail_after(20):
        before = len(anyio.get_running_tasks())
        async with open_connection(url_of(server)) as conn:
            await conn.join(fresh("v2-tasks"))
            assert len(anyio.get_running_tasks()) > before
        assert len(anyio.get_running_tasks()) == before
        assert not conn.connected
