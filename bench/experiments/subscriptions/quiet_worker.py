"""What a worker pays for rooms it does not serve.

Two servers share one Redis. Server B runs 10 busy rooms (one sender each, at full
speed, reading its own messages back); server A only holds one member in a quiet room. Reports the
CPU seconds A's worker spent while B's rooms were busy, and how many messages B fanned
out. Run with the code under test on ``PYTHONPATH`` (e.g. an older checkout's ``src``)::

    .venv/bin/python bench/experiments/subscriptions/quiet_worker.py [seconds]
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from pathlib import Path

import psutil
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))

from redis_server import run_redis
from servers import spawn_server


async def flood(url: str, room: str, stop: trio.Event, counts: list[int]) -> None:
    """One member that sends about 2,000 messages/s into ``room`` and reads them back."""
    url = f"{url}/ws/chat?room={room}&name=s{room}"
    async with open_websocket_url(url) as ws, trio.open_nursery() as nursery:

        async def read() -> None:
            with contextlib.suppress(ConnectionClosed):
                while True:
                    event = json.loads(await ws.get_message())
                    counts[0] += event.get("type") == "message"

        nursery.start_soon(read)
        text = json.dumps({"type": "message", "text": "x" * 80})
        while not stop.is_set():
            for _ in range(20):
                await ws.send_message(text)
            await trio.sleep(0.01)
        nursery.cancel_scope.cancel()


async def measure(a_url: str, b_url: str, a_pid: int, seconds: float) -> None:
    async with open_websocket_url(f"{a_url}/ws/chat?room=quiet&name=q"):
        worker = psutil.Process(a_pid)
        before = sum(worker.cpu_times()[:2])
        stop, counts = trio.Event(), [0]
        async with trio.open_nursery() as nursery:
            for i in range(10):
                nursery.start_soon(flood, b_url, f"busy{i}", stop, counts)
            await trio.sleep(seconds)
            stop.set()
        spent = sum(worker.cpu_times()[:2]) - before
    print(f"B delivered {counts[0]} messages; A's worker spent {spent:.2f} CPU s")


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 10.0
    with tempfile.TemporaryDirectory() as directory, run_redis(Path(directory)) as redis:
        env = {"ROOMCAST_REDIS_URL": redis.url, "ROOMCAST_RATE_LIMIT": "0"}
        with spawn_server(env=env) as a, spawn_server(env=env) as b:
            trio.run(measure, a.url(""), b.url(""), a.workers()[0], seconds)


if __name__ == "__main__":
    main()
