"""Retained history has a byte budget per room and one across rooms without members, so
what a client can make the server keep is bounded in bytes, not only in messages."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from roomcast.history import ENTRY_OVERHEAD, History, entry_size
from roomcast.hub import Hub, Member
from roomcast.protocol import ChatMessage

pytestmark = pytest.mark.anyio

EMOJI = "\U0001f600"  # 4 bytes a character in a str, as in UTF-8


def greeting(member: Member) -> list[dict[str, Any]]:
    return [orjson.loads(e) for e in member.greeting]


def test_entry_size_is_what_the_string_holds_in_memory() -> None:
    ascii_event, emoji_event = '{"text":"' + "x" * 4000 + '"}', '{"text":"' + EMOJI * 4000 + '"}'
    assert 4000 < entry_size(ascii_event) - ENTRY_OVERHEAD < 4100
    assert 16_000 < entry_size(emoji_event) - ENTRY_OVERHEAD < 16_200


def test_history_keeps_the_newest_within_count_and_bytes() -> None:
    history = History(max_count=5, max_bytes=3 * entry_size("x" * 1000))
    for seq in range(1, 4):
        assert history.append(seq, "x" * 1000) == entry_size("x" * 1000)
    assert [seq for seq, _ in history.entries] == [1, 2, 3]
    assert history.append(4, "x" * 1000) == 0  # one in, one out
    assert [seq for seq, _ in history.entries] == [2, 3, 4]
    history.append(5, "y")
    history.append(6, "y")
    assert [seq for seq, _ in history.entries] == [3, 4, 5, 6]  # bytes bound
    for seq in range(7, 12):
        history.append(seq, "y")
    assert [seq for seq, _ in history.entries] == [7, 8, 9, 10, 11]  # count bound
    assert history.bytes == sum(entry_size(e) for _, e in history.entries)


def test_a_message_bigger_than_the_budget_is_not_kept() -> None:
    history = History(max_count=100, max_bytes=1000)
    history.append(1, "small")
    history.append(2, "x" * 2000)
    assert len(history) == 0 and history.bytes == 0


async def test_resume_past_the_byte_budget_is_a_history_gap() -> None:
    hub = Hub(history_size=100, history_bytes=30_000)
    talker = hub.join("r", "talker")
    for i in range(20):
        hub.publish(talker, ChatMessage(f"{i}:" + EMOJI * 2000))  # ~8 KB each in memory
    room = hub.rooms["r"]
    kept = [seq for seq, _ in room.history.entries]
    assert kept == [18, 19, 20] and room.history.bytes <= 30_000
    events = greeting(hub.join("r", since=5, epoch=room.epoch))
    assert [e["type"] for e in events] == ["welcome", "error", "message", "message", "message"]
    assert (events[1]["error"], events[1]["since"], events[1]["first"]) == ("history_gap", 5, 18)


async def test_rooms_without_members_share_one_byte_budget() -> None:
    per_room = 20_000
    hub = Hub(history_bytes=per_room, idle_history_bytes=3 * per_room, idle_rooms=1000)
    epochs = {}
    for n in range(10):
        member = hub.join(f"r{n}", "visitor")
        for i in range(10):  # max-size messages, far past the room's own budget
            hub.publish(member, ChatMessage(EMOJI * 4000 + str(i)))
        epochs[n] = hub.rooms[f"r{n}"].epoch
        assert hub.rooms[f"r{n}"].history.bytes <= per_room
        hub.leave(member)
        idle = [room for room in hub.rooms.values() if not room.members]
        assert hub.idle_bytes == sum(room.history.bytes for room in idle) <= 3 * per_room
    # the least recently emptied were forgotten: coming back starts a new run (history_gap)
    assert sorted(hub.rooms) == ["r7", "r8", "r9"]
    back = greeting(hub.join("r0", since=10, epoch=epochs[0]))
    assert back[1]["error"] == "history_gap" and back[0]["epoch"] != epochs[0]
    # a room that is joined again leaves the idle budget; leaving puts it back
    again = hub.join("r9", since=10, epoch=epochs[9])
    assert greeting(again)[0]["seq"] == 10
    assert hub.idle_bytes == sum(hub.rooms[n].history.bytes for n in ("r7", "r8"))
    hub.leave(again)
    assert sorted(hub.rooms) == ["r0", "r7", "r8", "r9"]  # r0: back holds it
    assert hub.idle_bytes == sum(hub.rooms[n].history.bytes for n in ("r7", "r8", "r9"))


async def test_no_idle_budget_forgets_rooms_at_once() -> None:
    hub = Hub(idle_history_bytes=0)
    member = hub.join("r")
    hub.publish(member, ChatMessage("hello"))
    hub.leave(member)
    assert hub.rooms == {} and hub.idle_bytes == 0
