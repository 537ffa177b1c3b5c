"""roomcast posting a ``message`` webhook to a receiver on the same machine
(``roomcast-trio-batch-webhook`` in bench/servers.py): what a round trip to the
application's backend before each message is sequenced costs, next to
``roomcast-trio-batch`` and ``roomcast-trio-batch-hooked`` in the same run.

``python -m bench.webhooked --port P`` starts the receiver (uvicorn, a raw ASGI app that
verifies each signature and answers ``{}``) on a free port, then ``python -m roomcast`` on
P with ``ROOMCAST_WEBHOOK_EVENTS=message``, both in the runner's process group (so the
server's CPU the runner reports includes the receiver's)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from typing import Any

from roomcast.webhooks import verify

SECRET = "bench-webhook-secret"


async def receiver(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Accept every message as sent, once its signature checks out."""
    if scope["type"] != "http":
        return
    body = b""
    while True:
        part = await receive()
        body += part.get("body", b"")
        if not part.get("more_body"):
            break
    headers = dict(scope["headers"])
    signed = verify(
        SECRET,
        headers.get(b"roomcast-timestamp", b"").decode(),
        body,
        headers.get(b"roomcast-signature", b"").decode(),
    )
    status, answer = (200, b"{}") if signed else (401, b'{"error": "bad signature"}')
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": answer})


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_for(port: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("bench.webhooked: the receiver did not start")


def main() -> None:
    port = sys.argv[sys.argv.index("--port") + 1]
    receiver_port = _free_port()
    py = sys.executable
    receiver_argv = [
        py,
        "-m",
        "uvicorn",
        "bench.webhooked:receiver",
        "--port",
        str(receiver_port),
        "--log-level",
        "warning",
        "--no-access-log",
        "--lifespan",
        "off",
    ]
    with subprocess.Popen(receiver_argv) as receiving:
        _wait_for(receiver_port)
        env = {
            "ROOMCAST_WEBHOOK_URL": f"http://127.0.0.1:{receiver_port}/hooks",
            "ROOMCAST_WEBHOOK_SECRET": SECRET,
            "ROOMCAST_WEBHOOK_EVENTS": "message",
        }
        server_argv = [
            py,
            "-m",
            "roomcast",
            "--bind",
            f"127.0.0.1:{port}",
            "-k",
            "trio",
            "--workers",
            "1",
        ]
        try:
            subprocess.run(server_argv, env={**os.environ, **env}, check=False)
        finally:
            receiving.terminate()


if __name__ == "__main__":
    main()
