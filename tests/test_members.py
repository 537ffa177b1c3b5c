"""Who is in a room, on a real server: a verified user's tabs are one member, a live
token expires on time unless refreshed (SPEC §8.1, §8.3), and no name can pass for another
member's (the look-alikes of ``test_names``, in every auth mode)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import jwt
import pytest

from roomcast.identity import LEEWAY, mint_token
from test_names import LOOK_ALIKES

from rawws import RawWebSocket, open_raw_websocket
from servers import ServerProcess, spawn_server

SECRET = "a-secret-of-at-least-thirty-two-bytes!"


@pytest.fixture(scope="module")
def signed() -> Iterator[ServerProcess]:
    with spawn_server(env={"ROOMCAST_JWT_SECRET": SECRET, "ROOMCAST_RATE_LIMIT": "0"}) as server:
        yield server


@pytest.fixture(scope="module")
def anonymous() -> Iterator[ServerProcess]:
    with spawn_server(env={"ROOMCAST_RATE_LIMIT": "0"}) as server:
        yield server


def token(sub: str, name: str, ttl: float = 600) -> str:
    return mint_token(SECRET, sub=sub, name=name, ttl=ttl)


def join(server: ServerProcess, room: str, *, token: str = "", name: str = "") -> RawWebSocket:
    query = (
        f"room={room}" + (f"&token={token}" if token else "") + (f"&name={name}" if name else "")
    )
    return open_raw_websocket(server.port, f"/ws/chat?{query}", timeout=15)


def next_event(ws: RawWebSocket, type_: str) -> Any:
    while True:
        event = json.loads(ws.next_message())
        if event["type"] == type_:
            return event


def test_two_tabs_of_one_user_are_one_member(signed: ServerProcess) -> None:
    room = "tabs"
    observer = join(signed, room, token=token("obs", "Observer"))
    next_event(observer, "welcome")
    first = join(signed, room, token=token("ann", "Ann"))
    next_event(first, "welcome")
    joined = next_event(observer, "system")
    assert (joined["event"], joined["name"], joined["user"], joined["count"]) == (
        "join",
        "Ann",
        "ann",
        2,
    )
    second = join(signed, room, token=token("ann", "Ann"))
    welcome = next_event(second, "welcome")
    assert (welcome["members"], welcome["count"]) == (["Observer", "Ann"], 2)
    second.send_text(json.dumps({"text": "from the second tab", "id": "t2"}))
    message = next_event(observer, "message")
    assert (message["from"], message["user"]) == ("Ann", "ann")
    second.sock.close()  # the second tab leaves alone: nobody is told

    bob = join(signed, room, token=token("bob", "Bob"))  # the next change observer hears of
    assert next_event(bob, "welcome")["count"] == 3
    notice = next_event(observer, "system")
    assert (notice["event"], notice["joined"], notice["left"], notice["count"]) == (
        "join",
        ["Bob"],
        [],
        3,
    )
    first.sock.close()  # the last tab: now Ann leaves
    notice = next_event(observer, "system")
    assert (notice["event"], notice["left"], notice["count"]) == ("leave", ["Ann"], 2)
    for ws in (observer, bob):
        ws.sock.close()


def test_a_token_expires_on_a_live_connection_unless_refreshed(signed: ServerProcess) -> None:
    """The wiring on a real server; the timing is tested to the millisecond on trio's
    MockClock (test_clock)."""
    short = token("exp", "Exp", ttl=1)
    lapsing = join(signed, "expiry", token=short)
    refreshing = join(signed, "expiry", token=token("ref", "Ref", ttl=1))
    for ws in (lapsing, refreshing):
        next_event(ws, "welcome")
    refreshing.send_text(json.dumps({"type": "refresh", "token": token("ref", "Ref", ttl=600)}))

    code, reason, _ = lapsing.read_until_close()
    closed_at = time.time()
    assert (code, reason) == (4001, "token expired")
    expires = jwt.decode(short, options={"verify_signature": False})["exp"]
    assert expires + LEEWAY - 1 <= closed_at <= expires + LEEWAY + 2

    refreshing.send_text(json.dumps({"text": "still here", "id": "r1"}))
    assert next_event(refreshing, "ack")["id"] == "r1"
    refreshing.sock.close()
    lapsing.sock.close()


@pytest.mark.parametrize(("spelling", "outcome"), LOOK_ALIKES)
@pytest.mark.parametrize("mode", ["anonymous", "signed"])
def test_no_look_alike_of_a_members_name_gets_in(
    anonymous: ServerProcess, signed: ServerProcess, mode: str, spelling: str, outcome: str
) -> None:
    """Refused as a name (invisible characters: 4400 from the name check) or as another
    member's (4400 "the name ... is taken"); anonymous names and token names alike."""
    server = signed if mode == "signed" else anonymous
    room = f"look-{mode}"
    alice = join(server, room, **_as(mode, "alice", "alice"))
    next_event(alice, "welcome")
    other = join(server, room, **_as(mode, "mallory", spelling))
    try:
        code, reason, _ = other.read_until_close()
    finally:
        other.sock.close()
        alice.sock.close()
    if mode == "signed" and outcome == "refused":
        assert code == 4001  # a token whose name claim is unusable is refused as a token
        assert reason == "the name claim is not a usable display name"
    else:
        assert code == 4400
        if outcome == "same":
            assert reason.startswith("the name ") and reason.endswith(f" is taken in #{room}")


def _as(mode: str, user: str, name: str) -> dict[str, str]:
    return {"token": token(user, name)} if mode == "signed" else {"name": quote(name)}
