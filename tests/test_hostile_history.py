"""Scrollback under hostile clients, end to end: a real Hypercorn (Trio worker) on a
port-0 socket, raw sockets that ask for pages of a room's history and never read them.

A page is an event built for one connection (a copy of up to the room's whole retained
window, not an event shared with the room's other members), so what a client that stops
reading can make the server hold is counted in pages: at most two per connection (the one
its sender is writing, one waiting), not the ten of a burst."""

from __future__ import annotations

import gc
import json
import time
import tracemalloc
from collections.abc import Iterator

import pytest
from wsproto.events import TextMessage

from roomcast import Settings, create_app
from roomcast.scrollback import PAGE_CHARS

from rawws import RawWebSocket, open_raw_websocket
from servers import ThreadedServer, serve_in_thread

ROOM = "scroll"
#: texts that fill the room's retained history (ROOMCAST_HISTORY_BYTES, 256 KiB) in 70-odd
#: messages, so a page is as large as the window gets
TEXT = "x" * 3600
HOSTILE = 20
PIPELINED = 10  # the history burst


@pytest.fixture
def server() -> Iterator[ThreadedServer]:
    with serve_in_thread(
        create_app(Settings(rate_limit=0)), worker_class="trio", websocket_max_message_size=65536
    ) as server:
        yield server


def fill_history(server: ThreadedServer) -> None:
    talker = open_raw_websocket(server.port, f"/ws/chat?room={ROOM}&name=talker")
    talker.next_message()  # welcome
    for _ in range(100):
        talker.send_text(json.dumps({"text": TEXT}))
    for _ in range(100):
        talker.next_message()
    talker.kill()


def ask_pages_and_stop_reading(server: ThreadedServer) -> RawWebSocket:
    """A /ws connection with a tiny receive window that pipelines a burst of page
    requests in one write and then reads nothing."""
    ws = open_raw_websocket(server.port, "/ws?name=reader", receive_buffer=4096)
    request = json.dumps({"type": "history", "room": ROOM, "limit": 200})
    ws.sock.sendall(b"".join(ws.conn.send(TextMessage(data=request)) for _ in range(PIPELINED)))
    return ws


def traced_once_settled(limit: float = 30.0) -> int:
    """Traced memory once it has stopped growing (the server has answered every
    request it was sent): polled, as the server works in another thread."""
    deadline = time.monotonic() + limit
    last = -1
    while time.monotonic() < deadline:
        gc.collect()
        now = tracemalloc.get_traced_memory()[0]
        if abs(now - last) < 64 * 1024:
            return now
        last = now
        time.sleep(0.5)
    raise AssertionError(f"memory still moving after {limit} s")


def test_a_client_that_asks_for_pages_and_never_reads_them_holds_two_pages(
    server: ThreadedServer,
) -> None:
    fill_history(server)
    tracemalloc.start()
    try:
        before = traced_once_settled()
        hostile = [ask_pages_and_stop_reading(server) for _ in range(HOSTILE)]
        held = traced_once_settled() - before
        for ws in hostile:
            ws.kill()
    finally:
        tracemalloc.stop()
    page = 256 * 1024  # the retained window, as one event (PAGE_CHARS would cut a bigger one)
    assert page <= PAGE_CHARS
    per_connection = held / HOSTILE
    print(f"a non-reading client asking for {PIPELINED} pages: {per_connection / 1024:.0f} KiB")
    # three pages, the one being written also as its bytes and its frame (before: 10.7)
    assert per_connection < 6 * page, per_connection
