"""roomcast inside another ASGI app: mounted under ``/chat`` in Starlette, its lifespan run
by the host's (``lifespan=chat.lifespan``), served by Hypercorn on both event loops."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator

import anyio
import pytest

from roomcast.client import Message, open_room

from mounted import build
from servers import ThreadedServer, serve_in_thread

pytestmark = pytest.mark.anyio


@pytest.fixture
def host(anyio_backend: str) -> Iterator[ThreadedServer]:
    with serve_in_thread(build(), worker_class=anyio_backend) as server:
        yield server


def get(server: ThreadedServer, path: str) -> tuple[int, str, str]:
    request = urllib.request.Request(server.http_url(path))
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(request, timeout=5) as response:
            return response.status, response.headers.get("location") or "", response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("location") or "", error.read().decode()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


async def test_every_endpoint_works_under_the_mount_prefix(host: ThreadedServer) -> None:
    assert get(host, "/")[::2] == (200, "the host app")
    status, location, _ = get(host, "/chat")  # Starlette's redirect, or roomcast's own
    assert status in (307, 308) and location.endswith("/chat/")
    status, _, page = get(host, "/chat/")
    assert status == 200 and 'src="static/app.js"' in page
    assert get(host, "/chat/static/app.js")[0] == 200
    assert get(host, "/chat/healthz")[::2] == (200, '{"status":"ok","broker":"memory"}')
    assert get(host, "/chat/metrics")[0] == 200
    assert get(host, "/chat/nowhere")[0] == 404
    with anyio.fail_after(20):
        async with open_room(host.url("/chat"), "mounted", name="ada") as room:
            seq = await room.send("hello from under /chat")
            async for event in room:
                if isinstance(event, Message):
                    assert (event.seq, event.text) == (seq, "hello from under /chat")
                    break


def test_the_launcher_serves_a_host_app_that_mounts_roomcast() -> None:
    from pathlib import Path

    from servers import spawn_server

    tests = str(Path(__file__).parent)
    with spawn_server(["--app", "mounted:app"], env={"PYTHONPATH": tests}) as server:
        with urllib.request.urlopen(server.http_url("/chat/healthz"), timeout=5) as response:
            assert response.status == 200
        with urllib.request.urlopen(server.http_url("/"), timeout=5) as response:
            assert response.read() == b"the host app"
