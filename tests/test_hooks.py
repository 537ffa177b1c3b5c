"""Hooks (SPEC §10): the rules around them (unit, both anyio backends), what clients see
of them on real servers in process (Hypercorn's Trio and asyncio workers, both brokers),
and the issue's end-to-end cases on served processes (``roomcast --app hooked:app``)."""

from __future__ import annotations

import dataclasses
import json
import logging
import urllib.request
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AsyncExitStack, ExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from hooked import build
from roomcast import Identity, Refuse, Rewrite, Settings
from roomcast.hooks import (
    ConnectRequest,
    HookFailed,
    HookRunner,
    Hooks,
    JoinRequest,
    LeaveEvent,
    MessageRequest,
    PythonHooks,
)
from roomcast.identity import mint_token
from roomcast.protocol import ChatMessage
from roomcast.stored import StoredFeed, StoredMessage
from test_redis_stress import spread

from chatload import connect_all, run_load
from redis_server import RedisServer
from servers import ServerProcess, ThreadedServer, serve_in_thread, spawn_server

KEY = "hook-test-key"
SETTINGS = Settings(rate_limit=0, tokens=None, presence_grace=0, api_key=KEY, hook_timeout=1.0)
TRIO = pytest.mark.parametrize("anyio_backend", ["trio"])

# -- the rules, without a server (both backends) ---------------------------------------------


def runner(hooks: Hooks, timeout: float = 0.2) -> HookRunner:
    return HookRunner(PythonHooks(hooks), timeout=timeout, max_text=100)


REQUEST = MessageRequest("ann", "Ann", "lobby", "hello", "m1")


@pytest.mark.anyio
async def test_a_hook_that_times_out_fails_closed_with_one_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hooks = Hooks()

    @hooks.message
    async def slow(request: MessageRequest) -> None:
        await anyio.sleep(30)

    with anyio.fail_after(5), caplog.at_level(logging.WARNING, "roomcast"):
        screened = await runner(hooks).screen(REQUEST, ChatMessage("hello", "m1"))
    assert screened == Refuse("unavailable", screened.reason)  # type: ignore[union-attr]
    assert [r.getMessage() for r in caplog.records] == [
        "roomcast: the message hook took longer than 0.2s"
    ]


@pytest.mark.anyio
async def test_a_hook_that_raises_fails_closed_with_one_log_line_naming_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hooks = Hooks()

    @hooks.join
    async def broken(request: JoinRequest) -> None:
        raise KeyError("rooms table")

    with (
        anyio.fail_after(5),
        caplog.at_level(logging.WARNING, "roomcast"),
        pytest.raises(HookFailed),
    ):
        await runner(hooks).join(JoinRequest("ann", "Ann", "lobby"))
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("roomcast: the join hook raised KeyError('rooms table') at ")
    assert "\n" not in line and "in broken" in line


@pytest.mark.anyio
async def test_answers_are_checked_and_unusable_ones_fail_closed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    answers: list[Any] = [
        Rewrite("x" * 101),  # over max_text
        Rewrite("ok", {"when": object()}),  # data that is not JSON
        Refuse(4403, "a close code is no error code"),
        "yes",
    ]
    hooks = Hooks()

    @hooks.message
    async def answer(request: MessageRequest) -> Any:
        return answers.pop(0)

    run = runner(hooks)
    with anyio.fail_after(5), caplog.at_level(logging.WARNING, "roomcast"):
        for _ in range(4):
            with pytest.raises(HookFailed):
                await run.message(REQUEST)
        rewritten = await runner(_answering(Rewrite("HI", {"a": 1}))).screen(
            REQUEST, ChatMessage("hi", "m1")
        )
    assert len(caplog.records) == 4
    assert rewritten == ChatMessage("HI", "m1", {"a": 1})


def _answering(answer: Rewrite) -> Hooks:
    hooks = Hooks()

    @hooks.message
    async def message(request: MessageRequest) -> Rewrite:
        return answer

    return hooks


@pytest.mark.anyio
async def test_connect_checks_codes_and_normalises_names() -> None:
    answers: list[Any] = [
        Refuse(1008, "not a 4xxx code"),
        Identity("ann", "  Ann   B ", None, 1e12),
    ]
    hooks = Hooks()

    @hooks.connect
    async def connect(request: ConnectRequest) -> Any:
        return answers.pop(0)

    request = ConnectRequest({}, {}, {}, None, "/ws")
    run = runner(hooks)
    with anyio.fail_after(5):
        with pytest.raises(HookFailed):
            await run.connect(request)
        assert await run.connect(request) == Identity("ann", "Ann B", None, 1e12)


def stored(seq: int, room: str = "lobby") -> StoredMessage:
    return StoredMessage(room, seq, "E", None, "ann", f"m{seq}", None, seq, None)


@pytest.mark.anyio
async def test_the_stored_feed_never_waits_and_drops_for_a_full_consumer_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A consumer that is stuck loses what overflows its own queue (one log line), while
    another consumer gets everything; ``put`` never waits."""
    stuck = anyio.Event()
    seen: list[int] = []

    async def blocked(batch: Sequence[StoredMessage]) -> None:
        await stuck.wait()

    async def keeps_up(batch: Sequence[StoredMessage]) -> None:
        seen.extend(message.seq for message in batch)

    feed = StoredFeed()
    slow = feed.subscribe("slow", blocked, size=4)
    feed.subscribe("fast", keeps_up, size=100)
    with anyio.fail_after(5), caplog.at_level(logging.WARNING, "roomcast"):
        async with anyio.create_task_group() as tg:
            tg.start_soon(feed.run)
            feed.put(stored(1))
            await anyio.wait_all_tasks_blocked()  # slow holds seq 1 in its consumer
            for seq in range(2, 21):
                feed.put(stored(seq))
            while len(seen) < 20:
                await anyio.wait_all_tasks_blocked()
            tg.cancel_scope.cancel()
    assert seen == list(range(1, 21))
    assert slow.dropped == 20 - 1 - 4
    assert len(caplog.records) == 1
    assert "the slow queue is full (4 messages): messages from seq 6 of #lobby" in caplog.text


# -- in process: real Hypercorn, real clients -------------------------------------------------


class Recorder:
    """What the app's ``stored`` and ``leave`` hooks saw (called in the server's thread)."""

    def __init__(self) -> None:
        self.stored: list[StoredMessage] = []
        self.leaves: list[LeaveEvent] = []

    def __call__(self, hook: str, event: object) -> None:
        if isinstance(event, StoredMessage):
            self.stored.append(event)
        elif isinstance(event, LeaveEvent):
            self.leaves.append(event)


@dataclasses.dataclass
class Hooked:
    server: ThreadedServer
    record: Recorder


@pytest.fixture(params=["trio", "asyncio", "redis"])
def hooked(request: pytest.FixtureRequest) -> Iterator[Hooked]:
    """The hooked app on Hypercorn's Trio and asyncio workers, and on Redis (Trio)."""
    settings, worker = SETTINGS, request.param
    if request.param == "redis":
        redis: RedisServer = request.getfixturevalue("redis_server")
        settings, worker = dataclasses.replace(SETTINGS, redis_url=redis.url), "trio"
    record = Recorder()
    with serve_in_thread(build(record, settings), worker_class=worker) as server:
        yield Hooked(server, record)


@asynccontextmanager
async def chat(
    url: str, headers: list[tuple[str, str]] | None = None
) -> AsyncIterator[WebSocketConnection]:
    async with open_websocket_url(url, extra_headers=headers) as ws:
        yield ws


async def next_event(ws: WebSocketConnection, **match: Any) -> dict[str, Any]:
    """The next event with all of ``match``'s fields (others are skipped)."""
    while True:
        event: dict[str, Any] = json.loads(await ws.get_message())
        if all(event.get(key) == value for key, value in match.items()):
            return event


async def send(ws: WebSocketConnection, **message: Any) -> None:
    await ws.send_message(json.dumps(message))


def api_history(server: Any, room: str) -> list[dict[str, Any]]:
    request = urllib.request.Request(
        server.http_url(f"/api/rooms/{room}/history?since=0"),
        headers={"authorization": f"Bearer {KEY}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        messages: list[dict[str, Any]] = json.load(response)["messages"]
        return messages


@TRIO
@pytest.mark.anyio
async def test_a_rewrite_is_what_everyone_sees_and_a_refusal_reaches_the_sender_only(
    hooked: Hooked,
) -> None:
    await rewrite_and_refusal(hooked.server, "/ws/chat?room=rw")
    stored = await _wait_for(lambda: [m for m in hooked.record.stored if m.room == "rw"], 2)
    assert [(m.seq, m.text, m.data, m.id) for m in stored] == [
        (1, "HELLO", {"original": "hello"}, "r1"),
        (2, "after", None, "a1"),
    ]
    assert stored[0].name == "a" and stored[0].epoch


async def rewrite_and_refusal(server: Any, url: str) -> None:
    """``a`` sends a rewrite, a refusal and a plain message; ``b`` sees the rewrite and
    the plain message only, and the history API shows the rewrite as the members do."""
    with trio.fail_after(20):
        async with chat(server.url(url + "&name=a")) as a, chat(server.url(url + "&name=b")) as b:
            await next_event(a, type="welcome")
            await next_event(b, type="welcome")
            await send(a, text="rewrite:hello", id="r1")
            rewritten = await next_event(b, type="message")
            assert (rewritten["text"], rewritten["data"]) == ("HELLO", {"original": "hello"})
            assert await next_event(a, type="message") == rewritten
            await send(a, text="refuse:no_links", id="x1")
            error = await next_event(a, type="error")
            assert (error["error"], error["message"], error["id"]) == (
                "no_links",
                "not here: no_links",
                "x1",
            )
            await send(a, text="after", id="a1")
            after = await next_event(b, type="message")  # b never saw the refused one
            assert (after["text"], after["seq"]) == ("after", rewritten["seq"] + 1)
    room = url.partition("room=")[2]
    assert api_history(server, room)[-2] == rewritten


async def _wait_for(found: Any, count: int) -> list[Any]:
    """Poll a list the server's thread fills until it holds ``count`` items."""
    with trio.fail_after(10):
        while len(items := found()) < count:  # noqa: ASYNC110 (another thread fills it)
            await trio.sleep(0.01)
    result: list[Any] = items
    return result


@TRIO
@pytest.mark.anyio
async def test_v2_join_refusal_is_forbidden_and_a_failed_hook_unavailable(
    hooked: Hooked,
) -> None:
    with trio.fail_after(20):
        async with chat(hooked.server.url("/ws?name=ann")) as ws:
            await send(ws, type="join", room="vault")
            refused = await next_event(ws, type="error")
            assert (refused["error"], refused["room"], refused["message"]) == (
                "forbidden",
                "vault",
                "members only",
            )
            await send(ws, type="join", room="broken-join")
            failed = await next_event(ws, type="error")
            assert (failed["error"], failed["room"]) == ("unavailable", "broken-join")
            await send(ws, type="join", room="open")  # the connection stays
            await next_event(ws, type="welcome", room="open")
            await send(ws, type="message", room="open", text="rewrite:v2", id="1")
            message = await next_event(ws, type="message")
            assert (message["text"], message["data"], message["room"]) == (
                "V2",
                {"original": "v2"},
                "open",
            )
            await send(ws, type="leave", room="open")
            await next_event(ws, type="left")
    leaves = await _wait_for(lambda: hooked.record.leaves, 1)
    assert leaves[0] == LeaveEvent(None, "ann", "open", "left")


@TRIO
@pytest.mark.anyio
async def test_v1_join_refusal_closes_4403_and_connect_refusal_its_own_code(
    hooked: Hooked,
) -> None:
    with trio.fail_after(20):
        async with chat(hooked.server.url("/ws/chat?room=vault")) as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
        assert (closed.value.reason.code, closed.value.reason.reason) == (4403, "members only")
        banned = [("cookie", "theme=dark; session=banned")]
        async with chat(hooked.server.url("/ws/chat?room=lobby"), banned) as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
        assert (closed.value.reason.code, closed.value.reason.reason) == (
            4010,
            "banned from this chat",
        )


@TRIO
@pytest.mark.anyio
async def test_connect_by_cookie_sets_the_identity(hooked: Hooked) -> None:
    cookie = [("cookie", "theme=dark; session=ann")]
    with trio.fail_after(20):
        async with chat(hooked.server.url("/ws/chat?room=lobby&name=ignored"), cookie) as ws:
            welcome = await next_event(ws, type="welcome")
            assert welcome["members"] == ["User ann"]
            await send(ws, text="hi")
            message = await next_event(ws, type="message")
            assert (message["user"], message["from"]) == ("ann", "User ann")
    leaves = await _wait_for(lambda: hooked.record.leaves, 1)
    assert leaves[0] == LeaveEvent("ann", "User ann", "lobby", "left")


SECRET = "hook-test-secret-for-the-tests-only"


@pytest.fixture(params=["memory", "redis"])
def signed_hooked(request: pytest.FixtureRequest) -> Iterator[Hooked]:
    """The hooked app with signed tokens (refresh, room grants), on both brokers."""
    settings = dataclasses.replace(SETTINGS, jwt_secret=SECRET)
    if request.param == "redis":
        redis: RedisServer = request.getfixturevalue("redis_server")
        settings = dataclasses.replace(settings, redis_url=redis.url)
    record = Recorder()
    with serve_in_thread(build(record, settings), worker_class="trio") as server:
        yield Hooked(server, record)


def token(sub: str, *, rooms: list[str] | None = None) -> str:
    return mint_token(SECRET, sub=sub, ttl=600, rooms=rooms)


def leaves_of(record: Recorder, user: str) -> list[LeaveEvent]:
    return [event for event in record.leaves if event.user == user]


@TRIO
@pytest.mark.anyio
async def test_v2_every_ended_membership_calls_the_leave_hook_once(
    signed_hooked: Hooked,
) -> None:
    """A membership the server ends (a refresh that no longer grants the room) is told
    with its reason; the client's own leave and the connection's end are told once each,
    never twice."""
    server, record = signed_hooked.server, signed_hooked.record
    granted = token("eve", rooms=["g1", "g2", "g3"])
    with trio.fail_after(20):
        async with chat(server.url(f"/ws?token={granted}")) as ws:
            for room in ("g1", "g2", "g3"):
                await send(ws, type="join", room=room)
                await next_event(ws, type="welcome", room=room)
            narrower = token("eve", rooms=["g1", "g3"])
            await send(ws, type="refresh", token=narrower)
            assert (await next_event(ws, type="left"))["code"] == 4403
            told = await _wait_for(lambda: leaves_of(record, "eve"), 1)
            assert told == [LeaveEvent("eve", "eve", "g2", "not allowed in #g2")]
            await send(ws, type="leave", room="g1")
            await next_event(ws, type="left", room="g1")
            await _wait_for(lambda: leaves_of(record, "eve"), 2)
        await _wait_for(lambda: leaves_of(record, "eve"), 3)
        # another connection's whole life, after eve's: eve's hooks have all been called
        async with chat(server.url(f"/ws?token={token('zed')}")) as ws:
            await send(ws, type="join", room="g1")
            await next_event(ws, type="welcome")
        await _wait_for(lambda: leaves_of(record, "zed"), 1)
    assert leaves_of(record, "eve") == [
        LeaveEvent("eve", "eve", "g2", "not allowed in #g2"),
        LeaveEvent("eve", "eve", "g1", "left"),
        LeaveEvent("eve", "eve", "g3", "left"),
    ]


@TRIO
@pytest.mark.anyio
async def test_v2_a_connection_the_server_ends_calls_the_leave_hook_for_each_room(
    signed_hooked: Hooked,
) -> None:
    """A disconnect by the server API ends a ``/ws`` connection in three rooms: the hook
    hears each of the three, with the reason the connection was closed with."""
    server, record = signed_hooked.server, signed_hooked.record
    with trio.fail_after(20):
        async with chat(server.url(f"/ws?token={token('kai')}")) as ws:
            for room in ("d1", "d2", "d3"):
                await send(ws, type="join", room=room)
                await next_event(ws, type="welcome", room=room)
            answer = await trio.to_thread.run_sync(api_post, server, "/api/users/kai/disconnect")
            assert answer == {"closed": 1}
            with pytest.raises(ConnectionClosed) as closed:
                await next_event(ws, type="never")
            assert closed.value.reason.code == 4001
        told = await _wait_for(lambda: leaves_of(record, "kai"), 3)
    assert sorted(told, key=lambda event: event.room) == [
        LeaveEvent("kai", "kai", room, "disconnected by the server") for room in ("d1", "d2", "d3")
    ]


def api_post(server: Any, path: str) -> dict[str, Any]:
    request = urllib.request.Request(
        server.http_url(path), data=b"", headers={"authorization": f"Bearer {KEY}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        answer: dict[str, Any] = json.load(response)
        return answer


# -- end to end: served processes (roomcast --app hooked:app) --------------------------------

TESTS = str(Path(__file__).parent)
#: the served hook timeout: longer than the slow hook's 5 s, shorter than a stuck one's
SERVED_TIMEOUT = 6


def served_env(redis: RedisServer | None, **extra: str) -> dict[str, str]:
    env = {
        "PYTHONPATH": TESTS,
        "ROOMCAST_RATE_LIMIT": "0",
        "ROOMCAST_API_KEY": KEY,
        "ROOMCAST_HOOK_TIMEOUT": str(SERVED_TIMEOUT),
        "ROOMCAST_PRESENCE_GRACE": "0",
        "ROOMCAST_REDIS_URL": "" if redis is None else redis.url,
        **extra,
    }
    return env


@pytest.fixture(
    params=[("trio", "memory"), ("asyncio", "memory"), ("trio", "redis"), ("asyncio", "redis")],
    ids=["trio-memory", "asyncio-memory", "trio-redis", "asyncio-redis"],
)
def served(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    """``roomcast --app hooked:app`` on both worker classes, with both brokers."""
    worker_class, broker = request.param
    redis = request.getfixturevalue("redis_server") if broker == "redis" else None
    args = ["--app", "hooked:app", "--workers", "1", "--worker-class", worker_class]
    with spawn_server(args, env=served_env(redis)) as server:
        yield server


class Changed:
    """Wakes whoever waits for the readers' events to meet a condition."""

    def __init__(self) -> None:
        self.event = trio.Event()

    def tell(self) -> None:
        self.event.set()
        self.event = trio.Event()

    async def until(self, condition: Any) -> None:
        while not condition():
            await self.event.wait()


async def read_into(
    ws: WebSocketConnection, events: list[dict[str, Any]], changed: Changed
) -> None:
    while True:
        events.append(json.loads(await ws.get_message()))
        changed.tell()


def texts(events: list[dict[str, Any]]) -> list[str]:
    return [event["text"] for event in events if event["type"] == "message"]


@TRIO
@pytest.mark.anyio
async def test_a_slow_hook_holds_only_its_own_connection(served: ServerProcess) -> None:
    """``slow``'s hook sleeps 5 s and ``stuck``'s outlasts the timeout: meanwhile the two
    others send 50 messages each and all four members receive all of them; then the slow
    message comes, sequenced after them, and ``stuck`` gets ``unavailable`` and stays."""
    url = served.url("/ws/chat?room=slow&name=")
    names = ["slow", "stuck", "c", "d"]
    events: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    per_sender = 50
    chatter = {f"{name}:{n}" for name in ("c", "d") for n in range(per_sender)}
    changed = Changed()
    with trio.fail_after(SERVED_TIMEOUT + 20):
        async with AsyncExitStack() as stack:
            ws = {name: await stack.enter_async_context(chat(url + name)) for name in names}
            for name in names:
                await next_event(ws[name], type="welcome")
            async with trio.open_nursery() as nursery:
                for name in names:
                    nursery.start_soon(read_into, ws[name], events[name], changed)
                await send(ws["slow"], text="sleep:5", id="s1")
                await send(ws["stuck"], text="sleep:60", id="t1")
                for n in range(per_sender):
                    await send(ws["c"], text=f"c:{n}")
                    await send(ws["d"], text=f"d:{n}")
                await changed.until(lambda: all("sleep:5" in texts(events[name]) for name in names))
                await changed.until(lambda: any(e["type"] == "error" for e in events["stuck"]))
                await send(ws["stuck"], text="still here", id="t2")
                await changed.until(
                    lambda: all("still here" in texts(events[name]) for name in names)
                )
                nursery.cancel_scope.cancel()
    for name in names:  # all the chatter came while the slow message was held
        seen = texts(events[name])
        assert set(seen[: 2 * per_sender]) == chatter, name
        assert seen[2 * per_sender :] == ["sleep:5", "still here"], name
    error = next(e for e in events["stuck"] if e["type"] == "error")
    assert (error["error"], error["id"]) == ("unavailable", "t1")
    assert any(e["type"] == "ack" and e["id"] == "s1" for e in events["slow"])


@TRIO
@pytest.mark.anyio
async def test_a_raising_hook_logs_one_line_and_the_connection_stays(
    served: ServerProcess,
) -> None:
    with trio.fail_after(20):
        async with chat(served.url("/ws/chat?room=raise&name=ann")) as ws:
            await next_event(ws, type="welcome")
            await send(ws, text="raise", id="r1")
            error = await next_event(ws, type="error")
            assert (error["error"], error["id"]) == ("unavailable", "r1")
            await send(ws, text="fine", id="f1")
            assert (await next_event(ws, type="message"))["text"] == "fine"
    lines = [line for line in served.text.splitlines() if "hook" in line]
    assert len(lines) == 1, lines
    assert "the message hook raised ValueError('the moderation service is down')" in lines[0]


@TRIO
@pytest.mark.anyio
async def test_served_rewrite_reaches_all_and_history_refusal_the_sender_only(
    served: ServerProcess,
) -> None:
    await rewrite_and_refusal(served, "/ws/chat?room=served")


PER_SENDER = 300


@TRIO
@pytest.mark.anyio
async def test_stored_sees_every_seq_once_on_the_worker_that_accepted_it(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Two servers sharing Redis (Trio and asyncio workers), 4 senders at full speed
    spread over both: ``stored`` is called once per seq across both, on the sender's."""
    env = served_env(redis_server, HOOKED_STORED_DIR=str(tmp_path))
    with ExitStack() as stack:
        servers = [
            stack.enter_context(
                spawn_server(["--app", "hooked:app", "--worker-class", worker], env=env)
            )
            for worker in ("trio", "asyncio")
        ]
        clients = spread(servers, "stored", 8)
        senders = clients[:4]
        with trio.fail_after(60):
            async with AsyncExitStack() as connections:
                await connect_all(connections, clients)
                await run_load(clients, senders, per_sender=PER_SENDER, window=8)
            total = PER_SENDER * len(senders)
            lines = await _stored_lines(tmp_path, total)
        worker_of = [server.workers()[0] for server in servers]
    first = clients[0].welcome["seq"] + 1
    assert sorted(line["seq"] for line in lines) == list(range(first, first + total))
    assert len({line["epoch"] for line in lines}) == 1
    seen = dict(clients[0].messages)
    for line in lines:
        assert line["text"] == seen[line["seq"]]
        sender = int(line["text"].partition(":")[0].removeprefix("s"))
        assert line["pid"] == worker_of[sender % 2], line  # spread() alternates servers


async def _stored_lines(directory: Path, total: int) -> list[dict[str, Any]]:
    """Every line the servers' ``stored`` hooks wrote, once there are ``total`` (then a
    moment more, so that one too many would show)."""
    while len(_read_stored(directory)) < total:  # noqa: ASYNC110 (other processes write)
        await trio.sleep(0.05)
    await trio.sleep(0.5)  # anything beyond total would be a duplicate: let it come
    return _read_stored(directory)


def _read_stored(directory: Path) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for path in directory.glob("*.jsonl")
        for line in path.read_text().splitlines()
    ]
