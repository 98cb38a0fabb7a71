"""Lua scripts over Upstash: EVALSHA first, EVAL when the script is not cached.

Every script starts with ``#!lua flags=allow-key-locking`` so Upstash locks
only the keys it names (every key is passed in KEYS) instead of taking its
global script lock. Failures of the HTTP client are mapped here, in one place,
to :mod:`rejoin.errors`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any, Protocol

import httpx
from upstash_redis.errors import UpstashError

from .errors import SessionGone, StoreResponseError, StoreTimeout, StoreUnavailable

__all__ = ["RedisClient", "Script", "gone_reply"]

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
    """The two commands rejoin needs from an Upstash client.

    ``upstash_redis.asyncio.Redis`` satisfies it; so does any client with the
    same async ``eval``/``evalsha`` signatures.
    """

    async def eval(
        self, script: str, keys: list[str] | None = None, args: list[Any] | None = None
    ) -> Any: ...

    async def evalsha(
        self, sha1: str, keys: list[str] | None = None, args: list[Any] | None = None
    ) -> Any: ...


class Script:
    """A Lua script run with EVALSHA, falling back to EVAL on ``NOSCRIPT``.

    Args:
        name: a short name, used in error messages.
        body: the Lua source, without the flags line (added here) and without
            the shared prelude (prepended here).
    """

    def __init__(self, name: str, body: str) -> None:
        self.name = name
        self.source = HEADER + PRELUDE + body
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()

    async def __call__(self, redis: RedisClient, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run the script; one HTTP request once Upstash has it cached.

        Raises:
            SessionGone: the script's epoch guard failed.
            StoreTimeout: Upstash did not answer in time.
            StoreUnavailable: Upstash could not be reached or failed.
            StoreResponseError: Upstash or Redis refused the script.
        """
        keys_l, args_l = list(keys), [str(a) for a in args]
        try:
            try:
                return await redis.evalsha(self.sha, keys_l, args_l)
            except UpstashError as exc:
                if "NOSCRIPT" not in str(exc):
                    raise
            return await redis.eval(self.source, keys_l, args_l)
        except UpstashError as exc:
            message = str(exc)
            if _GONE in message:
                raise SessionGone(message.split(_GONE, 1)[1].strip()) from None
            raise StoreResponseError(f"script {self.name}: {message}") from exc
        except httpx.TimeoutException as exc:
            raise StoreTimeout(f"script {self.name}: Upstash did not answer in time") from exc
        except httpx.HTTPError as exc:
            raise StoreUnavailable(
                f"script {self.name}: Upstash unreachable ({type(exc).__name__})"
            ) from exc
        except json.JSONDecodeError as exc:
            # The client parses every answer as JSON; a proxy's 5xx page is not.
            raise StoreUnavailable(
                f"script {self.name}: Upstash answered with a server error"
            ) from exc
