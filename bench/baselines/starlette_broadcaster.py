"""A Starlette + broadcaster chat app (memory:// backend), served by uvicorn.

    uvicorn bench.baselines.starlette_broadcaster:app

The pattern of broadcaster's own README example: each connection runs a receiver that
publishes to the room's channel and a sender that subscribes to it and forwards every
event, in one anyio task group; whichever ends first cancels the other. Each subscriber
has its own unbounded ``asyncio.Queue``, so a client that stops reading never blocks the
room; its backlog grows instead. Same wire protocol as the chapter app (no join/leave
notices: peers of this kind do not send them).
"""

import json
from contextlib import asynccontextmanager

import anyio
from broadcaster import Broadcast
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket

broadcast = Broadcast("memory://")


async def chat_receiver(websocket: WebSocket, room: str) -> None:
    async for text in websocket.iter_text():
        if not text:
            continue
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = {"text": text}
        if not isinstance(data, dict):
            data = {"text": text}
        message = json.dumps({"type": "message", "text": data.get("text", text), "room": room})
        await broadcast.publish(channel=room, message=message)


async def chat_sender(websocket: WebSocket, room: str) -> None:
    async with broadcast.subscribe(channel=room) as subscriber:
        async for event in subscriber:
            await websocket.send_text(event.message)


async def chat(websocket: WebSocket) -> None:
    room = websocket.query_params.get("room", "general")
    await websocket.accept()
    async with anyio.create_task_group() as task_group:

        async def run_receiver() -> None:
            await chat_receiver(websocket, room)
            task_group.cancel_scope.cancel()

        task_group.start_soon(run_receiver)
        await chat_sender(websocket, room)


@asynccontextmanager
async def lifespan(app):
    await broadcast.connect()
    try:
        yield
    finally:
        await broadcast.disconnect()


app = Starlette(routes=[WebSocketRoute("/ws/chat", chat)], lifespan=lifespan)
