"""Shared fixtures: a Redis server, the local Upstash REST endpoint, and clients for both.

- ``redis_server`` / ``redis_url`` (session): ``$REJOIN_TEST_REDIS_URL`` if set
  (never flushed), else a private ``redis-server`` on a free port (or, without
  that binary, the embedded fakeredis store), flushed after every test.
- ``upstash`` (session): the Upstash-compatible endpoint in front of it;
  its faults are cleared after every test.
- ``upstash_async`` / ``upstash_sync`` / ``raw_redis`` (function): clients.
"""

from __future__ import annotations

import os
import secrets
import warnings
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest
import pytest_asyncio
import redis
from upstash_redis import Redis as UpstashSync
from upstash_redis.asyncio import Redis as UpstashAsync

from rejoin_local.redis_server import PrivateRedis, RedisStartError
from rejoin_local.upstash_rest import Faults, Stats, create_app, serve

# Clients built by the fixtures retry a lost response after this many seconds
# instead of upstash-redis' default 3 s.
TEST_RETRY_INTERVAL = 0.01


@dataclass(frozen=True)
class RedisServer:
    """The Redis the tests use.

    Attributes:
        url: ``redis://host:port/db``.
        owned: True when this session started it (so tests may FLUSHDB it).
    """

    url: str
    owned: bool


@dataclass(frozen=True)
class UpstashEndpoint:
    """The local Upstash REST endpoint, as served for the test session."""

    url: str
    token: str
    faults: Faults
    stats: Stats
    redis_url: str


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """The session's Redis: given, started here, or embedded as a last resort."""
    given = os.environ.get("REJOIN_TEST_REDIS_URL")
    if given:
        yield RedisServer(url=given, owned=False)
        return

    private = PrivateRedis(tmp_path_factory.mktemp("redis"), embedded_fallback=True)
    try:
        url = private.start()
    except RedisStartError as exc:
        pytest.fail(str(exc))
    try:
        if private.embedded:
            warnings.warn(
                "redis-server not found on PATH: tests run against the embedded fakeredis store",
                stacklevel=1,
            )
        yield RedisServer(url=url, owned=True)
    finally:
        private.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    """The session Redis URL (see ``redis_server``)."""
    return redis_server.url


@pytest.fixture(scope="session")
def upstash(redis_url: str) -> Iterator[UpstashEndpoint]:
    """The Upstash-compatible REST endpoint in front of ``redis_url``."""
    token = secrets.token_urlsafe(16)
    app = create_app(redis_url=redis_url, token=token)
    endpoint = app.state.endpoint
    with serve(app) as running:
        yield UpstashEndpoint(
            url=running.url,
            token=token,
            faults=endpoint.faults,
            stats=endpoint.stats,
            redis_url=redis_url,
        )


@pytest_asyncio.fixture
async def upstash_async(upstash: UpstashEndpoint) -> AsyncIterator[UpstashAsync]:
    """An ``upstash_redis.asyncio.Redis`` on the endpoint (base64 encoding, 1 retry)."""
    client = UpstashAsync(upstash.url, upstash.token, rest_retry_interval=TEST_RETRY_INTERVAL)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
def upstash_sync(upstash: UpstashEndpoint) -> Iterator[UpstashSync]:
    """An ``upstash_redis.Redis`` on the endpoint (base64 encoding, 1 retry)."""
    client = UpstashSync(upstash.url, upstash.token, rest_retry_interval=TEST_RETRY_INTERVAL)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def raw_redis(redis_url: str) -> Iterator[redis.Redis]:
    """redis-py straight to the session Redis (str replies), to check what is stored."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(autouse=True)
def _clear_upstash_faults(request: pytest.FixtureRequest) -> Iterator[None]:
    """Drop faults a test left pending, so a failing test does not poison the next."""
    if "upstash" not in request.fixturenames:
        yield
        return
    endpoint: UpstashEndpoint = request.getfixturevalue("upstash")
    yield
    endpoint.faults.clear()


@pytest.fixture(autouse=True)
def _flush_owned_redis(request: pytest.FixtureRequest) -> Iterator[None]:
    """FLUSHDB after each test that used Redis, only when this session started it."""
    if "redis_server" not in request.fixturenames:
        yield
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    yield
    if "upstash" in request.fixturenames:
        # A request released from a hang still applies: let it land first, so
        # a test's late write cannot reach the next test's database.
        endpoint: UpstashEndpoint = request.getfixturevalue("upstash")
        endpoint.faults.clear()
        endpoint.faults.settle()
    if server.owned:
        client = redis.Redis.from_url(server.url)
        try:
            client.flushdb()
        finally:
            client.close()
