"""A Redis pub/sub subscriber that hands over messages in bursts and reads at its own pace.

Why not coredis's ``PubSub``: it moves push messages through two unbounded memory streams
and hands them over one per scheduler pass. Fan-out then wakes every member's sender once
per message, batched frames shrink to a couple of events, and a worker that falls behind
buffers without limit. Here a socket read (up to :data:`READ_SIZE` bytes) becomes a burst:
every complete message in it is returned at once, so the broker fans the whole burst out
in one synchronous step; while messages keep coming, the subscriber also takes what
arrives within :data:`LINGER` into the same burst (under load that doubled the events per
batched frame and cut the CPU per delivery by a quarter). Nothing is read until the
previous burst has been handled, so a slow worker leaves the backlog in the kernel's
socket buffers and Redis's own output buffer (``client-output-buffer-limit pubsub``): when
Redis gives up on us and closes the connection, the broker catches up from history;
memory here stays bounded.

The connection subscribes to one channel of its own at once (the worker's control
channel); the broker adds and drops the room channels on it while it runs
(:meth:`Subscription.subscribe`, :mod:`.channels`). A burst carries each confirmation of
a subscription where Redis sent it among the messages (``(channel, None)``): a message
of a channel before the confirmation of its latest ``SUBSCRIBE`` belongs to an earlier
subscription of it, possibly undone since, so the broker must know which side it is on.

The connection uses the command client's parsed URL (host or Unix socket, credentials,
TLS context), so both always reach the same server the same way. RESP2 is enough: a
subscribed connection only ever receives ``message`` pushes and command replies.

*Sharded* (Redis Cluster, :mod:`.redis.cluster`): the same connection to one cluster
node, with ``SSUBSCRIBE``/``SUNSUBSCRIBE`` and their ``smessage`` pushes. A node that stops
owning a slot (resharding) sends ``sunsubscribe`` for that slot's channels unasked; one
that is asked for a channel of a slot it does not own answers ``MOVED``. Either way the
subscription no longer holds what it was asked for: it ends with :class:`SubscriptionLost`
(:class:`SlotMoved`), and the broker subscribes again where each room now lives and
catches up from history. ``sunsubscribe`` answers to the broker's own ``SUNSUBSCRIBE`` are
told apart by counting them.
"""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Final

import anyio
from anyio.abc import ByteStream
from coredis._utils import hash_slot
from coredis.connection import Location, TCPLocation, UnixDomainSocketLocation

from .resp import ProtocolError, Reply, ReplyError, ReplyParser, encode_command

__all__ = ["SlotMoved", "Subscription", "SubscriptionLost", "open_subscription"]

#: most bytes taken from the socket per burst
READ_SIZE: Final = 256 * 1024
#: seconds without a byte from Redis before the subscriber pings it
IDLE_PING: Final = 5.0
#: while messages keep coming (a burst within :data:`BUSY` seconds of the previous one),
#: seconds to wait for more before handing a burst over: under load, bursts (and so the
#: frames of batching members) get fuller and cheaper; a quiet room waits for nothing
LINGER: Final = 0.001
BUSY: Final = 0.05


class SubscriptionLost(Exception):
    """The subscription ended: connection closed or broken, no answer to a ping, or an
    unexpected reply. Messages published from now on until a new subscription is
    confirmed are not received."""


class SlotMoved(SubscriptionLost):
    """A sharded subscription lost channels it holds (their slot moved to another node)
    or was refused one (``MOVED``): the broker must look up where they live now."""


class Subscription:
    """Subscriptions on a connection of their own; see :func:`open_subscription`."""

    def __init__(self, stream: ByteStream, timeout: float, *, sharded: bool = False) -> None:
        self._stream = stream
        self._timeout = timeout
        self._sharded = sharded
        self._subscribe, self._unsubscribe = (
            ("SSUBSCRIBE", "SUNSUBSCRIBE") if sharded else ("SUBSCRIBE", "UNSUBSCRIBE")
        )
        #: sharded: SUNSUBSCRIBE answers still due per channel (any other is a slot move)
        self._unsubscribing: Counter[str] = Counter()
        #: the reader's pings and the broker's (un)subscriptions share the socket
        self._send_lock = anyio.Lock()
        self._parser = ReplyParser()
        self._replies: list[Reply] = []
        self._last_burst = float("-inf")

    async def receive(self) -> list[tuple[str, str | None]]:
        """The next burst: ``(channel, data)`` of every message that arrived, in the order
        Redis published them, and ``(channel, None)`` where Redis confirmed a
        subscription; waits for at least one. A burst is what one socket read completed,
        or, while messages keep coming, what arrived within :data:`LINGER`.

        :raises SubscriptionLost: if the connection ends or stops answering
        """
        pinged = lingered = False
        burst: list[tuple[str, str | None]] = []
        while True:
            for reply in self._take_replies():
                if not isinstance(reply, list) or len(reply) != 3:
                    if isinstance(reply, ReplyError):
                        if str(reply).startswith("MOVED"):
                            raise SlotMoved(f"Redis answered the subscriber with {reply}")
                        raise SubscriptionLost(f"Redis answered the subscriber with {reply}")
                    continue  # (RESP2 has no other push; a PING's answer is a list of 2)
                kind, channel, data = reply
                assert isinstance(channel, bytes)
                if kind in (b"message", b"smessage"):
                    assert isinstance(data, bytes)
                    burst.append((channel.decode(), data.decode()))
                elif kind in (b"subscribe", b"ssubscribe"):
                    burst.append((channel.decode(), None))
                elif kind == b"sunsubscribe":
                    self._unsubscribed(channel.decode())
                # else an unsubscribe's answer: nothing waits for it
            if burst:
                now = anyio.current_time()
                if not lingered and now - self._last_burst < BUSY:
                    lingered = True
                    with anyio.move_on_after(LINGER):
                        await self._read()
                    continue
                self._last_burst = anyio.current_time()
                return burst
            with anyio.move_on_after(self._timeout if pinged else IDLE_PING):
                await self._read()
                pinged = False
                continue
            if pinged:
                raise SubscriptionLost(f"no answer from Redis within {self._timeout} s")
            await self._send("PING")
            pinged = True

    async def subscribe(self, channels: list[str]) -> None:
        """Ask for ``channels``; each confirmation reaches the ``confirmed`` callback.

        :raises SubscriptionLost: if the command cannot be written
        """
        for group in self._per_slot(channels):
            await self._send(self._subscribe, *group)

    async def unsubscribe(self, channels: list[str]) -> None:
        """Let ``channels`` go (their messages may still arrive until Redis has read this).

        :raises SubscriptionLost: if the command cannot be written
        """
        if self._sharded:
            self._unsubscribing.update(channels)
        for group in self._per_slot(channels):
            await self._send(self._unsubscribe, *group)

    def _per_slot(self, channels: list[str]) -> list[list[str]]:
        """One command's channels: all of them, or (sharded) those of one hash slot each:
        ``SSUBSCRIBE`` of channels in two slots is refused ``CROSSSLOT``, and a node holds
        many slots (a resubscription after a lost connection asks for all its rooms)."""
        if not self._sharded:
            return [channels]
        groups: dict[int, list[str]] = {}
        for channel in channels:
            groups.setdefault(hash_slot(channel.encode()), []).append(channel)
        return list(groups.values())

    def _unsubscribed(self, channel: str) -> None:
        """A sharded ``sunsubscribe``: the answer to our own, or a slot that moved away."""
        due = self._unsubscribing[channel]
        if due <= 0:
            raise SlotMoved(f"{channel}: its slot moved to another node")
        if due == 1:
            del self._unsubscribing[channel]
        else:
            self._unsubscribing[channel] = due - 1

    async def _handshake(
        self, channel: str | None, name: str, username: str | None, password: str | None
    ) -> None:
        if password is not None:
            credentials = (username, password) if username else (password,)
            await self._send("AUTH", *credentials)
            await self._expect(lambda reply: reply == b"OK", "AUTH")
        await self._send("CLIENT", "SETNAME", name)
        await self._expect(lambda reply: reply == b"OK", "CLIENT SETNAME")
        if channel is None:
            return
        await self._send("SUBSCRIBE", channel)
        await self._expect(
            lambda reply: isinstance(reply, list) and reply[:1] == [b"subscribe"], "SUBSCRIBE"
        )

    async def _expect(self, check: Callable[[Reply], bool], what: str) -> None:
        with anyio.fail_after(self._timeout):
            while not self._replies:
                await self._read()
                self._replies = self._take_replies()
        reply = self._replies.pop(0)
        if not check(reply):
            raise SubscriptionLost(f"{what}: unexpected reply {reply!r}")

    def _take_replies(self) -> list[Reply]:
        try:
            parsed = self._parser.replies()
        except ProtocolError as exc:
            raise SubscriptionLost(f"Redis sent something that is not RESP2: {exc}") from exc
        replies, self._replies = self._replies + parsed, []
        return replies

    async def _read(self) -> None:
        try:
            data = await self._stream.receive(READ_SIZE)
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError) as exc:
            raise SubscriptionLost(f"connection to Redis lost: {exc!r}") from exc
        self._parser.feed(data)

    async def _send(self, *args: str) -> None:
        try:
            with anyio.fail_after(self._timeout):
                async with self._send_lock:
                    await self._stream.send(encode_command(*args))
        except (anyio.BrokenResourceError, OSError, TimeoutError) as exc:
            raise SubscriptionLost(f"cannot write to Redis: {exc!r}") from exc


@asynccontextmanager
async def open_subscription(
    location: Location,
    options: dict[str, Any],
    channel: str | None,
    *,
    name: str,
    reply_timeout: float,
    sharded: bool = False,
) -> AsyncIterator[Subscription]:
    """Connect to Redis at ``location`` (with the coredis connection ``options``:
    ``username``, ``password``, ``ssl_context``), name the connection ``name`` (``CLIENT
    LIST`` shows it) and subscribe to ``channel`` (if given). Every step, and later every
    keepalive ping, must be answered within ``reply_timeout`` seconds. ``sharded``: the
    subscriptions the broker adds are sharded ones (a cluster node's).

    :raises SubscriptionLost: if Redis cannot be reached or refuses the subscription
    """
    try:
        with anyio.fail_after(reply_timeout):
            stream = await _connect(location, options.get("ssl_context"))
    except (OSError, TimeoutError) as exc:
        raise SubscriptionLost(f"cannot connect to Redis at {location}: {exc!r}") from exc
    async with stream:
        subscription = Subscription(stream, reply_timeout, sharded=sharded)
        try:
            await subscription._handshake(
                channel, name, options.get("username"), options.get("password")
            )
        except TimeoutError as exc:
            raise SubscriptionLost(f"subscribing failed: {exc!r}") from exc
        yield subscription


async def _connect(location: Location, ssl_context: Any) -> ByteStream:
    if isinstance(location, UnixDomainSocketLocation):
        return await anyio.connect_unix(location.path)
    assert isinstance(location, TCPLocation), location
    if ssl_context is None:
        stream: ByteStream = await anyio.connect_tcp(location.host, location.port)
    else:
        stream = await anyio.connect_tcp(
            location.host,
            location.port,
            tls=True,
            ssl_context=ssl_context,
            tls_standard_compatible=False,
        )
    raw = stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
    if raw is not None:  # a vanished Redis host is found by the pings; keepalive helps idle NATs
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    return stream
