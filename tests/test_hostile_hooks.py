"""Hooks, webhooks and ``roomcast.testing`` under hostile answers and misuse: what an
application's hook (or its webhook receiver) may answer must cost one connection at most,
never every member of a room, never unbounded memory, never a crashed handler.

In-process cases use ``roomcast.testing`` on both anyio backends; the webhook receiver
cases run a real roomcast server and a real HTTP receiver (Hypercorn, in threads)."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest

from roomcast import Hooks, Rewrite, Settings, create_app
from roomcast import hooks as roomcast_hooks
from roomcast.client import Message
from roomcast.hooks import MessageRequest
from roomcast.testing import MessageRefused, open_test_client

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
