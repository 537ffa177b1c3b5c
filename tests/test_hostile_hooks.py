"""Hooks, webhooks and ``roomcast.testing`` under hostile answers and misuse: what an
application's hook (or its webhook receiver) may answer must cost one connection at most,
never every member of a room, never unbounded memory, never a crashed handler.

In-process cases use ``roomcast.testing`` on both anyio backends; the webhook receiver
cases run a real roomcast server and a real HTTP receiver (Hypercorn, in threads)."""

from __future__ import annotations

import contextlib
import json
import math
import time
from typing import Any

import anyio
import pytest

from roomcast import Hooks, Identity, Rewrite, Settings, create_app
from roomcast import hooks as roomcast_hooks
from roomcast.client import Message, Welcome
from roomcast.hooks import ConnectRequest, MessageRequest
from roomcast.testing import MessageRefused, TestWebSocket, WebSocketClosed, open_test_client

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
