"""Several clients that stop reading join a busy room on a real server process: the
healthy members' delivery goes on with no gap, the stalled ones are evicted with 4008, and
the server's memory stays bounded (measured)."""

from __future__ import annotations

import json
from typing import Any

import psutil
import pytest
import trio
from trio_websocket import open_websocket_url

from rawws import open_raw_websocket
from servers import spawn_server

pytestmark = pytest.mark.anyio

STALLED = 6
HEALTHY = 4
MESSAGES = 1500
TEXT = "y" * 2000
OUTBOX = 64
#: healthy readers wake the talker here after each message they receive
PROGRESS = trio.lowlevel.ParkingLot()


def server_rss(pid: int) -> int:
    """Resident memory of the server's process tree (Hypercorn parent + worker)."""
    parent = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [parent, *parent.children(recursive=True)])


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_stalled_readers_are_evicted_and_memory_stays_bounded() -> None:
    env = {
        "ROOMCAST_RATE_LIMIT": "0",
        "ROOMCAST_OUTBOX_SIZE": str(OUTBOX),
        "ROOMCAST_SEND_TIMEOUT": "600",  # keep the kernel out of it: eviction alone bounds memory
    }
    with spawn_server(env=env) as server, trio.fail_after(90):
        url = server.url("/ws/chat?room=busy")
        seqs: dict[int, list[int]] = {i: [] for i in range(HEALTHY)}
        async with trio.open_nursery() as nursery:
            clients = [
                await nursery.start(_healthy_client, url + f"&name=h{i}", seqs[i])
                for i in range(HEALTHY)
            ]
            warm = await _talk(clients[0], 100, seqs)  # warm up: allocator, caches
            baseline = peak = server_rss(server.process.pid)
            stalled = [
                await trio.to_thread.run_sync(
                    lambda i=i: open_raw_websocket(
                        server.port, f"/ws/chat?room=busy&name=s{i}", receive_buffer=4096
                    )
                )
                for i in range(STALLED)
            ]
            sent = warm
            for _ in range(MESSAGES // 100):
                sent = await _talk(clients[0], 100, seqs, start=sent)
                peak = max(peak, server_rss(server.process.pid))
            nursery.cancel_scope.cancel()
        for i in range(HEALTHY):  # every healthy member saw every message, in order
            assert seqs[i] == list(range(1, sent + 1))
        closes = [await trio.to_thread.run_sync(ws.read_until_close) for ws in stalled]
        assert {(code, reason) for code, reason, _ in closes} == {
            (4008, "too slow: outbox overflowed")
        }
        growth = peak - baseline
        # bounded by the outboxes (STALLED x OUTBOX x ~2 KB = 0.8 MB) plus allocator slack,
        # not by the MESSAGES x STALLED x 2 KB = 18 MB an unbounded buffer would hold
        print(f"\nserver RSS: baseline {baseline / 2**20:.1f} MB, peak {peak / 2**20:.1f} MB")
        assert growth < 8 * 2**20, f"server grew by {growth / 2**20:.1f} MB"


async def _healthy_client(url: str, seqs: list[int], task_status: Any) -> None:
    async with open_websocket_url(url) as ws:
        task_status.started(ws)
        while True:
            event = json.loads(await ws.get_message())
            if event["type"] == "message":
                seqs.append(event["seq"])
                PROGRESS.unpark_all()


async def _talk(ws: Any, count: int, seqs: dict[int, list[int]], start: int = 0) -> int:
    """Send ``count`` messages, each once every healthy member has the previous one."""
    for n in range(start + 1, start + count + 1):
        await ws.send_message(json.dumps({"text": TEXT}))
        while min(len(s) for s in seqs.values()) < n:
            await PROGRESS.park()
    return start + count
