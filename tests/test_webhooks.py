"""Webhooks (SPEC §10 over HTTP): signatures and settings without a server, then a real
roomcast server (Hypercorn's Trio and asyncio workers, in a thread) posting its hooks to
a real HTTP receiver the test serves: a stub whose answers each test chooses, and the
example receiver people copy (examples/webhook_receiver.py)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import httpx
import pytest
import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from trio_websocket import ConnectionClosed

from roomcast import Hooks, Settings, create_app
from roomcast.settings import SettingsError
from roomcast.testing import LifespanFailed, open_test_client
from roomcast.webhooks import sign, verify
from test_hooks import KEY, api_history, chat, next_event, rewrite_and_refusal, send

from servers import ROOT, ThreadedServer, serve_in_thread

SECRET = "webhook-test-secret"
TRIO = pytest.mark.parametrize("anyio_backend", ["trio"])

# -- signatures and settings, without a server -----------------------------------------------


def test_verify_takes_roomcasts_signature_only_and_only_fresh() -> None:
    body, now = b'{"event":"stored"}', 1_700_000_000
    good = sign(SECRET, str(now), body)
    assert good.startswith("sha256=") and len(good) == 7 + 64
    assert verify(SECRET, str(now), body, good, now=now + 299)
    assert not verify("another secret", str(now), body, good, now=now)
    assert not verify(SECRET, str(now), body + b" ", good, now=now)  # body changed
    assert not verify(SECRET, str(now + 1), body, good, now=now)  # timestamp changed
    assert not verify(SECRET, str(now), body, good, now=now + 301)  # replayed later
    assert not verify(SECRET, None, body, good, now=now)
    assert not verify(SECRET, str(now), body, None, now=now)
    assert not verify(SECRET, "-1", body, sign(SECRET, "-1", body), now=now)


def test_a_url_needs_its_secret_and_the_others_need_the_url() -> None:
    url = {"ROOMCAST_WEBHOOK_URL": "http://127.0.0.1:9/hooks"}
    for environ, message in [
        (url, "ROOMCAST_WEBHOOK_SECRET: required with ROOMCAST_WEBHOOK_URL"),
        ({"ROOMCAST_WEBHOOK_SECRET": "s"}, "ROOMCAST_WEBHOOK_SECRET: set without"),
        ({"ROOMCAST_WEBHOOK_EVENTS": "stored"}, "ROOMCAST_WEBHOOK_EVENTS: set without"),
        ({"ROOMCAST_WEBHOOK_URL": "ftp://x"}, "ROOMCAST_WEBHOOK_URL='ftp://x': must start"),
        ({**url, "ROOMCAST_WEBHOOK_SECRET": "s", "ROOMCAST_WEBHOOK_EVENTS": "sent"}, "not events"),
    ]:
        with pytest.raises(SettingsError, match=message):
            Settings.from_env(environ)
    chosen = {**url, "ROOMCAST_WEBHOOK_SECRET": "s", "ROOMCAST_WEBHOOK_EVENTS": "stored, message"}
    assert Settings.from_env(chosen).webhook_events == {"stored", "message"}


def test_the_launcher_refuses_a_url_without_secret_in_one_line() -> None:
    env = {"PATH": "/usr/bin:/bin", "ROOMCAST_WEBHOOK_URL": "http://127.0.0.1:9/hooks"}
    done = subprocess.run(
        [sys.executable, "-m", "roomcast", "--bind", "127.0.0.1:0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert lines == ["roomcast: ROOMCAST_WEBHOOK_SECRET: required with ROOMCAST_WEBHOOK_URL"], lines


@pytest.mark.anyio
async def test_python_hooks_and_webhooks_together_are_refused_at_startup() -> None:
    settings = Settings(webhook_url="http://127.0.0.1:9/hooks", webhook_secret="s")
    with pytest.raises(LifespanFailed, match="ROOMCAST_WEBHOOK_URL: this app has Python hooks"):
        async with open_test_client(create_app(settings, hooks=Hooks())):
            pass


# -- a receiver whose answers the test chooses ----------------------------------------------


@dataclasses.dataclass
class Stub:
    """What the stub receiver was sent and how it answers: ``hooked.py``'s rules over
    HTTP (so test_hooks.py's scenarios run against it), failures on demand."""

    #: every verified event, with the status it was answered
    seen: list[tuple[dict[str, Any], int]] = dataclasses.field(default_factory=list)
    #: requests whose signature did not verify
    forged: int = 0
    #: answer ``stored`` with 500 while set (the receiver's database is down)
    stored_down: bool = False

    def stored(self, status: int = 200) -> list[dict[str, Any]]:
        return [event for event, code in self.seen if event["event"] == "stored" and code == status]

    async def answer(self, event: dict[str, Any]) -> Response:
        kind = event["event"]
        if kind == "connect":
            return JSONResponse(_connect(event))
        if kind == "join":
            if event["room"] == "broken-join":
                return Response("the membership table is gone", status_code=500)
            refused = {"refuse": {"code": 4403, "reason": "members only"}}
            return JSONResponse(refused if event["room"] == "vault" else {})
        if kind == "message":
            return await _message(event["text"])
        if kind == "stored" and self.stored_down:
            return Response("database unavailable", status_code=500)
        return JSONResponse({})

    def app(self) -> Starlette:
        async def webhook(request: Request) -> Response:
            body = await request.body()
            stamp, signature = (
                request.headers.get(h) for h in ("roomcast-timestamp", "roomcast-signature")
            )
            if not verify(SECRET, stamp, body, signature):
                self.forged += 1
                return Response(status_code=401)
            event = json.loads(body)
            response = await self.answer(event)
            self.seen.append((event, response.status_code))
            return response

        return Starlette(routes=[Route("/hooks", webhook, methods=["POST"])])


def _connect(event: dict[str, Any]) -> dict[str, Any]:
    cookie = event["headers"].get("cookie", "")
    session = dict(part.strip().partition("=")[::2] for part in cookie.split(";")).get("session")
    if session is None:
        return {}
    if session == "banned":
        return {"refuse": {"code": 4010, "reason": "banned from this chat"}}
    return {"user": session, "name": f"User {session}", "rooms": None, "exp": None}


async def _message(text: str) -> Response:
    command, _, argument = text.partition(":")
    if command == "status":
        return Response("failing on purpose", status_code=int(argument))
    if command == "sleep":
        await anyio.sleep(float(argument))
    elif command == "garbage":
        return Response("<html>not JSON</html>", media_type="text/html")
    elif command == "typo":
        return JSONResponse({"refused": {"code": "x"}})
    elif command == "refuse":
        return JSONResponse({"refuse": {"code": argument, "reason": f"not here: {argument}"}})
    elif command == "rewrite":
        return JSONResponse({"text": argument.upper(), "data": {"original": argument}})
    return JSONResponse({})


@dataclasses.dataclass
class Webhooked:
    server: ThreadedServer
    stub: Stub


SETTINGS = Settings(
    rate_limit=0, presence_grace=0, api_key=KEY, hook_timeout=1.0, webhook_secret=SECRET
)


@pytest.fixture(params=["trio", "asyncio"])
def webhooked(request: pytest.FixtureRequest) -> Iterator[Webhooked]:
    """A standalone roomcast (no Python hooks) on each worker class, posting to the stub."""
    stub = Stub()
    with serve_in_thread(stub.app(), worker_class="trio") as receiver:
        settings = dataclasses.replace(SETTINGS, webhook_url=receiver.http_url("/hooks"))
        with serve_in_thread(create_app(settings), worker_class=request.param) as server:
            yield Webhooked(server, stub)


async def wait_until(condition: Any) -> None:
    """Poll what the servers' threads fill until ``condition()`` holds (20 s at most)."""
    with trio.fail_after(20):
        while not condition():  # noqa: ASYNC110 (another thread fills it)
            await trio.sleep(0.02)


@TRIO
@pytest.mark.anyio
async def test_a_rewrite_over_http_reaches_every_member_and_a_refusal_the_sender(
    webhooked: Webhooked,
) -> None:
    await rewrite_and_refusal(webhooked.server, "/ws/chat?room=rw")
    await wait_until(lambda: len(webhooked.stub.stored()) == 2)
    first, second = webhooked.stub.stored()
    assert first["text"] == "HELLO" and first["data"] == {"original": "hello"}
    assert (first["room"], first["seq"], first["name"], first["id"]) == ("rw", 1, "a", "r1")
    assert (second["seq"], second["text"], second["data"]) == (2, "after", None)
    assert set(first) == {
        "event",
        "room",
        "seq",
        "epoch",
        "user",
        "name",
        "text",
        "data",
        "ts",
        "id",
    }
    assert webhooked.stub.forged == 0


@TRIO
@pytest.mark.anyio
async def test_500s_timeouts_and_unusable_answers_fail_closed_and_the_connection_stays(
    webhooked: Webhooked, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "roomcast")
    failing = ["status:500", "status:302", "sleep:3", "garbage", "typo"]
    with trio.fail_after(30):
        async with chat(webhooked.server.url("/ws/chat?room=down&name=a")) as ws:
            await next_event(ws, type="welcome")
            for n, text in enumerate(failing):
                await send(ws, text=text, id=f"f{n}")
                error = await next_event(ws, type="error")
                assert (error["error"], error["id"]) == ("unavailable", f"f{n}"), text
            await send(ws, text="still here", id="ok")
            message = await next_event(ws, type="message")
            assert (message["text"], message["seq"]) == ("still here", 1)  # no seq used up
    lines = [r.getMessage() for r in caplog.records if "message hook" in r.getMessage()]
    assert len(lines) == len(failing), lines
    assert "HTTP 500 from http://127.0.0.1:" in lines[0] and "longer than 1.0s" in lines[2]


@TRIO
@pytest.mark.anyio
async def test_connect_and_join_answers_over_http(webhooked: Webhooked) -> None:
    url = webhooked.server.url
    with trio.fail_after(20):
        cookie = [("cookie", "theme=dark; session=ann")]
        async with chat(url("/ws/chat?room=lobby&name=ignored"), cookie) as ws:
            welcome = await next_event(ws, type="welcome")
            assert welcome["members"] == ["User ann"]
            await send(ws, text="hi")
            message = await next_event(ws, type="message")
            assert (message["user"], message["from"]) == ("ann", "User ann")
        for path, headers, code, reason in [
            ("/ws/chat?room=lobby", [("cookie", "session=banned")], 4010, "banned from this chat"),
            ("/ws/chat?room=vault", None, 4403, "members only"),
            ("/ws/chat?room=broken-join", None, 1011, None),
        ]:
            async with chat(url(path), headers) as ws:
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        await ws.get_message()
            assert closed.value.reason.code == code, path
            assert reason is None or closed.value.reason.reason == reason
    connect = next(event for event, _ in webhooked.stub.seen if event["event"] == "connect")
    assert connect["headers"]["cookie"] == "theme=dark; session=ann"
    assert connect["query"] == {"room": "lobby", "name": "ignored"}
    assert connect["client"][0] == "127.0.0.1" and isinstance(connect["client"][1], int)
    await wait_until(lambda: any(e["event"] == "leave" for e, _ in webhooked.stub.seen))
    leave = next(event for event, _ in webhooked.stub.seen if event["event"] == "leave")
    assert leave == {
        "event": "leave",
        "user": "ann",
        "name": "User ann",
        "room": "lobby",
        "reason": "left",
    }


@TRIO
@pytest.mark.anyio
async def test_stored_is_retried_until_the_receiver_recovers(
    webhooked: Webhooked, caplog: pytest.LogCaptureFixture
) -> None:
    """The receiver answers 500 to ``stored`` until the test has seen it refuse several
    posts; then every seq arrives, in order, once (a 500 is not taken: with timeouts a
    post may arrive twice, which is why delivery is documented as at least once)."""
    caplog.set_level(logging.WARNING, "roomcast")
    stub, total = webhooked.stub, 30
    stub.stored_down = True
    with trio.fail_after(30):
        async with chat(webhooked.server.url("/ws/chat?room=kept&name=a")) as ws:
            await next_event(ws, type="welcome")
            for n in range(total):
                await send(ws, text=f"m{n}")
            await next_event(ws, type="message", seq=total)  # fan-out did not wait
            await wait_until(lambda: len(stub.stored(500)) >= 4)
            stub.stored_down = False
            await wait_until(lambda: len(stub.stored()) == total)
    assert [event["seq"] for event in stub.stored()] == list(range(1, total + 1))
    assert {event["seq"] for event in stub.stored(500)} == {1}  # the first waited, in order
    lines = [r.getMessage() for r in caplog.records if "stored webhook" in r.getMessage()]
    assert len(lines) == 2, lines  # the outage, once; the recovery, once
    assert "HTTP 500" in lines[0] and "seq 1 of #kept" in lines[0]
    assert "answers again" in lines[1]


# -- the example receiver -------------------------------------------------------------------


def load_example(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.setenv("ROOMCAST_WEBHOOK_SECRET", SECRET)
    path = Path(ROOT) / "examples" / "webhook_receiver.py"
    spec = importlib.util.spec_from_file_location("webhook_receiver", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_example_receiver_refuses_a_bad_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    example = load_example(monkeypatch)
    with serve_in_thread(example.app, worker_class="trio") as receiver:
        url, body = receiver.http_url("/roomcast"), b'{"event": "join", "room": "r"}'
        now = str(int(time.time()))

        def post(stamp: str, signature: str, content: bytes = body) -> httpx.Response:
            headers = {"roomcast-timestamp": stamp, "roomcast-signature": signature}
            return httpx.post(url, content=content, headers=headers, timeout=10)

        assert post(now, sign(SECRET, now, body)).status_code == 200
        assert post(now, sign("not the secret", now, body)).status_code == 401
        assert post(now, sign(SECRET, now, body), content=body + b" ").status_code == 401
        old = str(int(time.time()) - 600)
        assert post(old, sign(SECRET, old, body)).status_code == 401  # a replay
        assert httpx.post(url, content=body, timeout=10).status_code == 401  # unsigned


@TRIO
@pytest.mark.anyio
@pytest.mark.parametrize("worker_class", ["trio", "asyncio"])
async def test_roomcast_with_the_example_receiver(
    monkeypatch: pytest.MonkeyPatch, worker_class: str
) -> None:
    example = load_example(monkeypatch)
    with serve_in_thread(example.app, worker_class="trio") as receiver:
        settings = dataclasses.replace(SETTINGS, webhook_url=receiver.http_url("/roomcast"))
        with serve_in_thread(create_app(settings), worker_class=worker_class) as server:
            url = server.url("/ws/chat?room=lobby")
            with trio.fail_after(20):
                async with chat(url) as ws:  # no session: refused by connect
                    with pytest.raises(ConnectionClosed) as closed:
                        await ws.get_message()
                assert (closed.value.reason.code, closed.value.reason.reason) == (
                    4001,
                    "log in first",
                )
                async with chat(url, [("cookie", "session=s3cr3t-ann")]) as ws:
                    await next_event(ws, type="welcome")
                    await send(ws, text="buy spam", id="s")
                    refused = await next_event(ws, type="error")
                    assert (refused["error"], refused["id"]) == ("banned_word", "s")
                    await send(ws, text="hi :)", id="h")
                    message = await next_event(ws, type="message")
                    assert (message["text"], message["from"], message["data"]) == (
                        "hi 🙂",
                        "Ann",
                        {"original": "hi :)"},
                    )
            assert api_history(server, "lobby")[-1] == message
            await wait_until(lambda: len(example.app.state.stored) == 1)
            assert example.app.state.stored[0]["text"] == "hi 🙂"
