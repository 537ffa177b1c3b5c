"""App-level timers on trio's MockClock (autojump): no real sleeps, exact times."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
import trio
from trio.testing import MockClock

from roomcast import Settings, create_app
from roomcast.connection import CLOSE_TIMEOUT

from harness import open_asgi_client

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return "trio", {"clock": MockClock(autojump_threshold=0)}


async def test_rate_limit_refills_at_the_configured_rate() -> None:
    app = create_app(Settings(rate_limit=2))  # 2/s, burst of 4
    with anyio.fail_after(60):
        async with open_asgi_client(app) as client, client.websocket("/ws/chat") as ws:
            await ws.receive_json()
            accepted = []
            for second in range(3):
                for i in range(6):
                    await ws.send_json({"text": f"{second}.{i}", "id": f"{second}.{i}"})
                await anyio.wait_all_tasks_blocked()
                await trio.sleep(1)  # jumps the mock clock: the bucket refills 2 tokens
            await ws.send_text("final")
            while True:
                event = await ws.receive_json()
                if event["type"] == "message":
                    accepted.append(event["text"])
                    if event["text"] == "final":
                        break
    # a burst of 4 at t=0, then 2 per mock second; "final" gets the token of the last second
    assert accepted == ["0.0", "0.1", "0.2", "0.3", "1.0", "1.1", "2.0", "2.1", "final"]


async def test_close_on_cancel_is_bounded_when_the_peer_does_not_read() -> None:
    """A handler cancelled at shutdown tries to send 1001 under a shield, but gives up after
    CLOSE_TIMEOUT when the send cannot complete, and the cancellation still propagates."""
    app = create_app(Settings(rate_limit=0))
    with anyio.fail_after(60):
        async with open_asgi_client(app) as client:
            scope = {
                "type": "websocket",
                "path": "/ws/chat",
                "query_string": b"",
                "headers": [],
                "subprotocols": [],
                "state": dict(client.state),
            }
            to_app, app_receive = anyio.create_memory_object_stream[dict[str, Any]](4)
            app_send, from_app = anyio.create_memory_object_stream[dict[str, Any]](0)
            await to_app.send({"type": "websocket.connect"})
            async with anyio.create_task_group() as tg:
                tg.start_soon(app, scope, app_receive.receive, app_send.send)
                assert (await from_app.receive())["type"] == "websocket.accept"
                await anyio.wait_all_tasks_blocked()  # the welcome send now blocks forever
                cancelled_at = trio.current_time()
                tg.cancel_scope.cancel()
            assert trio.current_time() - cancelled_at == pytest.approx(CLOSE_TIMEOUT)
            assert client.runtime.connections == 0
            assert not any(room.members for room in client.runtime.hub.rooms.values())
