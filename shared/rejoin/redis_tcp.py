"""rejoin's store over TCP: redis.asyncio (RESP, TLS with ``rediss://``), for
ElastiCache (Redis OSS or Valkey, serverless or node-based), Redis Cloud, MemoryDB
or any Redis 7+.

The same Lua scripts and keys as over Upstash REST; :class:`rejoin._lua.Script`
sends each script's plain text (no Upstash flags line) under its own sha and
maps redis-py's failures to :mod:`rejoin.errors`. Nothing here imports
``redis`` until a TCP client is built, so Upstash deployments never load it.

A URL picks the client:

- ``redis://[[user]:password@]host[:port][/db]``: one Redis (or a cluster-mode
  disabled ElastiCache primary endpoint); ``rediss://`` the same over TLS;
  ``unix:///path/to/redis.sock``: a local socket.
- ``redis+cluster://...`` / ``rediss+cluster://...``: Redis Cluster through
  ``redis.asyncio.cluster.RedisCluster`` (ElastiCache cluster mode enabled,
  whose configuration endpoint it is, and ElastiCache Serverless).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .client import DEFAULT_TIMEOUT
from .errors import ConfigError
from .session import UpstashSession

if TYPE_CHECKING:
    from agents.items import TResponseInputItem
    from agents.memory import SessionSettings
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

__all__ = [
    "TCP_SCHEMES",
    "RedisSession",
    "TcpRedisClient",
    "redacted",
    "redis_client",
    "redis_client_from_env",
]

# URL scheme -> (cluster client?, the scheme redis-py is given).
_SCHEMES = {
    "redis": (False, "redis"),
    "rediss": (False, "rediss"),
    "unix": (False, "unix"),
    "redis+cluster": (True, "redis"),
    "rediss+cluster": (True, "rediss"),
}
TCP_SCHEMES = frozenset(_SCHEMES)

_LOCKING_FLAG = "allow-key-locking"


def _scheme(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else ""


def redacted(url: str) -> str:
    """``scheme://host:port`` of a store URL: safe to show (no user, password, query)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return f"{_scheme(url) or '?'}://?"
    return f"{parts.scheme}://{host}{port}{parts.path if parts.scheme == 'unix' else ''}"


def _strip_upstash_flag(script: str) -> str:
    """Drop Upstash's ``allow-key-locking`` flag, which real Redis refuses.

    For scripts written for Upstash by others (upstash-ratelimit's sliding
    window); rejoin's own scripts are already sent without it. The first line
    is emptied rather than removed when nothing else is left on it, so Lua's
    line numbers stay those of the caller's text.
    """
    if not script.startswith("#!"):
        return script
    first, newline, rest = script.partition("\n")
    tokens = first.split()
    if not tokens or tokens[0] != "#!lua":
        return script
    kept = [tokens[0]]
    found = False
    for token in tokens[1:]:
        if token.startswith("flags="):
            flags = token[len("flags=") :].split(",")
            found = found or _LOCKING_FLAG in flags
            flags = [f for f in flags if f and f != _LOCKING_FLAG]
            if flags:
                kept.append("flags=" + ",".join(flags))
        else:
            kept.append(token)
    if not found:
        return script
    return (" ".join(kept) if len(kept) > 1 else "") + newline + rest


def _to_str(value: Any) -> Any:
    # For clients built without decode_responses: answers as the Upstash client gives them.
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, list):
        return [_to_str(v) for v in value]
    return value


class TcpRedisClient:
    """A :class:`rejoin.RedisClient` over a ``redis.asyncio`` client.

    It gives rejoin's scripts the ``eval(script, keys, args)`` /
    ``evalsha(sha, keys, args)`` shape of the Upstash client, answers with
    ``str`` (not ``bytes``) whatever the client's ``decode_responses``, and
    tells :class:`rejoin._lua.Script` to send plain Lua (``is_upstash``).
    It maps no errors: scripts do that, in one place.

    A redis.asyncio client and its pooled connections belong to the event
    loop they were opened on. Built by :func:`redis_client` (with a
    ``factory``), this client keeps one redis-py client per event loop: calls
    on the same loop (warm Lambda invocations) reuse its connections, and a
    new loop (each ``Runner.run_sync``) gets its own. A client you wrap
    yourself is used as it is, on whatever loop calls it.

    Args:
        client: a ``redis.asyncio.Redis`` or ``redis.asyncio.cluster.RedisCluster``.
        factory: builds another client like ``client`` (for other event loops).

    Attributes:
        is_upstash: always False.
        is_cluster: True for a Redis Cluster client: each script call's keys
            must then share one hash slot.
    """

    is_upstash = False

    def __init__(
        self,
        client: Redis | RedisCluster,
        *,
        factory: Callable[[], Redis | RedisCluster] | None = None,
    ) -> None:
        from redis.asyncio.cluster import RedisCluster

        self._first = client
        self._factory = factory
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = (
            weakref.WeakKeyDictionary()
        )
        self._unbound = True  # the first client is bound to whichever loop uses it first
        self.is_cluster = isinstance(client, RedisCluster)
        # Cluster clients whose slot map is loaded, and the locks that load them.
        self._mapped: weakref.WeakSet[Any] = weakref.WeakSet()
        self._map_locks: weakref.WeakKeyDictionary[Any, asyncio.Lock] = weakref.WeakKeyDictionary()
        try:
            decodes = bool(client.get_encoder().decode_responses)
        except AttributeError:  # a client-like object: normalise every answer
            decodes = False
        self._normalise: Callable[[Any], Any] = (lambda v: v) if decodes else _to_str

    @property
    def client(self) -> Any:
        """The redis-py client of the running event loop (for commands of your own)."""
        if self._factory is None:
            return self._first
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return self._first
        found = self._by_loop.get(loop)
        if found is None:
            if self._unbound:
                found, self._unbound = self._first, False
            else:
                found = self._factory()
            self._by_loop[loop] = found
        return found

    async def _ready(self) -> Any:
        client = self.client
        if self.is_cluster and client not in self._mapped:
            # redis-py loads a cluster's slot map lazily, and commands sent
            # concurrently while it loads can go to the wrong node; the MOVED
            # that follows makes it rebuild its nodes, closing connections that
            # other commands are using. Load the map once, before any command.
            lock = self._map_locks.setdefault(client, asyncio.Lock())
            async with lock:
                if client not in self._mapped:
                    await client.initialize()
                    self._mapped.add(client)
        return client

    async def eval(
        self, script: str, keys: list[str] | None = None, args: list[Any] | None = None
    ) -> Any:
        """``EVAL script numkeys key... arg...``, one round trip."""
        keys, args = keys or [], args or []
        client = await self._ready()
        reply = await client.eval(_strip_upstash_flag(script), len(keys), *keys, *args)
        return self._normalise(reply)

    async def evalsha(
        self, sha1: str, keys: list[str] | None = None, args: list[Any] | None = None
    ) -> Any:
        """``EVALSHA sha numkeys key... arg...``, one round trip."""
        keys, args = keys or [], args or []
        client = await self._ready()
        reply = await client.evalsha(sha1, len(keys), *keys, *args)
        return self._normalise(reply)

    async def ping(self) -> bool:
        """True if Redis answers PING (every primary, for a cluster)."""
        try:
            return bool(await self.client.ping())
        except Exception:  # unreachable, refused, timed out: all mean "no"
            return False

    async def close(self) -> None:
        """Close the connections of the running event loop's client."""
        await self.client.aclose()

    def __repr__(self) -> str:
        kind = "cluster" if self.is_cluster else "redis"
        pool = getattr(self._first, "connection_pool", None)
        if pool is None:
            return f"TcpRedisClient({kind})"
        kwargs = dict(getattr(pool, "connection_kwargs", {}))
        where = kwargs.get("path") or f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"
        return f"TcpRedisClient({kind}, {where})"


def redis_client(
    url: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    retries: int = 1,
    retry_interval: float = 0.2,
    **redis_kwargs: Any,
) -> TcpRedisClient:
    """Build a TCP store client from a URL, with timeouts and a bounded retry.

    The client keeps a connection pool; build it once per event loop and reuse
    it (``rejoin.runtime.Runtime`` does, so warm Lambda invocations skip the
    TCP and TLS handshakes). Nothing connects until the first command.

    Args:
        url: ``redis://``, ``rediss://`` (TLS), ``unix://``, or
            ``redis+cluster://`` / ``rediss+cluster://`` for Redis Cluster
            (see the module docs). The password goes in the URL (keep the URL
            in Secrets Manager).
        timeout: seconds to connect, and to wait for each answer.
        retries: how many times a command that failed on the connection
            (reset, closed, timed out) is sent again on a fresh one. Safe for
            rejoin's writes: every one is idempotent.
        retry_interval: seconds between tries.
        **redis_kwargs: more options for ``redis.asyncio.Redis.from_url`` /
            ``RedisCluster.from_url`` (e.g. ``ssl_ca_certs``, ``username``,
            ``credential_provider``, ``max_connections``); they win over the
            defaults set here.

    Raises:
        ConfigError: the URL's scheme is not one of the above, the URL is
            malformed (the message never shows the password), or the timeout
            is not positive.
    """
    scheme = _scheme(url)
    if scheme not in _SCHEMES:
        raise ConfigError(
            "a Redis URL must start with redis://, rediss:// (TLS), unix://, "
            f"redis+cluster:// or rediss+cluster://, not {scheme or url[:8]!r}://"
        )
    if timeout <= 0:
        raise ConfigError("timeout must be positive")
    if retries < 0 or retry_interval < 0:
        raise ConfigError("retries and retry_interval must not be negative")
    cluster, redis_scheme = _SCHEMES[scheme]
    target = redis_scheme + url[len(scheme) :]

    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster
    from redis.asyncio.retry import Retry
    from redis.backoff import ConstantBackoff

    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "decode_responses": True,
        # RESP2, as Upstash answers: Lua replies convert the same way on both transports.
        "protocol": 2,
        # A corrupt (non-UTF-8) entry must not break a whole read: it fails
        # JSON decoding and is skipped, as the session skips corrupt items.
        "encoding_errors": "replace",
        "retry": Retry(ConstantBackoff(retry_interval), retries),
    }
    options.update(redis_kwargs)

    def build() -> Redis | RedisCluster:
        if cluster:
            return RedisCluster.from_url(target, **options)
        return Redis.from_url(target, **options)

    try:
        client = build()
    except (ValueError, TypeError) as exc:
        # redis-py's message may quote the URL; ours shows only scheme, host, port.
        raise ConfigError(f"malformed Redis URL {redacted(url)} ({type(exc).__name__})") from None
    return TcpRedisClient(client, factory=build)


def redis_client_from_env(*, timeout: float | None = None) -> TcpRedisClient:
    """Build a client from ``REJOIN_STORE_URL``; the timeout defaults to
    ``REJOIN_STORE_TIMEOUT`` (seconds), else 5 s.

    Raises:
        ConfigError: the variable is missing or malformed.
    """
    url = os.environ.get("REJOIN_STORE_URL", "")
    if not url:
        raise ConfigError("set REJOIN_STORE_URL (e.g. rediss://:password@host:6379/0)")
    if timeout is None:
        try:
            timeout = float(os.environ.get("REJOIN_STORE_TIMEOUT") or DEFAULT_TIMEOUT)
        except ValueError:
            raise ConfigError("REJOIN_STORE_TIMEOUT must be a number of seconds") from None
    return redis_client(url, timeout=timeout)


class RedisSession(UpstashSession):
    """An Agents SDK session in Redis over TCP: rejoin's store, the SDK's ``RedisSession`` shape.

    The constructor and :meth:`from_url` take what
    ``agents.extensions.memory.RedisSession`` takes (``redis_client``,
    ``key_prefix``, ``ttl``, ``session_settings``; ``url`` and
    ``redis_kwargs``), so switching is a change of import. Underneath it is
    :class:`rejoin.UpstashSession`'s store over :class:`TcpRedisClient`: one
    Lua script per method (one round trip, atomic), idempotent writes, the
    hash-tagged keys ``<prefix>:{<session_id>}:items`` that keep a session in
    one Redis Cluster slot, rejoin's typed errors. Its data layout is not the
    SDK's (nor is its default ``key_prefix``): it does not read histories the
    SDK's ``RedisSession`` wrote.

    Args:
        session_id: 1-128 characters of ``A-Za-z0-9_-``.
        redis_client: a ``redis.asyncio.Redis``, a
            ``redis.asyncio.cluster.RedisCluster``, or a :class:`TcpRedisClient`
            (e.g. from :func:`redis_client`). The caller closes it.
        key_prefix: prefix of every key.
        ttl: if set, seconds: every call pushes the session's expiry this far
            into the future (a sliding TTL).
        session_settings: ``SessionSettings`` (or a dict); its ``limit`` is
            used when ``get_items`` is called without one.
        epoch, turn_attempt, clock: as for :class:`rejoin.UpstashSession`.

    Raises:
        InvalidSessionId: the session id is malformed (before any key is built).
    """

    def __init__(
        self,
        session_id: str,
        *,
        redis_client: Redis | RedisCluster | TcpRedisClient,
        key_prefix: str = "rejoin",
        ttl: int | None = None,
        session_settings: SessionSettings | dict[str, Any] | None = None,
        epoch: str | None = None,
        turn_attempt: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if ttl is not None and ttl <= 0:
            raise ValueError("ttl must be positive seconds (or None for no expiry)")
        client = (
            redis_client
            if isinstance(redis_client, TcpRedisClient)
            else TcpRedisClient(redis_client)
        )
        super().__init__(
            session_id,
            redis=client,
            key_prefix=key_prefix,
            ttl_seconds=ttl,
            session_settings=session_settings,
            epoch=epoch,
            turn_attempt=turn_attempt,
            clock=clock,
        )
        self._tcp = client

    @classmethod
    def from_url(
        cls,
        session_id: str,
        *,
        url: str,
        redis_kwargs: dict[str, Any] | None = None,
        session_settings: SessionSettings | dict[str, Any] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        **kwargs: Any,
    ) -> RedisSession:
        """Build a session on a client of its own; call :meth:`close` when done.

        Args:
            session_id: the conversation id.
            url: a Redis URL (see :func:`redis_client`), e.g.
                ``rediss://:password@host:6379/0``.
            redis_kwargs: more options for the redis-py client.
            session_settings: as for the constructor.
            timeout: seconds to connect and to wait for each answer.
            **kwargs: other constructor arguments (``key_prefix``, ``ttl``, ...).

        Raises:
            ConfigError: the URL is malformed or of another scheme.
        """
        client = redis_client(url, timeout=timeout, **(redis_kwargs or {}))
        session = cls(session_id, redis_client=client, session_settings=session_settings, **kwargs)
        session._owns_client = True
        return session

    @classmethod
    def from_env(
        cls, session_id: str, *, timeout: float | None = None, **kwargs: Any
    ) -> RedisSession:
        """Build a session on a client configured by ``REJOIN_STORE_URL``.

        The timeout is ``timeout`` seconds, else ``REJOIN_STORE_TIMEOUT``,
        else 5. Call :meth:`close` when done: the session owns this client.

        Raises:
            ConfigError: the variable is missing or malformed.
        """
        session = cls(session_id, redis_client=redis_client_from_env(timeout=timeout), **kwargs)
        session._owns_client = True
        return session

    async def ping(self) -> bool:
        """True if Redis answers (as the SDK's ``RedisSession.ping``)."""
        return await self._tcp.ping()

    def __repr__(self) -> str:
        return f"RedisSession(session_id={self.session_id!r}, prefix={self.keys.prefix!r})"

    @staticmethod
    def _serialize(items: list[TResponseInputItem]) -> list[str]:
        # As UpstashSession's, without Upstash's 10 MB request limit.
        return [json.dumps(item, separators=(",", ":")) for item in items]
