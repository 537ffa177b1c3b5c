"""The idle-deflater sweep frees what went quiet without holding the event loop: 10,000
connections that go quiet together are freed a few hundred at a time."""

from __future__ import annotations

import anyio
import pytest

from roomcast.launcher import hardening
from roomcast.launcher.hardening import RELEASE_PER_PASS, BoundedPerMessageDeflate, IdleDeflaters

from harness import loop_passes_during

pytestmark = pytest.mark.anyio


def quiet_connections(registry: IdleDeflaters, count: int) -> list[BoundedPerMessageDeflate]:
    extensions = [BoundedPerMessageDeflate() for _ in range(count)]
    for extension in extensions:
        extension._compressor = object()  # type: ignore[assignment]  # holds one
        registry.used(extension)
    return extensions


async def test_a_sweep_frees_every_quiet_deflater_a_pass_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(hardening, "DEFLATER_IDLE", 0.0)  # everything is quiet already
    registry = IdleDeflaters()
    extensions = quiet_connections(registry, 4 * RELEASE_PER_PASS + 1)
    with anyio.fail_after(10):
        freed, passes = await loop_passes_during(registry.sweep())
    assert freed == len(extensions)
    assert passes >= 4  # the loop ran between the passes
    assert all(extension._compressor is None for extension in extensions)
    assert len(registry) == 0


async def test_a_sweep_stops_at_the_first_deflater_still_in_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry = IdleDeflaters()
    extensions = quiet_connections(registry, 3)
    assert await registry.sweep() == 0  # used just now: none is quiet
    assert all(extension._compressor is not None for extension in extensions)
    assert len(registry) == 3
