"""One chat connection as a task tree: a receive loop and a sender task in one task group.

::

    serve_member
    └── task group
        ├── receive loop   (client frames -> hub.publish; errors -> own outbox), within
        │                  the token's expiry scope when tokens are signed
        └── sender task    (greeting, then outbox -> WebSocket frames; then the close code)

Only the sender task writes to the socket, so a peer that stops reading can block nothing
but its own sender. Whichever side ends first cancels the other; the member leaves its room
in ``finally``, synchronously, so no room entry outlives the connection. A token that
expires cancels the receive loop (its deadline is the scope's; a refresh moves it), which
ends the membership with 4001: no task of its own waits for it.
"""

from __future__ import annotations

import itertools
import time
from contextlib import nullcontext
from typing import Final

import anyio
import anyio.lowlevel
from anyio import CancelScope

from . import protocol
from .admission import TokenBucket
from .asgi import ConnectionClosed, WebSocket
from .brokers import UNAVAILABLE_NOTICE, Broker, BrokerUnavailable
from .hooks import HookRunner, LeaveEvent, MessageRequest, Refuse
from .hub import PRESENCE_WAKE, Client, Hub, Member, NameTaken
from .identity import LEEWAY, Identity, TokenRejected, TokenVerifier
from .protocol import BadMessage, ChatMessage, CloseCode, ErrorCode, Refresh
from .settings import Settings

__all__ = ["Credentials", "serve_binary_echo", "serve_echo", "serve_member"]

#: how long a close frame may take once the connection is being torn down
CLOSE_TIMEOUT = 1.0
#: a sender working through a backlog still checkpoints once per this many events: on
#: asyncio a send that fits in the socket buffer never yields to other tasks
FAIR_SHARE = 64
#: passes of the event loop a batch sender lets go by between taking an event and gathering
#: the rest of its frame (on top of the one in ``receive()``). Sends do not yield when the
#: kernel takes the frame (asyncio, and the Trio worker of ``python -m roomcast``), so these
#: are the only ones: with 1 a batch held 6 events at fanout1000, with 3 about 15 (of 16 in
#: flight), and CPU per delivery fell by a third (bench/README.md)
GATHER_PASSES = 3
RATE_NOTICE = "slow down: messages over the rate limit are dropped"
#: refreshes a connection may send per second (a burst of 3): each costs a signature check
#: (ES256 ~65 µs, HS256 ~23 µs on the 2-core dev machine, several messages' worth), outside
#: the message rate limit, and a client needs one per token lifetime
REFRESH_RATE = 1.0
REFRESH_NOTICE = "slow down: at most one refresh a second"
#: the ``bad_token`` text for a refresh whose new name the broker could not claim
RENAME_UNAVAILABLE = (
    "token not taken: the chat service cannot change your name now; try again shortly"
)


class Credentials:
    """A member's verified identity (SPEC §8.1, §8.3, or the ``connect`` hook's, §10):
    who it is, and until when; ``verifier`` checks refreshed tokens (``None``: this
    server does not use signed tokens).

    ``expiry`` is the cancel scope the receive loop runs in; its deadline is the token's
    ``exp`` (plus the verifier's clock :data:`~roomcast.identity.LEEWAY`, as at connect
    time) on anyio's clock. A ``refresh`` moves that deadline, which needs no wake-up: a
    scope's new deadline takes effect at once.
    """

    def __init__(self, verifier: TokenVerifier | None, identity: Identity) -> None:
        self.verifier = verifier
        self.identity = identity
        self.expiry = CancelScope(deadline=_deadline(identity))

    def renew(self, identity: Identity) -> None:
        self.identity = identity
        self.expiry.deadline = _deadline(identity)


def _deadline(identity: Identity) -> float:
    """The token's expiry on anyio's clock (``exp`` is wall-clock time)."""
    return anyio.current_time() + (identity.expires + LEEWAY - time.time())


async def serve_member(
    ws: WebSocket,
    broker: Broker,
    member: Member,
    settings: Settings,
    *,
    batch: bool,
    credentials: Credentials | None = None,
    hooks: HookRunner | None = None,
) -> None:
    """Run a joined member's connection until either side ends it (or its token expires);
    the member has left its room when this returns (or raises), and the ``leave`` hook
    has been told."""
    expiry = credentials.expiry if credentials is not None else nullcontext()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                send_outbox, ws, member.client, tg.cancel_scope, batch, settings.batch_max
            )
            with expiry:
                if await _receive_chat(ws, broker, member, settings, credentials, hooks):
                    tg.cancel_scope.cancel()  # the peer is gone: nobody left to write to
            if credentials is not None and credentials.expiry.cancelled_caught:
                broker.hub.end_client(member.client, CloseCode.UNAUTHORIZED, "token expired")
            # else (or now) the hub ended the membership: the sender drains the outbox,
            # then sends the close code (4008, 4001, 4403, 1001) and ends the task group
    finally:
        # Leaving the local room is synchronous and comes first; only telling other
        # processes may wait, and not for long.
        with anyio.move_on_after(CLOSE_TIMEOUT, shield=True):
            await broker.leave(member)
        if hooks is not None and "leave" in hooks.present:
            with anyio.move_on_after(hooks.timeout + CLOSE_TIMEOUT, shield=True):
                await hooks.leave(left(member))


def left(member: Member) -> LeaveEvent:
    """The ``leave`` hook's event for a membership that has ended: ``left`` unless the
    server ended it (then its close reason: ``too slow``, ``token expired``, ...)."""
    client = member.client
    reason = client.close_reason if client.close_code is not None else "left"
    return LeaveEvent(member.user, member.name, member.room.name, reason or "left")


async def _receive_chat(
    ws: WebSocket,
    broker: Broker,
    member: Member,
    settings: Settings,
    credentials: Credentials | None,
    hooks: HookRunner | None,
) -> bool:
    """Publish the client's messages until it disconnects (``True``) or the hub ends the
    membership (``False``)."""
    hub = broker.hub
    bucket = None
    if settings.rate_limit:
        bucket = TokenBucket(settings.rate_limit, 2 * settings.rate_limit, anyio.current_time())
    refreshes = TokenBucket(REFRESH_RATE, 3 * REFRESH_RATE, anyio.current_time())
    while member.joined:
        try:
            frame = await ws.receive()
        except ConnectionClosed:
            return True
        if isinstance(frame, bytes):
            _refuse(hub, member, ErrorCode.BINARY_UNSUPPORTED, "send text frames, not binary")
            continue
        try:
            message = protocol.parse_client_frame(frame, max_text=settings.max_text)
        except BadMessage as exc:
            _refuse(hub, member, exc.code, exc.message, exc.id)
            continue
        if message is None:
            continue
        if isinstance(message, Refresh):
            if refreshes.take(anyio.current_time()):
                await _refresh(broker, member, credentials, message.token)
            else:
                _refuse(hub, member, ErrorCode.RATE_LIMITED, REFRESH_NOTICE)
            continue
        if bucket is not None and not bucket.take(anyio.current_time()):
            _refuse(hub, member, ErrorCode.RATE_LIMITED, RATE_NOTICE, message.id)
            continue
        if hooks is not None and "message" in hooks.present:
            screened = await hooks.screen(request_of(member, message), message)
            if isinstance(screened, Refuse):
                _refuse(hub, member, str(screened.code), screened.reason, message.id)
                continue
            message = screened
        try:
            await broker.publish(member, message)
        except BrokerUnavailable:
            _refuse(hub, member, ErrorCode.UNAVAILABLE, UNAVAILABLE_NOTICE, message.id)
    return False


async def _refresh(
    broker: Broker, member: Member, credentials: Credentials | None, token: str
) -> None:
    """Take a new token in-band (SPEC §8.3): one for the same user moves the deadline and
    brings its ``name`` and ``rooms``; a room no longer granted is left with 4403. Any
    other token, or a name taken in the room or that the broker cannot check now, gets
    ``bad_token`` and changes nothing."""
    hub = broker.hub
    if credentials is None or credentials.verifier is None:
        _refuse(hub, member, ErrorCode.BAD_TOKEN, "this server does not use signed tokens")
        return
    try:
        identity = credentials.verifier.verify(token)
    except TokenRejected as rejected:
        _refuse(hub, member, ErrorCode.BAD_TOKEN, rejected.reason)
        return
    if identity.user != credentials.identity.user:
        _refuse(hub, member, ErrorCode.BAD_TOKEN, "the token is for another user")
        return
    try:
        await broker.rename(member, identity.name)
    except NameTaken:
        room = member.room.name
        _refuse(hub, member, ErrorCode.BAD_TOKEN, f"the name {identity.name} is taken in #{room}")
        return
    except BrokerUnavailable:
        _refuse(hub, member, ErrorCode.BAD_TOKEN, RENAME_UNAVAILABLE)
        return
    credentials.renew(identity)
    if not identity.may_enter(member.room.name):
        hub.end(member, CloseCode.FORBIDDEN, f"not allowed in #{member.room.name}")


def request_of(member: Member, message: ChatMessage) -> MessageRequest:
    """What the ``message`` hook is shown of a member's message."""
    return MessageRequest(member.user, member.name, member.room.name, message.text, message.id)


def _refuse(
    hub: Hub, member: Member, code: ErrorCode | str, message: str, id: str | None = None
) -> None:
    """Answer a refused frame with an ``error`` event (``code``: roomcast's, or the one a
    ``message`` hook gave). Each costs the sender a slot in its own outbox, so a flood it
    does not read ends in its eviction, not in unbounded work."""
    hub.stats.drops += 1
    hub.send_to(member, protocol.encode_error(code, message, id=id))


async def send_outbox(
    ws: WebSocket, client: Client, scope: CancelScope, batch: bool, batch_max: int
) -> None:
    """Write the greeting, then outbox events, to the socket; close when the outbox ends.

    With ``batch``, whatever is already queued (up to ``batch_max`` events) goes out as
    one frame: a lone event is never delayed, a backlog costs one write instead of many.
    A presence notice waiting in a member's slot goes out whenever the outbox is empty
    (or its wake-up comes through it), after the events queued before it. A join's
    greeting (v2: a join while connected) goes out before anything queued after it.
    """
    per_frame = batch_max if batch else 1
    try:
        with client.outbox:
            if batch:
                while (event := await _next_event(client, checkpoint=True)) is not None:
                    if event is GREETING_DUE:
                        await _send_greeting(ws, client, per_frame)
                        continue
                    # More passes of the event loop before gathering let the other
                    # fan-outs of those passes land too: a quiet room loses microseconds,
                    # a busy one gets fuller frames (GATHER_PASSES).
                    for _ in range(GATHER_PASSES):
                        await anyio.lowlevel.checkpoint()
                    await ws.send_text(_with_backlog(client, event, batch_max))
            else:
                for count in itertools.count(1):
                    event = await _next_event(client, checkpoint=count % FAIR_SHARE == 0)
                    if event is None:
                        break
                    if event is GREETING_DUE:
                        await _send_greeting(ws, client, per_frame)
                    else:
                        await ws.send_text(event)
        # The hub ended this connection (eviction or shutdown): tell the client why.
        await ws.close(client.close_code or CloseCode.NORMAL, client.close_reason)
    except ConnectionClosed:
        pass
    finally:
        scope.cancel()


async def _send_greeting(ws: WebSocket, client: Client, per_frame: int) -> None:
    """Send the welcome and any replay of the joins so far, then let them go: an idle
    connection should not keep its greeting alive (its own frame ends here)."""
    greeting, client.greeting = client.greeting, []
    for start in range(0, len(greeting), per_frame):
        await ws.send_text(protocol.join_batch(greeting[start : start + per_frame]))


#: what :func:`_next_event` returns when a join's greeting waits (it goes first)
GREETING_DUE: Final = "greeting"


async def _next_event(client: Client, *, checkpoint: bool) -> str | None:
    """The next event to send (:data:`GREETING_DUE` if a greeting waits), or ``None``
    once the outbox is closed and drained.

    Unless ``checkpoint`` is asked for, an event already queued is taken without
    ``receive``'s checkpoint and waiter objects: the send that follows is a checkpoint on
    trio, and under load those allocations were a large share of a delivery's cost. Before
    waiting on an empty outbox, a presence notice waiting in a member's slot is taken.
    """
    outbox = client.outbox
    while True:
        if checkpoint:
            await anyio.lowlevel.checkpoint()
        if client.greeting:
            return GREETING_DUE
        try:
            event: str | None = outbox.receive_nowait()
        except anyio.WouldBlock:
            event = None  # (no await in here: the exception would live as long as the wait)
        except anyio.EndOfStream:
            return None
        else:
            client.taken += 1
        if event is None:
            if (notice := client.take_presence()) is not None:
                return notice
            await client.wait_for_events()
            checkpoint = False  # that was one
        elif event is not PRESENCE_WAKE:
            return event
        elif (notice := client.take_presence()) is not None:
            return notice


def _with_backlog(client: Client, first: str, batch_max: int) -> str:
    """``first`` and whatever else is queued (up to ``batch_max`` events) as one batch,
    with a waiting presence notice last if the outbox is drained. A greeting that came
    meanwhile (a join during the gathering passes) stops it: the join's events queued
    after it must follow its welcome."""
    events = [first]
    outbox = client.outbox
    while len(events) < batch_max and not client.greeting:
        try:
            event = outbox.receive_nowait()
        except anyio.WouldBlock:
            notice = client.take_presence()
            if notice is not None:
                events.append(notice)
            break
        except anyio.EndOfStream:
            break
        client.taken += 1
        if event is not PRESENCE_WAKE:
            events.append(event)
        elif (notice := client.take_presence()) is not None:
            events.append(notice)
    return protocol.join_batch(events)


async def serve_echo(ws: WebSocket) -> None:
    """``/ws/echo``: text comes back as ``Echo: <text>``, bytes as the same bytes."""
    while True:
        frame = await ws.receive()
        if isinstance(frame, str):
            await ws.send_text(f"Echo: {frame}")
        else:
            await ws.send_bytes(frame)


async def serve_binary_echo(ws: WebSocket) -> None:
    """``/ws/binary``: bytes come back as bytes; text comes back as its UTF-8 bytes."""
    while True:
        frame = await ws.receive()
        await ws.send_bytes(frame.encode() if isinstance(frame, str) else frame)
