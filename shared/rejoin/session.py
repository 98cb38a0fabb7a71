"""``UpstashSession``: the Agents SDK ``Session`` protocol over Upstash REST.

Each method is one Lua script, so one HTTP request (after Upstash has cached
the script) and atomic. Writes carry a fresh id that the script records, so
when ``upstash-redis`` retries a request whose answer was lost (it cannot
know whether the first try was applied) the retry changes nothing.

Storage: the items are a Redis list of JSON strings, oldest first, at
``<prefix>:{<session_id>}:items``; see :class:`rejoin.keys.SessionKeys`.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ._lua import RedisClient, Script
from .errors import StoreError, StoreUnavailable
from .keys import SessionKeys

if TYPE_CHECKING:
    from agents.items import TResponseInputItem
    from agents.memory import SessionSettings

__all__ = ["UpstashSession"]

# Upstash refuses requests over 10 MB; fail before sending, with a clear error.
MAX_REQUEST_BYTES = 10 * 1024 * 1024

# KEYS: items, ops, results, meta. ARGV: epoch, now_ms, ttl_ms, then per script.
_HEAD = """
local items, ops, results, meta = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now, ttl = tonumber(ARGV[2]), tonumber(ARGV[3])
if not epoch_ok(meta, ARGV[1], now) then return gone('session was deleted or replaced') end
-- Operation ids are kept 15 minutes, never longer than the session's own TTL.
local keep = 900000
if ttl > 0 and ttl < keep then keep = ttl end
"""

_GET = Script(
    "get_items",
    _HEAD
    + """
slide(ttl, {items, meta})
if ARGV[4] == '' then return redis.call('LRANGE', items, 0, -1) end
local limit = tonumber(ARGV[4])
if limit <= 0 then return {} end
return redis.call('LRANGE', items, -limit, -1)
""",
)

# Only when the latest `limit` entries held corrupt ones (rare): walk back from
# the newest, skipping them as the SDK's backends do, so `limit` counts valid
# items. Decoding in Lua costs Redis time, so the common path above skips it.
_GET_VALID = Script(
    "get_valid_items",
    _HEAD
    + """
local limit = tonumber(ARGV[4])
local newest_first, stop = {}, -1
while #newest_first < limit do
  local want = limit - #newest_first
  local chunk = redis.call('LRANGE', items, stop - want + 1, stop)
  for i = #chunk, 1, -1 do
    if valid_json(chunk[i]) then
      newest_first[#newest_first + 1] = chunk[i]
      if #newest_first == limit then break end
    end
  end
  if #chunk < want then break end
  stop = stop - want
end
local out = {}
for i = #newest_first, 1, -1 do out[#out + 1] = newest_first[i] end
return out
""",
)

_ADD = Script(
    "add_items",
    _HEAD
    + """
local op = ARGV[4]
if seen(ops, op) then return 0 end
push_all(items, ARGV, 5)
remember(ops, results, op, now, keep)
slide(ttl, {items, meta})
return 1
""",
)

_REPLACE = Script(
    "replace_items",
    _HEAD
    + """
local op = ARGV[4]
if seen(ops, op) then return 0 end
redis.call('DEL', items)
push_all(items, ARGV, 5)
remember(ops, results, op, now, keep)
slide(ttl, {items, meta})
return 1
""",
)

_POP = Script(
    "pop_item",
    _HEAD
    + """
local op = ARGV[4]
if seen(ops, op) then return redis.call('HGET', results, op) end
local found = false
while true do
  local raw = redis.call('RPOP', items)
  if not raw then break end
  if valid_json(raw) then found = raw; break end
end
remember(ops, results, op, now, keep, found)
slide(ttl, {items, meta})
return found
""",
)

_CLEAR = Script(
    "clear_session",
    _HEAD
    + """
local op = ARGV[4]
if seen(ops, op) then return 0 end
redis.call('DEL', items)
remember(ops, results, op, now, keep)
return 1
""",
)


# The prefix is replaced only if it is still there: the list is at least `cut`
# long and its item `cut - 1` is the one read (same JSON, however serialised).
_REPLACE_PREFIX = Script(
    "compact_prefix",
    _HEAD
    + """
local function deep_equal(a, b)
  if type(a) ~= type(b) then return false end
  if type(a) ~= 'table' then return a == b end
  for k, v in pairs(a) do
    if not deep_equal(v, b[k]) then return false end
  end
  for k in pairs(b) do
    if a[k] == nil then return false end
  end
  return true
end
local op = ARGV[4]
if seen(ops, op) then return 1 end
local cut = tonumber(ARGV[5])
if cut < 1 or redis.call('LLEN', items) < cut then return 0 end
local stored = redis.call('LINDEX', items, cut - 1)
if stored ~= ARGV[6] then
  local ok1, a = pcall(cjson.decode, stored)
  local ok2, b = pcall(cjson.decode, ARGV[6])
  if not (ok1 and ok2 and deep_equal(a, b)) then return 0 end
end
redis.call('LTRIM', items, cut, -1)
redis.call('LPUSH', items, ARGV[7])
remember(ops, results, op, now, keep)
slide(ttl, {items, meta})
return 1
""",
)


def _decode(raw: list[str] | None) -> list[TResponseInputItem]:
    items: list[TResponseInputItem] = []
    for entry in raw or []:
        try:
            items.append(json.loads(entry))
        except (json.JSONDecodeError, TypeError):
            continue  # corrupt entries are skipped, as the SDK's backends do
    return items


def _resolve_limit(explicit: int | None, settings: Any) -> int | None:
    # As the SDK's resolve_session_limit, without importing the SDK.
    if explicit is not None:
        return explicit
    if settings is None:
        return None
    limit = settings.get("limit") if isinstance(settings, Mapping) else settings.limit
    return None if limit is None else int(limit)


class UpstashSession:
    """An Agents SDK session stored in Upstash Redis over its REST API.

    Satisfies ``agents.memory.Session``: pass it to ``Runner.run(...,
    session=...)`` like the SDK's own backends.

    Args:
        session_id: 1-128 characters of ``A-Za-z0-9_-``.
        redis: a store client: :func:`rejoin.upstash_client` (Upstash
            REST, with a timeout) or :func:`rejoin.store_client`; both work
            from any event loop and thread. A bare
            ``upstash_redis.asyncio.Redis`` works too, on its first event
            loop only (elsewhere: :class:`~rejoin.errors.StoreEventLoopError`).
        key_prefix: prefix of every key (``<prefix>:{<id>}:items``).
        ttl_seconds: if set, every call pushes the session's expiry this far
            into the future (a sliding TTL).
        session_settings: ``SessionSettings`` (or a dict); its ``limit`` is
            used when ``get_items`` is called without one.
        epoch: if set, every call checks that the room's epoch is still this
            one and raises :class:`rejoin.errors.SessionGone` otherwise, so a
            late write never lands in a deleted or replaced session.
        turn_attempt: with ``epoch``: also require that this attempt still
            holds the session's turn lease (the turn worker sets it).
        clock: returns the time in seconds (injected in tests).

    Raises:
        InvalidSessionId: the session id is malformed (before any key is built).
    """

    def __init__(
        self,
        session_id: str,
        *,
        redis: RedisClient,
        key_prefix: str = "rejoin",
        ttl_seconds: int | None = None,
        session_settings: SessionSettings | dict[str, Any] | None = None,
        epoch: str | None = None,
        turn_attempt: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.keys = SessionKeys(key_prefix, session_id)
        self.session_id = session_id
        self._settings: Any = session_settings
        if ttl_seconds is not None and ttl_seconds <= 0:
            raise ValueError("ttl_seconds must be positive (or None for no expiry)")
        self._ttl_ms = 0 if ttl_seconds is None else int(ttl_seconds * 1000)
        self._redis = redis
        if turn_attempt and not epoch:
            raise ValueError("turn_attempt needs an epoch")
        self._guard = f"{epoch}|{turn_attempt}" if turn_attempt else (epoch or "")
        self._clock = clock
        self._owns_client = False
        # (what, operation id) of the last write whose outcome is unknown.
        self._unsettled: tuple[str, str] | None = None

    @property
    def session_settings(self) -> SessionSettings:
        """The settings the SDK reads (``limit``); ``SessionSettings()`` by default.

        Built on first read: importing the SDK costs a cold start, and only the
        code that runs the agent reads them.
        """
        from agents.memory.session_settings import SessionSettings, coerce_session_settings

        if self._settings is None:
            self._settings = SessionSettings()
        elif isinstance(self._settings, dict):
            self._settings = coerce_session_settings(self._settings)
        settings: SessionSettings = self._settings
        return settings

    @session_settings.setter
    def session_settings(self, value: SessionSettings | dict[str, Any] | None) -> None:
        self._settings = value

    @classmethod
    def from_env(
        cls, session_id: str, *, timeout: float | None = None, **kwargs: Any
    ) -> UpstashSession:
        """Build a session on a client configured from the environment.

        Reads ``UPSTASH_REDIS_REST_URL`` and ``UPSTASH_REDIS_REST_TOKEN``; the
        request timeout is ``timeout`` seconds, else ``REJOIN_UPSTASH_TIMEOUT``,
        else 5. Other keyword arguments go to the constructor. Call
        :meth:`close` when done: the session owns this client.

        Raises:
            ConfigError: a variable is missing or malformed.
        """
        from .client import upstash_client_from_env

        session = cls(session_id, redis=upstash_client_from_env(timeout=timeout), **kwargs)
        session._owns_client = True
        return session

    def __repr__(self) -> str:
        return f"UpstashSession(session_id={self.session_id!r}, prefix={self.keys.prefix!r})"

    async def _run(self, script: Script, *extra: Any) -> Any:
        now_ms = int(self._clock() * 1000)
        return await script(
            self._redis, self.keys.store, (self._guard, now_ms, self._ttl_ms, *extra)
        )

    async def get_items(self, limit: int | None = None) -> list[TResponseInputItem]:
        """Return the history, or its latest ``limit`` items, oldest first.

        Args:
            limit: how many of the latest items to return; ``None`` uses
                ``session_settings.limit``, and if that is unset too, returns
                every item. ``0`` (or less) returns ``[]``.
        """
        resolved = _resolve_limit(limit, self._settings)
        if resolved is not None and resolved <= 0:
            return []
        raw = await self._run(_GET, "" if resolved is None else resolved)
        items = _decode(raw)
        if resolved is not None and len(items) < len(raw) == resolved:
            # Corrupt entries among the latest: fetch further back (rare).
            items = _decode(await self._run(_GET_VALID, resolved))
        return items

    async def add_items(self, items: list[TResponseInputItem]) -> None:
        """Append ``items`` in order, atomically; an empty list does nothing.

        Raises:
            StoreUnavailable: the outcome is unknown (applied whole or not at
                all). Call ``add_items`` again with the same items: the call
                reuses the operation id, so the items are stored exactly once.
        """
        if not items:
            return
        payload = self._serialize(items)
        await self._write(_ADD, "add", payload)

    async def pop_item(self) -> TResponseInputItem | None:
        """Remove and return the latest item, or ``None`` if there is none.

        Raises:
            StoreUnavailable: the outcome is unknown; calling ``pop_item`` again
                returns the item the first call removed, if it did.
        """
        raw = await self._write(_POP, "pop", [])
        return None if raw is None else json.loads(raw)

    async def clear_session(self) -> None:
        """Delete every item of the session."""
        await self._write(_CLEAR, "clear", [])

    async def _atomic_replace_items(self, items: list[TResponseInputItem]) -> bool:
        """Replace the whole history in one atomic script.

        The SDK's compaction session calls this hook (when present) instead of
        clear-then-add, so compaction never leaves an empty or half history.
        """
        await self._write(_REPLACE, "replace", self._serialize(items))
        return True

    async def _atomic_replace_prefix(self, cut: int, boundary: str, item: str) -> bool:
        """Replace the first ``cut`` items by ``item``, if they are still there.

        Compaction's write: messages appended meanwhile are kept; if the
        stored item ``cut - 1`` is no longer ``boundary`` (the same JSON, or
        the same raw text), nothing is written and False is returned.

        Args:
            cut: how many items, from the first, are replaced.
            boundary: item ``cut - 1`` as it was read (JSON).
            item: the replacement (JSON), e.g. a summary item.
        """
        return bool(await self._write(_REPLACE_PREFIX, "prefix", [str(cut), boundary, item]))

    async def _write(self, script: Script, what: str, payload: list[str]) -> Any:
        # A write whose answer was lost may have been applied. The same write
        # asked for again right after reuses its operation id, so it lands once.
        fingerprint = what + ":" + hashlib.sha256("\0".join(payload).encode()).hexdigest()
        pending = self._unsettled
        op = pending[1] if pending and pending[0] == fingerprint else uuid.uuid4().hex
        try:
            result = await self._run(script, op, *payload)
        except StoreUnavailable:
            self._unsettled = (fingerprint, op)
            raise
        except BaseException:
            self._unsettled = None
            raise
        self._unsettled = None
        return result

    async def close(self) -> None:
        """Close the client if this session created it (``from_env``)."""
        if self._owns_client:
            close = getattr(self._redis, "close", None)
            if close is not None:
                await close()

    @staticmethod
    def _serialize(items: list[TResponseInputItem]) -> list[str]:
        # ASCII-only JSON, as the SDK's RedisSession stores it: lone surrogates
        # and every code point round-trip exactly through HTTP and Lua.
        out = [json.dumps(item, separators=(",", ":")) for item in items]
        if sum(len(s) for s in out) > MAX_REQUEST_BYTES:
            raise StoreError(
                "items exceed Upstash's 10 MB request limit; add them in smaller batches"
            )
        return out
