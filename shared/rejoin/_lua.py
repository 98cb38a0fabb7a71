"""Lua scripts over either transport: EVALSHA first, EVAL when the script is not cached.

Every script is sent to Upstash with a first line ``#!lua
flags=allow-key-locking``, so Upstash locks only the keys it names (every key
is passed in KEYS) instead of taking its global script lock. Real Redis
refuses that flag, so over TCP (:mod:`rejoin.redis_tcp`) the same text is sent
with that first line left empty (so Lua's line numbers in errors match), under
its own sha. Failures of either client are mapped here, in one place, to
:mod:`rejoin.errors`.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from typing import Any, Protocol

import httpx
from upstash_redis.errors import UpstashError

from .errors import (
    SessionGone,
    StoreEventLoopError,
    StoreResponseError,
    StoreTimeout,
    StoreUnavailable,
)

__all__ = ["RedisClient", "Script", "gone_reply", "is_cluster", "is_upstash"]

HEADER = "#!lua flags=allow-key-locking\n"

# Scripts answer with this error prefix when the session's epoch guard fails.
_GONE = "REJOIN_GONE"

PRELUDE = f"""
local function gone(why)
  return redis.error_reply('{_GONE} ' .. why)
end
-- An epoch guard: writes made for an epoch of a room land only while that
-- epoch is live (not deleted, not replaced, grace deadline not passed).
-- A guard is '' (none), '<epoch>' or '<epoch>|<turn attempt>': a turn's writes
-- also need its lease, so a turn that lost its lease cannot interleave.
local function epoch_ok(meta, guard, now)
  if guard == '' then return true end
  local bar = string.find(guard, '|', 1, true)
  local epoch, attempt = guard, nil
  if bar then epoch, attempt = string.sub(guard, 1, bar - 1), string.sub(guard, bar + 1) end
  local m = redis.call('HMGET', meta, 'epoch', 'deadline', 'turn_attempt')
  if m[1] ~= epoch then return false end
  if m[2] and tonumber(m[2]) <= now then return false end
  if attempt and m[3] ~= attempt then return false end
  return true
end
local function slide(ttl, keys)
  if ttl > 0 then
    for _, k in ipairs(keys) do redis.call('PEXPIRE', k, ttl) end
  end
end
-- Idempotency: a write carries an operation id, recorded with the write (and,
-- where the answer matters, with its answer) for `keep` ms, so a retry of an
-- applied write (its answer lost) is recognised and answered as the first
-- try was. Retries come from the client while the caller still waits, so
-- `keep` only has to outlast the caller's timeout and retries.
local function seen(ops, op)
  return op ~= '' and redis.call('ZSCORE', ops, op) ~= false
end
local function remember(ops, results, op, now, keep, answer)
  if op == '' then return end
  redis.call('ZADD', ops, now, op)
  if answer then redis.call('HSET', results, op, answer) end
  local old = redis.call('ZRANGEBYSCORE', ops, '-inf', now - keep, 'LIMIT', 0, 100)
  if #old > 0 then
    redis.call('ZREM', ops, unpack(old))
    redis.call('HDEL', results, unpack(old))
  end
  redis.call('PEXPIRE', ops, keep)
  redis.call('PEXPIRE', results, keep)
end
-- An item is corrupt when it is not JSON, as the SDK's backends judge it.
-- cjson refuses lone UTF-16 surrogate escapes that Python's json accepts,
-- so those are neutralised before a second try (only on the failure path).
local function valid_json(raw)
  if pcall(cjson.decode, raw) then return true end
  local neutral, n = string.gsub(raw, '\\[uU][dD][89a-fA-F]%x%x', '\\u0020')
  return n > 0 and pcall(cjson.decode, neutral)
end
-- RPUSH in slices: Lua's unpack() is limited to a few thousand values.
local function push_all(key, argv, first)
  for i = first, #argv, 1000 do
    redis.call('RPUSH', key, unpack(argv, i, math.min(i + 999, #argv)))
  end
end
"""


def gone_reply() -> str:
    """The error prefix scripts use for a failed epoch guard (for tests)."""
    return _GONE


class RedisClient(Protocol):
    """The two commands rejoin needs from a store client.

    ``upstash_redis.asyncio.Redis`` satisfies it; so does
    :class:`rejoin.redis_tcp.TcpRedisClient` (redis.asyncio over TCP), and any
    client with the same async ``eval``/``evalsha`` signatures. A client that
    is not Upstash says so with an attribute ``is_upstash = False`` (see
    :func:`is_upstash`), and a Redis Cluster client with ``is_cluster = True``.
    """

    async def eval(
        self, script: str, keys: list[str] | None = None, args: list[Any] | None = None
    ) -> Any: ...

    async def evalsha(
        self, sha1: str, keys: list[str] | None = None, args: list[Any] | None = None
    ) -> Any: ...


def is_upstash(redis: object) -> bool:
    """Whether scripts go to Upstash (flagged source); True unless the client says not."""
    return bool(getattr(redis, "is_upstash", True))


def is_cluster(redis: object) -> bool:
    """Whether the client routes by hash slot (Redis Cluster): every key of one
    script call must then hash to one slot."""
    return bool(getattr(redis, "is_cluster", False))


def _sha(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


class Script:
    """A Lua script run with EVALSHA, falling back to EVAL on ``NOSCRIPT``.

    Args:
        name: a short name, used in error messages.
        body: the Lua source, without the flags line (added here) and without
            the shared prelude (prepended here).

    Attributes:
        source, sha: the text sent to Upstash (with the flags line) and its sha1.
        plain_source, plain_sha: the text sent to Redis over TCP (the flags line
            emptied, so line numbers match) and its sha1.
    """

    def __init__(self, name: str, body: str) -> None:
        self.name = name
        self.source = HEADER + PRELUDE + body
        self.sha = _sha(self.source)
        self.plain_source = "\n" + PRELUDE + body
        self.plain_sha = _sha(self.plain_source)

    async def __call__(self, redis: RedisClient, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run the script; one request (one round trip) once the server has it cached.

        Raises:
            SessionGone: the script's epoch guard failed.
            StoreTimeout: the store did not answer in time.
            StoreUnavailable: the store could not be reached or failed.
            StoreResponseError: the store refused the script.
        """
        keys_l, args_l = list(keys), [str(a) for a in args]
        upstash = is_upstash(redis)
        source, sha = (self.source, self.sha) if upstash else (self.plain_source, self.plain_sha)
        try:
            try:
                return await redis.evalsha(sha, keys_l, args_l)
            except Exception as exc:
                if not _is_noscript(exc):
                    raise
            return await redis.eval(source, keys_l, args_l)
        except Exception as exc:
            error = _store_error(self.name, exc) if upstash else _redis_error(self.name, exc)
            error = error or _loop_error(self.name, exc)
            if error is None:
                raise
            if isinstance(error, SessionGone):
                raise error from None
            raise error from exc


def _is_noscript(exc: Exception) -> bool:
    if isinstance(exc, UpstashError):
        return "NOSCRIPT" in str(exc)
    rx = sys.modules.get("redis.exceptions")
    return rx is not None and isinstance(exc, rx.NoScriptError)


def _gone(message: str) -> SessionGone | None:
    if _GONE in message:
        return SessionGone(message.split(_GONE, 1)[1].strip())
    return None


def _store_error(name: str, exc: Exception) -> Exception | None:
    """The rejoin error for a failure of the Upstash client (None: not a store failure)."""
    if isinstance(exc, UpstashError):
        message = str(exc)
        return _gone(message) or StoreResponseError(f"script {name}: {message}")
    if isinstance(exc, httpx.TimeoutException):
        return StoreTimeout(f"script {name}: Upstash did not answer in time")
    if isinstance(exc, httpx.HTTPError):
        return StoreUnavailable(f"script {name}: Upstash unreachable ({type(exc).__name__})")
    if isinstance(exc, json.JSONDecodeError):
        # The client parses every answer as JSON; a proxy's 5xx page is not.
        return StoreUnavailable(f"script {name}: Upstash answered with a server error")
    return None


_FOREIGN_LOOP = (
    "Event loop is closed",
    "attached to a different loop",
    "bound to a different event loop",
    "different event loop",
)


def _loop_error(name: str, exc: Exception) -> Exception | None:
    """A client used from an event loop (or thread) other than its own."""
    if isinstance(exc, RuntimeError) and any(m in str(exc) for m in _FOREIGN_LOOP):
        return StoreEventLoopError(
            f"script {name}: the store client belongs to another event loop (closed, or "
            "in another thread); build it with rejoin.upstash_client or rejoin.store_client, "
            "which keep one connection pool per event loop and thread"
        )
    return None


def _redis_error(name: str, exc: Exception) -> Exception | None:
    """The rejoin error for a failure of redis-py (None: not a store failure).

    redis-py is imported only by TCP deployments; any exception it raised
    means its module is loaded, so it is looked up, never imported, here.
    """
    rx = sys.modules.get("redis.exceptions")
    if rx is None or not isinstance(exc, (rx.RedisError, rx.RedisClusterException)):
        return None
    # Messages from redis-py name the host and port, never the password.
    message = str(exc) or type(exc).__name__
    if isinstance(exc, rx.ResponseError):
        gone = _gone(message)
        if gone is not None:
            return gone
        if isinstance(exc, (rx.ReadOnlyError, rx.ClusterDownError, rx.TryAgainError)):
            # A failover or resharding in progress: nothing ran; a retry may succeed.
            return StoreUnavailable(f"script {name}: Redis cannot run it now ({message})")
        return StoreResponseError(f"script {name}: {message}")
    if isinstance(exc, rx.TimeoutError):
        return StoreTimeout(f"script {name}: Redis did not answer in time")
    if isinstance(exc, (rx.AuthenticationError, rx.AuthorizationError)):
        return StoreResponseError(f"script {name}: Redis refused the credentials ({message})")
    if isinstance(exc, rx.ConnectionError):
        return StoreUnavailable(f"script {name}: Redis unreachable ({message})")
    if isinstance(exc, rx.SlotNotCoveredError):
        return StoreUnavailable(f"script {name}: Redis Cluster cannot serve the slot ({message})")
    if isinstance(exc, rx.RedisClusterException):
        cause = exc.__cause__
        if isinstance(cause, (rx.ConnectionError, rx.TimeoutError)):
            # No node of the cluster could be reached to learn its slots.
            return _redis_error(name, cause)
        # Otherwise raised before anything is sent, e.g. keys in two hash slots.
        return StoreResponseError(f"script {name}: {message}")
    return StoreUnavailable(f"script {name}: Redis failed ({type(exc).__name__}: {message})")
