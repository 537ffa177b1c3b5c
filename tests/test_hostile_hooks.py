"""Hooks, webhooks and ``roomcast.testing`` under hostile answers and misuse: what an
application's hook (or its webhook receiver) may answer must cost one connection at most,
never every member of a room, never unbounded memory, never a crashed handler.

In-process cases use ``roomcast.testing`` on both anyio backends; the webhook receiver
cases run a real roomcast server and a real HTTP receiver (Hypercorn, in threads)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest
import trio
from trio_websocket import open_websocket_url

from roomcast import Hooks, Identity, Rewrite, Settings, create_app
from roomcast import hooks as roomcast_hooks
from roomcast.asgi import Receive, Scope, Send
from roomcast.client import Message, Welcome
from roomcast.hooks import ConnectRequest, MessageRequest
from roomcast.testing import MessageRefused, TestWebSocket, WebSocketClosed, open_test_client

from servers import serve_in_thread

pytestmark = pytest.mark.anyio

SETTINGS = Settings(rate_limit=0, presence_grace=0)


def _with_data(data: dict[str, Any]) -> Hooks:
    """A ``message`` hook that adds ``data`` to the messages whose text is ``big``."""
    hooks = Hooks()

    @hooks.message
    async def message(request: MessageRequest) -> Rewrite | None:
        return Rewrite(request.text, data) if request.text == "big" else None

    return hooks


async def test_a_rewrite_with_huge_data_fails_closed_and_reaches_no_member() -> None:
    """10 MB of ``data`` on every message would go to every member (and every joiner's
    replay): a client with a frame limit (``websockets``: 1 MiB) would be closed, all of
    them at once. The sender gets ``unavailable``; the room sees nothing of it."""
    huge = {"blob": "x" * 10_000_000}
    with anyio.fail_after(20):
        async with (
            open_test_client(create_app(SETTINGS, hooks=_with_data(huge))) as client,
            client.connect("/ws/chat?room=r&name=a") as a,
            client.connect("/ws/chat?room=r&name=b") as b,
        ):
            await a.receive_event()
            await b.receive_event()
            with pytest.raises(MessageRefused) as refused:
                await a.send_message("big")
            assert refused.value.code == "unavailable"
            await b.send_message("after", id="next")
            heard = await a.receive_event()
            while not isinstance(heard, Message):
                heard = await a.receive_event()
            assert (heard.text, heard.seq) == ("after", 1)  # nothing was sequenced


async def test_a_rewrite_with_data_up_to_the_limit_goes_through() -> None:
    data = {"blob": "x" * (roomcast_hooks.MAX_DATA_BYTES - len('{"blob":""}'))}
    with anyio.fail_after(20):
        async with (
            open_test_client(create_app(SETTINGS, hooks=_with_data(data))) as client,
            client.connect("/ws/chat?room=r&name=a") as a,
        ):
            await a.receive_event()
            ack = await a.send_message("big")
            heard = await a.receive_event()
            assert isinstance(heard, Message) and heard.seq == ack.seq
            assert json.loads(heard.raw)["data"] == data


def _answering_connect(identity: Identity) -> Hooks:
    hooks = Hooks()

    @hooks.connect
    async def connect(request: ConnectRequest) -> Identity:
        return identity

    return hooks


ABSURD_IDENTITIES = {
    "a name of 100,000 characters": (Identity("u", "n" * 100_000, None, math.inf), 1011),
    "10,000 room grants": (Identity("u", "n", tuple(f"r{i}" for i in range(10_000)), 1e12), 1011),
    "an expiry that is not a number": (Identity("u", "n", None, math.nan), 1011),
    "an expiry in the past": (Identity("u", "n", None, time.time() - 3600), 4001),
    "an expiry in 1970": (Identity("u", "n", None, -1e300), 4001),
}


@pytest.mark.parametrize("case", ABSURD_IDENTITIES)
async def test_a_connect_identity_with_absurd_values_is_refused_before_the_room(
    case: str,
) -> None:
    """What the application's session store answers is checked as a token's claims are:
    a name no display name can be, more grants than a token may carry (each join checks
    them all), an expiry that is not a number (it became the connection's deadline and
    raised out of the app), or one already past (the connection joined and read the
    room's replay before being closed). None of them is let into the room."""
    identity, code = ABSURD_IDENTITIES[case]
    with anyio.fail_after(20):
        app = create_app(SETTINGS, hooks=_answering_connect(identity))
        async with (
            open_test_client(app) as client,
            client.connect("/ws/chat?room=r&name=a") as ws,
        ):
            events = await _events_until_closed(ws)
            assert ws.close_code == code
    # 1011: the hook failed closed, with error unavailable first; 4001: refused as a token is
    assert [event["type"] for event in events] == (["error"] if code == 1011 else [])


async def _events_until_closed(ws: TestWebSocket) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    with contextlib.suppress(WebSocketClosed):
        while True:
            events.append(await ws.receive_json())
    return events


async def test_a_connect_identity_expiring_in_a_far_future_is_served() -> None:
    with anyio.fail_after(20):
        app = create_app(SETTINGS, hooks=_answering_connect(Identity("u", "n", None, 1e300)))
        async with (
            open_test_client(app) as client,
            client.connect("/ws/chat?room=r") as ws,
        ):
            assert isinstance(await ws.receive_event(), Welcome)
            assert (await ws.send_message("still here")).seq == 1


# -- a webhook receiver that answers too much, on real servers -------------------------------


@dataclasses.dataclass
class FloodingReceiver:
    """An ASGI receiver answering every POST with ``size`` bytes: JSON whitespace, then
    ``{}`` (valid JSON: read to the end, it accepts)."""

    size: int

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        chunk = b" " * 65536
        for _ in range(self.size // len(chunk)):  # sent on after the client left: ignored
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"{}"})


async def _send_and_answer(url: str) -> dict[str, Any]:
    async with open_websocket_url(url) as ws:
        while json.loads(await ws.get_message())["type"] != "welcome":
            pass
        await ws.send_message(json.dumps({"text": "hello", "id": "h"}))
        while True:
            event: dict[str, Any] = json.loads(await ws.get_message())
            if event.get("id") == "h":
                return event


@pytest.mark.parametrize("anyio_backend", ["trio"])
@pytest.mark.parametrize("worker_class", ["trio", "asyncio"])
async def test_a_webhook_answer_of_100_mb_is_not_read_into_memory(worker_class: str) -> None:
    """The answer is read up to 1 MiB and then given up (the hook fails closed); before,
    the whole body was read into memory, per waiting connection (up to the pool's 200)."""
    receiver = FloodingReceiver(100 * 1024 * 1024)
    with serve_in_thread(receiver, worker_class="trio") as hooks_server:
        settings = dataclasses.replace(
            SETTINGS,
            hook_timeout=20.0,  # time enough to read it all: the cap, not the clock, stops it
            webhook_url=hooks_server.http_url("/hooks"),
            webhook_secret="s",
            webhook_events=frozenset({"message"}),
        )
        with (
            serve_in_thread(create_app(settings), worker_class=worker_class) as server,
            traced_peak() as peak,
            trio.fail_after(40),
        ):
            answer = await _send_and_answer(server.url("/ws/chat?room=r&name=a"))
    print(f"peak {peak() / 2**20:.1f} MiB")
    assert (answer["type"], answer.get("error")) == ("error", "unavailable")
    assert peak() < 20 * 1024 * 1024  # the cap, and nothing near the 100 MB


@contextlib.contextmanager
def traced_peak() -> Iterator[Callable[[], int]]:
    """The most memory the process (servers' threads included) held at once within the
    block, above what it held when the block began, read with ``tracemalloc``."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    baseline = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    peaks: list[int] = []
    try:
        yield lambda: peaks[0]
    finally:
        peaks.append(tracemalloc.get_traced_memory()[1] - baseline)
        if started:
            tracemalloc.stop()


# -- roomcast.testing misused ----------------------------------------------------------------


async def test_a_read_after_the_connect_block_blames_the_test_not_the_app() -> None:
    """A read after the ``connect`` block said ``1011 the app ended without closing``:
    a test author would hunt for a bug in an app that did nothing wrong."""
    with anyio.fail_after(20):
        async with open_test_client(create_app(SETTINGS)) as client:
            async with client.connect("/ws/chat?room=r") as ws:
                await ws.receive_event()
            with pytest.raises(WebSocketClosed) as closed:
                await ws.receive_json()
            assert (closed.value.code, closed.value.reason) == (1000, "closed by the client")
            assert (ws.close_code, ws.close_reason) == (1000, "closed by the client")
            async with client.connect("/ws/chat?room=r") as again:  # the app is fine
                assert isinstance(await again.receive_event(), Welcome)
