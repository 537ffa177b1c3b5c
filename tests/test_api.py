"""The server API (SPEC §8.2): request rules without a server, then the endpoints on a real
``python -m roomcast``, and across two servers sharing one Redis."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from roomcast.api import ApiError, parse_history_query, parse_publish

from chatters import Chatter
from redis_server import RedisServer
from servers import ServerProcess, spawn_server

KEY = "s3cret-api-key"
AUTH = {"authorization": f"Bearer {KEY}"}


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


def test_history_paging_parameters() -> None:
    assert parse_history_query(b"") == (0, 100)
    assert parse_history_query(b"since=5&limit=2") == (5, 2)
    for bad in (b"since=-1", b"since=x", b"limit=0", b"limit=1001", b"limit=two"):
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
        ("POST", "/api/rooms/r/messages", {"content": b"{"}, 400, "bad_request"),
        ("POST", "/api/rooms/r/messages", {"json": {"text": "x" * 101}}, 413, "too_long"),
        ("POST", "/api/rooms/r/messages", {"content": b"x" * 70_000}, 413, "too_large"),
        ("POST", "/api/rooms/bad%20room/messages", {"json": {"text": "x"}}, 400, "bad_request"),
        ("GET", "/api/rooms/r/messages", {}, 405, "method_not_allowed"),
        ("GET", "/api/nothing", {}, 404, "not_found"),
        ("GET", "/api/rooms/r/history?limit=5000", {}, 400, "bad_request"),
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
