"""The server API (SPEC §8.2): request rules without a server, then the endpoints on a real
``python -m roomcast``, and across two servers sharing one Redis; disconnecting a user (with
signed tokens) on one server, and across servers and workers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest

from roomcast.api import ApiError, parse_history_query, parse_publish, parse_user
from roomcast.client.api import ApiRefused, open_server_api
from roomcast.identity import mint_token
from roomcast.settings import Settings
from roomcast.testing import open_test_client

from chatters import Chatter, owner_of
from rawws import RawWebSocket, open_raw_websocket
from redis_server import RedisServer
from servers import ServerProcess, spawn_server

KEY = "s3cret-api-key"
AUTH = {"authorization": f"Bearer {KEY}"}
SECRET = "a-secret-of-at-least-thirty-two-bytes!"
DISCONNECTED = (4001, "disconnected by the server")


# -- request rules (sans I/O) ----------------------------------------------------------------


def test_a_publish_body_is_a_json_object_with_text() -> None:
    publish = parse_publish(b'{"text": "hi", "from": "ops", "id": "a1"}', max_text=10)
    assert (publish.message.text, publish.message.id, publish.sender) == ("hi", "a1", "ops")
    assert parse_publish(b'{"text": "hi"}', max_text=10).sender is None


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"not json", 400, "bad_request"),
        (b'["text"]', 400, "bad_request"),
        (b"{}", 400, "bad_request"),
        (b'{"text": 5}', 400, "bad_request"),
        (b'{"text": "   "}', 400, "bad_request"),
        (b'{"text": "' + b"x" * 11 + b'"}', 413, "too_long"),
        (b'{"text": "hi", "from": "a\\u202eb"}', 400, "bad_request"),
        (b'{"text": "hi", "from": ""}', 400, "bad_request"),
        (b'{"text": "hi", "id": 7}', 400, "bad_id"),
    ],
)
def test_bad_publish_bodies_are_refused(body: bytes, status: int, code: str) -> None:
    with pytest.raises(ApiError) as refused:
        parse_publish(body, max_text=10)
    assert (refused.value.status, refused.value.code) == (status, code)


def test_a_user_id_in_a_path_is_percent_decoded_utf8_of_1_to_256_characters() -> None:
    assert parse_user(b"team%2Fann%20%C3%BC:1") == "team/ann \u00fc:1"
    assert parse_user(b"x" * 256) == "x" * 256
    for bad in (b"", b"x" * 257, b"%FF", b"%C3"):
        with pytest.raises(ApiError) as refused:
            parse_user(bad)
        assert (refused.value.status, refused.value.code) == (400, "bad_request")


def test_history_paging_parameters() -> None:
    assert parse_history_query(b"") == (0, 100)
    assert parse_history_query(b"since=5&limit=2") == (5, 2)
    for bad in (b"since=-1", b"since=x", b"limit=0", b"limit=1001", b"limit=two", b"since=%C2%B2"):
        with pytest.raises(ApiError):
            parse_history_query(bad)


# -- on a real server -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    env = {"ROOMCAST_API_KEY": KEY, "ROOMCAST_RATE_LIMIT": "0", "ROOMCAST_MAX_TEXT": "100"}
    with spawn_server(env=env) as server:
        yield server


def api(server: ServerProcess, method: str, path: str, **kwargs: Any) -> httpx.Response:
    headers = kwargs.pop("headers", AUTH)
    return httpx.request(method, server.http_url(path), headers=headers, timeout=10, **kwargs)


def test_a_posted_message_reaches_members_with_the_next_seq_and_stays_in_history(
    server: ServerProcess,
) -> None:
    ada = Chatter.join(server.port, "api-room", "ada")
    before = ada.say("from a member")
    posted = api(
        server,
        "POST",
        "/api/rooms/api-room/messages",
        json={"text": "from the backend", "from": "ops", "id": "job-1"},
    )
    assert posted.status_code == 200 and posted.json() == {"seq": before + 1}
    while (event := ada.next_event())["type"] != "message":
        pass  # the ack of ada's own message
    assert (event["type"], event["seq"], event["text"], event["from"], event["id"]) == (
        "message",
        before + 1,
        "from the backend",
        "ops",
        "job-1",
    )
    history = api(server, "GET", "/api/rooms/api-room/history").json()
    assert [m["text"] for m in history["messages"]] == ["from a member", "from the backend"]
    assert (history["seq"], history["first"]) == (before + 1, 1)
    assert history["epoch"] == json.loads(ada_welcome(server))["epoch"]
    presence = api(server, "GET", "/api/rooms/api-room/presence").json()
    assert presence == {"room": "api-room", "count": 1, "members": [{"user": None, "name": "ada"}]}
    assert {"name": "api-room", "count": 1} in api(server, "GET", "/api/rooms").json()["rooms"]
    ada.ws.sock.close()


def ada_welcome(server: ServerProcess) -> str:
    from rawws import open_raw_websocket

    ws = open_raw_websocket(server.port, "/ws/chat?room=api-room")
    try:
        return str(ws.next_message())
    finally:
        ws.sock.close()


def test_history_pages_with_since_and_limit(server: ServerProcess) -> None:
    for n in range(1, 8):
        assert api(server, "POST", "/api/rooms/paged/messages", json={"text": f"m{n}"}).json() == {
            "seq": n
        }
    page = api(server, "GET", "/api/rooms/paged/history?since=2&limit=3").json()
    assert [m["seq"] for m in page["messages"]] == [3, 4, 5]
    rest = api(server, "GET", "/api/rooms/paged/history?since=5").json()
    assert [m["text"] for m in rest["messages"]] == ["m6", "m7"]
    empty = api(server, "GET", "/api/rooms/never-used/history").json()
    assert (empty["epoch"], empty["seq"], empty["messages"]) == (None, 0, [])


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "code"),
    [
        ("POST", "/api/rooms/r/messages", {"headers": {}}, 401, "unauthorized"),
        ("GET", "/api/rooms", {"headers": {"authorization": "Bearer wrong"}}, 401, "unauthorized"),
        ("GET", "/api/rooms", {"headers": {"authorization": b"Bearer \xe9"}}, 401, "unauthorized"),
        ("GET", "/api/rooms/r/history?since=%C2%B2", {}, 400, "bad_request"),
        ("GET", "/api/rooms/r/history?limit=%D9%A3", {}, 400, "bad_request"),
        ("POST", "/api/rooms/r/messages", {"content": b"{"}, 400, "bad_request"),
        ("POST", "/api/rooms/r/messages", {"json": {"text": "x" * 101}}, 413, "too_long"),
        ("POST", "/api/rooms/r/messages", {"content": b"x" * 70_000}, 413, "too_large"),
        ("POST", "/api/rooms/bad%20room/messages", {"json": {"text": "x"}}, 400, "bad_request"),
        ("GET", "/api/rooms/r/messages", {}, 405, "method_not_allowed"),
        ("GET", "/api/nothing", {}, 404, "not_found"),
        ("GET", "/api/rooms/r/history?limit=5000", {}, 400, "bad_request"),
        ("POST", "/api/users/ann/disconnect", {"headers": {}}, 401, "unauthorized"),
        ("GET", "/api/users/ann/disconnect", {}, 405, "method_not_allowed"),
        ("POST", "/api/users//disconnect", {}, 400, "bad_request"),
        ("POST", "/api/users/" + "x" * 257 + "/disconnect", {}, 400, "bad_request"),
        ("POST", "/api/users/%FF/disconnect", {}, 400, "bad_request"),
        ("POST", "/api/users/ann", {}, 404, "not_found"),
    ],
)
def test_refused_requests_say_why(
    server: ServerProcess, method: str, path: str, kwargs: dict[str, Any], status: int, code: str
) -> None:
    response = api(server, method, path, **kwargs)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"] == code
    if status == 401:
        assert response.headers["www-authenticate"] == "Bearer"


def test_without_a_key_the_api_does_not_exist() -> None:
    with spawn_server() as server:
        response = httpx.get(server.http_url("/api/rooms"), headers=AUTH, timeout=10)
        assert (response.status_code, response.text) == (404, "Not Found")


def test_a_message_posted_on_one_server_reaches_both_with_redis(redis_server: RedisServer) -> None:
    env = {
        "ROOMCAST_API_KEY": KEY,
        "ROOMCAST_RATE_LIMIT": "0",
        "ROOMCAST_REDIS_URL": redis_server.url,
    }
    with spawn_server(env=env) as first, spawn_server(env=env) as second:
        members = [
            Chatter.join(server.port, "shared", name)
            for server, name in ((first, "a"), (second, "b"))
        ]
        seq = members[0].say("hello")
        posted = api(second, "POST", "/api/rooms/shared/messages", json={"text": "posted"}).json()
        assert posted == {"seq": seq + 1}
        for member in members:
            while (event := member.next_event())["type"] != "message" or event["seq"] <= seq:
                pass
            assert (event["seq"], event["text"]) == (seq + 1, "posted")
        history = api(first, "GET", "/api/rooms/shared/history").json()
        assert [m["text"] for m in history["messages"]] == ["hello", "posted"]
        presence = api(first, "GET", "/api/rooms/shared/presence").json()
        assert sorted(m["name"] for m in presence["members"]) == ["a", "b"]
        for member in members:
            member.ws.sock.close()


# -- signed tokens: users in presence, disconnecting a user --------------------------------


@pytest.fixture(scope="module")
def signed() -> Iterator[ServerProcess]:
    env = {"ROOMCAST_API_KEY": KEY, "ROOMCAST_JWT_SECRET": SECRET, "ROOMCAST_RATE_LIMIT": "0"}
    with spawn_server(env=env) as server:
        yield server


def connect(server: ServerProcess, user: str, room: str) -> tuple[RawWebSocket, dict[str, Any]]:
    """A connection of ``user`` (named after it, capitalised) and its welcome."""
    token = mint_token(SECRET, sub=user, name=user.capitalize(), ttl=600)
    ws = open_raw_websocket(server.port, f"/ws/chat?room={room}&token={token}")
    welcome = json.loads(ws.next_message())
    assert welcome["type"] == "welcome", welcome
    return ws, welcome


def closed_with(ws: RawWebSocket) -> tuple[int, str]:
    code, reason, _ = ws.read_until_close()
    ws.sock.close()
    return code, reason


def presence_until(ws: RawWebSocket, count: int) -> list[dict[str, Any]]:
    """The presence notices ``ws`` reads until one shows ``count``."""
    notices: list[dict[str, Any]] = []
    while not notices or notices[-1]["count"] != count:
        event = json.loads(ws.next_message())
        if event["type"] == "system":
            notices.append(event)
    return notices


def test_presence_lists_each_user_once_however_many_tabs(signed: ServerProcess) -> None:
    tabs = [connect(signed, user, "tabs")[0] for user in ("ann", "bob", "ann", "ann")]
    presence = api(signed, "GET", "/api/rooms/tabs/presence").json()
    assert presence == {
        "room": "tabs",
        "count": 2,
        "members": [{"user": "ann", "name": "Ann"}, {"user": "bob", "name": "Bob"}],
    }
    assert {"name": "tabs", "count": 2} in api(signed, "GET", "/api/rooms").json()["rooms"]
    for tab in tabs:
        tab.sock.close()


def still_connected(ws: RawWebSocket) -> None:
    """``ws`` is still a member: its message comes back (its ack may come first)."""
    ws.send_text(json.dumps({"text": "still here", "id": "check"}))
    while (event := json.loads(ws.next_message()))["type"] != "message":
        assert event["type"] == "ack", event
    assert event["text"] == "still here"


def test_disconnect_closes_every_connection_of_the_user_and_no_other(
    signed: ServerProcess,
) -> None:
    bob, _ = connect(signed, "bob", "team")
    tabs = [connect(signed, "ann", room)[0] for room in ("team", "team", "side")]
    assert [n["event"] for n in presence_until(bob, 2)] == ["join"]

    response = api(signed, "POST", "/api/users/ann/disconnect")
    assert (response.status_code, response.json()) == (200, {"closed": 3})
    for tab in tabs:
        assert closed_with(tab) == DISCONNECTED
    notices = presence_until(bob, 1)  # her tabs were one member: one leave
    assert sum(n["leaves"] for n in notices) == 1 and notices[-1]["left"] == ["Ann"]
    still_connected(bob)

    again, welcome = connect(signed, "ann", "team")  # not a ban: her token still works
    assert welcome["count"] == 2
    presence = api(signed, "GET", "/api/rooms/team/presence").json()
    assert presence["members"] == [{"user": "bob", "name": "Bob"}, {"user": "ann", "name": "Ann"}]
    assert api(signed, "POST", "/api/users/nobody/disconnect").json() == {"closed": 0}
    for ws in (again, bob):
        ws.sock.close()


@pytest.mark.anyio
async def test_the_client_disconnects_a_user_whose_id_needs_escaping(
    signed: ServerProcess,
) -> None:
    user = "team/ann \u00fc:1?x=%2F"
    ws, _ = connect(signed, user, "escaped")
    with anyio.fail_after(10):
        async with open_server_api(signed.http_url(), KEY) as client:
            assert await client.disconnect_user(user) == 1
            assert await client.disconnect_user(user) == 0
            with pytest.raises(ApiRefused) as refused:
                await client.disconnect_user("")
            assert (refused.value.status, refused.value.code) == (400, "bad_request")
        async with open_server_api(signed.http_url(), "wrong") as client:
            with pytest.raises(ApiRefused) as refused:
                await client.disconnect_user(user)
            assert refused.value.status == 401
    assert closed_with(ws) == DISCONNECTED


def test_a_disconnect_on_one_server_closes_the_user_everywhere_with_redis(
    redis_server: RedisServer,
) -> None:
    """Ann has tabs on server A and on both workers of server B; the request goes to A."""
    env = {
        "ROOMCAST_API_KEY": KEY,
        "ROOMCAST_JWT_SECRET": SECRET,
        "ROOMCAST_RATE_LIMIT": "0",
        "ROOMCAST_REDIS_URL": redis_server.url,
        "ROOMCAST_MAX_CONNECTIONS_PER_USER": "50",
    }
    with (
        spawn_server(env=env) as first,
        spawn_server(["--workers", "2"], env=env) as second,
    ):
        bob, _ = connect(first, "bob", "shared")
        tabs = [connect(first, "ann", "shared")[0]]
        for worker, room in zip(second.workers(), ["shared", "elsewhere"], strict=True):
            with second.accepting_only(worker):
                tabs.append(connect(second, "ann", room)[0])
            assert owner_of([worker], tabs[-1].sock.getsockname()[:2]) == worker
        presence = api(first, "GET", "/api/rooms/shared/presence").json()
        assert presence["count"] == 2
        assert sorted(m["user"] for m in presence["members"]) == ["ann", "bob"]
        assert sum(n["joins"] for n in presence_until(bob, 2)) == 1  # ann, once

        response = api(first, "POST", "/api/users/ann/disconnect")
        assert (response.status_code, response.json()) == (200, {"closed": len(tabs)})
        for tab in tabs:
            assert closed_with(tab) == DISCONNECTED
        notices = presence_until(bob, 1)
        assert sum(n["leaves"] for n in notices) == 1 and notices[-1]["left"] == ["Ann"]
        still_connected(bob)
        bob.sock.close()


@pytest.mark.anyio
async def test_a_direct_room_listed_by_the_api_is_one_the_api_reaches() -> None:
    # GET /api/rooms lists dm:A:B rooms; their history (how a stored hook's gaps are filled),
    # presence and publishing must not answer 400 for the very name it listed
    settings = Settings(api_key=KEY, jwt_secret=SECRET, rate_limit=0)
    token = mint_token(SECRET, sub="ann", ttl=60)
    async with open_test_client(settings=settings) as client:
        async with client.connect("/ws", headers={"authorization": f"Bearer {token}"}) as ann:
            await ann.join("dm:ann:bo")
            await ann.send_message("hi bo", room="dm:ann:bo")
            listed = (await client.get("/api/rooms", headers=AUTH)).json()["rooms"]
            assert listed == [{"name": "dm:ann:bo", "count": 1}]
            history = await client.get("/api/rooms/dm:ann:bo/history", headers=AUTH)
            assert history.status_code == 200, history.text
            assert [m["text"] for m in history.json()["messages"]] == ["hi bo"]
            presence = await client.get("/api/rooms/dm%3Aann%3Abo/presence", headers=AUTH)
            assert presence.json()["members"] == [{"user": "ann", "name": "ann"}]
            posted = await client.post(
                "/api/rooms/dm:ann:bo/messages", json={"text": "from the backend"}, headers=AUTH
            )
            assert posted.json() == {"seq": 2}
        for room in ("dm:bo:ann", "dm:ann:ann", "dm::bo"):
            refused = await client.get(f"/api/rooms/{room}/history", headers=AUTH)
            assert (refused.status_code, refused.json()["error"]) == (400, "bad_request")
