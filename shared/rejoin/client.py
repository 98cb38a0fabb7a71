"""Store clients with a finite timeout: Upstash REST, or Redis over TCP by URL scheme.

``upstash-redis`` has no client-side timeout (its httpx client is built with
``timeout=None``) and retries a failed request once after 3 s. On Lambda a
hung request would eat the whole invocation, so rejoin always sets one.
Retrying is safe for rejoin's own writes: every one is idempotent.

rejoin also replaces that httpx client with a lean one
(:class:`rejoin._upstash_http.UpstashHttp`, over :mod:`rejoin._http1`): httpx
costs several times the CPU per request (bench/README.md, store section).
When the environment names a proxy (``HTTPS_PROXY``, ``HTTP_PROXY``,
``ALL_PROXY``), the httpx client stays, with the timeout set: only it does proxies.
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx

from .errors import ConfigError

if TYPE_CHECKING:
    from upstash_redis.asyncio import Redis

    from ._lua import RedisClient

__all__ = [
    "DEFAULT_TIMEOUT",
    "UpstashClient",
    "store_client",
    "upstash_client",
    "upstash_client_from_env",
]

DEFAULT_TIMEOUT = 5.0


class UpstashClient:
    """An ``upstash_redis.asyncio.Redis`` for each event loop that uses it.

    The Upstash client's HTTP connections belong to the event loop that
    opened them: used from another loop (a Lambda handler that calls
    ``asyncio.run`` per invocation, ``Runner.run_sync``, another thread) they
    fail with ``RuntimeError: Event loop is closed``. This keeps one client
    per loop, built on first use there, so one client (and one
    :class:`rejoin.UpstashSession`) works from any loop and any thread, and
    a warm Lambda's long-lived loop keeps reusing its connections.

    Every command of ``upstash_redis.asyncio.Redis`` is available on it
    (``await client.get("k")``); :attr:`client` is the running loop's.

    Args:
        factory: builds one ``upstash_redis.asyncio.Redis``.
        first: a client already built (and not used yet), handed to the first
            loop that asks instead of building another.
    """

    is_upstash = True

    def __init__(self, factory: Callable[[], Redis], *, first: Redis | None = None) -> None:
        self._factory = factory
        self._spare = first
        self._lock = threading.Lock()
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Redis] = (
            weakref.WeakKeyDictionary()
        )

    @property
    def client(self) -> Redis:
        """The running event loop's client (a new one outside any loop)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return self._factory()
        with self._lock:
            found = self._by_loop.get(loop)
            if found is None:
                found, self._spare = self._spare, None
                if found is None:
                    found = self._factory()
                self._by_loop[loop] = found
            return found

    async def eval(
        self, script: str, keys: list[str] | None = None, args: list[Any] | None = None
    ) -> Any:
        """``EVAL`` on the running loop's client."""
        return await self.client.eval(script, keys, args)

    async def evalsha(
        self, sha1: str, keys: list[str] | None = None, args: list[Any] | None = None
    ) -> Any:
        """``EVALSHA`` on the running loop's client."""
        return await self.client.evalsha(sha1, keys, args)

    async def close(self) -> None:
        """Close the running loop's client (those of other loops close with them)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        with self._lock:
            found = self._by_loop.pop(loop, None)
        if found is not None:
            await found.close()

    def __getattr__(self, name: str) -> Any:
        # Every other command, on the running loop's client.
        return getattr(self.client, name)

    def __repr__(self) -> str:
        return f"UpstashClient(loops={len(self._by_loop)})"


def upstash_client(
    url: str,
    token: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    retries: int = 1,
    retry_interval: float = 0.2,
) -> UpstashClient:
    """Build an Upstash client with a request timeout, usable from any event loop.

    Args:
        url: the database's REST URL (``UPSTASH_REDIS_REST_URL``).
        token: the database's REST token (``UPSTASH_REDIS_REST_TOKEN``).
        timeout: seconds each HTTP request may take in all (connecting and
            the whole answer included).
        retries: how many times the client retries a request that failed.
        retry_interval: seconds between retries.

    Returns:
        An :class:`UpstashClient`: an ``upstash_redis.asyncio.Redis`` per event
        loop, sending with :class:`~rejoin._upstash_http.UpstashHttp` unless
        the environment names a proxy (then with httpx).

    Raises:
        ConfigError: the URL or token is empty or malformed (a token with a
            line break or other control character would inject headers), or
            the timeout is not positive.
    """
    if not url or not url.startswith(("http://", "https://")):
        raise ConfigError("Upstash REST URL must start with https:// (or http:// locally)")
    if not token:
        raise ConfigError("Upstash REST token is empty")
    if not token.isascii() or not token.isprintable():
        raise ConfigError(
            "Upstash REST token must be printable ASCII (no line breaks): check how it was set"
        )
    if timeout <= 0:
        raise ConfigError("timeout must be positive")
    from ._upstash_http import UpstashHttp, proxy_configured

    lean = not proxy_configured()
    base = url.rstrip("/")
    try:
        UpstashHttp(base, timeout=timeout)
    except ValueError as exc:
        raise ConfigError(f"Upstash REST URL: {exc}") from None

    def build() -> Redis:
        from upstash_redis.asyncio import Redis

        client = Redis(
            base,
            token,
            rest_retries=retries,
            rest_retry_interval=retry_interval,
            allow_telemetry=False,
        )
        # The client offers no timeout option: replace its httpx client (or,
        # behind a proxy, set the timeout on it).
        http = getattr(getattr(client, "_http", None), "_client", None)
        if not isinstance(http, httpx.AsyncClient):
            raise ConfigError("unsupported upstash-redis version: cannot set a request timeout")
        if lean:
            client._http._client = UpstashHttp(base, timeout=timeout)  # type: ignore[assignment]
        else:
            http.timeout = httpx.Timeout(timeout)
        return client

    # Built now, to fail here rather than on the first request; kept for the
    # first event loop (building one costs an httpx client and its TLS context).
    return UpstashClient(build, first=build())


def upstash_client_from_env(
    *,
    timeout: float | None = None,
    retries: int = 1,
    retry_interval: float = 0.2,
) -> UpstashClient:
    """Build a client from ``UPSTASH_REDIS_REST_URL`` and ``UPSTASH_REDIS_REST_TOKEN``.

    The timeout defaults to ``REJOIN_UPSTASH_TIMEOUT`` (seconds), else 5 s.

    Raises:
        ConfigError: a variable is missing or malformed.
    """
    url = os.environ.get("UPSTASH_REDIS_REST_URL", "")
    token = os.environ.get("UPSTASH_REDIS_REST_TOKEN", "")
    if not url or not token:
        raise ConfigError("set UPSTASH_REDIS_REST_URL and UPSTASH_REDIS_REST_TOKEN")
    if timeout is None:
        try:
            timeout = float(os.environ.get("REJOIN_UPSTASH_TIMEOUT", DEFAULT_TIMEOUT))
        except ValueError:
            raise ConfigError("REJOIN_UPSTASH_TIMEOUT must be a number of seconds") from None
    return upstash_client(
        url, token, timeout=timeout, retries=retries, retry_interval=retry_interval
    )


def store_client(
    url: str,
    token: str | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    retries: int = 1,
    retry_interval: float = 0.2,
) -> RedisClient:
    """Build the store client a URL names: the transport is chosen by its scheme.

    - ``https://`` (``http://`` locally): Upstash REST, with ``token``
      (:func:`upstash_client`).
    - ``redis://``, ``rediss://`` (TLS), ``unix://``, ``redis+cluster://``,
      ``rediss+cluster://``: Redis over TCP (:func:`rejoin.redis_tcp.redis_client`);
      the password, if any, is in the URL and ``token`` is not used.

    Either way the scripts, keys and guarantees are the same; only the wire differs.

    Args:
        url: the store URL.
        token: the Upstash REST token (Upstash only).
        timeout: seconds to wait for each request (and, over TCP, to connect).
        retries: how many times a request that failed in transit is retried.
        retry_interval: seconds between retries.

    Raises:
        ConfigError: unknown scheme, malformed URL, missing Upstash token, or a
            timeout that is not positive. Messages never show the password.
    """
    from .redis_tcp import TCP_SCHEMES, redis_client

    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in ("http", "https"):
        if not token:
            raise ConfigError("an Upstash REST URL (https://) needs its REST token")
        return upstash_client(
            url, token, timeout=timeout, retries=retries, retry_interval=retry_interval
        )
    if scheme in TCP_SCHEMES:
        return redis_client(url, timeout=timeout, retries=retries, retry_interval=retry_interval)
    raise ConfigError(
        "store URL must start with https:// (Upstash REST) or redis://, rediss://, unix://, "
        "redis+cluster://, rediss+cluster:// (Redis over TCP)"
    )
