"""The Lua scripts of the Redis broker: each is one round trip and atomic.

Keys of one session share the hash tag ``{session id}`` and keys of one room
share ``{room}`` (so does the room's channel), so on a Redis Cluster every script
touches one slot, but ``SESSIONS`` and ``LEASE``: they write many sessions, declare the
first one's keys (which route the call to its node) and take every session's keys as
arguments, all of sessions on that node (the broker groups a batch by node; a script
may use keys of other slots on its own node).
Times come from Redis (``TIME``), never from an instance's clock, except a detached
session's absolute expiry, which the instance computes (``PEXPIREAT``).

On a cluster (the ``cluster`` argument of the room scripts is ``1``) a room
publishes on sharded pub/sub (``SPUBLISH``) and remembers the node that wrote it
(``CLUSTER MYID``): a room first written to by another node (its master failed over
to a replica, which may lack the last writes; or its slot was moved) starts a new
epoch, so that no offset is ever given to two messages.
"""

from __future__ import annotations

__all__ = [
    "CONTROL",
    "EPOCH",
    "FRAME_AT",
    "LEASE",
    "PRESENCE_ADD",
    "PRESENCE_BEAT",
    "PRESENCE_LIST",
    "PRESENCE_REMOVE",
    "PUBLISH",
    "ROOM_AFTER",
    "ROOM_SINCE",
    "SESSIONS",
    "SINCE",
]

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

#: KEYS: epoch. ARGV: candidate. The broker's epoch, made once per data set.
EPOCH = """
local e = redis.call('GET', KEYS[1])
if not e then
  redis.call('SET', KEYS[1], ARGV[1])
  e = ARGV[1]
end
return e
"""

#: KEYS: any key (only routes the call: on a cluster, every batch goes to the node of this
#: key, so that control messages leave in the order told). ARGV: (channel, message)...
#: ``PUBLISH`` each in order; returns how many processes received each.
CONTROL = """
local out = {}
for i = 1, #ARGV, 2 do
  out[#out + 1] = redis.call('PUBLISH', ARGV[i], ARGV[i + 1])
end
return out
"""

# ------------------------------------------------------------------- rooms

#: how often (in offsets) a publish also trims the history by age and the dedupe set
#: (reads apply the exact bounds; MAXLEN ~ bounds the stream's length at every publish)
TRIM_EVERY = 64

#: KEYS: meta, log, dedupe (offsets by request, within the history). ARGV: channel, body,
#: candidate epoch, history size, history ttl (ms), keep (ms), publish id, dedupe key or "",
#: cluster (1 or 0).
#: Next offset; store, fan out; now and then trim. Returns {offset, epoch}, or for a retry
#: of a publish still in the history {its offset, epoch, its body} (body nil if the stream
#: lost it). A room message costs Redis this one call whatever the room's size.
PUBLISH = (
    """
local cluster = ARGV[9] == '1'
local node = cluster and redis.call('CLUSTER', 'MYID') or ''
local m = redis.call('HMGET', KEYS[1], 'epoch', 'offset', 'node')
local ep, off = m[1], tonumber(m[2] or '0')
local size = tonumber(ARGV[4])
if not ep or (off > 0 and redis.call('EXISTS', KEYS[2]) == 0) or (m[3] or '') ~= node then
  -- the room is new, its history was lost, or another node wrote it last (a failover
  -- may have lost its last offsets): a new epoch, offsets from 1 again
  ep = ARGV[3]
  off = 0
  redis.call('DEL', KEYS[2], KEYS[3])
elseif ARGV[8] ~= '' then
  local seen = redis.call('ZSCORE', KEYS[3], ARGV[8])
  if seen and off - tonumber(seen) < size then
    -- a retry of a publish still in the history: answer with the first, publish nothing
    local want = tonumber(seen)
    for _, entry in ipairs(redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', off - want + 1)) do
      if tonumber(entry[2][2]) == want then return {want, ep, entry[2][6]} end
    end
    return {want, ep, false}
  end
end
off = off + 1
local ttl = tonumber(ARGV[5])
redis.call('HSET', KEYS[1], 'epoch', ep, 'offset', off, 'size', size, 'ttl', ttl, 'node', node)
local o = string.format('%d', off)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', size, '*', 'o', o, 'p', ARGV[7], 'b', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('PEXPIRE', KEYS[2], ARGV[6])
if ARGV[8] ~= '' then
  redis.call('ZADD', KEYS[3], off, ARGV[8])
  redis.call('PEXPIRE', KEYS[3], ARGV[6])
end
if off % """
    + str(TRIM_EVERY)
    + """ == 1 then
"""
    + _NOW
    + """
  redis.call('XTRIM', KEYS[2], 'MINID', '~', string.format('%d', now - ttl))
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', off - size)
end
local frame = o .. ' ' .. ep .. ' ' .. ARGV[7] .. ' ' .. ARGV[2]
redis.call(cluster and 'SPUBLISH' or 'PUBLISH', ARGV[1], frame)
return {off, ep}
"""
)

#: KEYS: meta, log, dedupe. ARGV: offset, epoch, candidate epoch, keep (ms), cluster.
#: Returns {current offset, epoch, covered (0/1), body...} with the bodies after offset.
ROOM_SINCE = (
    """
local node = ARGV[5] == '1' and redis.call('CLUSTER', 'MYID') or ''
local m = redis.call('HMGET', KEYS[1], 'epoch', 'node')
local ep = m[1]
if not ep or (m[2] or '') ~= node then
  ep = ARGV[3]
  redis.call('DEL', KEYS[2], KEYS[3])
  redis.call('HSET', KEYS[1], 'epoch', ep, 'offset', 0, 'node', node)
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
local cur = tonumber(redis.call('HGET', KEYS[1], 'offset') or '0')
local off = tonumber(ARGV[1])
if ARGV[2] ~= ep or off > cur then return {cur, ep, 0} end
if off == cur then return {cur, ep, 1} end
local need = cur - off
if need > tonumber(redis.call('HGET', KEYS[1], 'size') or '0') then return {cur, ep, 0} end
local ttl = tonumber(redis.call('HGET', KEYS[1], 'ttl') or '0')
"""
    + _NOW
    + """
local entries = redis.call(
  'XREVRANGE', KEYS[2], '+', string.format('%d', now - ttl), 'COUNT', need)
if #entries < need or tonumber(entries[#entries][2][2]) ~= off + 1 then
  return {cur, ep, 0}
end
local out = {cur, ep, 1}
for i = #entries, 1, -1 do
  table.insert(out, entries[i][2][6])
end
return out
"""
)

#: KEYS: meta, log. ARGV: last offset seen, its epoch, most entries.
#: Returns {current offset, epoch or false, (offset, publish id, body)...} after ``last``
#: (after 0 when the epoch differs): what a subscriber missed.
ROOM_AFTER = """
local ep = redis.call('HGET', KEYS[1], 'epoch')
if not ep then return {0, false} end
local cur = tonumber(redis.call('HGET', KEYS[1], 'offset') or '0')
local last = tonumber(ARGV[1])
if ARGV[2] ~= ep then last = 0 end
local out = {cur, ep}
local need = math.min(cur - last, tonumber(ARGV[3]))
if need <= 0 then return out end
local entries = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', need)
for i = #entries, 1, -1 do
  local f = entries[i][2]
  if tonumber(f[2]) > last then
    table.insert(out, f[2])
    table.insert(out, f[4])
    table.insert(out, f[6])
  end
end
return out
"""

# ---------------------------------------------------------------- sessions
# KEYS of a session: meta (hash: p principal, l last seq, b outbox bytes, o owner
# instance), outbox (list of frames), answers (hash: request id -> "ms:seq:digest"),
# order (list of request ids, oldest first).

#: KEYS: (meta, outbox, answers, order) of the first session (they route the call to its
#: node on a cluster). ARGV: max frames, max bytes, owner, max answers, lease (ms), control
#: channel prefix, the number of keys and the keys (meta, outbox, answers, order) of every
#: session, all on that node; then per session its id, its number of runs and each run:
#: kind, value count, values. Every session write the
#: flusher has queued, for up to 256 sessions, in one call (issue 13: a script call costs
#: Redis ~10 µs whatever it does), each session's runs in the order queued. Kinds:
#:
#: * ``o`` open (principal): a new session, held by this instance;
#: * ``f`` frames (seq, frame, ...): appended to the outbox, trimmed to the bounds;
#:   idempotent (a frame at or below the last seq is skipped: a retried flush);
#: * ``r`` remembered answers (request id, "ms:seq:digest", ...);
#: * ``d`` detach (expiry, unix ms): the session's keys expire then;
#: * ``a`` attach (the seq this instance resumes from): it holds the session now;
#:   frames the previous holder added after this one read the session (neither it nor
#:   its client saw them) are dropped, so seqs stay unique; the previous holder, if
#:   another instance, is told (in the same atomic step, so it can write nothing
#:   after) to let go of it (``takeover``);
#: * ``x`` drop: the session is forgotten.
#:
#: Only the holder writes (``f``, ``r``, ``d`` check the owner field): an instance that
#: lost the session to a takeover writes nothing.
SESSIONS = """
local maxf, maxb, owner = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local maxa, lease, told = tonumber(ARGV[4]), ARGV[5], ARGV[6]

local function copy_ttl(meta, key1, key2)
  local ttl = redis.call('PTTL', meta)
  if ttl > 0 then
    redis.call('PEXPIRE', key1, ttl)
    if key2 then redis.call('PEXPIRE', key2, ttl) end
  end
end

local function frames(meta, box, first, last)
  local m = redis.call('HMGET', meta, 'o', 'l', 'b')
  if m[1] ~= owner then return false end
  local seqs, bytes = tonumber(m[2] or '0'), tonumber(m[3] or '0')
  local n, fresh = -1, false
  for i = first, last, 2 do
    local seq = tonumber(ARGV[i])
    if seq > seqs then
      if seq ~= seqs + 1 then
        redis.call('DEL', box)
        bytes = 0
      end
      n = redis.call('RPUSH', box, ARGV[i + 1])
      fresh = fresh or n == 1  -- the list was made now: it needs the session's ttl
      bytes = bytes + #ARGV[i + 1]
      seqs = seq
    end
  end
  if n >= 0 then
    while n > 0 and (n > maxf or bytes > maxb) do
      bytes = bytes - #redis.call('LPOP', box)
      n = n - 1
    end
    redis.call('HSET', meta, 'l', string.format('%d', seqs), 'b', bytes)
    if fresh then copy_ttl(meta, box) end
  end
  return true
end

local function remember(meta, answers, order, first, last)
  local n, fresh = 0, false
  for i = first, last, 2 do
    if redis.call('HSET', answers, ARGV[i], ARGV[i + 1]) == 1 then
      n = redis.call('RPUSH', order, ARGV[i])
      fresh = fresh or n == 1  -- both were made now: they need the session's ttl
    end
  end
  while n > maxa do
    redis.call('HDEL', answers, redis.call('LPOP', order))
    n = n - 1
  end
  if fresh then copy_ttl(meta, answers, order) end
end

local function attach(meta, box, answers, order, seq, id)
  if redis.call('EXISTS', meta) == 0 then return end
  local previous = redis.call('HGET', meta, 'o')
  local last = tonumber(redis.call('HGET', meta, 'l') or '0')
  if last > seq then
    local bytes = tonumber(redis.call('HGET', meta, 'b') or '0')
    for _ = 1, math.min(last - seq, redis.call('LLEN', box)) do
      bytes = bytes - #redis.call('RPOP', box)
    end
    redis.call('HSET', meta, 'l', string.format('%d', seq), 'b', bytes)
  end
  redis.call('HSET', meta, 'o', owner)
  for _, key in ipairs({meta, box, answers, order}) do redis.call('PEXPIRE', key, lease) end
  if previous and previous ~= owner then
    local message = cjson.encode({op = 'takeover', session = id, from = owner})
    redis.call('PUBLISH', told .. previous, message)
  end
end

local nkeys = tonumber(ARGV[7])
local K = {unpack(ARGV, 8, 7 + nkeys)}
local a = 8 + nkeys
for k = 1, nkeys, 4 do
  local meta, box, answers, order = K[k], K[k + 1], K[k + 2], K[k + 3]
  local id, runs = ARGV[a], tonumber(ARGV[a + 1])
  a = a + 2
  local held = nil  -- whether this instance holds the session (nil: not read yet)
  for _ = 1, runs do
    local kind, first = ARGV[a], a + 2
    local last = a + 1 + tonumber(ARGV[a + 1])
    a = last + 1
    if held == nil and (kind == 'r' or kind == 'd') then
      held = redis.call('HGET', meta, 'o') == owner
    end
    if kind == 'f' then
      held = frames(meta, box, first, last)
    elseif kind == 'r' then
      if held then remember(meta, answers, order, first, last) end
    elseif kind == 'o' then
      redis.call('DEL', meta, box, answers, order)
      redis.call('HSET', meta, 'p', ARGV[first], 'l', 0, 'b', 0, 'o', owner)
      redis.call('PEXPIRE', meta, lease)
      held = true
    elseif kind == 'd' then
      if held then
        for _, key in ipairs({meta, box, answers, order}) do
          redis.call('PEXPIREAT', key, ARGV[first])
        end
      end
    elseif kind == 'a' then
      attach(meta, box, answers, order, tonumber(ARGV[first]), id)
      held = nil  -- read again: the session may be gone
    elseif kind == 'x' then
      redis.call('DEL', meta, box, answers, order)
      held = false
    end
  end
end
return 1
"""

#: KEYS: meta, outbox. ARGV: seq. Returns {-1} (no session), {0} (not covered),
#: {1} (nothing after seq) or {1, frames}.
SINCE = """
local last = redis.call('HGET', KEYS[1], 'l')
if not last then return {-1} end
last = tonumber(last)
local seq = tonumber(ARGV[1])
if seq >= last then return {1} end
local n = redis.call('LLEN', KEYS[2])
local first = last - n + 1
if n == 0 or first > seq + 1 then return {0} end
return {1, redis.call('LRANGE', KEYS[2], seq + 1 - first, -1)}
"""

#: KEYS: meta, outbox. ARGV: seq. The frame, or false when it left the outbox.
FRAME_AT = """
local last = tonumber(redis.call('HGET', KEYS[1], 'l') or '0')
local n = redis.call('LLEN', KEYS[2])
local index = tonumber(ARGV[1]) - (last - n + 1)
if index < 0 or index >= n then return false end
return redis.call('LINDEX', KEYS[2], index)
"""

#: KEYS: (meta, outbox, answers, order) of the first session (routing, as ``SESSIONS``).
#: ARGV: owner, lease (ms), then the four keys of every session, all on that node. Renew
#: the lease of the sessions this instance holds (up to 256 in one call).
LEASE = """
for k = 3, #ARGV, 4 do
  if redis.call('HGET', ARGV[k], 'o') == ARGV[1] then
    for i = k, k + 3 do redis.call('PEXPIRE', ARGV[i], ARGV[2]) end
  end
end
return 1
"""

# ---------------------------------------------------------------- presence
# KEYS of a room's presence: members (hash: member -> JSON [[instance, key], ...]) and
# instances (sorted set: instance -> unix ms it stops counting unless it beats again).

_LIVE = (
    _NOW
    + """
local alive = {}
local function live(instance)
  if alive[instance] == nil then
    local until_ms = redis.call('ZSCORE', KEYS[2], instance)
    alive[instance] = until_ms ~= false and tonumber(until_ms) > now
  end
  return alive[instance]
end
-- keep only a member's entries of live instances (its hash field, JSON entries);
-- returns how many are left (none: the member is gone)
local function sweep(member, raw)
  local entries = cjson.decode(raw)
  local kept = {}
  for _, e in ipairs(entries) do
    if live(e[1]) then table.insert(kept, e) end
  end
  if #kept == 0 then
    redis.call('HDEL', KEYS[1], member)
  elseif #kept < #entries then
    redis.call('HSET', KEYS[1], member, cjson.encode(kept))
  end
  return #kept
end
"""
)

_BEAT = """
local ttl = tonumber(ARGV[#ARGV])
redis.call('ZADD', KEYS[2], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], 3 * ttl)
redis.call('PEXPIRE', KEYS[2], 3 * ttl)
"""

#: KEYS: members, instances, sweep cursor. ARGV: instance, entries to sweep, ttl (ms).
#: This instance still counts; and a few members (HSCAN) are swept of dead instances'
#: entries, so that members of an instance that died stop counting in HLEN
#: (``presence_count``) even in a room nobody lists.
PRESENCE_BEAT = (
    _LIVE
    + _BEAT
    + """
local scan = redis.call('HSCAN', KEYS[1], redis.call('GET', KEYS[3]) or '0', 'COUNT', ARGV[2])
local found = scan[2]
for i = 1, #found, 2 do sweep(found[i], found[i + 1]) end
if scan[1] == '0' then
  redis.call('DEL', KEYS[3])
else
  redis.call('SET', KEYS[3], scan[1], 'PX', 3 * ttl)
end
return 1
"""
)

#: KEYS: members, instances. ARGV: instance, (member, key) pairs, ttl (ms). The joins of
#: a room gathered in one call (issue 13: a call costs Redis more than the work in it).
#: Returns per pair: 1 when the member was not present (through any live instance)
#: before, else 0; then the members counted (HLEN) after it.
PRESENCE_ADD = (
    _LIVE
    + _BEAT
    + """
local out = {}
for i = 2, #ARGV - 1, 2 do
  local member, key = ARGV[i], ARGV[i + 1]
  local raw = redis.call('HGET', KEYS[1], member)
  local kept = {}
  local had = false
  local again = false
  if raw then
    for _, e in ipairs(cjson.decode(raw)) do
      if live(e[1]) then
        table.insert(kept, e)
        had = true
        if e[1] == ARGV[1] and e[2] == key then again = true end
      end
    end
  end
  if not again then table.insert(kept, {ARGV[1], key}) end
  redis.call('HSET', KEYS[1], member, cjson.encode(kept))
  table.insert(out, had and 0 or 1)
  table.insert(out, redis.call('HLEN', KEYS[1]))
end
return out
"""
)

#: KEYS: members, instances. ARGV: instance, member, key.
#: {1 when the member is no longer present at all, else 0; members counted (HLEN)}.
PRESENCE_REMOVE = (
    _LIVE
    + """
local raw = redis.call('HGET', KEYS[1], ARGV[2])
if not raw then return {0, redis.call('HLEN', KEYS[1])} end
local kept = {}
local found = false
for _, e in ipairs(cjson.decode(raw)) do
  if e[1] == ARGV[1] and e[2] == ARGV[3] then
    found = true
  elseif live(e[1]) then
    table.insert(kept, e)
  end
end
if #kept == 0 then
  redis.call('HDEL', KEYS[1], ARGV[2])
else
  redis.call('HSET', KEYS[1], ARGV[2], cjson.encode(kept))
end
local count = redis.call('HLEN', KEYS[1])
if found and #kept == 0 then return {1, count} end
return {0, count}
"""
)

#: KEYS: members, instances. Members present through a live instance, sorted;
#: entries of dead instances are removed on the way.
PRESENCE_LIST = (
    _LIVE
    + """
local all = redis.call('HGETALL', KEYS[1])
local out = {}
for i = 1, #all, 2 do
  if sweep(all[i], all[i + 1]) > 0 then table.insert(out, all[i]) end
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
table.sort(out)
return out
"""
)
