"""The seed chapter's chat app ("WebSockets Over ASGI"), copied faithfully.

Served by Hypercorn (trio worker) and by uvicorn:

    hypercorn -k trio bench.baselines.chapter:application
    uvicorn bench.baselines.chapter:application

The room logic is the chapter's, unchanged: a module-level ``rooms`` dict of sets of
``send`` callables, the sender joins before ``websocket.accept``, and ``broadcast``
serialises once with ``json.dumps`` and then awaits each client's ``send`` in turn. Only the
parts the chapter leaves out (``handle_lifespan``, ``read_body``) and its routing example
(``/ws/chat`` here, unknown WebSocket paths closed with 4004, 404 for other HTTP paths) are
filled in, the way the chapter sketches them.
"""

import json

# Connected clients: room_name -> set of send callables
rooms: dict[str, set] = {}


async def application(scope, receive, send):
    if scope["type"] == "lifespan":
        await handle_lifespan(receive, send)
    elif scope["type"] == "http":
        await handle_http(scope, receive, send)
    elif scope["type"] == "websocket":
        path = scope["path"]
        if path == "/ws/chat":
            await handle_websocket(scope, receive, send)
        else:
            # Reject unknown WebSocket paths
            event = await receive()
            if event["type"] == "websocket.connect":
                await send({"type": "websocket.close", "code": 4004})
    else:
        pass  # Unknown scope type, ignore


async def handle_lifespan(receive, send):
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def read_body(receive):
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body", False):
            return body


async def handle_http(scope, receive, send):
    await read_body(receive)
    body = b"Not Found"
    await send(
        {
            "type": "http.response.start",
            "status": 404,
            "headers": [
                (b"content-type", b"text/plain"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def handle_websocket(scope, receive, send):
    """Multi-room chat server."""
    # Get room from query string
    query = scope.get("query_string", b"").decode()
    room = "general"
    for param in query.split("&"):
        if param.startswith("room="):
            room = param[5:]
            break

    # Join the room
    if room not in rooms:
        rooms[room] = set()
    rooms[room].add(send)

    try:
        # Accept the WebSocket connection
        event = await receive()
        if event["type"] != "websocket.connect":
            return
        await send({"type": "websocket.accept"})

        # Announce arrival
        await broadcast(
            room,
            {
                "type": "system",
                "message": f"A user joined #{room}",
            },
            exclude=send,
        )

        # Message loop
        while True:
            event = await receive()

            if event["type"] == "websocket.receive":
                text = event.get("text", "")
                if not text:
                    continue

                try:
                    data = json.loads(text)
                except json.JSONDecodeError:
                    data = {"text": text}

                # Broadcast to everyone in the room
                await broadcast(
                    room,
                    {
                        "type": "message",
                        "text": data.get("text", text),
                        "room": room,
                    },
                )

            elif event["type"] == "websocket.disconnect":
                break

    finally:
        # Remove from room on disconnect
        rooms.get(room, set()).discard(send)
        await broadcast(
            room,
            {
                "type": "system",
                "message": f"A user left #{room}",
            },
        )


async def broadcast(room: str, data: dict, exclude=None) -> None:
    """Send a message to all clients in a room."""
    message = json.dumps(data)
    dead_clients = set()

    for client_send in list(rooms.get(room, set())):
        if client_send is exclude:
            continue
        try:
            await client_send(
                {
                    "type": "websocket.send",
                    "text": message,
                }
            )
        except Exception:
            dead_clients.add(client_send)

    # Clean up dead clients
    rooms.get(room, set()).difference_update(dead_clients)
