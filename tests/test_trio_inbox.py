"""``AppInbox``: the queue between a connection and its app on the Trio worker keeps a
trio memory channel's semantics (bounded, first in first out, checkpoints, nothing lost
to cancellation) in a few objects."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from roomcast.launcher.trio_inbox import AppInbox

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "trio"  # Hypercorn's Trio worker: the inbox is trio's own


async def test_events_come_out_in_the_order_they_went_in() -> None:
    inbox = AppInbox(3)
    with trio.fail_after(5):
        for n in range(3):
            await inbox.put({"n": n})
        assert [(await inbox.receive())["n"] for _ in range(3)] == [0, 1, 2]


async def test_a_full_inbox_makes_the_sender_wait_until_the_app_receives() -> None:
    inbox = AppInbox(2)
    put: list[int] = []

    async def sender() -> None:
        for n in range(4):
            await inbox.put({"n": n})
            put.append(n)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            await trio.testing.wait_all_tasks_blocked()
            assert put == [0, 1]  # the third waits: the app is behind
            assert (await inbox.receive())["n"] == 0
            await trio.testing.wait_all_tasks_blocked()
            assert put == [0, 1, 2]
            assert [(await inbox.receive())["n"] for _ in range(3)] == [1, 2, 3]


async def test_a_waiting_receiver_is_handed_the_event() -> None:
    inbox = AppInbox(1)
    got: list[object] = []

    async def app() -> None:
        got.append(await inbox.receive())

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(app)
            await trio.testing.wait_all_tasks_blocked()
            inbox.put_nowait({"type": "websocket.receive", "text": "hi"})
            inbox.put_nowait({"type": "websocket.disconnect"})  # room for one more
    assert got == [{"type": "websocket.receive", "text": "hi"}]
    assert inbox.receive_nowait() == {"type": "websocket.disconnect"}


async def test_a_cancelled_receive_loses_nothing() -> None:
    inbox = AppInbox(1)
    with trio.fail_after(5):
        with trio.move_on_after(0.01) as waited:
            await inbox.receive()
        assert waited.cancelled_caught
        await inbox.put({"n": 1})  # queued, not handed to the receiver that left
        assert await inbox.receive() == {"n": 1}


async def test_a_cancelled_put_queues_nothing() -> None:
    inbox = AppInbox(1)
    with trio.fail_after(5):
        await inbox.put({"n": 1})
        with trio.move_on_after(0.01) as waited:
            await inbox.put({"n": 2})
        assert waited.cancelled_caught
        assert await inbox.receive() == {"n": 1}
        with pytest.raises(trio.WouldBlock):
            inbox.receive_nowait()


async def test_both_calls_are_checkpoints() -> None:
    inbox = AppInbox(1)
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await inbox.put({"n": 1})  # room for it, and still a checkpoint
    inbox.put_nowait({"n": 1})
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await inbox.receive()  # an event waits, and still a checkpoint
    assert inbox.receive_nowait() == {"n": 1}
