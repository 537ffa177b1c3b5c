from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator

    from redis_cluster import RedisCluster

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


@pytest.fixture(scope="session")
def redis_cluster_session(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RedisCluster]:
    """One local Redis Cluster (3 masters, no replicas) for the session: it takes seconds
    to form (installed by the README's test command). Tests that kill or reshard nodes
    start their own."""
    from redis_cluster import run_cluster

    with run_cluster(tmp_path_factory.mktemp("redis-cluster")) as cluster:
        yield cluster


@pytest.fixture
def redis_cluster(redis_cluster_session: RedisCluster) -> RedisCluster:
    """The session's cluster, emptied for this test."""
    from redis_cluster import flush

    flush(redis_cluster_session)
    return redis_cluster_session
