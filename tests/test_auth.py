"""Signed tokens on a real server (SPEC §8.1): HS256 and ES256, every refusal with its
close code and reason, room grants, the per-user cap, and no token in any log line."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from rawws import RawWebSocket, open_raw_websocket
from servers import ServerProcess, spawn_server

SECRET = "a-secret-of-at-least-thirty-two-bytes!"
AUDIENCE = "roomcast-tests"


def claims(**overrides: object) -> dict[str, object]:
    now = int(time.time())
    return {"sub": "ann", "name": "Ann", "aud": AUDIENCE, "exp": now + 60, **overrides}


@pytest.fixture(scope="module")
def hs256() -> Iterator[ServerProcess]:
    env = {
        "ROOMCAST_JWT_SECRET": SECRET,
        "ROOMCAST_JWT_AUDIENCE": AUDIENCE,
        "ROOMCAST_RATE_LIMIT": "0",
        "ROOMCAST_MAX_CONNECTIONS_PER_USER": "10",
    }
    with spawn_server(env=env) as server:
        yield server


def join(
    server: ServerProcess, token: str | None, room: str = "team-red", **query: str
) -> RawWebSocket:
    params = "&".join(f"{k}={v}" for k, v in {"room": room, **query}.items())
    target = f"/ws/chat?{params}" + (f"&token={token}" if token else "")
    return open_raw_websocket(server.port, target, timeout=10)


def closed_with(ws: RawWebSocket) -> tuple[int, str]:
    code, reason, _ = ws.read_until_close()
    ws.sock.close()
    return code, reason


def hs(payload: dict[str, object], key: str = SECRET) -> str:
    return jwt.encode(payload, key, algorithm="HS256")


def test_a_valid_token_joins_under_its_own_name(hs256: ServerProcess) -> None:
    ws = join(hs256, hs(claims(rooms=["team-*"])), name="Mallory")  # the query's name is ignored
    welcome = json.loads(ws.next_message())
    assert welcome["type"] == "welcome" and welcome["members"] == ["Ann"]
    ws.send_text(json.dumps({"text": "hello", "id": "1"}))
    message = json.loads(ws.next_message())
    assert (message["type"], message["from"]) == ("message", "Ann")
    ws.sock.close()


def bad_token(kind: str) -> str | None:
    """A refused token, made when the test runs (tokens made at collection could expire)."""
    return {
        "missing": lambda: None,
        "malformed": lambda: "not.a.token",
        "signature": lambda: hs(claims(), "a-different-secret-of-thirty-two-bytes"),
        "expired": lambda: hs(claims(exp=1_000_000)),
        "audience": lambda: hs(claims(aud="another-service")),
        "no-exp": lambda: hs({"sub": "ann", "aud": AUDIENCE}),
    }[kind]()


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("missing", "missing token"),
        ("malformed", "malformed token"),
        ("signature", "invalid signature"),
        ("expired", "token expired"),
        ("audience", "wrong audience"),
        ("no-exp", "token has no exp claim"),
    ],
)
def test_every_bad_token_is_closed_4001_with_its_reason(
    hs256: ServerProcess, kind: str, reason: str
) -> None:
    assert closed_with(join(hs256, bad_token(kind))) == (4001, reason)


def test_a_room_outside_the_grant_is_closed_4403(hs256: ServerProcess) -> None:
    token = hs(claims(rooms=["team-*", "lobby"]))
    assert closed_with(join(hs256, token, room="secret")) == (4403, "not allowed in #secret")
    granted = join(hs256, token, room="lobby")
    assert json.loads(granted.next_message())["type"] == "welcome"
    granted.sock.close()


def test_the_eleventh_connection_of_one_user_is_closed_4429(hs256: ServerProcess) -> None:
    token = hs(claims(sub="eve", name="Eve"))
    tabs = [join(hs256, token, room=f"r{i}") for i in range(10)]
    for tab in tabs:
        assert json.loads(tab.next_message())["type"] == "welcome"
    assert closed_with(join(hs256, token)) == (4429, "too many connections for this user")
    tabs.pop().sock.close()
    for _ in range(50):  # once the server has seen the close, the slot is free again
        late = join(hs256, token, room="late")
        try:
            assert json.loads(late.next_message())["type"] == "welcome"
            break
        except ConnectionError as refused:
            assert str(refused) == "closed 4429"
        finally:
            late.sock.close()
        time.sleep(0.05)  # another process: nothing to wait on
    else:
        raise AssertionError("the slot of a closed connection never came back")
    for tab in tabs:
        tab.sock.close()


def test_no_token_appears_in_any_log_line(hs256: ServerProcess) -> None:
    tokens = [hs(claims(sub=f"logged-{n}")) for n in range(5)]
    for token in tokens:
        ws = join(hs256, token)
        ws.next_message()
        ws.sock.close()
    for bad in (hs(claims(), "wrong-secret-that-is-long-enough-for-hs256"), "garbage.token.here"):
        closed_with(join(hs256, bad))
    time.sleep(0.2)  # the access lines of the last connections
    log = hs256.text
    assert "GET /ws/chat" in log  # access logging is on
    for token in [*tokens, "garbage.token.here"]:
        assert token not in log
        for part in token.split("."):
            assert part not in log


def test_es256_tokens_from_a_public_key(tmp_path: Path) -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "key.pem").write_bytes(pem)
    env = {"ROOMCAST_JWT_PUBLIC_KEY": str(tmp_path / "key.pem")}
    with spawn_server(env=env) as server:
        token = jwt.encode(claims(aud=None), private, algorithm="ES256")
        ws = join(server, token)
        assert json.loads(ws.next_message())["members"] == ["Ann"]
        ws.sock.close()
        assert closed_with(join(server, forged_with(pem))) == (4001, "invalid signature")


def forged_with(public_pem: bytes) -> str:
    """The algorithm-confusion attack: an HS256 token keyed with the server's public key
    (PyJWT refuses to make one, so it is made by hand)."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims(aud=None)).encode())
    signature = hmac.new(public_pem, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(signature)}"
