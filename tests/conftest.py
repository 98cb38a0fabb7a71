"""Shared fixtures: a Redis server, the local Upstash REST endpoint, and clients for both.

- ``redis_server`` / ``redis_url`` (session): ``$REJOIN_TEST_REDIS_URL`` if set
  (never flushed), else a private ``redis-server`` on a free port (or, without
  that binary, the embedded fakeredis store), flushed after every test.
- ``upstash`` (session): the Upstash-compatible endpoint in front of it;
  its faults are cleared after every test.
- ``upstash_async`` / ``upstash_sync`` / ``raw_redis`` (function): clients.
- ``redis_proxy`` (session): a RESP proxy in front of ``redis_url`` that counts
  commands and injects faults over TCP; ``redis_cluster`` (session): a private
  three-node Redis Cluster (skips the test where one cannot run).
- ``store`` (function, parametrised ``upstash``/``tcp``/``cluster``): one
  transport of the store, so a test written once runs on each.
"""

from __future__ import annotations

import os
import secrets
import tempfile
import warnings
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
import redis
from upstash_redis import Redis as UpstashSync
from upstash_redis.asyncio import Redis as UpstashAsync

from rejoin import redis_client, upstash_client
from rejoin_local.openai_stub import OpenAIStub, RunningStub
from rejoin_local.openai_stub import serve as serve_openai_stub
from rejoin_local.redis_proxy import RespProxy
from rejoin_local.redis_server import PrivateRedis, PrivateRedisCluster, RedisStartError
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


# --- the store on each transport ---------------------------------------------

STORES = ("upstash", "tcp", "cluster")


@pytest.fixture(scope="module")
def openai_server() -> Iterator[RunningStub]:
    """The local OpenAI-compatible server (Responses, Chat Completions, compaction)."""
    with serve_openai_stub() as running:
        yield running


@pytest.fixture
def openai_stub(openai_server: RunningStub) -> Iterator[OpenAIStub]:
    """The server's scripted replies and recorded requests, fresh for each test."""
    openai_server.stub.reset()
    yield openai_server.stub
    openai_server.stub.release()  # a hang a failing test left behind
    openai_server.stub.reset()


@pytest.fixture(scope="session")
def redis_proxy(redis_url: str) -> Iterator[RespProxy]:
    """A RESP proxy in front of the session Redis: TCP stats and faults."""
    target = redis.connection.parse_url(redis_url)
    with RespProxy(str(target.get("host", "127.0.0.1")), int(target.get("port", 6379))) as proxy:
        yield proxy


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[PrivateRedisCluster]:
    """A private Redis Cluster (three primaries); skips where it cannot run."""
    why = PrivateRedisCluster.available()
    if why is not None:
        pytest.skip(f"no Redis Cluster here: {why}")
    # Not under pytest's basetemp: another pytest run on the machine may prune
    # that while this one runs, and a cluster node exits when it cannot save
    # its nodes.conf.
    with tempfile.TemporaryDirectory(prefix="rejoin-cluster-") as workdir:
        cluster = PrivateRedisCluster(workdir)
        try:
            cluster.start()
        except RedisStartError as exc:
            pytest.fail(str(exc))
        try:
            yield cluster
        finally:
            cluster.stop()


class ClusterInspector(redis.cluster.RedisCluster):
    """A sync cluster client whose KEYS asks every primary (a test's view of all keys)."""

    def keys(self, pattern: Any = "*", **kwargs: Any) -> Any:
        kwargs.setdefault("target_nodes", self.PRIMARIES)
        return super().keys(pattern, **kwargs)


@dataclass
class Store:
    """One transport of the store under test.

    Attributes:
        name: ``upstash`` (REST through the local endpoint), ``tcp`` (redis.asyncio
            through the RESP proxy) or ``cluster`` (redis.asyncio.cluster on a
            three-node Redis Cluster, no proxy).
        url: the URL ``rejoin.store_client`` takes for it.
        token: the Upstash REST token (Upstash only).
        raw: a sync redis-py client straight to the data (str replies), to check
            what is stored.
        stats: requests and commands as the server side saw them (None on the
            cluster: its client talks to every node directly).
        faults: fault injection (None on the cluster).
    """

    name: str
    url: str
    token: str | None
    raw: Any
    stats: Stats | None
    faults: Faults | None

    def client(self, timeout: float = 2.0, **kwargs: Any) -> Any:
        """A fresh rejoin store client (retries after 10 ms, not 200 ms)."""
        kwargs.setdefault("retry_interval", TEST_RETRY_INTERVAL)
        if self.name == "upstash":
            assert self.token is not None
            return upstash_client(self.url, self.token, timeout=timeout, **kwargs)
        return redis_client(self.url, timeout=timeout, **kwargs)

    def require(self, what: str) -> None:
        """Skip the test on a transport that lacks ``what`` (``stats`` or ``faults``)."""
        if getattr(self, what) is None:
            pytest.skip(f"the {self.name} store has no {what} here")


@pytest.fixture(params=STORES)
def store(
    request: pytest.FixtureRequest,
    redis_server: RedisServer,
    upstash: UpstashEndpoint,
    redis_proxy: RespProxy,
) -> Iterator[Store]:
    """The store on each transport in turn; the same test runs on all three."""
    name: str = request.param
    if name == "upstash":
        raw = redis.Redis.from_url(redis_server.url, decode_responses=True)
        yield Store(name, upstash.url, upstash.token, raw, upstash.stats, upstash.faults)
        raw.close()
        return
    if name == "tcp":
        raw = redis.Redis.from_url(redis_server.url, decode_responses=True)
        redis_proxy.reset()
        db = redis.connection.parse_url(redis_server.url).get("db", 0)
        url = f"redis://127.0.0.1:{redis_proxy.port}/{db}"
        try:
            yield Store(name, url, None, raw, redis_proxy.stats, redis_proxy.faults)
        finally:
            redis_proxy.faults.clear()
            raw.close()
        return
    cluster: PrivateRedisCluster = request.getfixturevalue("redis_cluster")
    inspector = ClusterInspector.from_url(str(cluster.url), decode_responses=True)
    url = "redis+cluster://" + str(cluster.url).split("://", 1)[1]
    try:
        yield Store(name, url, None, inspector, None, None)
    finally:
        inspector.close()
        cluster.flush()
