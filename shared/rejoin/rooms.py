"""Room state: connections, participants, presence, grace, the event log, turns.

Every transition is one Lua script over the session's hash-tagged keys, so it
is atomic and costs one request. Time comes from the injected clock and is
passed to the scripts, so the two-minute grace is testable in milliseconds.

**Every transition remembers its outcome.** A call carries a fresh operation
id; the script stores its answer under that id, with its effect, in the same
atomic step. ``upstash-redis`` retries a request whose answer was lost without
knowing whether it was applied: the retry carries the same id and gets the
first answer back, unchanged, so a retried ``say`` is delivered once, a
retried ``begin_turn`` gets its own lease and a retried ``$disconnect`` still
tells the others. Answers are JSON text, stored and returned byte for byte.
Reads that may be large (``resume``'s backlog, ``begin_turn``'s history) keep a
small record instead and re-read up to the same point.

**One global key**, ``<prefix>:schedule``: a sorted set of session ids scored
by when the cleanup should next look at the session (its grace deadline, or
when one of its connections could have gone stale). Scripts touch it only
when a session starts, goes into grace, or is visited. On a Redis Cluster a
script cannot name it next to the session's keys; there the store is built
with ``index_in_script=False`` and applies the index changes the script
returns in a second request (idempotent, and the cleanup re-checks every
session it visits).
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ._lua import RedisClient, Script
from .encryption import Encryption, SessionCipher
from .errors import NotInSession, NotJoined, RateLimited, RoomError, TokenExpired, TokenRevoked
from .keys import SessionKeys
from .speakers import Spoken, spoken_item

__all__ = [
    "Departure",
    "Joined",
    "Kicked",
    "RoomStore",
    "Said",
    "TurnStart",
    "Visit",
    "new_epoch",
]

# KEYS of every room script: SessionKeys.room (the session's data keys, then
# its revocations), then the schedule when the caller passes it.
# ARGV[1] now (ms), ARGV[2] operation id ('' for none), ARGV[3] settings JSON.
_PRELUDE = """
local items, ops, results, meta, conns, users, events, rate, departed, revoked =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10]
local schedule = KEYS[11]
local now, op = tonumber(ARGV[1]), ARGV[2]
local cfg = cjson.decode(ARGV[3])
local index = {}
-- The schedule index, or (no such key: a cluster) a note for the caller to apply.
local function index_set(sid, at)
  if schedule then redis.call('ZADD', schedule, at, sid) else index[#index + 1] = at end
end
local function index_del(sid)
  if schedule then redis.call('ZREM', schedule, sid) else index[#index + 1] = -1 end
end
local function decode_or_nil(raw)
  if not raw then return nil end
  return cjson.decode(raw)
end
-- A JSON object from scalar fields and fields already JSON (events, lists).
local function answer(fields, raw)
  if #index > 0 then fields.index = index end
  local s = cjson.encode(fields)
  for k, v in pairs(raw or {}) do
    local piece = '"' .. k .. '":' .. v
    if s == '{}' then
      s = '{' .. piece .. '}'
    else
      s = string.sub(s, 1, -2) .. ',' .. piece .. '}'
    end
  end
  return s
end
local function json_list(strings)
  local quoted = {}
  for i, v in ipairs(strings) do quoted[i] = cjson.encode(v) end
  return '[' .. table.concat(quoted, ',') .. ']'
end
local function raw_list(jsons)
  return '[' .. table.concat(jsons, ',') .. ']'
end
-- The answer of an operation already applied, if this is its retry.
local function replay()
  if op == '' then return nil end
  return redis.call('HGET', results, op) or nil
end
-- Records the answer with the effect; returns it.
local function done(s)
  remember(ops, results, op, now, cfg.keep, s)
  return s
end
-- Refusals change nothing, so they are not recorded: a retry is refused again
-- (or, if what refused it has changed meanwhile, applied once).
local function fail(code, extra)
  local f = extra or {}
  f.err = code
  return answer(f)
end
-- Appends an event with the next sequence number; returns its JSON.
local function append_event(ev)
  ev.seq = redis.call('HINCRBY', meta, 'seq', 1)
  local raw = cjson.encode(ev)
  redis.call('RPUSH', events, raw)
  redis.call('LTRIM', events, -cfg.cap, -1)
  return raw
end
-- Connections that asked to receive events (sent `resume`).
local function ready_conns(except)
  local out = {}
  local all = redis.call('HGETALL', conns)
  for i = 1, #all, 2 do
    if all[i] ~= except and cjson.decode(all[i + 1]).ready == 1 then out[#out + 1] = all[i] end
  end
  return out
end
-- A sliding window over two fixed windows, as upstash-ratelimit's: returns
-- the ms to wait, or nil (and counts the frame) when under the limit.
local function window(field)
  local w = math.floor(now / cfg.rw)
  local raw = redis.call('HGET', rate, field)
  local pw, prev, cur = -2, 0, 0
  if raw then
    local a, b, c = string.match(raw, '^(%-?%d+):(%d+):(%d+)$')
    pw, prev, cur = tonumber(a), tonumber(b), tonumber(c)
  end
  if pw == w - 1 then prev, cur = cur, 0 elseif pw ~= w then prev, cur = 0, 0 end
  return w, prev, cur
end
local function wait_for(prev, cur)
  local elapsed = now % cfg.rw
  if cur + 1 > cfg.rl or prev == 0 then return cfg.rw - elapsed end
  -- The previous window's share decays linearly: wait until it leaves room.
  local t = cfg.rw - (cfg.rl - cur - 1) * cfg.rw / prev
  return math.max(1, math.ceil(t - elapsed))
end
-- With `always`, the frame is counted but never refused (`leave`: refusing it
-- would leave the participant shown as there).
local function over_limit(conn, user, always)
  if cfg.rl <= 0 then return nil end
  local fields = {'c:' .. conn, 'u:' .. user}
  local state = {}
  for i, f in ipairs(fields) do
    local w, prev, cur = window(f)
    local elapsed = now % cfg.rw
    if not always and prev * (cfg.rw - elapsed) / cfg.rw + cur + 1 > cfg.rl then
      return wait_for(prev, cur)
    end
    state[i] = {w, prev, cur}
  end
  for i, f in ipairs(fields) do
    local s = state[i]
    redis.call('HSET', rate, f, s[1] .. ':' .. s[2] .. ':' .. (s[3] + 1))
  end
  redis.call('PEXPIRE', rate, cfg.rw * 2)
  return nil
end
-- A connection's record, or an error answer for a frame from it.
local function frame_conn(conn)
  local rec = decode_or_nil(redis.call('HGET', conns, conn))
  if not rec then return nil, fail('not_in_session') end
  if rec.exp and rec.exp <= now then return nil, fail('token_expired') end
  local r = redis.call('HMGET', revoked, '*', 'u:' .. rec.user)
  if (r[1] and tonumber(r[1]) >= rec.iat) or (r[2] and tonumber(r[2]) >= rec.iat) then
    return nil, fail('revoked')
  end
  local wait = over_limit(conn, rec.user)
  if wait then return nil, fail('rate_limited', {retry_after_ms = wait}) end
  return rec, nil
end
-- Removes one connection; returns its record and the presence event (or nil).
-- `status` is what the participant becomes if this was their last connection.
local function drop_conn(conn, status)
  local rec = decode_or_nil(redis.call('HGET', conns, conn))
  if not rec then return nil, nil end
  redis.call('HDEL', conns, conn)
  redis.call('HDEL', rate, 'c:' .. conn)
  local p = decode_or_nil(redis.call('HGET', users, rec.user))
  if not p then return rec, nil end
  p.conns = math.max(0, p.conns - 1)
  local ev = nil
  if p.conns == 0 and p.status ~= status then
    p.status = status
    ev = append_event({type = 'presence', user = rec.user, name = p.name, status = status,
      ts = now})
  end
  redis.call('HSET', users, rec.user, cjson.encode(p))
  return rec, ev
end
-- A departed connection is remembered a while, so a `leave` that lost the race
-- against its own $disconnect still turns `away` into `left`.
local function note_departed(conn, user)
  redis.call('HSET', departed, conn, user .. ' ' .. now)
  local all = redis.call('HGETALL', departed)
  for i = 1, #all, 2 do
    local at = tonumber(string.match(all[i + 1], ' (%d+)$'))
    if at < now - 300000 then redis.call('HDEL', departed, all[i]) end
  end
end
-- Starts grace when the last connection is gone; returns the deadline or nil.
local function maybe_grace(sid)
  if redis.call('HLEN', conns) > 0 then return nil end
  local deadline = now + cfg.grace
  redis.call('HSET', meta, 'deadline', deadline)
  index_set(sid, deadline + cfg.skew)
  return deadline
end
local function wipe()
  redis.call('DEL', items, ops, results, meta, conns, users, events, rate, departed)
end
local function participants()
  local out = {}
  local all = redis.call('HGETALL', users)
  for i = 1, #all, 2 do
    local p = cjson.decode(all[i + 1])
    out[#out + 1] = cjson.encode({user = all[i], name = p.name, status = p.status})
  end
  return raw_list(out)
end
"""


def _script(name: str, body: str) -> Script:
    return Script(name, _PRELUDE + body)


_CONNECT = _script(
    "connect",
    """
local again = replay()
if again then return again end
local sid, new_epoch, conn, user, name = ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local mode, iat, exp = ARGV[9], tonumber(ARGV[10]), tonumber(ARGV[11])
-- Refusals change nothing and are not recorded: a retry gives the same refusal.
local r = redis.call('HMGET', revoked, '*', 'u:' .. user)
if (r[1] and tonumber(r[1]) >= iat) or (r[2] and tonumber(r[2]) >= iat) then
  return fail('revoked')
end
local m = redis.call('HMGET', meta, 'epoch', 'deadline', 'joined')
local fresh, from_grace = false, false
if not m[1] then
  fresh = true
elseif m[2] and tonumber(m[2]) <= now then
  -- Expired but not swept yet: the old session is unreachable from its deadline on.
  wipe()
  fresh = true
end
if fresh then
  redis.call('HSET', meta, 'epoch', new_epoch, 'created', now, 'seq', 0, 'mode', mode)
  m[3] = false
elseif m[2] then
  redis.call('HDEL', meta, 'deadline')
  from_grace = true
end
if fresh or m[2] then index_set(sid, now + cfg.idle) end
redis.call('HSET', meta, 'joined', 1)
local resumed = (m[3] == '1') and 1 or 0
redis.call('HSET', conns, conn, cjson.encode({user = user, name = name, ready = 0, at = now,
  iat = iat, exp = exp, resumed = resumed}))
local p = decode_or_nil(redis.call('HGET', users, user)) or {status = 'new', conns = 0}
local ev = 'null'
p.conns = p.conns + 1
p.name = name
if p.status ~= 'active' then
  p.status = 'active'
  ev = append_event({type = 'presence', user = user, name = name, status = 'active', ts = now})
end
redis.call('HSET', users, user, cjson.encode(p))
local epoch = redis.call('HGET', meta, 'epoch')
return done(answer({epoch = epoch, resumed = resumed, from_grace = from_grace},
  {event = ev, recipients = json_list(ready_conns(conn))}))
""",
)

# Resume answers with the backlog, which can be large: its record keeps only
# where the backlog ended, and a retry re-reads the log up to there.
_RESUME = _script(
    "resume",
    """
local conn, epoch, last_seq = ARGV[4], ARGV[5], tonumber(ARGV[6])
local upto = nil
local again = replay()
if again then
  upto = cjson.decode(again)
  if upto.err then return again end
  upto = upto.seq
end
local rec = nil
if not upto then
  local err
  rec, err = frame_conn(conn)
  if not rec then return err end
  rec.ready = 1
  rec.at = now
  redis.call('HSET', conns, conn, cjson.encode(rec))
else
  rec = decode_or_nil(redis.call('HGET', conns, conn))
  if not rec then return fail('not_in_session') end
end
local m = redis.call('HMGET', meta, 'epoch', 'seq', 'mode')
local seq = tonumber(m[2])
if upto then seq = upto end
local kept = redis.call('LLEN', events)
local first = tonumber(m[2]) - kept + 1
local recovered, lo = 0, 0
if epoch == m[1] and last_seq >= first - 1 and last_seq <= seq then
  recovered = 1
  lo = last_seq - first + 1
end
-- Negative LRANGE indexes count from the end: an empty range must stay empty.
local evs = {}
if seq - first >= lo then evs = redis.call('LRANGE', events, lo, seq - first) end
if not again then remember(ops, results, op, now, cfg.keep, cjson.encode({seq = seq})) end
return answer({epoch = m[1], seq = seq, recovered = recovered, mode = m[3], log_start = first,
  user = rec.user, name = rec.name, resumed = rec.resumed},
  {events = raw_list(evs), participants = participants()})
""",
)

_SAY = _script(
    "say",
    """
local again = replay()
if again then return again end
local conn, id, text, addressed, item = ARGV[4], ARGV[5], ARGV[6], ARGV[7] == '1', ARGV[8]
local rec, err = frame_conn(conn)
if not rec then return err end
if rec.ready ~= 1 then return fail('not_joined') end
-- The item names its speaker from the caller's identity: it must be this connection's.
if rec.user ~= ARGV[9] then return fail('not_in_session') end
rec.at = now
redis.call('HSET', conns, conn, cjson.encode(rec))
local m = redis.call('HMGET', meta, 'epoch', 'mode', 'm:' .. rec.user .. ':' .. id)
if m[3] then
  -- The sender sent this id before (their own retry): it is a duplicate.
  local prior = cjson.decode(m[3])
  return done(answer({duplicate = true, seq = prior[1], turn = prior[2], epoch = m[1],
    mode = m[2], user = rec.user, name = rec.name}))
end
local ev = append_event({type = 'message', id = id, user = rec.user, name = rec.name,
  text = text, ts = now})
local seq = tonumber(redis.call('HGET', meta, 'seq'))
-- The agent answers every message, or in meeting mode those addressed to it.
local turn = ''
if m[2] == 'every' or addressed then turn = tostring(seq) end
-- Message ids live as long as the session, per sender.
redis.call('HSET', meta, 'm:' .. rec.user .. ':' .. id, cjson.encode({seq, turn}))
-- The agent's history gets every message, in the room's order, as its own
-- item with the speaker set by the server (rejoin.speakers), never from text.
redis.call('RPUSH', items, item)
return done(answer({duplicate = false, seq = seq, turn = turn, epoch = m[1], mode = m[2],
  user = rec.user, name = rec.name},
  {event = ev, recipients = json_list(ready_conns(''))}))
""",
)

_PING = _script(
    "ping",
    """
local again = replay()
if again then return again end
local conn = ARGV[4]
local rec, err = frame_conn(conn)
if not rec then return err end
rec.at = now
redis.call('HSET', conns, conn, cjson.encode(rec))
return done(answer({ts = now}))
""",
)

# `leave` and `$disconnect`. A `leave` that arrives after its connection's
# $disconnect (the client closes right after sending it) finds the connection
# among the departed and still turns `away` into `left`.
_DEPART = _script(
    "depart",
    """
local again = replay()
if again then return again end
local sid, conn, leaving = ARGV[4], ARGV[5], ARGV[6] == '1'
local status = leaving and 'left' or 'away'
local rec = nil
local ev = nil
if leaving then
  local r = decode_or_nil(redis.call('HGET', conns, conn))
  if r then over_limit(conn, r.user, true) end
end
rec, ev = drop_conn(conn, status)
if not rec then
  local gone = redis.call('HGET', departed, conn)
  if not (leaving and gone) then return fail('not_in_session') end
  local user = string.match(gone, '^(.-) %d+$')
  local p = decode_or_nil(redis.call('HGET', users, user))
  if p and p.conns == 0 and p.status == 'away' then
    p.status = 'left'
    redis.call('HSET', users, user, cjson.encode(p))
    ev = append_event({type = 'presence', user = user, name = p.name, status = 'left', ts = now})
  end
  redis.call('HDEL', departed, conn)
  return done(answer({user = user, seq = ev and cjson.decode(ev).seq or cjson.null},
    {event = ev or 'null', recipients = json_list(ready_conns(''))}))
end
if not leaving then note_departed(conn, rec.user) end
local deadline = maybe_grace(sid)
return done(answer({user = rec.user, deadline = deadline or cjson.null,
  seq = ev and cjson.decode(ev).seq or cjson.null},
  {event = ev or 'null', recipients = json_list(ready_conns(''))}))
""",
)

# The HTTP API removes a participant: their tokens issued until now are revoked
# and their connections dropped (the caller closes them).
_KICK = _script(
    "kick",
    """
local again = replay()
if again then return again end
local sid, user, revoke_ms = ARGV[4], ARGV[5], tonumber(ARGV[6])
if not redis.call('HGET', meta, 'epoch') then return fail('missing') end
redis.call('HSET', revoked, 'u:' .. user, now)
redis.call('PEXPIRE', revoked, revoke_ms)
local dropped, ev = {}, nil
local all = redis.call('HGETALL', conns)
for i = 1, #all, 2 do
  if cjson.decode(all[i + 1]).user == user then
    local _, e = drop_conn(all[i], 'removed')
    dropped[#dropped + 1] = all[i]
    ev = e or ev
  end
end
local p = decode_or_nil(redis.call('HGET', users, user))
if p and p.status ~= 'removed' then
  -- Away (not connected): shown as removed too.
  p.status = 'removed'
  redis.call('HSET', users, user, cjson.encode(p))
  ev = append_event({type = 'presence', user = user, name = p.name, status = 'removed', ts = now})
end
local deadline = nil
if #dropped > 0 then deadline = maybe_grace(sid) end
return done(answer({user = user, deadline = deadline or cjson.null},
  {connections = json_list(dropped), event = ev or 'null',
   recipients = json_list(ready_conns(''))}))
""",
)

_CREATE = _script(
    "create",
    """
local again = replay()
if again then return again end
local sid, epoch, mode = ARGV[4], ARGV[5], ARGV[6]
local m = redis.call('HMGET', meta, 'epoch', 'deadline')
if m[1] and not (m[2] and tonumber(m[2]) <= now) then
  return answer({epoch = m[1], created = false})
end
wipe()
-- Nobody is connected yet: the session waits one grace period for its first join.
local deadline = now + cfg.grace
redis.call('HSET', meta, 'epoch', epoch, 'created', now, 'seq', 0, 'mode', mode,
  'deadline', deadline)
index_set(sid, deadline + cfg.skew)
return done(answer({epoch = epoch, created = true}))
""",
)

_STATUS = _script(
    "status",
    """
local with_events = ARGV[4] == '1'
local m = redis.call('HMGET', meta, 'epoch', 'deadline', 'created', 'mode', 'seq')
if not m[1] or (m[2] and tonumber(m[2]) <= now) then return answer({missing = true}) end
local evs = {}
if with_events then evs = redis.call('LRANGE', events, 0, -1) end
return answer({epoch = m[1], deadline = m[2] and tonumber(m[2]) or cjson.null,
  created = tonumber(m[3]), mode = m[4], seq = tonumber(m[5]),
  connections = redis.call('HLEN', conns)},
  {participants = participants(), events = raw_list(evs)})
""",
)

# Ending revokes every token issued until now. Its answer is kept with the
# revocation (which outlives the session), so a retry still answers 'existed'.
_END = _script(
    "end",
    """
local sid, revoke_ms = ARGV[4], tonumber(ARGV[5])
if op ~= '' then
  local again = redis.call('HGET', revoked, 'op:' .. op)
  if again then return again end
end
local conn_ids = redis.call('HKEYS', conns)
local existed = redis.call('EXISTS', meta) == 1
wipe()
index_del(sid)
redis.call('HSET', revoked, '*', now)
local s = answer({existed = existed}, {connections = json_list(conn_ids)})
if op ~= '' then redis.call('HSET', revoked, 'op:' .. op, s) end
redis.call('PEXPIRE', revoked, revoke_ms)
return s
""",
)

# The cleanup's look at one session: delete it if its grace is over, or name
# the connections quiet for so long that their $disconnect may have been lost.
# After a deletion nothing of the session is left to remember an answer in,
# so a retry answers 'missing' (already gone), which is what it is.
_VISIT = _script(
    "visit",
    """
local again = replay()
if again then return again end
local sid = ARGV[4]
local m = redis.call('HMGET', meta, 'epoch', 'deadline')
if not m[1] then index_del(sid); return answer({state = 'missing'}) end
if redis.call('HLEN', conns) == 0 then
  if not m[2] then
    -- Nobody connected and no grace running (cannot happen by the transitions
    -- here, but a session must never be kept alive by a missing deadline).
    m[2] = now + cfg.grace
    redis.call('HSET', meta, 'deadline', m[2])
  end
  local deadline = tonumber(m[2])
  if deadline + cfg.skew <= now then
    wipe()
    index_del(sid)
    return answer({state = 'deleted'})
  end
  index_set(sid, deadline + cfg.skew)
  return done(answer({state = 'not_due'}))
end
if m[2] then redis.call('HDEL', meta, 'deadline') end
local idle, oldest = {}, now
local all = redis.call('HGETALL', conns)
for i = 1, #all, 2 do
  local at = cjson.decode(all[i + 1]).at
  if at <= now - cfg.idle then idle[#idle + 1] = all[i] elseif at < oldest then oldest = at end
end
-- Quiet ones are checked now; look again when the next one could be.
if #idle > 0 then index_set(sid, now + 60000) else index_set(sid, oldest + cfg.idle) end
return done(answer({state = 'active'}, {idle = json_list(idle)}))
""",
)

# The connection is still open (API Gateway knows it); it was only quiet.
_ALIVE = _script(
    "alive",
    """
local conn = ARGV[4]
local rec = decode_or_nil(redis.call('HGET', conns, conn))
if not rec then return answer({found = false}) end
if rec.at < now then
  rec.at = now
  redis.call('HSET', conns, conn, cjson.encode(rec))
end
return answer({found = true})
""",
)

# Is a token issued at ARGV[5] (ms) for user ARGV[4] revoked? (the HTTP API's readers)
_REVOKED = _script(
    "revoked",
    """
local user, iat = ARGV[4], tonumber(ARGV[5])
local r = redis.call('HMGET', revoked, '*', 'u:' .. user)
local gone = (r[1] and tonumber(r[1]) >= iat) or (r[2] and tonumber(r[2]) >= iat)
return answer({revoked = gone and true or false})
""",
)

_DUE = Script(
    "due",
    "return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))",
)
_INDEX = Script(
    "index",
    """
local at = tonumber(ARGV[2])
if at < 0 then return redis.call('ZREM', KEYS[1], ARGV[1]) end
return redis.call('ZADD', KEYS[1], at, ARGV[1])
""",
)

# --- turns ------------------------------------------------------------------

_TURN_GUARD = """
local epoch, turn, attempt = ARGV[4], ARGV[5], ARGV[6]
local h = redis.call('HMGET', meta, 'epoch', 'deadline', 'turn', 'turn_attempt', 'turn_until',
  't:' .. turn)
if h[1] ~= epoch or (h[2] and tonumber(h[2]) <= now) then
  return gone('session was deleted or replaced')
end
"""

# The turn's start: the lease, and the history the Runner reads (the latest
# `limit` items; 0 for all). The history is not recorded: a retry re-reads it.
_BEGIN_TURN = _script(
    "begin_turn",
    _TURN_GUARD
    + """
local lease, limit = tonumber(ARGV[7]), tonumber(ARGV[8])
local again = replay()
local state
if again then
  state = cjson.decode(again).state
elseif h[6] then
  state = 'done'
elseif h[3] and h[4] ~= attempt and tonumber(h[5]) > now then
  state = 'busy'
else
  state = 'started'
  redis.call('HSET', meta, 'turn', turn, 'turn_attempt', attempt, 'turn_until', now + lease)
  redis.call('HDEL', meta, 'stop')
  remember(ops, results, op, now, cfg.keep, cjson.encode({state = state}))
end
local head = answer({state = state}, {recipients = json_list(ready_conns(''))})
if state ~= 'started' then return {head} end
local out = {head}
local history
if limit > 0 then history = redis.call('LRANGE', items, -limit, -1)
else history = redis.call('LRANGE', items, 0, -1) end
for i = 1, #history do out[#out + 1] = history[i] end
return out
""",
)

# The turn's end: its items (held in memory during the run) and the agent's
# message land together, once.
_COMMIT_TURN = _script(
    "commit_turn",
    _TURN_GUARD
    + """
local again = replay()
if again then return again end
local text, reply_to, stopped = ARGV[7], tonumber(ARGV[8]), ARGV[9] == '1'
if h[6] then return done(answer({state = 'done'}, {event = 'null', recipients = '[]'})) end
if h[4] ~= attempt then return gone('turn lease lost') end
push_all(items, ARGV, 10)
local ev = 'null'
if text ~= '' or stopped then
  ev = append_event({type = 'agent_message', turn = turn, reply_to = reply_to, text = text,
    stopped = stopped or nil, ts = now})
end
redis.call('HSET', meta, 't:' .. turn, 1)
redis.call('HDEL', meta, 'turn', 'turn_attempt', 'turn_until', 'stop')
return done(answer({state = 'committed'}, {event = ev, recipients = json_list(ready_conns(''))}))
""",
)

# A failed turn wrote nothing: releasing its lease lets the retry start at once.
_RELEASE_TURN = _script(
    "release_turn",
    _TURN_GUARD
    + """
local again = replay()
if again then return again end
if h[4] ~= attempt then return done(answer({released = false}, {recipients = '[]'})) end
redis.call('HDEL', meta, 'turn', 'turn_attempt', 'turn_until', 'stop')
return done(answer({released = true}, {recipients = json_list(ready_conns(''))}))
""",
)

# Polled while the agent streams: who to send deltas to, and whether to stop.
_TURN_STATUS = _script(
    "turn_status",
    _TURN_GUARD
    + """
local s = redis.call('HGET', meta, 'stop')
return answer({stop = (s ~= false and s ~= nil) and s or cjson.null,
  held = h[4] == attempt}, {recipients = json_list(ready_conns(''))})
""",
)

# A participant asks the running turn to stop (a `stop` frame).
_STOP = _script(
    "stop",
    """
local again = replay()
if again then return again end
local conn, wanted = ARGV[4], ARGV[5]
local rec, err = frame_conn(conn)
if not rec then return err end
if rec.ready ~= 1 then return fail('not_joined') end
local h = redis.call('HMGET', meta, 'turn', 'turn_until')
local running = h[1] and tonumber(h[2]) > now and (wanted == '' or wanted == h[1])
if running then redis.call('HSET', meta, 'stop', rec.user) end
return done(answer({running = running and true or false, turn = h[1] or cjson.null}))
""",
)


# --- outcomes -----------------------------------------------------------------


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
    """

    epoch: str
    resumed: bool
    event: dict[str, Any] | None
    recipients: list[str]
    from_grace: bool = False


@dataclass(frozen=True)
class Said:
    """The outcome of a ``say``.

    Attributes:
        duplicate: the sender used this message id before; nothing was logged.
        seq: the message's sequence number (the original one if duplicate).
        turn: the agent turn the message asks for (``""`` when none).
        event: the logged message event (``None`` if duplicate).
        recipients: ready connections to broadcast to (the sender included).
        epoch: the session's epoch.
        mode: the session's reply mode.
        user: the sender's user id; name: the sender's display name.
    """

    duplicate: bool
    seq: int
    turn: str
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
class Kicked:
    """The outcome of removing a participant.

    Attributes:
        connections: the participant's connections, now dropped (close them).
        event: the presence event logged (``removed``), if any.
        recipients: ready connections still in the session.
    """

    connections: list[str]
    event: dict[str, Any] | None
    recipients: list[str]


@dataclass(frozen=True)
class TurnStart:
    """The outcome of :meth:`RoomStore.begin_turn`.

    Attributes:
        state: ``started``, ``done`` (already committed: skip), or ``busy``
            (another turn of the session holds the lease: retry later).
        history: the session's history when the turn started (raw JSON
            strings, oldest first, as stored), when started.
        recipients: ready connections at the start.
        items: ``history`` decoded (and decrypted), one per entry; ``None``
            for an entry that is not JSON or cannot be decrypted.
    """

    state: Literal["started", "done", "busy"]
    history: list[str] = field(default_factory=list)
    recipients: list[str] = field(default_factory=list)
    items: list[Any] = field(default_factory=list)


@dataclass(frozen=True)
class Visit:
    """What the cleanup found in one session.

    Attributes:
        session_id: the session.
        state: ``deleted`` (its grace was over), ``missing`` (already gone),
            ``not_due`` (in grace) or ``active`` (someone is connected).
        idle: connections quiet for longer than the idle timeout (active only).
    """

    session_id: str
    state: Literal["deleted", "missing", "not_due", "active"]
    idle: list[str] = field(default_factory=list)


def new_epoch() -> str:
    """A fresh, unguessable epoch id."""
    return secrets.token_urlsafe(9)


def _op() -> str:
    return secrets.token_hex(8)


def _event(raw: Any) -> dict[str, Any] | None:
    return raw if isinstance(raw, dict) else None


def _ids(raw: Any) -> list[str]:
    return [str(x) for x in raw] if isinstance(raw, list) else []


_ERRORS: dict[str, Callable[[dict[str, Any]], Exception]] = {
    "not_in_session": lambda a: NotInSession("this connection is not part of the session"),
    "not_joined": lambda a: NotJoined("send resume first"),
    "rate_limited": lambda a: RateLimited(int(a["retry_after_ms"]) / 1000),
    "token_expired": lambda a: TokenExpired("the connection's token has expired; reconnect"),
    "revoked": lambda a: TokenRevoked("the token was revoked"),
}


class RoomStore:
    """Room state for every session.

    Args:
        redis: a store client (see :func:`rejoin.upstash_client`).
        key_prefix: prefix of every key.
        grace_seconds: how long a session outlives its last connection.
        event_log_size: how many events are kept for replay.
        clock: returns the time in seconds (injected in tests).
        clock_skew_seconds: the cleanup deletes a session only this long
            after its deadline. Lambdas' clocks differ slightly; without the
            margin a cleanup whose clock runs ahead could delete a session
            that a reconnect (whose clock says "before the deadline") is
            resuming at that very moment.
        idle_seconds: a connection quiet this long may have lost its
            ``$disconnect``; the cleanup asks API Gateway about it.
        rate_limit: frames per connection, and per participant, per window
            (0: no limit).
        rate_window_seconds: the rate limit's window.
        outcome_seconds: how long an operation's answer is kept for a retry.
            Retries come from the client while its caller waits, so this only
            has to outlast the request timeout and the client's retries.
        revocation_seconds: how long revocations (ended session, removed
            participant) are kept: the longest a token can live.
        index_in_script: the scripts update the schedule index themselves
            (one request); False on a Redis Cluster, where the index lives in
            another slot and is updated by a second request.
        encryption: when set, message texts and history items are stored
            encrypted (:mod:`rejoin.encryption`).
    """

    def __init__(
        self,
        redis: RedisClient,
        *,
        key_prefix: str = "rejoin",
        grace_seconds: float = 120,
        event_log_size: int = 500,
        clock: Callable[[], float] = time.time,
        clock_skew_seconds: float = 2.0,
        idle_seconds: float = 660,
        rate_limit: int = 0,
        rate_window_seconds: float = 10,
        outcome_seconds: float = 120,
        revocation_seconds: float = 12 * 3600,
        index_in_script: bool = True,
        encryption: Encryption | None = None,
    ) -> None:
        self.redis = redis
        self.encryption = encryption
        self.prefix = key_prefix
        self.grace_ms = int(grace_seconds * 1000)
        self.cap = event_log_size
        self.clock = clock
        self.skew_ms = int(clock_skew_seconds * 1000)
        self.revocation_ms = int(revocation_seconds * 1000)
        self.schedule_key = f"{key_prefix}:schedule"
        self.index_in_script = index_in_script
        self._cfg = json.dumps(
            {
                "cap": event_log_size,
                "grace": self.grace_ms,
                "skew": self.skew_ms,
                "idle": int(idle_seconds * 1000),
                "rl": rate_limit,
                "rw": max(1, int(rate_window_seconds * 1000)),
                "keep": int(outcome_seconds * 1000),
            },
            separators=(",", ":"),
        )

    def now_ms(self) -> int:
        """The injected clock's time in milliseconds."""
        return int(self.clock() * 1000)

    def cipher(self, session_id: str) -> SessionCipher | None:
        """The session's cipher when encryption at rest is on."""
        return self.encryption.for_session(session_id) if self.encryption else None

    def _event(self, session_id: str, raw: Any) -> dict[str, Any] | None:
        event = _event(raw)
        cipher = self.cipher(session_id)
        return cipher.decrypt_event(event) if cipher and event else event

    def _events(self, session_id: str, raw: Any) -> list[dict[str, Any]]:
        cipher = self.cipher(session_id)
        events = list(raw or [])
        return [cipher.decrypt_event(e) for e in events] if cipher else events

    def serialize_item(self, session_id: str, item: Any) -> str:
        """A history item as stored (an encrypted envelope when encryption is on)."""
        cipher = self.cipher(session_id)
        stored = cipher.wrap(item) if cipher else item
        return json.dumps(stored, ensure_ascii=False, separators=(",", ":"))

    def decode_item(self, session_id: str, raw: str) -> Any | None:
        """A stored history entry as the model reads it (``None``: unreadable)."""
        try:
            stored = json.loads(raw)
        except ValueError:
            return None  # corrupt entries are skipped, as the SDK's backends do
        cipher = self.cipher(session_id)
        return cipher.unwrap(stored) if cipher else stored

    def keys(self, session_id: str) -> SessionKeys:
        """The keys of one session (validates the id)."""
        return SessionKeys(self.prefix, session_id)

    async def _call(
        self, script: Script, session_id: str, *args: Any, op: bool = True
    ) -> dict[str, Any]:
        keys = self.keys(session_id).room
        if self.index_in_script:
            keys = (*keys, self.schedule_key)
        reply = await script(
            self.redis, keys, (self.now_ms(), _op() if op else "", self._cfg, *args)
        )
        return await self._settle(session_id, reply)

    async def _settle(self, session_id: str, reply: Any) -> dict[str, Any]:
        answer: dict[str, Any] = json.loads(reply)
        for at in answer.get("index", []):
            await _INDEX(self.redis, (self.schedule_key,), (session_id, at))
        err = answer.get("err")
        if err in _ERRORS:
            raise _ERRORS[err](answer)
        if err is not None:
            raise RoomError(f"unexpected answer {err!r}")
        return answer

    # --- connections --------------------------------------------------------

    async def connect(
        self,
        session_id: str,
        connection_id: str,
        user_id: str,
        name: str,
        *,
        mode: str,
        issued_at: float,
        expires_at: float | None = None,
    ) -> Joined:
        """Add a connection; create or resume the session as its lifecycle says.

        Args:
            issued_at: the token's ``iat`` (seconds): a token issued before a
                revocation of this session or participant is refused.
            expires_at: the token's ``exp`` (seconds): frames after it are refused.

        Raises:
            TokenRevoked: the token was revoked (session ended, participant
                removed); nothing was stored.
        """
        _check_connection_id(connection_id)
        a = await self._call(
            _CONNECT,
            session_id,
            session_id,
            new_epoch(),
            connection_id,
            user_id,
            name,
            mode,
            int(issued_at * 1000),
            int(expires_at * 1000) if expires_at is not None else 2**52,
        )
        return Joined(
            epoch=str(a["epoch"]),
            resumed=bool(a["resumed"]),
            event=_event(a.get("event")),
            recipients=_ids(a.get("recipients")),
            from_grace=bool(a["from_grace"]),
        )

    async def resume(
        self, session_id: str, connection_id: str, epoch: str | None, last_seq: int
    ) -> dict[str, Any]:
        """Mark a connection ready and build its ``welcome`` frame (events unpaged).

        Raises:
            NotInSession: the connection is not in this session.
            RateLimited: the connection or participant is over its frame budget.
            TokenExpired, TokenRevoked: the connection's token no longer holds.
        """
        a = await self._call(_RESUME, session_id, connection_id, epoch or "", last_seq)
        events = self._events(session_id, a.get("events"))
        recovered = bool(a["recovered"])
        log_start = int(a["log_start"])
        return {
            "type": "welcome",
            "session": session_id,
            "epoch": a["epoch"],
            "resumed": bool(a["resumed"]),
            "recovered": recovered,
            "seq": int(a["seq"]),
            "log_start": log_start,
            "truncated": log_start > 1,
            "you": {"user": a["user"], "name": a["name"], "connection": connection_id},
            "participants": a.get("participants") or [],
            "mode": a["mode"],
            "grace_seconds": self.grace_ms // 1000,
            "events": events if recovered else [],
            "transcript": None if recovered else events,
        }

    async def say(
        self,
        session_id: str,
        connection_id: str,
        message_id: str,
        text: str,
        *,
        speaker: tuple[str, str],
        addressed: bool,
    ) -> Said:
        """Log a participant's message and add it to the agent's history.

        A message id the sender used before is a duplicate (nothing changes);
        ids are scoped to the sender. The message asks for an agent turn in
        ``every`` mode, or when ``addressed`` to the agent.

        Args:
            speaker: (user id, display name) of the connection, from its
                authorizer context; the history item names this speaker.

        Raises:
            NotInSession: the connection is not in this session.
            NotJoined: the connection has not sent ``resume`` yet.
            RateLimited: over the frame budget; nothing was stored.
        """
        user, name = speaker
        item = spoken_item(Spoken(user, name, message_id, text))
        cipher = self.cipher(session_id)
        a = await self._call(
            _SAY,
            session_id,
            connection_id,
            message_id,
            cipher.encrypt_text(text) if cipher else text,
            "1" if addressed else "0",
            self.serialize_item(session_id, item),
            user,
        )
        return Said(
            duplicate=bool(a["duplicate"]),
            seq=int(a["seq"]),
            turn=str(a.get("turn") or ""),
            event=self._event(session_id, a.get("event")),
            recipients=_ids(a.get("recipients")),
            epoch=str(a["epoch"]),
            mode=str(a["mode"]),
            user=str(a["user"]),
            name=str(a["name"]),
        )

    async def ping(self, session_id: str, connection_id: str) -> int:
        """Record that a connection is alive; returns the server time (ms).

        Raises:
            NotInSession, RateLimited, TokenExpired, TokenRevoked: as :meth:`say`.
        """
        a = await self._call(_PING, session_id, connection_id)
        return int(a["ts"])

    async def leave(self, session_id: str, connection_id: str) -> Departure:
        """The participant leaves for good: shown as ``left``, even if this
        connection's ``$disconnect`` got there first.

        Raises:
            NotInSession: the connection was never in the session.
            RateLimited: over the frame budget.
        """
        return _departure(await self._call(_DEPART, session_id, session_id, connection_id, "1"))

    async def disconnect(self, session_id: str, connection_id: str) -> Departure | None:
        """Remove a connection (shown as ``away``); start grace if it was the last.

        Returns ``None`` when the connection is not there (already removed).
        """
        try:
            a = await self._call(_DEPART, session_id, session_id, connection_id, "0")
        except NotInSession:
            return None
        return _departure(a)

    async def kick(self, session_id: str, user_id: str) -> Kicked | None:
        """Remove a participant: revoke their tokens issued until now, drop their
        connections. ``None`` if the session does not exist."""
        try:
            a = await self._call(_KICK, session_id, session_id, user_id, self.revocation_ms)
        except RoomError:
            return None
        return Kicked(
            connections=_ids(a.get("connections")),
            event=_event(a.get("event")),
            recipients=_ids(a.get("recipients")),
        )

    async def revoked(self, session_id: str, user_id: str, issued_at: float) -> bool:
        """Whether a token of ``user_id`` issued at ``issued_at`` was revoked."""
        a = await self._call(_REVOKED, session_id, user_id, int(issued_at * 1000), op=False)
        return bool(a["revoked"])

    async def issue_time(self, session_id: str, user_id: str, now: float) -> int:
        """The ``iat`` for a token of ``user_id`` minted at ``now``, never born revoked.

        ``iat`` has one-second resolution: if the session ended (or the user
        was removed) earlier in this second, a token issued now would count as
        issued before the revocation. Then it is issued at the next second,
        well within the verifier's ``iat`` leeway.
        """
        issued = math.floor(now)
        if await self.revoked(session_id, user_id, issued):
            issued += 1
        return issued

    async def stop(self, session_id: str, connection_id: str, turn: str | None) -> dict[str, Any]:
        """Ask the session's running turn (``turn``, or whichever runs) to stop.

        Returns:
            ``{"running": bool, "turn": str | None}``.
        """
        a = await self._call(_STOP, session_id, connection_id, turn or "")
        return {"running": bool(a["running"]), "turn": a.get("turn")}

    # --- sessions -----------------------------------------------------------

    async def create(self, session_id: str, *, mode: str) -> tuple[str, bool]:
        """Create a session before anyone joins; returns (epoch, created).

        A live session is left as it is (``created`` is False). A created
        session waits one grace period for its first connection.
        """
        a = await self._call(_CREATE, session_id, session_id, new_epoch(), mode)
        return str(a["epoch"]), bool(a["created"])

    async def status(self, session_id: str, *, with_events: bool = False) -> dict[str, Any] | None:
        """The session's state, or ``None`` if it does not exist or expired."""
        a = await self._call(_STATUS, session_id, int(with_events), op=False)
        if a.get("missing"):
            return None
        out: dict[str, Any] = {
            "session": session_id,
            "epoch": a["epoch"],
            "state": "active" if int(a["connections"]) > 0 else "grace",
            "connections": int(a["connections"]),
            "grace_deadline_ms": a.get("deadline"),
            "created_ms": int(a["created"]),
            "mode": a["mode"],
            "seq": int(a["seq"]),
            "participants": sorted(a.get("participants") or [], key=lambda p: p["user"]),
        }
        if with_events:
            out["events"] = self._events(session_id, a.get("events"))
        return out

    async def end(self, session_id: str) -> list[str] | None:
        """Delete a session now and revoke every token issued for it until now.

        Returns its connection ids (``None`` if it did not exist).
        """
        a = await self._call(_END, session_id, session_id, self.revocation_ms)
        return _ids(a.get("connections")) if a["existed"] else None

    # --- the cleanup ----------------------------------------------------------

    async def due(self, limit: int = 500) -> list[str]:
        """Sessions the cleanup should look at now, oldest first."""
        ids = await _DUE(self.redis, (self.schedule_key,), (self.now_ms(), limit))
        return [str(i) for i in ids or []]

    async def visit(self, session_id: str) -> Visit:
        """Delete the session if its grace is over, or name its quiet connections."""
        a = await self._call(_VISIT, session_id, session_id)
        return Visit(session_id, a["state"], _ids(a.get("idle")))

    async def mark_alive(self, session_id: str, connection_id: str) -> bool:
        """Record that API Gateway still knows a quiet connection."""
        a = await self._call(_ALIVE, session_id, connection_id, op=False)
        return bool(a["found"])

    # --- turns --------------------------------------------------------------

    async def begin_turn(
        self,
        session_id: str,
        epoch: str,
        turn_id: str,
        attempt: str,
        lease_seconds: float,
        *,
        history_limit: int = 0,
    ) -> TurnStart:
        """Take the session's turn lease and read the history the Runner needs.

        Args:
            history_limit: read only the latest this many items (0: all).

        Raises:
            SessionGone: the session at ``epoch`` no longer exists.
        """
        keys = self.keys(session_id).room
        reply = await _BEGIN_TURN(
            self.redis,
            keys,
            (
                self.now_ms(),
                _op(),
                self._cfg,
                epoch,
                turn_id,
                attempt,
                int(lease_seconds * 1000),
                history_limit,
            ),
        )
        head = json.loads(reply[0])
        history = [str(r) for r in reply[1:]]
        return TurnStart(
            head["state"],
            history=history,
            recipients=_ids(head.get("recipients")),
            items=[self.decode_item(session_id, r) for r in history],
        )

    async def commit_turn(
        self,
        session_id: str,
        epoch: str,
        turn_id: str,
        attempt: str,
        *,
        items: Sequence[Any],
        reply_text: str,
        reply_to: int,
        stopped: bool = False,
    ) -> tuple[dict[str, Any] | None, list[str]]:
        """Write the turn's items and log the agent's message, once.

        Args:
            items: the items the run produced, in order.
            reply_text: the agent's final text ('' for none).
            reply_to: the seq of the message answered.
            stopped: a participant stopped the turn; ``reply_text`` is partial.

        Returns:
            The logged ``agent_message`` event (``None`` if none, or if another
            attempt had committed the turn) and the recipients.

        Raises:
            SessionGone: the session is gone or this attempt lost the lease.
        """
        cipher = self.cipher(session_id)
        a = await self._call(
            _COMMIT_TURN,
            session_id,
            epoch,
            turn_id,
            attempt,
            cipher.encrypt_text(reply_text) if cipher and reply_text else reply_text,
            reply_to,
            "1" if stopped else "0",
            *(self.serialize_item(session_id, i) for i in items),
        )
        return self._event(session_id, a.get("event")), _ids(a.get("recipients"))

    async def release_turn(
        self, session_id: str, epoch: str, turn_id: str, attempt: str
    ) -> list[str] | None:
        """Give up a failed turn's lease; returns the recipients (``None`` if not held)."""
        a = await self._call(_RELEASE_TURN, session_id, epoch, turn_id, attempt)
        return _ids(a.get("recipients")) if a["released"] else None

    async def turn_status(
        self, session_id: str, epoch: str, turn_id: str, attempt: str
    ) -> tuple[list[str], str | None, bool]:
        """(recipients, who asked to stop or None, whether this attempt holds the lease)."""
        a = await self._call(_TURN_STATUS, session_id, epoch, turn_id, attempt, op=False)
        return _ids(a.get("recipients")), a.get("stop"), bool(a["held"])


def _departure(a: dict[str, Any]) -> Departure:
    deadline = a.get("deadline")
    return Departure(
        event=_event(a.get("event")),
        recipients=_ids(a.get("recipients")),
        grace_deadline=int(deadline) if deadline is not None else None,
        user=str(a["user"]),
    )


def _check_connection_id(connection_id: str) -> None:
    if not connection_id or len(connection_id) > 128:
        raise RoomError("invalid connection id")
