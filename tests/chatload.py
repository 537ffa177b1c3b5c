"""Chat load for stress tests: senders at full speed with several messages in flight, and
every member of the room recording what it received, so a test can assert exactly-once,
in-order delivery to everyone.

Clients are trio-websocket connections; half of them may offer ``roomcast.batch`` (one
frame, several ``\\n``-separated events). Nothing here sleeps: senders are paced by their
own acks (a window of messages in flight), receivers read until they have seen every
message, and the caller bounds the whole run with ``fail_after``.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import trio
from trio_websocket import WebSocketConnection, open_websocket_url

BATCH = "roomcast.batch"


@dataclass(eq=False)
class Client:
    """One member of the room and everything it received."""

    url: str
    batch: bool
    ws: WebSocketConnection | None = None
    welcome: dict[str, Any] = field(default_factory=dict)
    #: (seq, text) of every ``message`` event, in arrival order
    messages: list[tuple[int, str]] = field(default_factory=list)
    #: ids of this client's own messages, in the order their acks arrived, with their seqs
    acks: list[tuple[str, int]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    notices: list[dict[str, Any]] = field(default_factory=list)
    frames: int = 0
    window: trio.Semaphore | None = None
    changed: trio.Event = field(default_factory=trio.Event)

    async def receive(self) -> list[dict[str, Any]]:
        assert self.ws is not None
        frame = await self.ws.get_message()
        self.frames += 1
        assert isinstance(frame, str)
        events = (
            [json.loads(line) for line in frame.split("\n")] if self.batch else [json.loads(frame)]
        )
        for event in events:
            self.record(event)
        return events

    def record(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        if kind == "message":
            self.messages.append((event["seq"], event["text"]))
        elif kind == "ack":
            self.acks.append((event["id"], event["seq"]))
            if self.window is not None:
                self.window.release()
        elif kind == "error":
            self.errors.append(event)
        elif kind == "system":
            self.notices.append(event)
        self.changed.set()
        self.changed = trio.Event()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Until ``predicate()`` holds (evaluated after each event this client records)."""
        while not predicate():
            await self.changed.wait()


async def connect_all(stack: AsyncExitStack, clients: list[Client]) -> None:
    """Open every client's connection (in order) and read its welcome."""
    for client in clients:
        client.ws = await stack.enter_async_context(
            open_websocket_url(client.url, subprotocols=[BATCH] if client.batch else None)
        )
        first = (await client.receive())[0]
        assert first["type"] == "welcome", first
        client.welcome = first


async def read_forever(client: Client) -> None:
    while True:
        await client.receive()


def text_of(sender: int, n: int, pad: int = 0) -> str:
    return f"s{sender}:{n}" + (" " + "x" * pad if pad else "")


async def send_all(client: Client, sender: int, count: int, window: int, pad: int = 0) -> None:
    """Send ``count`` messages with ids, keeping at most ``window`` unacknowledged."""
    assert client.ws is not None
    client.window = trio.Semaphore(window)
    for n in range(count):
        await client.window.acquire()
        text = text_of(sender, n, pad)
        await client.ws.send_message(json.dumps({"text": text, "id": f"{n}"}))


async def run_load(
    clients: list[Client],
    senders: list[Client],
    *,
    per_sender: int,
    window: int,
    pad: int = 0,
    during: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Every sender sends ``per_sender`` messages (``pad`` characters longer than their
    :func:`text_of`) at full speed while every client reads; returns once every client has
    received all of them. ``during`` runs alongside (e.g. pausing a server)."""
    total = per_sender * len(senders)
    async with trio.open_nursery() as nursery:
        for client in clients:
            nursery.start_soon(read_forever, client)
        for index, sender in enumerate(senders):
            nursery.start_soon(send_all, sender, index, per_sender, window, pad)
        if during is not None:
            nursery.start_soon(during)
        for client in clients:
            await client.wait_for(lambda c=client: len(c.messages) >= total)  # type: ignore[misc]
        for sender in senders:
            await sender.wait_for(lambda s=sender: len(s.acks) >= per_sender)  # type: ignore[misc]
        nursery.cancel_scope.cancel()


def delivery_faults(client: Client, first: int, total: int) -> dict[str, Any]:
    """What is wrong with what ``client`` received, if anything: duplicates, gaps and
    out-of-order seqs, counted (an empty dict means exactly once and in order)."""
    seqs = [seq for seq, _ in client.messages]
    faults: dict[str, Any] = {}
    duplicates = len(seqs) - len(set(seqs))
    if duplicates:
        faults["duplicates"] = duplicates
    backwards = sum(1 for a, b in itertools.pairwise(seqs) if b <= a)
    if backwards:
        faults["out_of_order"] = backwards
    missing = set(range(first, first + total)) - set(seqs)
    if missing:
        faults["missing"] = len(missing)
    if client.errors:
        faults["errors"] = client.errors[:3]
    return faults
