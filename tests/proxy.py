"""A TCP proxy a test can cut: every connection through it dies at once, as if the
network between client and server broke (the server sees a RST, the client too)."""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

import anyio
import anyio.abc


class Proxy:
    def __init__(self, listener: anyio.abc.SocketListener, target: int) -> None:
        self.listener = listener
        self.target = target
        self.port: int = listener.extra(anyio.abc.SocketAttribute.local_port)
        self.cuts = 0
        self._streams: list[anyio.abc.SocketStream] = []

    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def cut(self) -> None:
        """Reset every connection open through the proxy now."""
        self.cuts += 1
        streams, self._streams = self._streams, []
        for stream in streams:
            sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)
            with suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await stream.aclose()

    async def _serve(self, client: anyio.abc.SocketStream) -> None:
        async with client, await anyio.connect_tcp("127.0.0.1", self.target) as server:
            self._streams += [client, server]
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._pump, client, server, tg.cancel_scope)
                tg.start_soon(self._pump, server, client, tg.cancel_scope)

    @staticmethod
    async def _pump(
        source: anyio.abc.SocketStream,
        sink: anyio.abc.SocketStream,
        scope: anyio.CancelScope,
    ) -> None:
        with suppress(anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            async for data in source:
                await sink.send(data)
        scope.cancel()


@asynccontextmanager
async def open_proxy(target: int) -> AsyncIterator[Proxy]:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    proxy = Proxy(listener, target)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, proxy._serve)
        yield proxy
        tg.cancel_scope.cancel()
