"""permessage-deflate as browsers get it, end to end: what ``ROOMCAST_COMPRESSION``
negotiates for Chromium's exact offer, and compressed messages both ways.

The memory an idle compressed connection costs is measured by the bench (``python -m bench
--servers roomcast-trio-batch-deflate-low-memory,... --workloads idle``), not here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import anyio
import pytest
from anyio.abc import SocketStream
from websockets.asyncio.client import connect
from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection, TextMessage
from wsproto.extensions import Extension, PerMessageDeflate

from roomcast import Settings, create_app
from roomcast.launcher.hardening import BoundedPerMessageDeflate

from servers import ThreadedServer, serve_in_thread, spawn_server

#: what Chromium (and Firefox) send in every WebSocket handshake
BROWSER_OFFER = "permessage-deflate; client_max_window_bits"
#: the response to it for each ROOMCAST_COMPRESSION (None: declined)
ANSWERS = {
    "low-memory": "permessage-deflate; client_max_window_bits=10; client_no_context_takeover",
    "no-context": "permessage-deflate; client_max_window_bits=10; server_no_context_takeover; "
    "client_no_context_takeover",
    "full": "permessage-deflate; client_max_window_bits=15",
    "off": None,
}
RSV1 = 0x40

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module", params=["trio", "asyncio"])
def server(request: pytest.FixtureRequest) -> Iterator[ThreadedServer]:
    """The app with the default settings, on Hypercorn's Trio and asyncio workers."""
    with serve_in_thread(create_app(Settings(rate_limit=0)), worker_class=request.param) as s:
        yield s


@dataclass
class BrowserLikeClient:
    """A WebSocket client that offers permessage-deflate as Chromium does (wsproto frames
    it as the response says), and sees the RSV1 bit of each frame the server sends."""

    stream: SocketStream
    extensions: str | None
    connection: Connection
    rsv1: list[bool] = field(default_factory=list)
    wire_bytes: int = 0

    async def send(self, text: str) -> None:
        await self.stream.send(self.connection.send(TextMessage(text)))

    async def receive(self) -> str:
        while True:
            for event in self.connection.events():
                if isinstance(event, TextMessage):
                    assert event.message_finished
                    return event.data
                assert not isinstance(event, CloseConnection), event
            data = await self.stream.receive()
            self.note_frame_headers(data)
            self.connection.receive_data(data)

    def note_frame_headers(self, data: bytes) -> None:
        """RSV1 of each unmasked server frame starting in ``data`` (small frames, read
        whole: the echoes here are far below 64 KiB and come one per read or more)."""
        at = 0
        while at < len(data):
            first, length = data[at], data[at + 1] & 0x7F
            header = 2 + (2 if length == 126 else 8 if length == 127 else 0)
            if length >= 126:
                length = int.from_bytes(data[at + 2 : at + header], "big")
            self.rsv1.append(bool(first & RSV1))
            self.wire_bytes += length
            at += header + length


async def open_browser_like(port: int, path: str) -> BrowserLikeClient:
    """Connect with Chromium's handshake headers and its extension offer."""
    stream = await anyio.connect_tcp("127.0.0.1", port)
    await stream.send(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Extensions: {BROWSER_OFFER}\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += await stream.receive()
    head, rest = head.split(b"\r\n\r\n", 1)
    status, *lines = head.decode().split("\r\n")
    assert status.startswith("HTTP/1.1 101"), status
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    accepted = headers.get("sec-websocket-extensions")
    extensions: list[Extension] = []
    if accepted is not None:
        deflate = PerMessageDeflate()
        deflate.finalize(accepted)
        extensions.append(deflate)
    client = BrowserLikeClient(stream, accepted, Connection(ConnectionType.CLIENT, extensions))
    client.note_frame_headers(rest)
    client.connection.receive_data(rest)
    return client


@pytest.fixture
def restored_compression() -> Iterator[None]:
    """The process's compression as it was before a test's app installed its own (it is
    one per process: Hypercorn builds the extension without knowing the app)."""
    before = BoundedPerMessageDeflate.compression
    yield
    BoundedPerMessageDeflate.compression = before


@pytest.mark.usefixtures("restored_compression")
@pytest.mark.parametrize("compression", list(ANSWERS))
async def test_a_browser_offer_gets_what_the_setting_negotiates(compression: str) -> None:
    with serve_in_thread(create_app(Settings(compression=compression))) as server:
        with anyio.fail_after(10):
            client = await open_browser_like(server.port, "/ws/echo")
            assert client.extensions == ANSWERS[compression]
            await client.send("hello")
            assert await client.receive() == "Echo: hello"
            assert client.rsv1 == [compression != "off"]
            await client.stream.aclose()


async def test_messages_round_trip_compressed_both_ways(server: ThreadedServer) -> None:
    """The client compresses every message without context (as the response asks), the
    server keeps its own: repetitive chat shrinks on the wire, each message intact."""
    texts = [f"message {i}: the quick brown fox jumps over the lazy dog " * 8 for i in range(20)]
    with anyio.fail_after(10):
        client = await open_browser_like(server.port, "/ws/echo")
        assert client.extensions == ANSWERS["low-memory"]
        for text in texts:
            await client.send(text)
            assert await client.receive() == f"Echo: {text}"
        await client.stream.aclose()
    assert client.rsv1 == [True] * len(texts)
    assert client.wire_bytes < sum(len(t) for t in texts) / 4


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the websockets client's loop
async def test_a_compressing_client_library_chats_through_the_hardened_server(
    server: ThreadedServer,
) -> None:
    """``websockets`` offers what browsers offer and inflates with the context the server
    keeps: a room's messages reach it intact, and its own reach the room."""
    url = server.url("/ws/chat?room=deflate&name=")
    with anyio.fail_after(10):
        async with connect(url + "a") as alice, connect(url + "b", compression=None) as bob:
            assert alice.response is not None
            answer = alice.response.headers["sec-websocket-extensions"]
            assert "client_no_context_takeover" in answer
            for ws in (alice, bob):
                assert json.loads(await ws.recv())["type"] == "welcome"
            for i in range(5):
                await alice.send(json.dumps({"text": f"hello {i} " * 10, "id": str(i)}))
                for ws in (alice, bob):
                    while (event := json.loads(await ws.recv()))["type"] != "message":
                        pass
                    assert event["text"] == f"hello {i} " * 10


#: in a page of the server: open ``url``, echo ``texts`` one after another, and say what
#: the browser negotiated
ECHO_IN_PAGE = """async ([url, texts]) => {
    const ws = new WebSocket(url);
    const incoming = [];
    let wake = null;
    ws.onmessage = (event) => { incoming.push(event.data); if (wake) wake(); };
    const bounded = (settle) => new Promise((resolve, reject) => {
        settle(resolve, reject);
        setTimeout(() => reject(new Error("nothing within 10 s")), 10000);
    });
    await bounded((resolve, reject) => { ws.onopen = resolve; ws.onerror = reject; });
    const echoes = [];
    for (const text of texts) {
        ws.send(text);
        while (incoming.length === 0) await bounded((resolve) => { wake = resolve; });
        echoes.push(incoming.shift());
    }
    ws.close();
    return {extensions: ws.extensions, echoes};
}"""


def test_chromium_negotiates_the_default_and_its_messages_round_trip() -> None:
    """Chromium itself, against ``python -m roomcast``: it accepts the default answer
    (small windows, its context reset per message) and every echo comes back whole."""
    from test_browser import CHROMIUM_ARGS, _requirements

    sync_api, executable = _requirements()
    texts = [f"{i}: the quick brown fox jumps over the lazy dog " * (1 + 40 * i) for i in range(6)]
    with spawn_server(env={"ROOMCAST_RATE_LIMIT": "0"}) as server, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, timeout=30_000)
        try:
            page = browser.new_page()
            page.set_default_timeout(10_000)
            page.goto(server.http_url("/healthz"))
            result = page.evaluate(ECHO_IN_PAGE, [server.url("/ws/echo"), texts])
        finally:
            browser.close()
    assert result["extensions"] == ANSWERS["low-memory"]
    assert result["echoes"] == [f"Echo: {text}" for text in texts]
