"""Room state: connections, participants, presence, grace, the event log, turns.

Every transition is one Lua script over the session's hash-tagged keys (plus
the two global indexes below), so it is atomic and costs one Upstash request.
Time comes from the injected clock and is passed to the scripts, so the
two-minute grace is testable in milliseconds.

Global keys (outside any session's hash tag, named in KEYS like every key):

* ``<prefix>:grace`` - sorted set of sessions in grace, scored by deadline
  (ms). The cleanup reads it in batches instead of scanning the database.
* ``<prefix>:activity`` - sorted set of connection ids, scored by their last
  activity (ms). A connection whose ``$disconnect`` was lost stops moving
  here, so the cleanup finds it.
* ``<prefix>:conn:<connection id>`` - the session a connection belongs to
  (events other than ``$connect`` carry only the connection id).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ._lua import RedisClient, Script
from .errors import NotInSession, NotJoined, RoomError
from .keys import SessionKeys

__all__ = [
    "Departure",
    "Joined",
    "RoomStore",
    "Said",
    "SweepOutcome",
    "TurnStart",
    "new_epoch",
]

_PRELUDE = """
local function decode_or_nil(raw)
  if not raw then return nil end
  return cjson.decode(raw)
end
-- Appends an event with the next sequence number; returns its JSON.
local function append_event(meta, events, ev, cap)
  ev.seq = redis.call('HINCRBY', meta, 'seq', 1)
  local raw = cjson.encode(ev)
  redis.call('RPUSH', events, raw)
  redis.call('LTRIM', events, -cap, -1)
  return raw
end
-- Connections that asked to receive events (sent `resume`).
local function ready_conns(conns, except)
  local out = {}
  local all = redis.call('HGETALL', conns)
  for i = 1, #all, 2 do
    if all[i] ~= except and cjson.decode(all[i + 1]).ready == 1 then
      out[#out + 1] = all[i]
    end
  end
  return out
end
-- Removes one connection; returns its record and a presence event (or false).
local function drop_conn(conns, users, meta, events, conn, left, now, cap)
  local rec = decode_or_nil(redis.call('HGET', conns, conn))
  if not rec then return nil, false end
  redis.call('HDEL', conns, conn)
  local p = decode_or_nil(redis.call('HGET', users, rec.user))
  if not p then return rec, false end
  p.conns = math.max(0, p.conns - 1)
  local ev = false
  if p.conns == 0 then
    local status = left and 'left' or 'away'
    if p.status ~= status then
      p.status = status
      ev = append_event(meta, events,
        {type = 'presence', user = rec.user, name = p.name, status = status, ts = now}, cap)
    end
  end
  redis.call('HSET', users, rec.user, cjson.encode(p))
  return rec, ev
end
-- Starts grace when the last connection is gone.
local function maybe_grace(conns, meta, grace, sid, now, grace_ms)
  if redis.call('HLEN', conns) > 0 then return false end
  local deadline = now + grace_ms
  redis.call('HSET', meta, 'deadline', deadline)
  redis.call('ZADD', grace, deadline, sid)
  return deadline
end
"""

# KEYS: the seven session keys (SessionKeys.all order), grace, activity, conn.
_SESSION_KEYS = """
local items, ops, results, meta, conns, users, events =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
"""

_CONNECT = Script(
    "connect",
    _PRELUDE
    + _SESSION_KEYS
    + """
local grace, activity, connkey = KEYS[8], KEYS[9], KEYS[10]
local now, sid, new_epoch, conn = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4]
local user, name, mode, cap, conn_ttl = ARGV[5], ARGV[6], ARGV[7], tonumber(ARGV[8]), ARGV[9]
local previous = redis.call('GET', connkey)
local m = redis.call('HMGET', meta, 'epoch', 'deadline', 'joined')
local fresh = false
if not m[1] then
  fresh = true
elseif m[2] and tonumber(m[2]) <= now then
  -- Expired but not swept yet: the old session is unreachable from its deadline on.
  redis.call('DEL', items, ops, results, meta, conns, users, events)
  fresh = true
end
if fresh then
  redis.call('HSET', meta, 'epoch', new_epoch, 'created', now, 'seq', 0, 'mode', mode)
  m[3] = false
elseif m[2] then
  redis.call('HDEL', meta, 'deadline')
end
redis.call('ZREM', grace, sid)
redis.call('HSET', meta, 'joined', 1)
-- A connection id seen again (API Gateway reuses nothing, but a lost
-- $disconnect can leave a record behind): drop the old record first.
drop_conn(conns, users, meta, events, conn, false, now, cap)
redis.call('HSET', conns, conn, cjson.encode({user = user, name = name, ready = 0, at = now,
  resumed = (m[3] == '1') and 1 or 0}))
redis.call('ZADD', activity, now, conn)
redis.call('SET', connkey, sid .. ' ' .. user, 'PX', conn_ttl)
local p = decode_or_nil(redis.call('HGET', users, user)) or {status = 'new', conns = 0}
local ev = false
p.conns = p.conns + 1
p.name = name
if p.status ~= 'active' then
  p.status = 'active'
  ev = append_event(meta, events,
    {type = 'presence', user = user, name = name, status = 'active', ts = now}, cap)
end
redis.call('HSET', users, user, cjson.encode(p))
local epoch = redis.call('HGET', meta, 'epoch')
return {epoch, (m[3] == '1') and 1 or 0, ev, ready_conns(conns, conn), previous,
  (not fresh and m[2]) and 1 or 0}
""",
)

_RESUME = Script(
    "resume",
    _PRELUDE
    + _SESSION_KEYS
    + """
local activity = KEYS[8]
local now, conn, epoch, last_seq = tonumber(ARGV[1]), ARGV[2], ARGV[3], tonumber(ARGV[4])
local rec = decode_or_nil(redis.call('HGET', conns, conn))
if not rec then return false end
local m = redis.call('HMGET', meta, 'epoch', 'seq', 'mode')
local seq = tonumber(m[2])
local first = seq - redis.call('LLEN', events) + 1
local recovered, evs = 0, {}
if epoch == m[1] and last_seq >= first - 1 and last_seq <= seq then
  recovered = 1
  evs = redis.call('LRANGE', events, last_seq - first + 1, -1)
else
  evs = redis.call('LRANGE', events, 0, -1)
end
rec.ready = 1
redis.call('HSET', conns, conn, cjson.encode(rec))
redis.call('ZADD', activity, now, conn)
return {m[1], seq, recovered, evs, redis.call('HGETALL', users), m[3], cjson.encode(rec)}
""",
)

_SAY = Script(
    "say",
    _PRELUDE
    + _SESSION_KEYS
    + """
local activity = KEYS[8]
local now, conn, id, text, cap = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local rec = decode_or_nil(redis.call('HGET', conns, conn))
if not rec then return {-2} end
if rec.ready ~= 1 then return {-1} end
redis.call('ZADD', activity, now, conn)
local m = redis.call('HMGET', meta, 'epoch', 'mode', 'm:' .. id)
if m[3] then return {0, tonumber(m[3]), false, {}, m[1], m[2], cjson.encode(rec)} end
local ev = append_event(meta, events,
  {type = 'message', id = id, user = rec.user, name = rec.name, text = text, ts = now}, cap)
local seq = redis.call('HGET', meta, 'seq')
-- Message ids live as long as the session: a resent message is a no-op.
redis.call('HSET', meta, 'm:' .. id, seq)
return {1, tonumber(seq), ev, ready_conns(conns, ''), m[1], m[2], cjson.encode(rec)}
""",
)

_TOUCH = Script(
    "touch",
    """
local conns, activity, conn, now = KEYS[1], KEYS[2], ARGV[1], ARGV[2]
if redis.call('HEXISTS', conns, conn) == 0 then return 0 end
redis.call('ZADD', activity, now, conn)
return 1
""",
)

_DISCONNECT = Script(
    "disconnect",
    _PRELUDE
    + _SESSION_KEYS
    + """
local grace, activity, connkey = KEYS[8], KEYS[9], KEYS[10]
local now, sid, conn, left = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4] == '1'
local grace_ms, cap = tonumber(ARGV[5]), tonumber(ARGV[6])
-- The id may have moved to another session since (a reused id): leave that alone.
local owner = redis.call('GET', connkey)
if not owner or string.sub(owner, 1, #sid + 1) == sid .. ' ' then
  redis.call('ZREM', activity, conn)
  redis.call('DEL', connkey)
end
local rec, ev = drop_conn(conns, users, meta, events, conn, left, now, cap)
if not rec then return {0} end
local deadline = maybe_grace(conns, meta, grace, sid, now, grace_ms)
return {1, ev, ready_conns(conns, ''), deadline, rec.user}
""",
)

_SWEEP = Script(
    "sweep",
    _SESSION_KEYS
    + """
local grace, now, sid = KEYS[8], tonumber(ARGV[1]), ARGV[2]
local m = redis.call('HMGET', meta, 'epoch', 'deadline')
if not m[1] then redis.call('ZREM', grace, sid); return 0 end
if not m[2] or redis.call('HLEN', conns) > 0 then
  -- Resumed since it was indexed: never delete it.
  redis.call('ZREM', grace, sid)
  return -1
end
if tonumber(m[2]) > now then
  redis.call('ZADD', grace, m[2], sid)
  return -2
end
redis.call('DEL', items, ops, results, meta, conns, users, events)
redis.call('ZREM', grace, sid)
return 1
""",
)

_STATUS = Script(
    "status",
    _SESSION_KEYS
    + """
local now, with_events = tonumber(ARGV[1]), ARGV[2] == '1'
local m = redis.call('HMGET', meta, 'epoch', 'deadline', 'created', 'mode', 'seq')
if not m[1] or (m[2] and tonumber(m[2]) <= now) then return false end
local evs = {}
if with_events then evs = redis.call('LRANGE', events, 0, -1) end
return {m[1], m[2], m[3], m[4], m[5], redis.call('HLEN', conns), redis.call('HGETALL', users), evs}
""",
)

_CREATE = Script(
    "create",
    _SESSION_KEYS
    + """
local grace = KEYS[8]
local now, sid, epoch, mode, deadline = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local m = redis.call('HMGET', meta, 'epoch', 'deadline')
if m[1] and not (m[2] and tonumber(m[2]) <= now) then return {m[1], 0} end
redis.call('DEL', items, ops, results, meta, conns, users, events)
-- Nobody is connected yet: the session waits one grace period for its first join.
redis.call('HSET', meta, 'epoch', epoch, 'created', now, 'seq', 0, 'mode', mode,
  'deadline', deadline)
redis.call('ZADD', grace, deadline, sid)
return {epoch, 1}
""",
)

_END = Script(
    "end",
    _SESSION_KEYS
    + """
local grace, sid = KEYS[8], ARGV[1]
local conn_ids = redis.call('HKEYS', conns)
local existed = redis.call('EXISTS', meta)
redis.call('DEL', items, ops, results, meta, conns, users, events)
redis.call('ZREM', grace, sid)
return {existed, conn_ids}
""",
)

_RECIPIENTS = Script(
    "recipients",
    _PRELUDE
    + """
local meta, conns, epoch = KEYS[1], KEYS[2], ARGV[1]
if redis.call('HGET', meta, 'epoch') ~= epoch then return {} end
return ready_conns(conns, '')
""",
)

# Turns. KEYS: the seven session keys. ARGV[1] is the guard '<epoch>'.
_BEGIN_TURN = Script(
    "begin_turn",
    _SESSION_KEYS
    + """
local now, turn, attempt, lease = tonumber(ARGV[2]), ARGV[3], ARGV[4], tonumber(ARGV[5])
if not epoch_ok(meta, ARGV[1], now) then return gone('session was deleted or replaced') end
if redis.call('HEXISTS', meta, 't:' .. turn) == 1 then return {0} end
local h = redis.call('HMGET', meta, 'turn', 'turn_until', 'turn_start')
if h[1] and tonumber(h[2]) > now then return {2, h[1]} end
if h[3] then
  -- A turn that never committed (crashed, timed out) left writes: undo them.
  local start = tonumber(h[3])
  if start == 0 then redis.call('DEL', items) else redis.call('LTRIM', items, 0, start - 1) end
end
local start = redis.call('LLEN', items)
redis.call('HSET', meta, 'turn', turn, 'turn_attempt', attempt, 'turn_until', now + lease,
  'turn_start', start)
return {1, start}
""",
)

_COMMIT_TURN = Script(
    "commit_turn",
    _PRELUDE
    + _SESSION_KEYS
    + """
local now, turn, attempt = tonumber(ARGV[2]), ARGV[3], ARGV[4]
local text, cap = ARGV[5], tonumber(ARGV[6])
if not epoch_ok(meta, ARGV[1], now) then return gone('session was deleted or replaced') end
if redis.call('HEXISTS', meta, 't:' .. turn) == 1 then return {0, false, {}} end
if redis.call('HGET', meta, 'turn_attempt') ~= attempt then return gone('turn lease lost') end
local ev = false
if text ~= '' then
  ev = append_event(meta, events, {type = 'agent_message', turn = turn, text = text, ts = now}, cap)
end
redis.call('HSET', meta, 't:' .. turn, 1)
redis.call('HDEL', meta, 'turn', 'turn_attempt', 'turn_until', 'turn_start')
return {1, ev, ready_conns(conns, '')}
""",
)

_ROLLBACK_TURN = Script(
    "rollback_turn",
    _PRELUDE
    + _SESSION_KEYS
    + """
local attempt = ARGV[2]
local h = redis.call('HMGET', meta, 'epoch', 'turn_attempt', 'turn_start')
if h[1] ~= ARGV[1] or h[2] ~= attempt then return {0, {}} end
local start = tonumber(h[3])
if start == 0 then redis.call('DEL', items) else redis.call('LTRIM', items, 0, start - 1) end
redis.call('HDEL', meta, 'turn', 'turn_attempt', 'turn_until', 'turn_start')
return {1, ready_conns(conns, '')}
""",
)

# Single commands, as scripts too: one client Protocol (eval/evalsha) and one
# place where Upstash failures become rejoin errors.
_LOOKUP = Script("lookup", "return redis.call('GET', KEYS[1])")
_DUE = Script(
    "due",
    "return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))",
)
_MARK_ALIVE = Script("mark_alive", "return redis.call('ZADD', KEYS[1], 'XX', ARGV[1], ARGV[2])")
_FORGET = Script("forget", "return redis.call('ZREM', KEYS[1], ARGV[1])")


@dataclass(frozen=True)
class Joined:
    """The outcome of a ``$connect``.

    Attributes:
        epoch: the session's epoch (new if the session is fresh).
        resumed: the session existed and had been joined before.
        event: the presence event logged (the participant became active).
        recipients: ready connections (other than this one) to broadcast to.
        from_grace: this connection brought the session back from its grace
            period (nobody was connected).
        stale_session: another session this connection id was still recorded
            in (its ``$disconnect`` was lost); the caller removes it there.
    """

    epoch: str
    resumed: bool
    event: dict[str, Any] | None
    recipients: list[str]
    stale_session: str | None = None
    from_grace: bool = False


@dataclass(frozen=True)
class Said:
    """The outcome of a ``say``.

    Attributes:
        duplicate: the message id was seen before; nothing was logged.
        seq: the message's sequence number (the original one if duplicate).
        event: the logged message event (``None`` if duplicate).
        recipients: ready connections to broadcast to (the sender included).
        epoch: the session's epoch.
        mode: the session's reply mode.
        user: the sender's user id; name: the sender's display name.
    """

    duplicate: bool
    seq: int
    event: dict[str, Any] | None
    recipients: list[str]
    epoch: str
    mode: str
    user: str
    name: str


@dataclass(frozen=True)
class Departure:
    """The outcome of a ``$disconnect`` or ``leave``.

    Attributes:
        event: the presence event logged (away or left), if presence changed.
        recipients: ready connections still in the session.
        grace_deadline: ms timestamp if this was the last connection.
        user: the departed participant's user id.
    """

    event: dict[str, Any] | None
    recipients: list[str]
    grace_deadline: int | None
    user: str


@dataclass(frozen=True)
class TurnStart:
    """The outcome of :meth:`RoomStore.begin_turn`.

    Attributes:
        state: ``started``, ``done`` (already committed: skip), or ``busy``
            (another turn of the session holds the lease: retry later).
        history_length: items in the history when the turn started.
    """

    state: Literal["started", "done", "busy"]
    history_length: int = 0


@dataclass(frozen=True)
class SweepOutcome:
    """What one pass of expiry did to one session."""

    session_id: str
    deleted: bool
    reason: Literal["deleted", "resumed", "not_due", "missing"]


def _events(raw: Sequence[str] | None) -> list[dict[str, Any]]:
    return [json.loads(r) for r in raw or []]


def _pairs(flat: Sequence[str]) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def new_epoch() -> str:
    """A fresh, unguessable epoch id."""
    return secrets.token_urlsafe(9)


class RoomStore:
    """Room state for every session, in Upstash.

    Args:
        redis: an Upstash client (see :func:`rejoin.upstash_client`).
        key_prefix: prefix of every key.
        grace_seconds: how long a session outlives its last connection.
        event_log_size: how many events are kept for replay.
        clock: returns the time in seconds (injected in tests).
        connection_ttl_seconds: how long a connection-to-session mapping
            lives (API Gateway closes connections after 2 h).
        clock_skew_seconds: the cleanup deletes a session only this long
            after its deadline. Lambdas' clocks differ slightly; without the
            margin a cleanup whose clock runs ahead could delete a session
            that a reconnect (whose clock says "before the deadline") is
            resuming at that very moment.
    """

    def __init__(
        self,
        redis: RedisClient,
        *,
        key_prefix: str = "rejoin",
        grace_seconds: float = 120,
        event_log_size: int = 500,
        clock: Callable[[], float] = time.time,
        connection_ttl_seconds: int = 3 * 3600,
        clock_skew_seconds: float = 2.0,
    ) -> None:
        self.redis = redis
        self.prefix = key_prefix
        self.grace_ms = int(grace_seconds * 1000)
        self.cap = event_log_size
        self.clock = clock
        self.conn_ttl_ms = connection_ttl_seconds * 1000
        self.skew_ms = int(clock_skew_seconds * 1000)
        self.grace_key = f"{key_prefix}:grace"
        self.activity_key = f"{key_prefix}:activity"

    def now_ms(self) -> int:
        """The injected clock's time in milliseconds."""
        return int(self.clock() * 1000)

    def keys(self, session_id: str) -> SessionKeys:
        """The keys of one session (validates the id)."""
        return SessionKeys(self.prefix, session_id)

    def _conn_key(self, connection_id: str) -> str:
        if not connection_id or len(connection_id) > 128:
            raise RoomError("invalid connection id")
        return f"{self.prefix}:conn:{connection_id}"

    # --- connections --------------------------------------------------------

    async def lookup(self, connection_id: str) -> tuple[str, str] | None:
        """The (session id, user id) of a connection, or ``None``."""
        raw = await _LOOKUP(self.redis, (self._conn_key(connection_id),), ())
        if raw is None:
            return None
        session_id, _, user_id = str(raw).partition(" ")
        return session_id, user_id

    async def connect(
        self, session_id: str, connection_id: str, user_id: str, name: str, *, mode: str
    ) -> Joined:
        """Add a connection; create or resume the session as its lifecycle says."""
        keys = self.keys(session_id)
        epoch, resumed, event, recipients, previous, from_grace = await _CONNECT(
            self.redis,
            (*keys.all, self.grace_key, self.activity_key, self._conn_key(connection_id)),
            (
                self.now_ms(),
                session_id,
                new_epoch(),
                connection_id,
                user_id,
                name,
                mode,
                self.cap,
                self.conn_ttl_ms,
            ),
        )
        prev_sid = str(previous).split(" ", 1)[0] if previous else None
        return Joined(
            epoch=str(epoch),
            resumed=bool(resumed),
            event=json.loads(event) if event else None,
            recipients=list(recipients or []),
            stale_session=prev_sid if prev_sid and prev_sid != session_id else None,
            from_grace=bool(from_grace),
        )

    async def resume(
        self, session_id: str, connection_id: str, epoch: str | None, last_seq: int
    ) -> dict[str, Any]:
        """Mark a connection ready and build its ``welcome`` frame.

        Raises:
            NotInSession: the connection is not in this session.
        """
        keys = self.keys(session_id)
        reply = await _RESUME(
            self.redis,
            (*keys.all, self.activity_key),
            (self.now_ms(), connection_id, epoch or "", last_seq),
        )
        if not reply:
            raise NotInSession("this connection is not part of the session")
        cur_epoch, seq, recovered, raw_events, users, mode, rec = reply
        me = json.loads(rec)
        events = _events(raw_events)
        return {
            "type": "welcome",
            "session": session_id,
            "epoch": cur_epoch,
            "resumed": bool(me.get("resumed")),
            "recovered": bool(recovered),
            "seq": int(seq),
            "you": {"user": me["user"], "name": me["name"], "connection": connection_id},
            "participants": _participants(users),
            "mode": mode,
            "grace_seconds": self.grace_ms // 1000,
            "events": events if recovered else [],
            "transcript": None if recovered else events,
        }

    async def say(self, session_id: str, connection_id: str, message_id: str, text: str) -> Said:
        """Log a participant's message (a repeated ``message_id`` is a no-op).

        Raises:
            NotInSession: the connection is not in this session.
            NotJoined: the connection has not sent ``resume`` yet.
        """
        keys = self.keys(session_id)
        reply = await _SAY(
            self.redis,
            (*keys.all, self.activity_key),
            (self.now_ms(), connection_id, message_id, text, self.cap),
        )
        if int(reply[0]) == -2:
            raise NotInSession("this connection is not part of the session")
        if int(reply[0]) == -1:
            raise NotJoined("send resume before say")
        status, seq, event, recipients, epoch, mode, rec = reply
        me = json.loads(rec)
        return Said(
            duplicate=int(status) == 0,
            seq=int(seq),
            event=json.loads(event) if event else None,
            recipients=list(recipients or []),
            epoch=str(epoch),
            mode=str(mode),
            user=me["user"],
            name=me["name"],
        )

    async def touch(self, session_id: str, connection_id: str) -> bool:
        """Record activity of a connection (``ping``); False if it is not there."""
        keys = self.keys(session_id)
        done = await _TOUCH(
            self.redis, (keys.connections, self.activity_key), (connection_id, self.now_ms())
        )
        return bool(done)

    async def disconnect(
        self, session_id: str, connection_id: str, *, left: bool = False
    ) -> Departure | None:
        """Remove a connection; start grace if it was the last one.

        Idempotent: a second call (a retried or duplicated ``$disconnect``)
        returns ``None`` and changes nothing.
        """
        keys = self.keys(session_id)
        reply = await _DISCONNECT(
            self.redis,
            (*keys.all, self.grace_key, self.activity_key, self._conn_key(connection_id)),
            (self.now_ms(), session_id, connection_id, int(left), self.grace_ms, self.cap),
        )
        if int(reply[0]) == 0:
            return None
        _, event, recipients, deadline, user = reply
        return Departure(
            event=json.loads(event) if event else None,
            recipients=list(recipients or []),
            grace_deadline=int(deadline) if deadline else None,
            user=str(user),
        )

    async def recipients(self, session_id: str, epoch: str) -> list[str]:
        """Ready connections of the session, if it is still at ``epoch``."""
        keys = self.keys(session_id)
        return list(await _RECIPIENTS(self.redis, (keys.meta, keys.connections), (epoch,)) or [])

    # --- sessions -----------------------------------------------------------

    async def create(self, session_id: str, *, mode: str) -> tuple[str, bool]:
        """Create a session before anyone joins; returns (epoch, created).

        A live session is left as it is (``created`` is False). A created
        session waits one grace period for its first connection.
        """
        keys = self.keys(session_id)
        now = self.now_ms()
        epoch, created = await _CREATE(
            self.redis,
            (*keys.all, self.grace_key),
            (now, session_id, new_epoch(), mode, now + self.grace_ms),
        )
        return str(epoch), bool(created)

    async def status(self, session_id: str, *, with_events: bool = False) -> dict[str, Any] | None:
        """The session's state, or ``None`` if it does not exist or expired."""
        keys = self.keys(session_id)
        reply = await _STATUS(self.redis, keys.all, (self.now_ms(), int(with_events)))
        if not reply:
            return None
        epoch, deadline, created, mode, seq, n_conns, users, raw_events = reply
        out: dict[str, Any] = {
            "session": session_id,
            "epoch": epoch,
            "state": "active" if int(n_conns) > 0 else "grace",
            "connections": int(n_conns),
            "grace_deadline_ms": int(deadline) if deadline else None,
            "created_ms": int(created),
            "mode": mode,
            "seq": int(seq),
            "participants": _participants(users),
        }
        if with_events:
            out["events"] = _events(raw_events)
        return out

    async def end(self, session_id: str) -> list[str] | None:
        """Delete a session now; returns its connection ids (``None`` if none)."""
        keys = self.keys(session_id)
        existed, conn_ids = await _END(self.redis, (*keys.all, self.grace_key), (session_id,))
        return list(conn_ids or []) if int(existed) else None

    async def due_for_expiry(self, limit: int = 100) -> list[str]:
        """Sessions whose grace deadline has passed, oldest first."""
        due = self.now_ms() - self.skew_ms
        ids = await _DUE(self.redis, (self.grace_key,), (due, limit))
        return [str(i) for i in ids or []]

    async def sweep(self, session_id: str) -> SweepOutcome:
        """Delete one session if its deadline passed and nobody came back."""
        keys = self.keys(session_id)
        due = self.now_ms() - self.skew_ms
        code = int(await _SWEEP(self.redis, (*keys.all, self.grace_key), (due, session_id)))
        reason: dict[int, Literal["deleted", "resumed", "not_due", "missing"]] = {
            1: "deleted",
            -1: "resumed",
            -2: "not_due",
            0: "missing",
        }
        return SweepOutcome(session_id, code == 1, reason[code])

    async def idle_connections(self, idle_seconds: float, limit: int = 100) -> list[str]:
        """Connections with no activity for ``idle_seconds`` (lost ``$disconnect``?)."""
        cutoff = self.now_ms() - int(idle_seconds * 1000)
        ids = await _DUE(self.redis, (self.activity_key,), (cutoff, limit))
        return [str(i) for i in ids or []]

    async def mark_alive(self, connection_id: str) -> None:
        """Record that API Gateway still knows a connection (it is only idle)."""
        await _MARK_ALIVE(self.redis, (self.activity_key,), (self.now_ms(), connection_id))

    async def forget_connection(self, connection_id: str) -> None:
        """Drop a connection that belongs to no session from the indexes."""
        await _FORGET(self.redis, (self.activity_key,), (connection_id,))

    # --- turns --------------------------------------------------------------

    async def begin_turn(
        self, session_id: str, epoch: str, turn_id: str, attempt: str, lease_seconds: float
    ) -> TurnStart:
        """Take the session's turn lease and remember where the history starts.

        Raises:
            SessionGone: the session at ``epoch`` no longer exists.
        """
        keys = self.keys(session_id)
        reply = await _BEGIN_TURN(
            self.redis,
            keys.all,
            (epoch, self.now_ms(), turn_id, attempt, int(lease_seconds * 1000)),
        )
        code = int(reply[0])
        if code == 0:
            return TurnStart("done")
        if code == 2:
            return TurnStart("busy")
        return TurnStart("started", int(reply[1]))

    async def commit_turn(
        self, session_id: str, epoch: str, turn_id: str, attempt: str, reply_text: str
    ) -> tuple[dict[str, Any] | None, list[str]]:
        """Log the agent's reply (if any), mark the turn done, release the lease.

        Returns:
            The logged ``agent_message`` event (or ``None``) and the recipients.

        Raises:
            SessionGone: the session is gone or this attempt lost the lease.
        """
        keys = self.keys(session_id)
        _, event, recipients = await _COMMIT_TURN(
            self.redis,
            keys.all,
            (epoch, self.now_ms(), turn_id, attempt, reply_text, self.cap),
        )
        return (json.loads(event) if event else None), list(recipients or [])

    async def rollback_turn(self, session_id: str, epoch: str, attempt: str) -> list[str] | None:
        """Undo a failed turn's writes; returns the recipients (``None`` if not held)."""
        keys = self.keys(session_id)
        done, recipients = await _ROLLBACK_TURN(self.redis, keys.all, (epoch, attempt))
        return list(recipients or []) if int(done) else None


def _participants(flat: Sequence[str]) -> list[dict[str, Any]]:
    out = []
    for user, raw in sorted(_pairs(list(flat)).items()):
        rec = json.loads(raw)
        out.append({"user": user, "name": rec["name"], "status": rec["status"]})
    return out
