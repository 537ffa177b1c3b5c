from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator

    from postgres_server import PostgresServer
    from redis_server import RedisServer

sys.path.insert(0, os.path.dirname(__file__))  # the helpers next to the tests


@pytest.fixture(autouse=True)
def no_default_archive(monkeypatch: pytest.MonkeyPatch) -> None:
    """Apps that read the environment in tests keep no archive unless a test names one
    (the embedded default, ``sqlite:///roomcast.db``, would carry rooms' sequences from
    test to test)."""
    monkeypatch.setenv("ROOMCAST_ARCHIVE", "off")


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Every async test runs on both backends unless it asks for one."""
    return str(request.param)


@pytest.fixture
def redis_server(tmp_path: os.PathLike[str]) -> Iterator[RedisServer]:
    """A fresh redis-server for one test (installed by the README's test command)."""
    from pathlib import Path

    from redis_server import run_redis

    with run_redis(Path(tmp_path) / "redis") as server:
        yield server


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL cluster for the session (it takes seconds to start;
    installed by the README's test command). Tests that stop it start their own."""
    from postgres_server import run_postgres

    with run_postgres() as server:
        yield server


@pytest.fixture
def postgres_url(postgres_cluster: PostgresServer) -> str:
    """A fresh, empty database in the session's cluster."""
    return postgres_cluster.database()
