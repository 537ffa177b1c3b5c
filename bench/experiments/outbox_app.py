"""Experiment, not product code: roomcast's architecture and nothing else.

The chapter's chat with what roomcast adds to a delivery's path: a sender task per member
(an anyio task group per connection) fed by a bounded anyio memory object stream, fan-out
by ``send_nowait``, queued events taken with ``receive_nowait``, and the same gen-0 GC
threshold. No protocol, history, admission or metrics. Measured next to ``chapter-trio``
(``outbox-trio`` in bench/servers.py), it shows what the task-per-member design itself
costs on Hypercorn's Trio worker, apart from roomcast's own code.
"""

import contextlib
import gc
import json
from urllib.parse import parse_qs

import anyio

rooms: dict[str, set] = {}


async def application(scope, receive, send):
    if scope["type"] == "lifespan":
        await receive()
        gc.set_threshold(50_000, *gc.get_threshold()[1:])
        await send({"type": "lifespan.startup.complete"})
        await receive()
        await send({"type": "lifespan.shutdown.complete"})
    elif scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        await chat(scope, receive, send)


async def chat(scope, receive, send):
    outbox_send, outbox = anyio.create_memory_object_stream[str](1024)
    room = parse_qs(scope.get("query_string", b"").decode()).get("room", ["general"])[0]
    members = rooms.setdefault(room, set())
    members.add(outbox_send)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(send_outbox, outbox, send)
            while (message := await receive())["type"] == "websocket.receive":
                text = json.loads(message["text"])["text"]
                event = json.dumps({"type": "message", "text": text})
                for member in members:
                    with contextlib.suppress(anyio.WouldBlock):  # full: dropped, not evicted
                        member.send_nowait(event)
            tg.cancel_scope.cancel()
    finally:
        members.discard(outbox_send)


async def send_outbox(outbox, send):
    while True:
        try:
            event = outbox.receive_nowait()
        except anyio.WouldBlock:
            event = await outbox.receive()
        await send({"type": "websocket.send", "text": event})
