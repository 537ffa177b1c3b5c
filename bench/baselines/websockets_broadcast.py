"""A chat server on the ``websockets`` library's asyncio implementation, fanning out with
``websockets.asyncio.server.broadcast()``.

    python -m bench.baselines.websockets_broadcast --port 8000 [--uvloop]

``broadcast()`` writes each frame into every connection's transport synchronously, with no
backpressure: a client that stops reading never blocks the room, and its unsent frames pile
up in the server's memory until the connection times out. Same wire protocol as the
chapter app (no join/leave notices: peers of this kind do not send them).
"""

import argparse
import asyncio
import json
import resource
import signal
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import broadcast, serve
from websockets.exceptions import ConnectionClosed

rooms: dict = {}


async def handler(websocket) -> None:
    url = urlsplit(websocket.request.path)
    if url.path != "/ws/chat":
        await websocket.close(4004, "unknown path")
        return
    room = parse_qs(url.query).get("room", ["general"])[0]
    members = rooms.setdefault(room, set())
    members.add(websocket)
    try:
        async for text in websocket:  # ends quietly on a clean close
            if not isinstance(text, str) or not text:
                continue
            try:
                data = json.loads(text)
            except json.JSONDecodeError:
                data = {"text": text}
            if not isinstance(data, dict):
                data = {"text": text}
            broadcast(
                members,
                json.dumps({"type": "message", "text": data.get("text", text), "room": room}),
            )
    except ConnectionClosed:
        pass  # the client vanished without a close frame
    finally:
        members.discard(websocket)
        if not members:
            rooms.pop(room, None)


async def main(host: str, port: int) -> None:
    async with serve(handler, host, port) as server:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, server.close)
        await server.wait_closed()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--uvloop", action="store_true", help="run on uvloop instead of asyncio's loop")
    a = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if a.uvloop:
        import uvloop

        uvloop.run(main(a.host, a.port))
    else:
        asyncio.run(main(a.host, a.port))
