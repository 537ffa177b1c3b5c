"""Coalesced presence in the hub: joins and leaves recorded in O(1), one notice per room per
flush, held in each member's one-notice slot so that presence never evicts anyone.

The hub is synchronous; :meth:`Hub.flush_presence` stands in for one pass of the flusher.
The flusher itself (:meth:`Hub.run_presence`) and the sender's side of the slot
(``connection._next_event``) are tested on both anyio backends.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import orjson
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from roomcast import Settings, create_app, protocol
from roomcast.connection import _next_event, _with_backlog
from roomcast.hub import PRESENCE_RATE, PRESENCE_WAKE, Hub, Member
from roomcast.presence import HeldLeaves
from roomcast.protocol import MAX_WELCOME_MEMBERS, ChatMessage, CloseCode
from sender import drain as read

from servers import serve_in_thread

pytestmark = pytest.mark.anyio


def notices(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == "system"]


async def test_a_crowd_joining_costs_one_notice_per_member_per_flush() -> None:
    hub = Hub(outbox_size=4)
    host = hub.join("r", "host")
    read(host)
    crowd = [hub.join("r", f"c{i}" if i % 3 else None) for i in range(1500)]
    assert all(m.queued == 0 for m in [host, *crowd])  # recorded only: nothing queued
    handed = hub.flush_presence()
    assert handed == 1500  # everyone but the last to join, whose welcome is current
    [notice] = notices(read(host))
    assert (notice["event"], notice["count"], notice["joins"], notice["leaves"]) == (
        "join",
        1501,
        1500,
        0,
    )
    assert notice["joined"] == ["c1", "c2", "c4", "c5", "c7", "c8", "c10", "c11", "c13", "c14"]
    assert notice["members"] == hub.rooms["r"].member_names()
    assert len(notice["members"]) == MAX_WELCOME_MEMBERS
    assert (
        notice["message"] == "c1, c2, c4, c5, c7, c8, c10, c11, c13, c14 and 1490 others joined #r"
    )
    # one string, serialised once, handed to all of them
    assert len({id(m.presence) for m in crowd[:-1]}) == 1
    assert crowd[-1].presence is None and crowd[-1].presence_seen == hub.rooms["r"].presence_version
    assert hub.stats.presence_notices == 1500 and hub.stats.deliveries == 0
    assert hub.flush_presence() == 0  # nothing changed since


async def test_a_crowd_leaving_never_evicts_the_member_that_stays() -> None:
    """The issue's failure: 1,199 leave notices filled the one remaining member's outbox."""
    hub = Hub(outbox_size=2)
    stays = hub.join("r", "stays")
    crowd = [hub.join("r", f"c{i}") for i in range(1499)]
    hub.flush_presence()
    read(stays)
    for member in crowd:
        hub.leave(member)
    assert stays.queued == 0
    assert hub.flush_presence() == 1
    assert stays.joined and stays.close_code is None and hub.stats.evictions == 0
    assert stays.queued == 1  # a wake-up: its outbox was empty
    [notice] = notices(read(stays))
    assert (notice["event"], notice["count"], notice["leaves"], notice["members"]) == (
        "leave",
        1,
        1499,
        ["stays"],
    )


async def test_a_notice_never_takes_a_slot_from_a_busy_outbox() -> None:
    hub = Hub(outbox_size=3)
    reader, talker = hub.join("r", "reader"), hub.join("r", "talker")
    read(reader)
    hub.publish(talker, ChatMessage("one"))
    hub.publish(talker, ChatMessage("two"))
    hub.join("r", "late")
    assert reader.queued == 2
    hub.flush_presence()
    assert reader.queued == 2  # no wake-up: its sender takes the notice once it has drained
    hub.publish(talker, ChatMessage("three"))  # the outbox's third slot is still a message's
    assert reader.joined and reader.queued == 3
    events = read(reader)
    assert [e.get("text", e["type"]) for e in events] == ["one", "two", "three", "system"]
    assert events[-1]["count"] == 3


async def test_presence_alone_never_evicts_a_member_that_does_not_read() -> None:
    hub = Hub(outbox_size=1)
    idle = hub.join("r", "idle")
    for i in range(50):
        hub.leave(hub.join("r", f"v{i}"))
        hub.flush_presence()
    assert idle.joined and idle.queued == 1 and hub.stats.evictions == 0
    # every notice replaced the unsent one before it: the member reads only the last
    [notice] = notices(read(idle))
    assert (notice["message"], notice["count"]) == ("v49 joined and v49 left #r", 1)


async def test_a_member_whose_welcome_is_newer_than_every_change_gets_no_notice() -> None:
    hub = Hub()
    first = hub.join("r", "first")
    second = hub.join("r", "second")  # joined after the only other change
    assert hub.flush_presence() == 1
    assert notices(read(second)) == [] and len(notices(read(first))) == 1
    third = hub.join("r", "third")
    hub.leave(first)  # a change after third's welcome
    assert hub.flush_presence() == 2
    [seen_by_third] = notices(read(third))
    assert (seen_by_third["count"], seen_by_third["members"]) == (2, ["second", "third"])


async def test_joining_an_empty_room_records_nothing() -> None:
    hub = Hub()
    alone = hub.join("r", "alone")
    assert hub.rooms["r"].presence is None
    hub.leave(alone)
    assert hub.flush_presence() == 0


async def test_a_sender_whose_receive_side_is_gone_is_dropped_by_the_wake_up() -> None:
    hub = Hub()
    gone, stays = hub.join("r", "gone"), hub.join("r", "stays")
    gone.outbox.close()  # its sender task ended a moment before its receive loop leaves
    hub.leave(hub.join("r", "visitor"))
    hub.flush_presence()
    assert not gone.joined and gone.close_code is None and stays.joined
    assert hub.stats.evictions == 0


async def test_close_all_ends_outboxes_without_notices() -> None:
    hub = Hub()
    a, b = hub.join("r", "a"), hub.join("r", "b")
    hub.close_all(CloseCode.GOING_AWAY, "bye")
    assert hub.flush_presence() == 0
    assert read(a)[-1]["type"] == "welcome" and not notices(read(b))


# -- the flusher and the sender, on both backends ---------------------------------------------


async def test_run_presence_announces_at_once_then_at_most_once_per_interval() -> None:
    hub = Hub(presence_interval=3600)
    ann = hub.join("r", "ann")
    read(ann)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(hub.run_presence)
            await anyio.wait_all_tasks_blocked()
            hub.join("r", "bob")  # the first change after a quiet interval: at once
            await anyio.wait_all_tasks_blocked()
            assert [n["name"] for n in notices(read(ann))] == ["bob"]
            hub.join("r", "cy")  # within the interval: waits for the next pass
            await anyio.wait_all_tasks_blocked()
            assert notices(read(ann)) == [] and hub.rooms["r"].presence is not None
            tg.cancel_scope.cancel()


async def test_each_room_has_its_own_interval() -> None:
    hub = Hub(presence_interval=3600)
    ann, bea = hub.join("a", "ann"), hub.join("b", "bea")
    read(ann), read(bea)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(hub.run_presence)
            hub.join("a", "al")
            await anyio.wait_all_tasks_blocked()
            assert len(notices(read(ann))) == 1
            hub.join("b", "bo")  # room b has been quiet: at once, whatever room a does
            hub.join("a", "ada")
            await anyio.wait_all_tasks_blocked()
            assert [n["name"] for n in notices(read(bea))] == ["bo"]
            assert notices(read(ann)) == []
            tg.cancel_scope.cancel()


async def test_a_big_room_waits_one_second_per_presence_rate_members() -> None:
    """Presence costs a room at most PRESENCE_RATE notices a second, however big."""
    hub = Hub(presence_interval=0.01)
    size = 2 * PRESENCE_RATE
    members = [hub.join("big", f"m{i}") for i in range(size)]
    for member in members:
        read(member)
    room = hub.rooms["big"]
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(hub.run_presence)
            await anyio.wait_all_tasks_blocked()  # the joins went out in one notice
            assert hub.stats.presence_notices == size - 1
            waits = room.presence_next - anyio.current_time()
            assert 1.9 < waits <= 2.0  # two seconds for 4,000 members, not 0.01
            hub.leave(members[-1])
            await anyio.wait_all_tasks_blocked()
            assert hub.stats.presence_notices == size - 1 and room.presence is not None
            tg.cancel_scope.cancel()


async def test_run_presence_sends_what_waited_once_the_interval_is_over() -> None:
    hub = Hub(presence_interval=0.01)
    ann = hub.join("r", "ann")
    read(ann)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(hub.run_presence)
            hub.join("r", "bob")
            await anyio.wait_all_tasks_blocked()
            hub.join("r", "cy")
            hub.join("r", None)
            seen: list[dict[str, Any]] = []
            while sum(n["joins"] for n in seen) < 3:
                seen += notices(read(ann))
                await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
    assert seen[-1]["count"] == 4 and seen[-1]["members"] == ["ann", "bob", "cy"]


async def test_run_presence_asks_a_presence_source_for_count_and_names() -> None:
    hub = Hub(presence_interval=3600)
    asked: list[str] = []

    async def source(room: Any) -> tuple[int, list[tuple[str | None, str]]] | None:
        asked.append(room.name)
        await anyio.lowlevel.checkpoint()
        return (42, [("far", "elsewhere")]) if room.name == "r" else None

    hub.presence_source = source
    ann, solo = hub.join("r", "ann"), hub.join("q", "solo")
    read(ann), read(solo)
    hub.note_presence(hub.rooms["r"], "join", "remote", count=41)
    hub.note_presence(hub.rooms["q"], "leave", "remote", count=7)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(hub.run_presence)
            await anyio.wait_all_tasks_blocked()
            tg.cancel_scope.cancel()
    assert sorted(asked) == ["q", "r"]
    [r] = notices(read(ann))
    assert (r["count"], r["members"]) == (42, ["elsewhere"])
    assert r["people"] == [{"user": "far", "name": "elsewhere"}]
    [q] = notices(read(solo))  # the source could not say: the count reported with the change
    assert q["count"] == 7 and "members" not in q


async def test_a_change_while_the_source_is_asked_is_announced_to_the_member_it_concerns() -> None:
    """Regression (found by the Redis tests): the flusher asks a presence source after
    taking a room's changes; a change arriving meanwhile bumped the room's version, so the
    earlier notice reached the member whose own join it reported, and that member then
    skipped the notice of the newer change."""
    hub = Hub(presence_interval=0.01)
    asked, release = anyio.Event(), anyio.Event()

    async def source(room: Any) -> tuple[int, list[tuple[str | None, str]]]:
        asked.set()
        await release.wait()
        return len(room.members), room.listed()

    hub.presence_source = source
    ann = hub.attach("r", "ann")  # as the Redis broker does: its own join comes back later
    room = hub.rooms["r"]
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(hub.run_presence)
            hub.note_presence(room, "join", "ann", 1, origin=ann)
            await asked.wait()
            hub.attach("r", "bob")
            hub.note_presence(room, "join", "bob", 2)
            release.set()
            seen: list[dict[str, Any]] = []
            while not seen:
                await anyio.wait_all_tasks_blocked()
                seen += notices(read(ann))
                if not seen:
                    await anyio.sleep(0.01)  # the room's interval, before bob's notice
            tg.cancel_scope.cancel()
    assert [(n["name"], n["count"]) for n in seen] == [("bob", 2)]


@pytest.mark.parametrize("batch", [False, True])
async def test_an_idle_sender_wakes_for_a_notice_and_gets_it_after_queued_events(
    batch: bool,
) -> None:
    hub = Hub(outbox_size=8)
    reader, talker = hub.join("r", "reader"), hub.join("r", "talker")
    reader.greeting.clear()
    got: list[str] = []

    async def sender() -> None:
        while (event := await _next_event(reader.client, checkpoint=batch)) is not None:
            got.extend(_with_backlog(reader.client, event, 64).split("\n") if batch else [event])

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(sender)
            await anyio.wait_all_tasks_blocked()  # waiting on an empty outbox
            hub.flush_presence()  # talker's join: a wake-up into the empty outbox
            await anyio.wait_all_tasks_blocked()
            hub.publish(talker, ChatMessage("m1"))
            hub.leave(hub.join("r", "visitor"))
            hub.flush_presence()  # the outbox holds m1: no wake-up, the slot waits
            hub.publish(talker, ChatMessage("m2"))
            await anyio.wait_all_tasks_blocked()
            hub.close_all(CloseCode.GOING_AWAY, "bye")
    kinds = [orjson.loads(e).get("text", orjson.loads(e)["type"]) for e in got]
    assert kinds == ["system", "m1", "m2", "system"]
    assert PRESENCE_WAKE not in got
    assert orjson.loads(got[-1])["count"] == 2


# -- what clients read ------------------------------------------------------------------------


def test_the_client_library_reads_a_coalesced_notice() -> None:
    from roomcast.client.events import Person, Presence, parse_event
    from roomcast.presence import PresenceChanges

    changes = PresenceChanges()
    for name in ("ann", None, "bob"):
        changes.add("join", name)
    changes.add("leave", "cy")
    line = changes.encode("r", count=4, people=[("a", "ann"), (None, "bob"), ("d", "dee")])
    event = parse_event(orjson.loads(line), line)
    assert event == Presence(
        event="presence",
        names=("ann", "bob", "cy"),
        count=4,
        message="ann, bob and 1 other joined and cy left #r",
        joined=("ann", "bob"),
        left=("cy",),
        joins=3,
        leaves=1,
        members=("ann", "bob", "dee"),
        room="r",
        people=(Person("a", "ann"), Person(None, "bob"), Person("d", "dee")),
    )


def test_the_client_library_reads_the_people_of_a_welcome() -> None:
    from roomcast.client.events import Person, Welcome, parse_event

    line = protocol.encode_welcome(
        room="r", epoch="e", seq=3, people=[("a", "ann"), (None, "bob")], count=2, max_text=9
    )
    event = parse_event(orjson.loads(line), line)
    assert isinstance(event, Welcome)
    assert event.members == ("ann", "bob")
    assert event.people == (Person("a", "ann"), Person(None, "bob"))


def test_the_client_library_still_reads_a_single_change_notice() -> None:
    from roomcast.client.events import Presence, parse_event

    raw = {"type": "system", "message": "ann left #r", "event": "leave", "name": "ann", "count": 1}
    event = parse_event(raw)
    assert isinstance(event, Presence)
    assert (event.names, event.left, event.joined, event.leaves, event.members) == (
        ("ann",),
        ("ann",),
        (),
        1,
        None,
    )


# -- the leave grace: a reloaded tab is announced neither leaving nor joining ------------------


async def next_notices(member: Member) -> list[dict[str, Any]]:
    """The notices the member gets next (waiting for the flusher)."""
    while not (seen := notices(read(member))):
        await member.wait_for_events()
    return seen


def test_a_held_leave_is_taken_back_by_the_same_person_only() -> None:
    held = HeldLeaves()
    held.hold("alice", None, 3, due=10.0)
    held.hold("Ann", "ann", 2, due=11.0)
    assert len(held) == 2 and held.due == 10.0
    assert not held.take_back("bob", None)
    assert not held.take_back("Ann", None)  # an anonymous "Ann" is not the verified ann
    assert not held.take_back("alice", "alice")  # nor is a verified user named alice
    assert held.take_back("Ann (new name)", "ann")  # a verified user by its id, whatever name
    assert held.take_back("alice", None)  # an anonymous member by its name
    assert len(held) == 0 and held.due == math.inf and held.release() == []


def test_held_leaves_are_released_in_order_once_their_grace_ends() -> None:
    held = HeldLeaves()
    for due, name in enumerate(["a", "b", None, None, "c"]):
        held.hold(name, None, None, due=float(due))
    assert held.take_back("b", None)
    assert held.take_back(None, None)  # the nameless: any stands for any other
    assert [leave.name for leave in held.release(2.5)] == ["a"]
    assert held.due == 3.0  # the taken-back ones are skipped
    assert [leave.name for leave in held.release(4.0, most=1)] == [None]
    assert [leave.name for leave in held.release()] == ["c"]
    assert len(held) == 0


async def test_a_member_back_within_the_grace_is_announced_neither_leaving_nor_joining() -> None:
    hub = Hub(presence_interval=0.01, presence_grace=3600)
    watcher, alice, ann = (
        hub.join("r", "watcher"),
        hub.join("r", "alice"),
        hub.join("r", "Ann", user="ann"),
    )
    room = hub.rooms["r"]
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(hub.run_presence)
            await anyio.wait_all_tasks_blocked()
            read(watcher)
            hub.leave(alice)
            hub.leave(ann)
            await anyio.wait_all_tasks_blocked()
            assert len(room.held_leaves) == 2 and room.count == 1  # true, and not announced
            alice = hub.join("r", "alice")  # the reloaded tabs: the name is free again
            ann = hub.join("r", "Ann", user="ann")
            await anyio.wait_all_tasks_blocked()
            assert not room.held_leaves and room.presence is None
            assert read(watcher) == []
            read(alice)
            [welcome] = read(ann)
            assert (welcome["count"], welcome["members"]) == (3, ["watcher", "alice", "Ann"])
            hub.join("r", "cy")  # the next notice is about cy alone
            [notice] = await next_notices(watcher)
            assert (notice["joined"], notice["left"], notice["count"]) == (["cy"], [], 4)
            assert notices(read(alice)) == notices(read(ann)) == [notice]
            tg.cancel_scope.cancel()


async def test_a_member_that_stays_away_is_announced_once_the_grace_is_over() -> None:
    grace = 0.2
    hub = Hub(presence_interval=0.01, presence_grace=grace)
    watcher, alice = hub.join("r", "watcher"), hub.join("r", "alice")
    read(watcher)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(hub.run_presence)
            await anyio.wait_all_tasks_blocked()
            read(watcher)
            hub.leave(alice)
            alice = hub.join("r", "alice")  # a reload first: nothing to announce
            await anyio.wait_all_tasks_blocked()
            read(alice)
            left_at = anyio.current_time()
            hub.leave(alice)
            seen = await next_notices(watcher)
            assert anyio.current_time() - left_at >= grace
            tg.cancel_scope.cancel()
    [notice] = seen
    assert (notice["event"], notice["left"], notice["count"], notice["members"]) == (
        "leave",
        ["alice"],
        1,
        ["watcher"],
    )


async def test_a_notice_during_the_grace_names_the_held_leave_too() -> None:
    """A notice shows the room as it is: one that goes out during a grace (someone else
    came) does not list the member who left, so it says so, and a return is a join."""
    hub = Hub(presence_interval=0.01, presence_grace=3600)
    watcher, alice = hub.join("r", "watcher"), hub.join("r", "alice")
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(hub.run_presence)
            await anyio.wait_all_tasks_blocked()
            read(watcher)
            hub.leave(alice)
            hub.join("r", "cy")
            [notice] = await next_notices(watcher)
            assert (notice["joined"], notice["left"], notice["count"]) == (["cy"], ["alice"], 2)
            assert notice["members"] == ["watcher", "cy"]
            hub.join("r", "alice")
            seen = await next_notices(watcher)
            assert [(n["joined"], n["left"], n["count"]) for n in seen] == [(["alice"], [], 3)]
            tg.cancel_scope.cancel()


async def test_held_leaves_of_a_room_left_empty_are_forgotten() -> None:
    hub = Hub(presence_grace=3600)
    alice, bob = hub.join("r", "alice"), hub.join("r", "bob")
    hub.leave(alice)
    assert len(hub.rooms["r"].held_leaves) == 1
    hub.leave(bob)  # nobody is left to tell
    alice = hub.join("r", "alice")
    bob = hub.join("r", "bob")  # a join like any: announced
    assert hub.flush_presence() == 1
    assert [n["name"] for n in notices(read(alice))] == ["bob"]


# -- on a real server ----------------------------------------------------------------------


@asynccontextmanager
async def chat(url: str) -> AsyncIterator[tuple[WebSocketConnection, dict[str, Any]]]:
    async with open_websocket_url(url) as ws:
        welcome = orjson.loads(await ws.get_message())
        assert welcome["type"] == "welcome"
        yield ws, welcome


@asynccontextmanager
async def rejoin(url: str) -> AsyncIterator[tuple[WebSocketConnection, dict[str, Any]]]:
    """Join as a reloaded page does. With Redis and another server, the old connection's
    leave can reach Redis a moment after this join, and its name is held until then
    (4400 taken, as the README says of an anonymous user reconnecting at once): a page
    takes longer than that to load; here, try again after a moment."""
    async with AsyncExitStack() as stack:
        for attempt in range(40):
            ws = await stack.enter_async_context(open_websocket_url(url))
            try:
                welcome = orjson.loads(await ws.get_message())
                break
            except ConnectionClosed as closed:
                if closed.reason.code != 4400 or attempt == 39:
                    raise
            await trio.sleep(0.05)
        assert welcome["type"] == "welcome"
        yield ws, welcome


async def notices_until(
    ws: WebSocketConnection, done: Callable[[dict[str, Any]], bool]
) -> list[dict[str, Any]]:
    """The presence notices ``ws`` reads until one for which ``done`` holds."""
    seen: list[dict[str, Any]] = []
    while not seen or not done(seen[-1]):
        event = orjson.loads(await ws.get_message())
        if event["type"] == "system":
            seen.append(event)
    return seen


async def reload_and_leave(urls: Callable[[str, int], str], grace: float) -> None:
    """Alice's tab reloads (closes, and a new one joins at once; ``urls(name, n)`` is the
    chat URL of the ``n``-th connection): the watcher sees no leave and no join, and then
    only cy's join; alice and cy leave for good: the watcher sees it once the grace is
    over, with the room as it is."""
    async with chat(urls("watcher", 0)) as (watcher, _):
        async with chat(urls("alice", 1)):
            await notices_until(watcher, lambda n: n["count"] == 2)
        async with rejoin(urls("alice", 2)) as (_, welcome):  # the reloaded tab: its name back
            assert (welcome["count"], sorted(welcome["members"])) == (2, ["alice", "watcher"])
            async with chat(urls("cy", 3)):
                [notice] = await notices_until(watcher, lambda n: "cy" in n["joined"])
                assert (notice["joined"], notice["left"], notice["count"]) == (["cy"], [], 3)
                assert (notice["joins"], notice["leaves"]) == (1, 0)
                left_at = trio.current_time()
        seen = await notices_until(watcher, lambda n: n["count"] == 1)
        assert trio.current_time() - left_at >= grace
        assert sorted(name for notice in seen for name in notice["left"]) == ["alice", "cy"]
        assert sum(notice["joins"] for notice in seen) == 0
        assert seen[-1]["members"] == ["watcher"]


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_a_reloaded_tab_is_not_announced_and_a_departure_is_after_the_grace() -> None:
    """The issue's case, on a real server with the default grace: a tab that reloads was
    shown to the others as "alice left" and then "alice joined"."""
    settings = Settings(rate_limit=0)
    assert settings.presence_grace == 2.0
    with serve_in_thread(create_app(settings)) as server, trio.fail_after(30):
        await reload_and_leave(
            lambda name, _: server.url(f"/ws/chat?room=reload&name={name}"),
            settings.presence_grace,
        )
