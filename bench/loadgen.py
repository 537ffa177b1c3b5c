"""Load generator for the benchmark suite (picows + uvloop, one process, one core).

Derived from shared/bench/fanout.py and speaking the same protocol as every server in
the suite: a client sends ``{"text": ...}``; the server sends
``{"type": "message", "text": ..., "room": ...}`` to every member of the room, the sender
included. Frames may hold several ``\\n``-separated JSON events (``roomcast.batch``).

Two modes, each printing JSON lines on stdout:

``fanout``
    ``--rooms`` rooms of ``--members`` healthy members each; ``--senders`` members per room
    also send ``--messages`` messages, keeping at most ``--window`` of their own messages
    in flight (closed loop: a sender waits to see its own message come back). Optional
    ``--stalled`` clients per room join with a tiny SO_RCVBUF and never read. Latency is
    measured the same way for every server: each text embeds the client's send time
    (``perf_counter_ns``, same process), and every healthy delivery is timed against it.

``idle``
    Opens ``--connections`` connections (``--members`` per room) with ``--concurrency``
    handshakes in flight, prints ``{"phase": "connected", ...}``, then holds them until a
    line other than ``probe`` arrives on stdin (or ``--hold`` seconds pass) and closes
    them. Each binds its source address first (``bench/sources.py``: ``--per-address``
    connections from 127.0.0.2, the next from 127.0.0.3, ...), so that more connections
    than the ephemeral port range holds can reach the one server port; ``--first`` numbers
    this process's connections after another's (the runner splits a big count over
    several processes). On a ``probe`` line it measures a chat round trip while the idle
    connections are held: ``--probe-members`` more clients join one room, one of them sends
    ``--probe-rate`` messages a second for ``--probe-seconds``, and every other member times
    each message from its send to its arrival; it prints ``{"phase": "probe", ...}``.

``crowd``
    Fills rooms with ``--members`` clients (one room, or rooms of ``--rooms-of``) with
    ``--concurrency`` handshakes in flight, within ``--limit`` seconds: how long until
    every handshake completed (the fill), and until the presence traffic it set off has
    been delivered (no frame for ``--quiet`` seconds: the settle).

``multiroom``
    ``--people`` people, each in ``--rooms-per-person`` of ``--rooms`` rooms (every room
    the same size), connected either with one v1 connection per room (``--layout v1``:
    ``/ws/chat?room=``) or with one v2 connection each that joins all of its rooms
    (``--layout v2``: ``/ws``, ``join`` commands, all sent at once). Every connection
    carries its person's name. Prints ``{"phase": "joined", ...}`` once every welcome has
    arrived and presence has settled, waits for a line on stdin (the runner measures the
    server's memory meanwhile), then runs ``--rounds`` rounds in which ``--senders``
    members of each room send into it, ``--window`` messages in flight each (one closed
    loop per sending membership, on its v1 connection or on its person's v2 connection).
    Every receiver checks each of its rooms' seqs (duplicates, gaps).

Every loop is bounded in count and time (``--deadline``, ``--connect-timeout``, ``--hold``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import socket
import sys
import time
import zlib

import orjson
import uvloop
from picows import WSCloseCode, WSListener, WSMsgType, ws_connect

try:
    from bench.sources import ports_per_address, source_address
except ImportError:  # run as a script (python bench/loadgen.py): bench/ is on sys.path
    from sources import ports_per_address, source_address  # type: ignore[no-redef]

perf_ns = time.perf_counter_ns
loads = orjson.loads

#: what Chromium (and Firefox) offer in every WebSocket handshake (``--deflate``)
BROWSER_DEFLATE_OFFER = "permessage-deflate; client_max_window_bits"
#: whether connections offer it: set from ``--deflate``
OFFER_DEFLATE = False


class Deflate:
    """One connection's permessage-deflate (RFC 7692), as the server answered the browser
    offer: what a browser's compressor and decompressor keep is what the response says."""

    def __init__(self, response: str) -> None:
        params = {}
        for part in response.split(";")[1:]:
            name, _, value = (piece.strip() for piece in part.partition("="))
            params[name] = int(value) if value else None
        self.server_context = "server_no_context_takeover" not in params
        self.client_context = "client_no_context_takeover" not in params
        self.client_bits = params.get("client_max_window_bits") or 15
        self.server_bits = params.get("server_max_window_bits") or 15
        self._inflater = zlib.decompressobj(-self.server_bits)
        self._deflater = self._new_deflater()

    def _new_deflater(self):  # type: ignore[no-untyped-def]
        return zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -self.client_bits)

    def inflate(self, payload: bytes) -> bytes:
        data = self._inflater.decompress(payload + b"\x00\x00\xff\xff")
        if not self.server_context:
            self._inflater = zlib.decompressobj(-self.server_bits)
        return data

    def deflate(self, data: bytes) -> bytes:
        out = self._deflater.compress(data) + self._deflater.flush(zlib.Z_SYNC_FLUSH)
        if not self.client_context:
            self._deflater = self._new_deflater()
        return out[:-4]


def handshake_headers(subprotocol: str | None) -> dict[str, str] | None:
    headers = {}
    if subprotocol:
        headers["Sec-WebSocket-Protocol"] = subprotocol
    if OFFER_DEFLATE:
        headers["Sec-WebSocket-Extensions"] = BROWSER_DEFLATE_OFFER
    return headers or None


def send_text(transport, listener, data: bytes) -> None:  # type: ignore[no-untyped-def]
    """One text message, compressed when the connection negotiated permessage-deflate."""
    st = STATS
    st.payload_out += len(data)
    deflate = listener.deflate
    if deflate is None:
        st.wire_out += len(data)
        transport.send(WSMsgType.TEXT, data)
    else:
        wire = deflate.deflate(data)
        st.wire_out += len(wire)
        transport.send(WSMsgType.TEXT, wire, rsv1=True)


def raise_nofile(want: int = 1 << 16) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(want, hard), max(want, hard)))
        except (ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Stats:
    def __init__(self) -> None:
        self.lat: list[int] = []
        self.deliveries = 0
        self.frames = 0
        self.other_events = 0
        self.notices = 0  # presence: "system" events
        self.first_send: int | None = None
        self.last_recv: int | None = None
        self.last_frame = perf_ns()
        self.measuring = False
        self.unexpected_closes = 0
        self.close_codes: dict[int, int] = {}
        # delivery order, over the whole run: every member must see its room's seqs
        # once each, consecutively, from the seq its welcome named
        self.duplicates = 0
        self.gaps = 0
        self.gap_notices = 0
        #: the first few connections that failed for good, and why
        self.connect_errors: list[str] = []
        self.reset_bytes()

    def reset_bytes(self) -> None:
        # text payloads received and sent: as on the wire (compressed or not), and as read
        self.wire_in = 0
        self.payload_in = 0
        self.wire_out = 0
        self.payload_out = 0

    def reset(self) -> None:
        self.lat = []
        self.deliveries = 0
        self.frames = 0
        self.other_events = 0
        self.notices = 0
        self.first_send = None
        self.last_recv = None
        self.reset_bytes()


STATS = Stats()


class Receiver(WSListener):
    """What every load-generator connection does with a frame: counts it, accounts for a
    close, and hands each event of a (batched) text frame to :meth:`on_event`."""

    closing = False
    close_code: int | None = None
    deflate: Deflate | None = None

    def on_ws_connected(self, transport) -> None:  # type: ignore[no-untyped-def]
        accepted = transport.response.headers.get("sec-websocket-extensions")
        if OFFER_DEFLATE and accepted:
            self.deflate = Deflate(accepted)

    def on_ws_frame(self, transport, frame) -> None:  # type: ignore[no-untyped-def]
        st = STATS
        now = perf_ns()
        st.last_frame = now
        if frame.msg_type != WSMsgType.TEXT:
            if frame.msg_type == WSMsgType.CLOSE:
                code = int(frame.get_close_code())
                self.close_code = code
                st.close_codes[code] = st.close_codes.get(code, 0) + 1
                if not self.closing:
                    st.unexpected_closes += 1
                transport.disconnect()
            return
        st.frames += 1
        payload = frame.get_payload_as_bytes()
        st.wire_in += len(payload)
        if frame.rsv1 and self.deflate is not None:
            payload = self.deflate.inflate(payload)
        st.payload_in += len(payload)
        for line in payload.split(b"\n") if b"\n" in payload else (payload,):
            if line:
                self.on_event(line, now)

    def on_event(self, line: bytes, now: int) -> None:
        raise NotImplementedError


class Client(Receiver):
    def __init__(self, idx: int) -> None:
        self.idx = idx
        self.own: asyncio.Queue[int] = asyncio.Queue()
        self.closing = False
        self.got = 0
        self.sent = 0
        self.close_code: int | None = None
        self.last_seq: int | None = None  # from the welcome, then each message's

    def on_event(self, line: bytes, now: int) -> None:
        st = STATS
        try:
            data = loads(line)
            kind = data.get("type")
            text = data["text"] if kind == "message" else None
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError):
            kind = text = None
        if text is None:
            st.other_events += 1
            st.notices += kind == "system"
            if kind == "welcome":
                self.last_seq = data.get("seq")
            elif kind == "error" and data.get("error") == "history_gap":
                st.gap_notices += 1
            return
        seq = data.get("seq")
        if isinstance(seq, int) and self.last_seq is not None:
            if seq <= self.last_seq:
                st.duplicates += 1  # or out of order: either way, seen before its turn
            elif seq > self.last_seq + 1:
                st.gaps += seq - self.last_seq - 1
            self.last_seq = max(seq, self.last_seq)
        parts = text.split(":", 3)
        if len(parts) < 3:
            st.other_events += 1
            return
        sender, seq, ts = parts[0], parts[1], parts[2]
        st.lat.append(now - int(ts))
        st.deliveries += 1
        self.got += 1
        st.last_recv = now
        if int(sender) == self.idx:
            self.own.put_nowait(int(seq))

    def on_ws_disconnected(self, transport) -> None:  # type: ignore[no-untyped-def]
        if not self.closing and STATS.measuring:
            STATS.unexpected_closes += 1


#: Linux's IP_BIND_ADDRESS_NO_PORT (Python 3.11 has no name for it): a socket bound to an
#: address with port 0 gets its port at connect(), unique for the 4-tuple, rather than at
#: bind(), unique for the address (then ports would run out as if every connection went to
#: a different server)
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


def _bound_socket(source: str):  # type: ignore[no-untyped-def]
    """A socket factory for picows: an unconnected socket bound to ``source``."""

    def factory(_url):  # type: ignore[no-untyped-def]
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    return factory


def _stalled_socket(rcvbuf: int):  # type: ignore[no-untyped-def]
    def factory(_url):  # type: ignore[no-untyped-def]
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        return sock

    return factory


async def connect(  # type: ignore[no-untyped-def]
    a: argparse.Namespace,
    url: str,
    idx: int,
    *,
    stalled: bool = False,
    source: str | None = None,
    listener_factory=None,
):
    """A picows connection (a :class:`Client`, or what ``listener_factory`` makes), from
    ``source`` if given, retried with a growing pause."""
    headers = handshake_headers(a.subprotocol)
    if stalled:
        socket_factory = _stalled_socket(a.stalled_rcvbuf)
    else:
        socket_factory = _bound_socket(source) if source else None
    last: Exception | None = None
    for attempt in range(a.connect_attempts):
        try:
            transport, listener = await ws_connect(
                listener_factory or (lambda: Client(idx)),
                url,
                websocket_handshake_timeout=a.connect_timeout,
                extra_headers=headers,
                socket_factory=socket_factory,
            )
            break
        except Exception as exc:  # refused, reset, handshake timeout: back off and retry
            last = exc
            await asyncio.sleep(min(0.05 * (attempt + 1), 1.0))
    else:
        raise RuntimeError(f"connect failed after {a.connect_attempts} attempts: {last!r}")
    if stalled:
        transport.underlying_transport.pause_reading()
    return transport, listener


async def connect_many(a, specs, concurrency, source_of=None):  # type: ignore[no-untyped-def]
    """Connect every (url, idx, stalled) in ``specs`` with ``concurrency`` in flight; keep
    order. ``source_of(idx)``, if given, names the address each connection comes from."""
    results: list = [None] * len(specs)
    it = iter(enumerate(specs))
    failures = 0

    async def worker() -> None:
        nonlocal failures
        for i, (url, idx, stalled) in it:
            source = source_of(idx) if source_of else None
            try:
                results[i] = await connect(a, url, idx, stalled=stalled, source=source)
            except RuntimeError as exc:
                failures += 1
                if len(STATS.connect_errors) < 3:
                    STATS.connect_errors.append(f"connection {idx} from {source}: {exc}")

    await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    return results, failures


def room_url(a: argparse.Namespace, room: int) -> str:
    return f"{a.url}?room={a.room_prefix}{room}"


async def wait_quiet(quiet_s: float, limit_s: float) -> float:
    """Wait until no frame has arrived for ``quiet_s`` (join notices have settled)."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit_s:
        if (perf_ns() - STATS.last_frame) / 1e9 >= quiet_s:
            break
        await asyncio.sleep(0.05)
    return time.perf_counter() - t0


async def sender(a: argparse.Namespace, transport, listener: Client, pad: str, stop_at: int) -> int:  # type: ignore[no-untyped-def]
    """Send until ``stop_at`` (perf_counter_ns) or ``--messages``, at most ``--window`` of
    this sender's messages in flight; then wait for the rest to come back. Returns the
    number sent."""
    st = STATS
    outstanding = 0
    own = listener.own
    sent = 0
    while sent < a.messages:
        while outstanding >= a.window:
            await own.get()
            outstanding -= 1
        t = perf_ns()
        if t >= stop_at:
            break
        if st.first_send is None:
            st.first_send = t
        send_text(transport, listener, orjson.dumps({"text": f"{listener.idx}:{sent}:{t}:{pad}"}))
        sent += 1
        outstanding += 1
        listener.sent = sent
    while outstanding:
        await own.get()
        outstanding -= 1
    return sent


def close(transport) -> None:  # type: ignore[no-untyped-def]
    """A close frame (1000), then the TCP connection."""
    with contextlib.suppress(Exception):
        transport.send_close(WSCloseCode.OK)
    transport.disconnect()


def pct(lat: list[int], q: float) -> float | None:
    if not lat:
        return None
    return round(lat[min(len(lat) - 1, int(q * len(lat)))] / 1e6, 3)


async def _finish_sending(a: argparse.Namespace, tasks: list[asyncio.Future[None]]) -> bool:
    """Wait for the round's senders; ``False`` if they did not finish within the round's
    duration plus its deadline (a stalled room)."""
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), a.duration + a.deadline)
    except TimeoutError:
        return False
    return True


async def _drain(
    a: argparse.Namespace, t_start: int, done: bool, expected: int
) -> tuple[bool, float]:
    """Wait for the ``expected`` deliveries (for ``--drain`` seconds at most, one if the
    senders stalled), stop measuring and sort the latencies; returns whether the round is
    complete and the seconds it is timed over.

    A complete round is timed to its last delivery; an incomplete one (a stalled room) to
    the moment the generator gave up, so a server that stopped delivering is not flattered.
    """
    st = STATS
    drain_until = time.perf_counter() + (a.drain if done else min(a.drain, 1.0))
    while st.deliveries < expected and time.perf_counter() < drain_until:  # noqa: ASYNC110
        await asyncio.sleep(0.005)  # deliveries are counted in protocol callbacks: poll
    t_stop = perf_ns()
    st.measuring = False
    complete = done and st.deliveries >= expected
    end = (st.last_recv or t_stop) if complete else t_stop
    st.lat.sort()
    return complete, (end - (st.first_send or t_start)) / 1e9


async def run_round(
    a: argparse.Namespace, phase: str, n: int, healthy, senders, members_per_room: int
) -> dict:  # type: ignore[no-untyped-def]
    st = STATS
    st.reset()
    for _, lst in healthy:
        lst.got = 0
        lst.sent = 0
        while not lst.own.empty():
            lst.own.get_nowait()
    st.measuring = True
    pad = "x" * a.pad
    if a.verbose:
        print(f"loadgen: {phase} round {n} starts", file=sys.stderr, flush=True)
    wall_start = time.time()
    t_start = perf_ns()
    stop_at = t_start + int(a.duration * 1e9)
    tasks = [asyncio.ensure_future(sender(a, t, lst, pad, stop_at)) for t, lst in senders]
    done = await _finish_sending(a, tasks)
    sent = sum(lst.sent for _, lst in senders)
    expected = sent * members_per_room
    complete, span = await _drain(a, t_start, done, expected)
    lat = st.lat
    short = []
    if a.rooms == 1:
        short = sorted(lst.got for _, lst in healthy if lst.got < sent)
    out = {
        "phase": phase,
        "round": n,
        "wall": [round(wall_start, 3), round(time.time(), 3)],
        "sent": sent,
        "expected": expected,
        **delivery_summary(st, complete, span, lat),
    }
    if a.rooms == 1:
        out["short_receivers"] = len(short)
        out["short_receivers_min"] = short[0] if short else None
    for t in tasks:
        t.cancel()
    await asyncio.sleep(0)
    return out


async def run_fanout(a: argparse.Namespace) -> dict:
    specs = []
    for r in range(a.rooms):
        url = room_url(a, r)
        for m in range(a.members):
            specs.append((url, r * a.members + m, False))
    t0 = time.perf_counter()
    clients, failures = await connect_many(a, specs, a.concurrency)
    connect_s = time.perf_counter() - t0
    settle_s = await wait_quiet(a.quiet, a.settle_limit)
    healthy = [c for c in clients if c is not None]
    senders = []
    for r in range(a.rooms):
        members = clients[r * a.members : (r + 1) * a.members]
        senders.extend(c for c in members[: a.senders] if c is not None)

    rounds = []
    phase = "control" if a.stalled else "run"
    for n in range(a.rounds):
        rounds.append(await run_round(a, phase, n, healthy, senders, a.members))
        await wait_quiet(a.quiet, a.settle_limit)

    stalled: list = []
    stalled_info = {}
    if a.stalled:
        wall = time.time()
        stalled_specs = [
            (room_url(a, r), 1_000_000 + r * a.stalled + s, True)
            for r in range(a.rooms)
            for s in range(a.stalled)
        ]
        stalled, stalled_failures = await connect_many(a, stalled_specs, a.concurrency)
        failures += stalled_failures
        await wait_quiet(a.quiet, a.settle_limit)
        stalled_info = {"stalled_connected_wall": round(wall, 3)}
        for n in range(a.rounds):
            rounds.append(await run_round(a, "stalled", n, healthy, senders, a.members))
            await wait_quiet(a.quiet, a.settle_limit)
        # What did the server do with them? Read what is queued for them (a bounded
        # amount of time) and see which were closed, and with which code.
        for c in stalled:
            if c is not None:
                c[1].closing = True
                c[0].underlying_transport.resume_reading()
        t_end = time.perf_counter() + a.drain
        while time.perf_counter() < t_end and any(  # noqa: ASYNC110
            c is not None and c[1].close_code is None and not c[0].is_disconnected for c in stalled
        ):
            await asyncio.sleep(0.05)
        codes: dict[str, int] = {}
        for c in stalled:
            if c is not None:
                key = (
                    str(c[1].close_code)
                    if c[1].close_code is not None
                    else ("disconnected" if c[0].is_disconnected else "open")
                )
                codes[key] = codes.get(key, 0) + 1
        stalled_info["stalled_end_state"] = codes

    out = {
        "mode": "fanout",
        "rooms": a.rooms,
        "members": a.members,
        "senders_per_room": a.senders,
        "window": a.window,
        "duration": a.duration,
        "pad": a.pad,
        "stalled_per_room": a.stalled,
        "subprotocol": a.subprotocol,
        "negotiated": sorted(
            {t.response.headers.get("sec-websocket-protocol", "") for t, _ in healthy[:50]}
        ),
        "connected": len(healthy),
        "connect_failures": failures,
        "connect_concurrency": a.concurrency,
        "connect_s": round(connect_s, 3),
        "settle_s": round(settle_s, 3),
        "close_codes": {str(k): v for k, v in STATS.close_codes.items()},
        "order": {
            "duplicates": STATS.duplicates,
            "gaps": STATS.gaps,
            "gap_notices": STATS.gap_notices,
        },
        **stalled_info,
        "rounds": rounds,
    }
    for c in clients + stalled:
        if c is not None:
            c[1].closing = True
            close(c[0])
    await asyncio.sleep(0.1)
    return out


def idle_specs(a: argparse.Namespace) -> list[tuple[str, int, bool]]:
    """(url, connection number, stalled) for this process's idle connections, numbered
    from ``--first`` so that rooms and source addresses continue another process's."""
    return [
        (room_url(a, idx // a.members), idx, False)
        for idx in range(a.first, a.first + a.connections)
    ]


async def run_idle(a: argparse.Namespace) -> None:
    per_address = a.per_address or ports_per_address()
    specs = idle_specs(a)
    t0 = time.perf_counter()
    clients, failures = await connect_many(
        a, specs, a.concurrency, lambda idx: source_address(idx, per_address)
    )
    elapsed = time.perf_counter() - t0
    ok = [c for c in clients if c is not None]
    settle_s = await wait_quiet(a.quiet, a.settle_limit)
    sources = [source_address(idx, per_address) for _, idx, _ in specs[:1] + specs[-1:]]
    print(
        json.dumps(
            {
                "mode": "idle",
                "phase": "connected",
                "connections": a.connections,
                "first": a.first,
                "connected": len(ok),
                # still open once the join notices settled: a server may accept the
                # handshake and close the connection after (a join that failed)
                "alive": sum(1 for t, _ in ok if not t.is_disconnected),
                "connect_failures": failures,
                "first_failures": STATS.connect_errors,
                "connect_s": round(elapsed, 3),
                "connects_per_s": round(len(ok) / elapsed) if elapsed > 0 else 0,
                "settle_s": round(settle_s, 3),
                "concurrency": a.concurrency,
                "per_address": per_address,
                "source_addresses": sources,
                "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            }
        ),
        flush=True,
    )
    await hold(a)
    alive = sum(1 for t, _ in ok if not t.is_disconnected)
    for t, lst in ok:
        if lst is not None:  # was None once (100,000 over 7 workers, a third closed by 1011)
            lst.closing = True
        close(t)
    closed_by_server = {str(k): v for k, v in STATS.close_codes.items()}
    print(
        json.dumps(
            {
                "mode": "idle",
                "phase": "closed",
                "alive_before_close": alive,
                "close_codes_before": closed_by_server,
            }
        ),
        flush=True,
    )
    await asyncio.sleep(0.2)


async def hold(a: argparse.Namespace) -> None:
    """Hold the idle connections until a line other than ``probe`` arrives on stdin (or
    ``--hold`` seconds pass); measure a round trip for each ``probe`` line."""
    loop = asyncio.get_running_loop()
    until = time.monotonic() + a.hold
    while (left := until - time.monotonic()) > 0:
        try:
            line = await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.readline), left)
        except TimeoutError:
            return
        if line.strip() != "probe":
            return
        print(json.dumps(await run_probe(a)), flush=True)


#: the probe's clients are numbered from here (the idle ones from 0)
PROBE_IDS = 1 << 40


class ProbeMember(Receiver):
    """A member of the probe's room: times every message another member sent."""

    def __init__(self, idx: int, latencies: list[int]) -> None:
        self.idx = idx
        self.latencies = latencies

    def on_event(self, line: bytes, now: int) -> None:
        try:
            text = loads(line).get("text")
            sender, _, sent_at = text.split(":", 2)
            if int(sender) != self.idx:
                self.latencies.append(now - int(sent_at))
        except (orjson.JSONDecodeError, AttributeError, ValueError):
            STATS.other_events += 1  # the welcome, presence notices


async def run_probe(a: argparse.Namespace) -> dict:
    """A chat round trip while the idle connections are held: ``--probe-members`` members
    of one room, the first sending ``--probe-rate`` messages a second (open loop: at its
    pace whatever the answers) for ``--probe-seconds``, every other member timing each
    message from send to arrival."""
    url = f"{a.url}?room={a.room_prefix}-probe"
    latencies: list[int] = []
    t0 = time.perf_counter()
    members = []
    try:
        for n in range(a.probe_members):
            idx = PROBE_IDS + n
            members.append(
                await connect(
                    a, url, idx, listener_factory=lambda idx=idx: ProbeMember(idx, latencies)
                )
            )
    except RuntimeError as exc:  # the server is full (503), or gone: say so, keep the rest
        for t, member in members:
            member.closing = True
            close(t)
        return {"mode": "idle", "phase": "probe", "error": f"member {len(members)}: {exc}"}
    connect_s = time.perf_counter() - t0
    await wait_quiet(a.quiet, a.settle_limit)  # the join notices
    transport, sender = members[0]
    count = round(a.probe_rate * a.probe_seconds)
    start = time.perf_counter()
    for n in range(count):
        await asyncio.sleep(max(0.0, start + n / a.probe_rate - time.perf_counter()))
        send_text(transport, sender, orjson.dumps({"text": f"{sender.idx}:{n}:{perf_ns()}"}))
    expected = count * (a.probe_members - 1)
    drain_until = time.perf_counter() + a.drain
    while len(latencies) < expected and time.perf_counter() < drain_until:  # noqa: ASYNC110
        await asyncio.sleep(0.01)  # deliveries are counted in protocol callbacks: poll
    latencies.sort()
    for t, member in members:
        member.closing = True
        close(t)
    return {
        "mode": "idle",
        "phase": "probe",
        "members": a.probe_members,
        "sent": count,
        "rate_per_s": a.probe_rate,
        "expected": expected,
        "received": len(latencies),
        "connect_s": round(connect_s, 3),
        "p50_ms": pct(latencies, 0.5),
        "p99_ms": pct(latencies, 0.99),
        "max_ms": pct(latencies, 1.0),
    }


async def connect_until(a: argparse.Namespace, specs, deadline: float):  # type: ignore[no-untyped-def]
    """Like :func:`connect_many`, but every handshake still open at ``deadline``
    (perf_counter) is abandoned: returns (clients connected, failures)."""
    results: list = []
    it = iter(specs)
    failures = 0

    async def worker() -> None:
        nonlocal failures
        for url, idx, stalled in it:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            try:
                results.append(
                    await asyncio.wait_for(connect(a, url, idx, stalled=stalled), remaining)
                )
            except (RuntimeError, TimeoutError):
                failures += 1

    await asyncio.gather(*(worker() for _ in range(max(1, a.concurrency))))
    return results, failures


async def run_crowd(a: argparse.Namespace) -> dict:
    size = a.rooms_of or a.members
    specs = [(room_url(a, i // size), i, False) for i in range(a.members)]
    STATS.reset()
    wall_start = time.time()
    t0 = time.perf_counter()
    clients, failures = await connect_until(a, specs, t0 + a.limit)
    fill_s = time.perf_counter() - t0
    wall_filled = time.time()
    complete = len(clients) == a.members
    settle_limit = max(0.0, a.limit - fill_s) + a.quiet
    settled = await wait_quiet(a.quiet, settle_limit) < settle_limit
    settled_s = (STATS.last_frame / 1e9) - t0 if STATS.last_frame / 1e9 > t0 else fill_s
    out = {
        "mode": "crowd",
        "members": a.members,
        "room_size": size,
        "rooms": -(-a.members // size),
        "concurrency": a.concurrency,
        "connected": len(clients),
        "connect_failures": failures,
        "complete": complete,
        "fill_s": round(fill_s, 3),
        "settled": settled,
        "settled_s": round(max(settled_s, fill_s), 3),
        "wall": [round(wall_start, 3), round(wall_filled, 3)],
        "wall_settled": [round(wall_start, 3), round(time.time(), 3)],
        "frames": STATS.frames,
        "events": STATS.other_events,
        "notices": STATS.notices,
    }
    for t, lst in clients:
        lst.closing = True
        close(t)
    await asyncio.sleep(0.1)
    return out


# -- multiroom: v1 (a connection per room) against v2 (one connection, many rooms) ------------


def person_rooms(a: argparse.Namespace, person: int) -> list[int]:
    """The rooms ``person`` is in: ``--rooms-per-person`` rooms spaced ``rooms // k``
    apart, so that with ``people`` a multiple of ``rooms`` every room has
    ``people * k / rooms`` members."""
    k = a.rooms_per_person
    step = max(1, a.rooms // k)
    return [(person + step * j) % a.rooms for j in range(k)]


class MultiClient(Receiver):
    """One connection (v1: in one room; v2: in several), checking every room's seqs and
    handing each of its sending memberships its own messages back (the closed loop)."""

    def __init__(self, rooms: list[str]) -> None:
        self.rooms = rooms
        self.welcomes = 0
        self.last_seq: dict[str, int] = {}
        #: sender id -> that sending membership's returns (seq of each own message)
        self.own: dict[int, asyncio.Queue[int]] = {}
        self.closing = False
        self.close_code: int | None = None
        self.joined: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.errors: list[str] = []

    def on_event(self, line: bytes, now: int) -> None:
        st = STATS
        try:
            data = loads(line)
            kind = data.get("type")
        except (orjson.JSONDecodeError, AttributeError):
            st.other_events += 1
            return
        if kind != "message":
            st.other_events += 1
            st.notices += kind == "system"
            if kind == "welcome":
                self.last_seq[data.get("room")] = data.get("seq") or 0
                self.welcomes += 1
                if self.welcomes == len(self.rooms) and not self.joined.done():
                    self.joined.set_result(None)
            elif kind == "error":
                st.gap_notices += data.get("error") == "history_gap"
                if len(self.errors) < 3:
                    self.errors.append(f"{data.get('error')}: {data.get('message')}")
            return
        room, seq = data.get("room"), data.get("seq")
        last = self.last_seq.get(room)
        if isinstance(seq, int) and last is not None:
            if seq <= last:
                st.duplicates += 1  # or out of order: either way, seen before its turn
            else:
                st.gaps += seq - last - 1
                self.last_seq[room] = seq
        parts = data.get("text", "").split(":", 3)
        if len(parts) < 3:
            st.other_events += 1
            return
        sender, own_seq, ts = parts[0], parts[1], parts[2]
        st.lat.append(now - int(ts))
        st.deliveries += 1
        st.last_recv = now
        returns = self.own.get(int(sender))
        if returns is not None:
            returns.put_nowait(int(own_seq))

    def on_ws_disconnected(self, transport) -> None:  # type: ignore[no-untyped-def]
        if not self.closing and self.close_code is None:
            STATS.unexpected_closes += 1


async def connect_multi(a: argparse.Namespace, url: str, rooms: list[str]):  # type: ignore[no-untyped-def]
    """A picows connection for ``rooms`` (retried like :func:`connect`); v2 sends its
    joins at once, then waits (bounded) for every welcome."""
    headers = handshake_headers(a.subprotocol)
    last: Exception | None = None
    for attempt in range(a.connect_attempts):
        try:
            transport, listener = await ws_connect(
                lambda: MultiClient(rooms),
                url,
                websocket_handshake_timeout=a.connect_timeout,
                extra_headers=headers,
            )
            break
        except Exception as exc:  # refused, reset, handshake timeout: back off and retry
            last = exc
            await asyncio.sleep(min(0.05 * (attempt + 1), 1.0))
    else:
        raise RuntimeError(f"connect failed after {a.connect_attempts} attempts: {last!r}")
    if a.layout == "v2":
        for room in rooms:
            transport.send(WSMsgType.TEXT, orjson.dumps({"type": "join", "room": room}))
    try:
        await asyncio.wait_for(asyncio.shield(listener.joined), a.connect_timeout)
    except TimeoutError:
        close(transport)
        raise RuntimeError(
            f"{listener.welcomes} of {len(rooms)} welcomes; close {listener.close_code}; "
            f"errors {listener.errors}"
        ) from None
    return transport, listener


def multiroom_specs(a: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(url, rooms) for every connection: one per (person, room) for v1, one per person
    for v2. Each carries the person's name, so that rooms hold the same people."""
    specs = []
    for person in range(a.people):
        rooms = [f"{a.room_prefix}{r}" for r in person_rooms(a, person)]
        if a.layout == "v2":
            specs.append((f"{a.url}?name=p{person}", rooms))
        else:
            specs.extend((f"{a.url}?room={room}&name=p{person}", [room]) for room in rooms)
    return specs


async def connect_all_multi(a: argparse.Namespace, specs):  # type: ignore[no-untyped-def]
    results: list = [None] * len(specs)
    it = iter(enumerate(specs))
    failures: list[str] = []

    async def worker() -> None:
        for i, (url, rooms) in it:
            try:
                results[i] = await connect_multi(a, url, rooms)
            except RuntimeError as exc:
                failures.append(str(exc))

    await asyncio.gather(*(worker() for _ in range(max(1, a.concurrency))))
    return results, failures


def sending_memberships(a: argparse.Namespace, clients) -> list[tuple]:  # type: ignore[no-untyped-def]
    """(sender id, transport, room, room size, returns) for ``--senders`` members of each
    room, spread over its member list; each is a closed loop of its own (its returns are
    queued by the listener of the connection it sends on)."""
    members: dict[str, list[tuple[object, MultiClient]]] = {}
    for c in clients:
        if c is not None:
            for room in c[1].rooms:
                members.setdefault(room, []).append(c)
    out = []
    for room, lst in sorted(members.items()):
        n = min(a.senders, len(lst))
        for i in range(n):
            transport, listener = lst[i * len(lst) // n]
            sid = len(out)
            listener.own[sid] = returns = asyncio.Queue()
            out.append((sid, transport, room, len(lst), returns))
    return out


async def multi_sender(
    a: argparse.Namespace,
    sid: int,
    transport,
    room: str,
    queue,
    pad: str,
    stop_at: int,
    sent: list[int],
) -> None:  # type: ignore[no-untyped-def]
    """Like :func:`sender`, for one sending membership: v1 sends ``{"text"}`` on the
    room's connection, v2 ``{"type": "message", "room", "text"}`` on the person's."""
    st = STATS
    outstanding = 0
    v2 = a.layout == "v2"
    while sent[sid] < a.messages:
        while outstanding >= a.window:
            await queue.get()
            outstanding -= 1
        t = perf_ns()
        if t >= stop_at:
            break
        if st.first_send is None:
            st.first_send = t
        text = f"{sid}:{sent[sid]}:{t}:{pad}"
        msg = {"type": "message", "room": room, "text": text} if v2 else {"text": text}
        transport.send(WSMsgType.TEXT, orjson.dumps(msg))
        sent[sid] += 1
        outstanding += 1
    while outstanding:
        await queue.get()
        outstanding -= 1


async def multi_round(a: argparse.Namespace, n: int, slots) -> dict:  # type: ignore[no-untyped-def]
    st = STATS
    st.reset()
    for *_, returns in slots:
        while not returns.empty():
            returns.get_nowait()
    st.measuring = True
    pad = "x" * a.pad
    sent = [0] * len(slots)
    wall_start = time.time()
    t_start = perf_ns()
    stop_at = t_start + int(a.duration * 1e9)
    tasks = [
        asyncio.ensure_future(multi_sender(a, sid, t, room, returns, pad, stop_at, sent))
        for sid, t, room, _, returns in slots
    ]
    done = await _finish_sending(a, tasks)
    expected = sum(sent[sid] * size for sid, _, _, size, _ in slots)
    complete, span = await _drain(a, t_start, done, expected)
    lat = st.lat
    for t in tasks:
        t.cancel()
    await asyncio.sleep(0)
    return {
        "phase": "run",
        "round": n,
        "wall": [round(wall_start, 3), round(time.time(), 3)],
        "sent": sum(sent),
        "expected": expected,
        **delivery_summary(st, complete, span, lat),
    }


def delivery_summary(st: Stats, complete: bool, span: float, lat: list[int]) -> dict:
    """What a measured round reports about deliveries, whatever the workload."""
    return {
        "delivered": st.deliveries,
        "complete": complete,
        "seconds": round(span, 3),
        "deliveries_per_s": round(st.deliveries / span) if span > 0 else 0,
        "frames": st.frames,
        "events_per_frame": round(st.deliveries / st.frames, 2) if st.frames else None,
        "other_events": st.other_events,
        "unexpected_closes": st.unexpected_closes,
        "p50_ms": pct(lat, 0.5),
        "p90_ms": pct(lat, 0.9),
        "p99_ms": pct(lat, 0.99),
        "max_ms": pct(lat, 1.0),
        # bytes of text payload received per delivery: on the wire, and once inflated
        "wire_bytes_per_delivery": round(st.wire_in / st.deliveries, 1) if st.deliveries else None,
        "payload_bytes_per_delivery": (
            round(st.payload_in / st.deliveries, 1) if st.deliveries else None
        ),
        "wire_bytes_sent": st.wire_out,
        "payload_bytes_sent": st.payload_out,
    }


async def run_multiroom(a: argparse.Namespace) -> dict:
    specs = multiroom_specs(a)
    wall_start = time.time()
    t0 = time.perf_counter()
    clients, failures = await connect_all_multi(a, specs)
    connect_s = time.perf_counter() - t0
    settle_s = await wait_quiet(a.quiet, a.settle_limit)
    ok = [c for c in clients if c is not None]
    memberships = sum(len(c[1].rooms) for c in ok)
    print(
        json.dumps(
            {
                "mode": "multiroom",
                "phase": "joined",
                "layout": a.layout,
                "connections": len(specs),
                "connected": len(ok),
                "memberships": memberships,
                "connect_failures": len(failures),
                "first_failures": failures[:3],
                "connect_s": round(connect_s, 3),
                "settle_s": round(settle_s, 3),
                "wall": [round(wall_start, 3), round(time.time(), 3)],
                "events_while_joining": STATS.other_events,
            }
        ),
        flush=True,
    )
    loop = asyncio.get_running_loop()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.readline), a.hold)
    slots = sending_memberships(a, ok)
    rounds = []
    for n in range(a.rounds):
        rounds.append(await multi_round(a, n, slots))
        await wait_quiet(a.quiet, a.settle_limit)
    out = {
        "mode": "multiroom",
        "layout": a.layout,
        "people": a.people,
        "rooms": a.rooms,
        "rooms_per_person": a.rooms_per_person,
        "senders_per_room": a.senders,
        "sending_memberships": len(slots),
        "window": a.window,
        "duration": a.duration,
        "pad": a.pad,
        "subprotocol": a.subprotocol,
        "negotiated": sorted(
            {t.response.headers.get("sec-websocket-protocol", "") for t, _ in ok[:50]}
        ),
        "connected": len(ok),
        "alive_at_end": sum(1 for t, _ in ok if not t.is_disconnected),
        "close_codes": {str(k): v for k, v in STATS.close_codes.items()},
        "order": {
            "duplicates": STATS.duplicates,
            "gaps": STATS.gaps,
            "gap_notices": STATS.gap_notices,
        },
        "rounds": rounds,
    }
    for t, lst in ok:
        lst.closing = True
        close(t)
    await asyncio.sleep(0.2)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("mode", choices=["fanout", "idle", "crowd", "multiroom"])
    p.add_argument("--url", default="ws://127.0.0.1:8000/ws/chat", help="without the query string")
    p.add_argument("--room-prefix", default="bench")
    p.add_argument("--rooms", type=int, default=1)
    p.add_argument("--members", type=int, default=100, help="healthy members per room")
    p.add_argument("--senders", type=int, default=4, help="senders per room (<= members)")
    p.add_argument("--messages", type=int, default=1_000_000, help="most per sender per round")
    p.add_argument("--duration", type=float, default=5.0, help="seconds each round sends for")
    p.add_argument("--rounds", type=int, default=1, help="rounds (and again with stalled clients)")
    p.add_argument("--window", type=int, default=4, help="own messages in flight per sender")
    p.add_argument("--stalled", type=int, default=0, help="clients per room that never read")
    p.add_argument("--stalled-rcvbuf", type=int, default=4096)
    p.add_argument("--pad", type=int, default=64, help="payload padding characters")
    p.add_argument("--subprotocol", default=None, help="offer this subprotocol (roomcast.batch)")
    p.add_argument(
        "--deflate",
        action="store_true",
        help=f"offer permessage-deflate as browsers do ({BROWSER_DEFLATE_OFFER!r})",
    )
    p.add_argument(
        "--deadline", type=float, default=3.0, help="seconds past --duration to wait for senders"
    )
    p.add_argument("--drain", type=float, default=3.0, help="seconds to wait for the tail")
    p.add_argument("--quiet", type=float, default=0.3, help="settle: seconds without frames")
    p.add_argument("--settle-limit", type=float, default=60.0)
    p.add_argument(
        "--concurrency", type=int, default=1, help="handshakes in flight (fanout: 1, see README)"
    )
    p.add_argument("--connect-timeout", type=float, default=30.0)
    p.add_argument("--connect-attempts", type=int, default=20)
    p.add_argument("--connections", type=int, default=10_000, help="idle mode")
    p.add_argument(
        "--first", type=int, default=0, help="idle mode: the number of this process's first one"
    )
    p.add_argument(
        "--per-address",
        type=int,
        default=0,
        help="idle mode: connections per source address (0: the ephemeral port range less 2,000)",
    )
    p.add_argument("--probe-members", type=int, default=10, help="idle mode: the probe's room")
    p.add_argument("--probe-rate", type=float, default=20.0, help="idle mode: probe messages/s")
    p.add_argument("--probe-seconds", type=float, default=10.0, help="idle mode")
    p.add_argument("--verbose", action="store_true", help="progress on stderr")
    p.add_argument("--hold", type=float, default=60.0, help="idle mode: most seconds to hold")
    p.add_argument("--rooms-of", type=int, default=0, help="crowd mode: room size (0: one room)")
    p.add_argument("--limit", type=float, default=120.0, help="crowd mode: most seconds to fill")
    p.add_argument("--layout", choices=["v1", "v2"], default="v2", help="multiroom mode")
    p.add_argument("--people", type=int, default=500, help="multiroom mode")
    p.add_argument("--rooms-per-person", type=int, default=20, help="multiroom mode")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    global OFFER_DEFLATE
    a = parse_args(argv)
    OFFER_DEFLATE = a.deflate
    raise_nofile(max(1 << 16, a.connections + a.probe_members + 1024))
    if a.mode == "fanout":
        print(json.dumps(uvloop.run(run_fanout(a))), flush=True)
    elif a.mode == "crowd":
        print(json.dumps(uvloop.run(run_crowd(a))), flush=True)
    elif a.mode == "multiroom":
        print(json.dumps(uvloop.run(run_multiroom(a))), flush=True)
    else:
        uvloop.run(run_idle(a))


if __name__ == "__main__":
    main()
