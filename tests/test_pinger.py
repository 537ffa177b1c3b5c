"""The :class:`Pinger`: one task pings every WebSocket of an app at its interval, drops
those that closed or went away, and never waits on any one of them."""

from __future__ import annotations

import gc

import anyio
import pytest
from anyio import wait_all_tasks_blocked

from roomcast.launcher.pinger import MAX_WAIT, MIN_WAIT, PINGS_PER_PASS, Pinger

from harness import loop_passes_during

pytestmark = pytest.mark.anyio


class FakeWebSocket:
    def __init__(self, *, ending: bool = False) -> None:
        self.closed = False
        self.ending = ending
        self.pings: list[float] = []

    def ping_soon(self) -> bool:
        if self.ending:
            return False
        self.pings.append(anyio.current_time())
        return True


async def test_each_websocket_is_pinged_once_per_interval() -> None:
    pinger = Pinger()
    websockets = [FakeWebSocket() for _ in range(3)]
    start = anyio.current_time()
    for websocket in websockets:
        pinger.add(websocket, 0.2)
    with anyio.fail_after(10):
        while len(websockets[-1].pings) < 3:
            await anyio.sleep(0.05)
            await pinger.ping_due()
    for websocket in websockets:
        # the first after a half to a whole interval, then on that schedule: never early
        # (a late ping does not move the next one: the schedule is kept)
        for k, at in enumerate(websocket.pings):
            assert at - start >= 0.1 + k * 0.2


async def test_closed_ending_and_forgotten_websockets_are_dropped() -> None:
    pinger = Pinger()
    closed, ending, kept = FakeWebSocket(), FakeWebSocket(ending=True), FakeWebSocket()
    for websocket in (closed, ending, kept):
        pinger.add(websocket, 0.0)
    pinger.add(FakeWebSocket(), 0.0)
    closed.closed = True
    gc.collect()  # the fourth had no other reference: the pinger kept it only weakly
    assert await pinger.ping_due() == 1
    assert (closed.pings, ending.pings, len(kept.pings)) == ([], [], 1)
    assert len(pinger) == 1


async def test_a_large_pass_lets_other_tasks_run() -> None:
    pinger = Pinger()
    websockets = [FakeWebSocket() for _ in range(4 * PINGS_PER_PASS)]
    for websocket in websockets:
        pinger.add(websocket, 0.0)
    with anyio.fail_after(10):
        started, passes = await loop_passes_during(pinger.ping_due())
    assert started == len(websockets)
    assert passes >= 3


async def test_run_pings_until_cancelled_and_then_holds_nothing() -> None:
    pinger = Pinger()
    pinged_twice = anyio.Event()

    class Counted(FakeWebSocket):
        def ping_soon(self) -> bool:
            super().ping_soon()
            if len(self.pings) == 2:
                pinged_twice.set()
            return True

    websocket = Counted()
    pinger.add(websocket, 0.01)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(pinger.run)
            await pinged_twice.wait()
            tg.cancel_scope.cancel()
    assert len(pinger) == 0
    assert websocket.pings[1] - websocket.pings[0] >= MIN_WAIT * 0.9


async def test_a_connection_due_before_the_pinger_wakes_wakes_it() -> None:
    """Nothing to ping, the pinger sleeps its longest; a connection with a short
    interval added meanwhile is pinged at its time, not when the sleep ends."""
    pinger = Pinger()
    pinged = anyio.Event()

    class Watched(FakeWebSocket):
        def ping_soon(self) -> bool:
            pinged.set()
            return super().ping_soon()

    websocket = Watched()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(pinger.run)
            await wait_all_tasks_blocked()  # asleep, for up to MAX_WAIT
            added = anyio.current_time()
            pinger.add(websocket, 0.02)
            await pinged.wait()
            tg.cancel_scope.cancel()
    assert websocket.pings[0] - added < MAX_WAIT / 2
