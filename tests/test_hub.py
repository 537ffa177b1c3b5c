"""The hub: rooms, membership, fan-out into bounded outboxes, eviction, history."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import anyio
import orjson
import pytest

from roomcast.hub import Hub, Member, RoomFull
from roomcast.protocol import ChatMessage, CloseCode
from sender import drain

pytestmark = pytest.mark.anyio


def types(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


async def test_welcome_lists_present_names_and_count() -> None:
    hub = Hub()
    hub.join("r", "ann")
    hub.join("r", None)
    bob = hub.join("r", "bob")
    [welcome] = drain(bob)
    assert welcome["type"] == "welcome"
    assert (welcome["room"], welcome["seq"], welcome["count"]) == ("r", 0, 3)
    assert welcome["members"] == ["ann", "bob"]
    assert welcome["epoch"] == hub.rooms["r"].epoch


async def test_every_member_gets_each_message_once_in_one_order() -> None:
    hub = Hub()
    members = [hub.join("r", f"m{i}") for i in range(3)]
    for m in members:
        drain(m)
    for i in range(5):
        hub.publish(members[i % 3], ChatMessage(f"t{i}"))
    seen = [[(e["seq"], e["text"]) for e in drain(m)] for m in members]
    assert seen[0] == [(i + 1, f"t{i}") for i in range(5)]
    assert seen[0] == seen[1] == seen[2]


async def test_a_message_is_serialised_once_for_all_members() -> None:
    hub = Hub()
    a, b = hub.join("r"), hub.join("r")
    drain(a), drain(b)
    hub.publish(a, ChatMessage("hi"))
    assert a.outbox.receive_nowait() is b.outbox.receive_nowait()


async def test_rooms_are_isolated() -> None:
    hub = Hub()
    a, b = hub.join("one"), hub.join("two")
    drain(a), drain(b)
    hub.publish(a, ChatMessage("only one"))
    assert [e["room"] for e in drain(a)] == ["one"]
    assert drain(b) == []
    assert hub.rooms["two"].seq == 0


async def test_join_and_leave_are_announced_to_the_others_only() -> None:
    hub = Hub()
    ann = hub.join("r", "ann")
    drain(ann)
    bob = hub.join("r", "bob")
    assert drain(ann) == []  # recorded, not sent: notices go out when presence is flushed
    assert hub.flush_presence() == 1
    assert types(drain(bob)) == ["welcome"]  # its welcome already shows its join
    [joined] = drain(ann)
    assert joined == {
        "type": "system",
        "room": "r",
        "message": "bob joined #r",
        "event": "join",
        "name": "bob",
        "user": None,
        "count": 2,
        "joined": ["bob"],
        "left": [],
        "joins": 1,
        "leaves": 0,
        "members": ["ann", "bob"],
        "people": [{"user": None, "name": "ann"}, {"user": None, "name": "bob"}],
    }
    hub.leave(bob)
    hub.leave(bob)  # idempotent
    hub.flush_presence()
    [left] = drain(ann)
    assert (left["event"], left["name"], left["count"], left["members"]) == (
        "leave",
        "bob",
        1,
        ["ann"],
    )


async def test_ending_a_user_ends_each_of_its_tabs_with_one_leave_per_room() -> None:
    hub = Hub()
    bob = hub.join("r", "Bob", user="bob")
    tabs = [hub.join(room, "Ann", user="ann") for room in ("r", "r", "s")]
    other = hub.join("s", None)
    hub.flush_presence()
    for member in (bob, other, *tabs):
        drain(member)
    assert hub.rooms["r"].people() == [("bob", "Bob"), ("ann", "Ann")]
    assert hub.rooms["s"].people() == [("ann", "Ann"), (None, None)]
    assert hub.end_user("ann", CloseCode.UNAUTHORIZED, "disconnected by the server") == 3
    assert hub.end_user("ann", CloseCode.UNAUTHORIZED, "again") == 0
    for tab in tabs:
        assert not tab.joined
        assert (tab.close_code, tab.close_reason) == (
            CloseCode.UNAUTHORIZED,
            "disconnected by the server",
        )
    hub.flush_presence()
    for member in (bob, other):
        [left] = drain(member)
        assert (left["event"], left["leaves"], left["user"], left["count"]) == (
            "leave",
            1,
            "ann",
            1,
        )
    assert hub.rooms["r"].users == {"bob": 1} and not hub.rooms["s"].users


async def test_ack_only_for_messages_with_an_id() -> None:
    hub = Hub()
    a = hub.join("r")
    drain(a)
    hub.publish(a, ChatMessage("no id"))
    hub.publish(a, ChatMessage("with id", "c1"))
    events = drain(a)
    assert types(events) == ["message", "message", "ack"]
    assert events[1]["id"] == "c1"
    assert events[2] == {"type": "ack", "id": "c1", "seq": 2}


async def test_capacity() -> None:
    hub = Hub(room_capacity=2)
    hub.join("r"), hub.join("r")
    with pytest.raises(RoomFull):
        hub.join("r")
    hub.join("other")  # capacity is per room
    assert len(hub.rooms["r"].members) == 2


async def test_full_outbox_evicts_only_that_member() -> None:
    hub = Hub(outbox_size=3)
    slow, fast = hub.join("r", "slow"), hub.join("r", "fast")
    drain(slow), drain(fast)
    for i in range(4):
        hub.publish(fast, ChatMessage(f"m{i}"))
        drain(fast)  # fast keeps up
    assert not slow.joined and fast.joined
    assert slow.close_code is CloseCode.TOO_SLOW
    assert hub.stats.evictions == 1
    # the slow member still gets what was queued before the eviction, then its outbox ends
    assert [e["text"] for e in drain(slow)] == ["m0", "m1", "m2"]
    with pytest.raises(anyio.EndOfStream):
        slow.outbox.receive_nowait()
    hub.publish(fast, ChatMessage("after"))
    events = drain(fast)
    assert [e["type"] for e in events] == ["message"]
    assert events[0]["seq"] == 5


async def test_eviction_is_announced_and_frees_the_room_slot() -> None:
    hub = Hub(outbox_size=2, room_capacity=2)
    slow, fast = hub.join("r", "slow"), hub.join("r", "fast")
    hub.flush_presence()  # slow's outbox was empty: the notice's wake-up takes one slot
    drain(fast)
    hub.publish(fast, ChatMessage("x"))  # slow's outbox is now full
    drain(fast)
    hub.publish(fast, ChatMessage("y"))
    assert not slow.joined and slow.close_code is CloseCode.TOO_SLOW
    hub.flush_presence()
    assert [e.get("event", e["type"]) for e in drain(fast)] == ["message", "leave"]
    assert [e.get("event", e["type"]) for e in drain(slow)] == ["welcome", "join", "message"]
    hub.join("r", "newcomer")  # capacity is free again


async def test_a_waiting_sender_task_gets_events_and_sees_the_end() -> None:
    hub = Hub(outbox_size=2)
    b = hub.join("r")
    received: list[str] = []

    async def sender() -> None:
        async for event in b.outbox:
            received.append(orjson.loads(event)["type"])

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(sender)
            await anyio.wait_all_tasks_blocked()
            for i in range(10):  # more than the outbox holds: the receiver keeps up
                hub.publish(b, ChatMessage(str(i)))
                await anyio.wait_all_tasks_blocked()
            hub.close_all(CloseCode.GOING_AWAY, "bye")
    assert received == ["message"] * 10
    assert b.close_code is CloseCode.GOING_AWAY and not hub.rooms["r"].members


async def test_empty_room_without_history_is_forgotten() -> None:
    hub = Hub()
    a = hub.join("r")
    hub.leave(a)
    assert "r" not in hub.rooms


async def test_idle_rooms_keep_history_up_to_a_bound() -> None:
    hub = Hub(idle_rooms=2)
    epochs = {}
    for name in ("a", "b", "c"):
        m = hub.join(name)
        hub.publish(m, ChatMessage("x"))
        epochs[name] = hub.rooms[name].epoch
        hub.leave(m)
    assert sorted(hub.rooms) == ["b", "c"]  # the least recently emptied was forgotten
    again = hub.join("b", since=1, epoch=epochs["b"])
    assert types(drain(again)) == ["welcome"]
    assert hub.rooms["b"].seq == 1


class TestResume:
    def room_with(self, hub: Hub, count: int) -> tuple[Member, str]:
        talker = hub.join("r", "talker")
        for i in range(1, count + 1):
            hub.publish(talker, ChatMessage(f"m{i}"))
        return talker, hub.rooms["r"].epoch

    async def test_since_replays_exactly_the_missed_messages_then_live(self) -> None:
        hub = Hub(history_size=10)
        talker, epoch = self.room_with(hub, 5)
        back = hub.join("r", since=3, epoch=epoch)
        hub.publish(talker, ChatMessage("m6"))
        events = drain(back)
        assert types(events) == ["welcome", "message", "message", "message"]
        assert [e["seq"] for e in events[1:]] == [4, 5, 6]

    async def test_up_to_date_client_gets_no_replay(self) -> None:
        hub = Hub(history_size=10)
        _, epoch = self.room_with(hub, 5)
        assert types(drain(hub.join("r", since=5, epoch=epoch))) == ["welcome"]

    async def test_discarded_messages_are_reported_as_a_gap(self) -> None:
        hub = Hub(history_size=3)
        _, epoch = self.room_with(hub, 10)
        events = drain(hub.join("r", since=2, epoch=epoch))
        assert types(events) == ["welcome", "error", "message", "message", "message"]
        assert events[1]["error"] == "history_gap" and events[1]["first"] == 8
        assert [e["seq"] for e in events[2:]] == [8, 9, 10]

    async def test_other_epoch_is_a_gap_with_full_replay(self) -> None:
        hub = Hub(history_size=10)
        self.room_with(hub, 3)
        events = drain(hub.join("r", since=50, epoch="previous-run"))
        assert types(events) == ["welcome", "error", "message", "message", "message"]
        assert [e["seq"] for e in events[2:]] == [1, 2, 3]

    async def test_no_history_kept_means_a_gap_for_anything_missed(self) -> None:
        hub = Hub(history_size=0)
        _, epoch = self.room_with(hub, 2)
        assert types(drain(hub.join("r", since=1, epoch=epoch))) == ["welcome", "error"]


async def test_member_whose_sender_stopped_is_dropped_quietly() -> None:
    """A connection's sender task can stop reading its outbox a moment before the member
    leaves (cancellation at shutdown); fan-out must then drop it, not crash the sender."""
    hub = Hub()
    gone, staying = hub.join("r", "gone"), hub.join("r", "staying")
    drain(staying)
    gone.outbox.close()
    hub.publish(staying, ChatMessage("hi"))
    assert not gone.joined and gone.close_code is None
    assert hub.stats.evictions == 0
    hub.flush_presence()
    events = drain(staying)
    assert types(events) == ["message", "system"]
    assert (events[1]["left"], events[1]["count"]) == (["gone"], 1)


async def test_a_mass_disconnect_drops_everyone_without_deep_recursion() -> None:
    """1,000 peers gone at once: their senders have stopped, their receive loops have not
    left yet. Presence finds them all at its next notice (each wake-up meets a closed
    outbox); dropping them must be a loop: nested, this was a RecursionError that killed
    the connection handler that happened to leave first."""
    hub = Hub(outbox_size=4)
    staying = hub.join("r", "staying")
    gone = [hub.join("r", f"g{i}") for i in range(1500)]
    drain(staying)
    for member in gone:
        member.outbox.close()
    hub.leave(gone[0])
    hub.flush_presence()  # wakes everyone who has not seen the last change
    assert list(hub.rooms["r"].members) == [staying]
    assert all(not m.joined and m.close_code is None for m in gone)
    hub.flush_presence()  # the drops, announced
    [notice] = [e for e in drain(staying) if e["type"] == "system"][-1:]
    assert (notice["count"], notice["members"], notice["leaves"]) == (1, ["staying"], 1499)


async def test_a_users_tabs_count_once_as_they_come_and_go() -> None:
    hub = Hub()
    tabs = [hub.join("r", "Ann", user="ann") for _ in range(3)]
    bob = hub.join("r", "Bob", user="bob")
    anonymous = [hub.join("r") for _ in range(2)]
    room = hub.rooms["r"]
    assert room.count == 4 and room.people() == [
        ("ann", "Ann"),
        ("bob", "Bob"),
        (None, None),
        (None, None),
    ]
    expected = [4, 4, 3]  # ann is there until her last tab goes
    for tab, count in zip(tabs, expected, strict=True):
        hub.leave(tab)
        assert room.count == count
    for member in [bob, *anonymous]:
        hub.leave(member)
    assert (room.count, room.extra_tabs, dict(room.users)) == (0, 0, {})


def test_membership_fanout_and_presence_each_live_in_a_module_of_their_own() -> None:
    """Issue 21 ("keep the house readable"): the hub is a package whose parts each own one
    concern and say which in their docstring, none of them the 1,000-line module it was;
    everything the rest of roomcast imports from ``roomcast.hub`` is still there."""
    import roomcast.hub
    from roomcast.hub import fanout, flusher, membership, model

    exported = {"PRESENCE_RATE", "PRESENCE_WAKE", "Announce", "Client", "Hub", "HubStats"}
    exported |= {"Member", "NameTaken", "PresenceSource", "Room", "RoomFull", "replay"}
    assert exported <= set(roomcast.hub.__all__)
    assert all(hasattr(roomcast.hub, name) for name in exported)
    owners: list[tuple[ModuleType, list[Any]]] = [
        (membership, [Hub.join, Hub.attach, Hub.end_client, Hub.leave, Hub.close_all]),
        (fanout, [Hub.publish, Hub.deliver, Hub.relay_typing, Hub.notify]),
        (flusher, [flusher.PresenceFlusher.run_presence, flusher.PresenceFlusher.note_presence]),
        (model, [Member, roomcast.hub.Client, roomcast.hub.Room]),
    ]
    for module, parts in owners:
        assert {part.__module__ for part in parts} == {module.__name__}
        assert module.__doc__ and module.__file__ is not None
        with open(module.__file__, encoding="utf-8") as source:
            assert sum(1 for _ in source) < 500
    hub = Hub()
    assert hub.run_presence == hub.flusher.run_presence
    assert hub.announce == hub.flusher.announce_locally
