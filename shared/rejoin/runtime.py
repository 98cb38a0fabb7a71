"""What a Lambda container shares between invocations, and how tests replace it.

Handlers are synchronous (Lambda calls them so); rejoin is async (the Agents
SDK is). Each thread keeps one event loop for its whole life, so the Upstash
client's HTTP connections survive from one invocation to the next instead of
a new TLS handshake per event.

Tests and the local stack install their own :class:`Runtime` with
:func:`set_runtime` (an in-memory sender and queue, an injected clock).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from .config import Settings
from .errors import ConfigError

if TYPE_CHECKING:
    from ._lua import RedisClient
    from .encryption import Encryption
    from .queue import TurnQueue
    from .rooms import RoomStore
    from .sender import ConnectionSender
    from .tokens import TokenVerifier

__all__ = ["Runtime", "get_runtime", "set_runtime"]

T = TypeVar("T")

# API Gateway closes idle connections after its idle timeout; a connection
# quiet for a minute longer than that has probably lost its $disconnect.
IDLE_MARGIN_SECONDS = 60


class Runtime:
    """Settings plus the clients built from them, created on first use.

    Args:
        settings: the configuration.
        clock: returns the time in seconds; injected in tests.
        sender: posts frames to connections; default: API Gateway's
            management API at ``settings.ws_endpoint`` (or the event's).
        queue: the turn queue; default: SQS at ``settings.turn_queue_url``.
        redis_factory: builds an Upstash client (one per event loop).
        agent_factory: builds the agent; the turn worker's default
            (:func:`rejoin.turns.build_agent`) when None.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
        sender: ConnectionSender | None = None,
        queue: TurnQueue | None = None,
        redis_factory: Callable[[], RedisClient] | None = None,
        agent_factory: Callable[[Runtime], Any] | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self._sender = sender
        self._queue = queue
        self._redis_factory = redis_factory
        self._local = threading.local()
        self._verifier: TokenVerifier | None = None
        self._cipher: Encryption | None = None
        self.agent_factory = agent_factory

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on this thread's long-lived event loop."""
        loop: asyncio.AbstractEventLoop | None = getattr(self._local, "loop", None)
        if loop is None or loop.is_closed():
            loop = asyncio.new_event_loop()
            self._local.loop = loop
        return loop.run_until_complete(coro)

    def bound(self) -> dict[str, Any]:
        # Clients (HTTP pools, locks) belong to the event loop that first used
        # them, and one thread may run several loops (Runtime.run's, Mangum's,
        # a test's): keep them per (thread, loop), rebuilt when the loop changes.
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = getattr(self._local, "loop", None)
        bound: dict[str, Any] | None = getattr(self._local, "bound", None)
        if bound is None or self._local.bound_loop is not loop:
            bound = self._local.bound = {}
            self._local.bound_loop = loop
        return bound

    def redis(self) -> RedisClient:
        """The store client of the running event loop (Upstash, or Redis over TCP)."""
        bound = self.bound()
        client: RedisClient | None = bound.get("redis")
        if client is None:
            if self._redis_factory is not None:
                client = self._redis_factory()
            elif url := self.settings.store_url:  # redis://, rediss://, ...: chosen by scheme
                from .client import store_client

                s = self.settings
                client = store_client(url, s.upstash_token, timeout=s.upstash_timeout)
            else:
                from .client import upstash_client

                s = self.settings
                if not s.upstash_url or not s.upstash_token:
                    raise ConfigError(
                        "Upstash is not configured: set REJOIN_UPSTASH_SECRET, or "
                        "UPSTASH_REDIS_REST_URL and UPSTASH_REDIS_REST_TOKEN"
                    )
                client = upstash_client(s.upstash_url, s.upstash_token, timeout=s.upstash_timeout)
            bound["redis"] = client
        return client

    def sender(self, request_context: dict[str, Any] | None = None) -> ConnectionSender:
        """The connection sender; on AWS built from the endpoint or the event."""
        if self._sender is None:
            from .sender import ApiGatewaySender

            endpoint = self.settings.ws_endpoint
            if endpoint is None and request_context:
                endpoint = f"https://{request_context['domainName']}/{request_context['stage']}"
            if endpoint is None:
                raise ConfigError("REJOIN_WS_ENDPOINT is not set")
            self._sender = ApiGatewaySender(endpoint_url=endpoint)
        return self._sender

    def queue(self) -> TurnQueue:
        """The turn queue."""
        if self._queue is None:
            from .queue import SqsTurnQueue

            if not self.settings.turn_queue_url:
                raise ConfigError("REJOIN_TURN_QUEUE_URL is not set")
            self._queue = SqsTurnQueue(self.settings.turn_queue_url)
        return self._queue

    def rooms(self) -> RoomStore:
        """The room store, configured by the settings, on this loop's client."""
        from ._lua import is_cluster
        from .rooms import RoomStore

        s = self.settings
        client = self.redis()
        return RoomStore(
            client,
            key_prefix=s.key_prefix,
            grace_seconds=s.grace_seconds,
            event_log_size=s.event_log_size,
            clock=self.clock,
            idle_seconds=s.idle_timeout_seconds + IDLE_MARGIN_SECONDS,
            rate_limit=s.rate_limit,
            rate_window_seconds=s.rate_window_seconds,
            revocation_seconds=s.token_max_ttl_seconds,
            # On a Redis Cluster the schedule index is in another slot than the
            # session's keys: it is updated by a second request there.
            index_in_script=not is_cluster(client),
            encryption=self._encryption(),
        )

    def _encryption(self) -> Encryption | None:
        keys = self.settings.encryption_keys
        if not keys:
            return None
        if self._cipher is None:
            from .encryption import Encryption

            self._cipher = Encryption(keys)
        return self._cipher

    def verifier(self) -> TokenVerifier:
        """The token verifier (HS256 secret, or a JWKS URL)."""
        if self._verifier is None:
            from .tokens import TokenVerifier

            s = self.settings
            if not s.token_secret and not s.jwks_url:
                raise ConfigError("set REJOIN_TOKEN_SECRET_NAME (or REJOIN_JWKS_URL)")
            self._verifier = TokenVerifier(
                secret=s.token_secret if not s.jwks_url else None,
                jwks_url=s.jwks_url,
                audience=s.token_audience,
                issuer=s.token_issuer,
                clock=self.clock,
                max_ttl_seconds=s.token_max_ttl_seconds,
                iat_leeway=s.token_iat_leeway_seconds,
            )
        return self._verifier


_lock = threading.Lock()
_current: Runtime | None = None


def get_runtime() -> Runtime:
    """The installed runtime, built from the environment on first use."""
    global _current
    with _lock:
        if _current is None:
            _current = Runtime(Settings.from_env())
        return _current


def set_runtime(runtime: Runtime | None) -> None:
    """Install a runtime (tests, local stack); ``None`` rebuilds from env next time."""
    global _current
    with _lock:
        _current = runtime
