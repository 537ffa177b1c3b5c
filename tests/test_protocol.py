"""The sans-IO chat protocol: no event loop, no sockets."""

from __future__ import annotations

from urllib.parse import quote

import orjson
import pytest

from roomcast import protocol
from roomcast.presence import PresenceChanges
from roomcast.protocol import ChatMessage, ChatQuery, CloseCode, ErrorCode, ProtocolError


def parse(frame: str, max_text: int = 4000) -> ChatMessage | None:
    return protocol.parse_client_frame(frame, max_text=max_text)


class TestParseChatText:
    def test_json_object_with_text_and_id(self) -> None:
        assert parse('{"text": "hi", "id": "m1"}') == ChatMessage("hi", "m1")

    def test_json_object_with_text_only(self) -> None:
        assert parse('{"text": "hi"}') == ChatMessage("hi", None)

    @pytest.mark.parametrize(
        "frame",
        [
            "hello there",
            "[1, 2, 3]",
            '"a json string"',
            "42",
            '{"message": "no text key"}',
            '{"text": 5}',
            "{not json",
        ],
    )
    def test_anything_else_is_the_whole_frame(self, frame: str) -> None:
        assert parse(frame) == ChatMessage(frame, None)

    @pytest.mark.parametrize("frame", ["", "   ", "\n\t", '{"text": ""}', '{"text": "  "}'])
    def test_empty_text_is_ignored(self, frame: str) -> None:
        assert parse(frame) is None

    def test_text_over_the_limit_is_refused(self) -> None:
        assert parse("x" * 10, max_text=10) == ChatMessage("x" * 10)
        with pytest.raises(ProtocolError) as info:
            parse("x" * 11, max_text=10)
        assert info.value.code is ErrorCode.TOO_LONG
        assert "11" in info.value.message and "10" in info.value.message

    def test_limit_counts_characters_not_bytes(self) -> None:
        assert parse("é" * 10, max_text=10) == ChatMessage("é" * 10)

    @pytest.mark.parametrize("bad_id", [5, ["x"], "i" * 65, {"a": 1}])
    def test_bad_id_is_refused(self, bad_id: object) -> None:
        with pytest.raises(ProtocolError) as info:
            parse(orjson.dumps({"text": "hi", "id": bad_id}).decode())
        assert info.value.code is ErrorCode.BAD_ID

    def test_lone_surrogate_escape_falls_back_to_plain_text(self) -> None:
        frame = '{"text": "\\ud800"}'
        assert parse(frame) == ChatMessage(frame)

    def test_deeply_nested_json_is_plain_text(self) -> None:
        frame = "{" + '"a":[' * 5000 + "]" * 5000 + "}"
        message = parse(frame, max_text=len(frame))
        assert message == ChatMessage(frame)


class TestParseChatQuery:
    def test_defaults(self) -> None:
        assert protocol.parse_chat_query(b"") == ChatQuery(room="general")

    def test_all_parameters(self) -> None:
        query = protocol.parse_chat_query(b"room=a.b-c_1&name=Al%20B&token=t&since=7&epoch=e-1")
        assert query == ChatQuery(room="a.b-c_1", name="Al B", token="t", since=7, epoch="e-1")

    def test_first_value_wins_and_unknown_parameters_are_ignored(self) -> None:
        assert protocol.parse_chat_query(b"room=a&room=b&x=1").room == "a"

    @pytest.mark.parametrize(
        ("query", "names"),
        [
            (b"room=", "room"),
            (b"room=" + b"a" * 65, "room"),
            (b"room=a%20b", "room"),
            (b"room=%F0%9F%98%80", "room"),
            (b"name=" + b"n" * 33, "name"),
            (b"name=a%0Ab", "name"),
            (b"name=%1b[31m", "name"),
            (b"name=%E2%80%AEevil", "name"),
            (b"name=%20%20", "name"),
            (b"name=a%E2%80%8Bnn", "name"),  # a zero-width space: "ann" twice over
            (b"name=a%E2%80%A8b", "name"),
            (b"since=-1", "since"),
            (b"since=abc", "since"),
            (b"since=%D9%A3", "since"),
            (b"epoch=a/b", "epoch"),
            (b"room=%FF", "query string"),
        ],
    )
    def test_invalid_parameters_name_what_was_expected(self, query: bytes, names: str) -> None:
        with pytest.raises(ProtocolError) as info:
            protocol.parse_chat_query(query)
        assert info.value.code is CloseCode.BAD_REQUEST
        assert names in info.value.message

    @pytest.mark.parametrize("name", ["Zoë", "Jean Paul", "👨\u200d👩\u200d👧", "李小龍"])
    def test_names_people_actually_use(self, name: str) -> None:
        query = f"name={quote(name)}".encode()
        assert protocol.parse_chat_query(query).name == name

    def test_names_are_normalised(self) -> None:
        assert protocol.parse_chat_query(b"name=Jean%C2%A0Paul%20").name == "Jean Paul"
        assert protocol.parse_chat_query(b"name=%EF%BD%81nn").name == "ann"  # fullwidth a

    def test_room_of_64_characters_is_fine(self) -> None:
        assert protocol.parse_chat_query(b"room=" + b"r" * 64).room == "r" * 64


class TestEncode:
    def test_message_fields(self) -> None:
        event = orjson.loads(
            protocol.encode_message(room="r", seq=3, text="hi", sender=None, ts=10, id="m")
        )
        assert event == {
            "type": "message",
            "text": "hi",
            "room": "r",
            "seq": 3,
            "from": None,
            "user": None,
            "ts": 10,
            "id": "m",
        }

    def test_message_without_id_has_no_id_field(self) -> None:
        event = orjson.loads(protocol.encode_message(room="r", seq=1, text="t", sender="a", ts=1))
        assert "id" not in event

    def test_welcome_lists_at_most_100_members(self) -> None:
        names = [f"n{i}" for i in range(150)]
        people = [(f"u{i}" if i % 2 else None, name) for i, name in enumerate(names)]
        event = orjson.loads(
            protocol.encode_welcome(
                room="r", epoch="e", seq=4, people=people, count=150, max_text=4000
            )
        )
        assert event["members"] == names[:100]
        # the same people with their ids (a direct room names ids), for v2 clients
        assert event["people"] == [{"user": u, "name": n} for u, n in people[:100]]
        assert (event["type"], event["count"], event["seq"], event["epoch"]) == (
            "welcome",
            150,
            4,
            "e",
        )

    def test_welcome_tells_the_client_the_longest_text_the_server_takes(self) -> None:
        # a client that knows the limit keeps an over-long draft rather than sending it
        # into a refusal (issue 20, item 4)
        event = orjson.loads(
            protocol.encode_welcome(room="r", epoch="e", seq=0, people=[], count=1, max_text=20)
        )
        assert event["limits"] == {"text": 20}

    @pytest.mark.parametrize(
        ("name", "event", "message"),
        [
            (None, "join", "A user joined #r"),
            ("ann", "join", "ann joined #r"),
            (None, "leave", "A user left #r"),
            ("bob", "leave", "bob left #r"),
        ],
    )
    def test_a_single_change_keeps_the_seed_notice_fields(
        self, name: str | None, event: str, message: str
    ) -> None:
        changes = PresenceChanges()
        changes.add("join" if event == "join" else "leave", name)
        decoded = orjson.loads(changes.encode("r", count=2, people=[("u", "x"), (None, "y")]))
        assert {k: decoded[k] for k in ("type", "message", "event", "name", "count")} == {
            "type": "system",
            "message": message,
            "event": event,
            "name": name,
            "count": 2,
        }
        assert decoded["members"] == ["x", "y"]
        assert decoded["people"] == [{"user": "u", "name": "x"}, {"user": None, "name": "y"}]

    @pytest.mark.parametrize(
        ("joins", "leaves", "message", "event"),
        [
            (["ann", "bob"], [], "ann and bob joined #r", "join"),
            (["ann", None, "bob", None], [], "ann, bob and 2 others joined #r", "join"),
            ([None, None, None], [], "3 users joined #r", "join"),
            ([], ["ann", "bob", "cy"], "ann, bob and cy left #r", "leave"),
            (["ann"], [None], "ann joined and A user left #r", "presence"),
            ([f"u{i}" for i in range(12)], ["ann"], None, "presence"),
        ],
    )
    def test_coalesced_notices(
        self, joins: list[str | None], leaves: list[str | None], message: str | None, event: str
    ) -> None:
        changes = PresenceChanges()
        for name in joins:
            changes.add("join", name)
        for name in leaves:
            changes.add("leave", name)
        decoded = orjson.loads(changes.encode("r", count=7, people=None))
        assert (decoded["event"], decoded["name"], decoded["count"]) == (event, None, 7)
        if message is not None:
            assert decoded["message"] == message
        named = [n for n in joins if n is not None]
        assert decoded["joined"] == named[: protocol.MAX_PRESENCE_NAMES]
        assert decoded["left"] == [n for n in leaves if n is not None]
        assert (decoded["joins"], decoded["leaves"]) == (len(joins), len(leaves))
        assert "members" not in decoded  # not known where the notice was encoded
        assert "people" not in decoded

    def test_a_crowd_costs_a_bounded_notice(self) -> None:
        changes = PresenceChanges()
        for i in range(5000):
            changes.add("join", f"member-{i}")
            changes.add("leave", f"member-{i}")
        assert len(changes.joined) == len(changes.left) == protocol.MAX_PRESENCE_NAMES
        people = [(f"user-{i}", f"n{i}") for i in range(500)]
        notice = changes.encode("r", count=1, people=people)
        decoded = orjson.loads(notice)
        assert decoded["message"] == (
            "member-0, member-1, member-2, member-3, member-4, member-5, member-6, member-7, "
            "member-8, member-9 and 4990 others joined and member-0, member-1, member-2, "
            "member-3, member-4, member-5, member-6, member-7, member-8, member-9 and 4990 "
            "others left #r"
        )
        assert len(decoded["members"]) == len(decoded["people"]) == protocol.MAX_WELCOME_MEMBERS
        assert len(notice) < 6000

    def test_ack_and_error(self) -> None:
        assert orjson.loads(protocol.encode_ack(id="x", seq=9)) == {
            "type": "ack",
            "id": "x",
            "seq": 9,
        }
        error = orjson.loads(protocol.encode_error(ErrorCode.TOO_LONG, "too long"))
        assert error == {"type": "error", "error": "too_long", "message": "too long"}

    def test_batch_is_one_event_per_line_even_with_newlines_in_text(self) -> None:
        events = [
            protocol.encode_message(room="r", seq=i, text="line1\nline2", sender=None, ts=0)
            for i in (1, 2)
        ]
        frame = protocol.join_batch(events)
        assert [orjson.loads(line)["seq"] for line in frame.split("\n")] == [1, 2]


def test_an_object_with_another_type_is_a_command() -> None:
    assert parse('{"type": "refresh", "token": "t0k"}') == protocol.Refresh("t0k")
    assert parse('{"type": "message", "text": "hi"}') == protocol.ChatMessage("hi")
    for frame, code in [
        ('{"type": "refresh"}', protocol.ErrorCode.BAD_TOKEN),
        ('{"type": "refresh", "token": 5}', protocol.ErrorCode.BAD_TOKEN),
        ('{"type": "typing", "text": "hi"}', protocol.ErrorCode.UNKNOWN_TYPE),
    ]:
        with pytest.raises(protocol.BadMessage) as refused:
            parse(frame)
        assert refused.value.code == code
    assert parse('{"type": 5, "text": "hi"}') == protocol.ChatMessage("hi")  # not a string


@pytest.mark.parametrize(
    ("frame", "id"),
    [
        ('{"type": "message", "room": "r", "text": 5, "id": "m1"}', "m1"),
        ('{"type": "message", "room": "r", "id": "m2"}', "m2"),
        ('{"type": "message", "room": "r", "text": null}', None),
        ('{"type": "message", "room": "r", "text": 5, "id": 7}', None),
    ],
)
def test_a_v2_message_without_a_string_text_is_refused_with_its_id(
    frame: str, id: str | None
) -> None:
    # docs/protocol.md: every refused message gets its own error, with the message's id
    with pytest.raises(protocol.BadMessage) as refused:
        protocol.parse_command(frame, max_text=4000)
    assert (refused.value.code, refused.value.id, refused.value.room) == (
        ErrorCode.BAD_REQUEST,
        id,
        "r",
    )


@pytest.mark.parametrize("since", ["true", "false", "1.0", '"3"', "-1"])
def test_a_v2_join_refuses_a_since_that_is_not_a_whole_number(since: str) -> None:
    # JSON true must not read as since=1 (a replay from seq 2), as for history's before
    with pytest.raises(protocol.BadMessage) as refused:
        protocol.parse_command(f'{{"type": "join", "room": "r", "since": {since}}}', max_text=10)
    assert (refused.value.code, refused.value.room) == (ErrorCode.BAD_REQUEST, "r")


def test_a_v2_join_takes_a_whole_since() -> None:
    join = protocol.parse_command('{"type": "join", "room": "r", "since": 0}', max_text=10)
    assert join == protocol.Join("r", 0, None)


def test_a_v2_query_takes_its_name_and_ignores_v1_parameters() -> None:
    # /ws?name=&token=: room, since and epoch are /ws/chat's; /ws ignored a valid one and
    # closed 4400 "room must be ..." for an invalid one
    assert protocol.parse_rooms_name(b"name=ada&room=&since=x&epoch=!") == "ada"
    assert protocol.parse_rooms_name(b"room=bad%20room") is None
    assert protocol.parse_rooms_name(b"name=") is None
    with pytest.raises(ProtocolError, match="line break"):
        protocol.parse_rooms_name(b"name=a%0Ab")
    with pytest.raises(ProtocolError, match="UTF-8"):
        protocol.parse_rooms_name(b"name=%FF")
