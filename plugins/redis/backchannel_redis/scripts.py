"""The Lua scripts of the Redis broker: each is one round trip and atomic.

Keys of one session share the hash tag ``{session id}`` and keys of one room
share ``{room}``, so every script but ``APPEND`` touches one Redis Cluster slot
(``APPEND`` carries the frames of many sessions: a cluster mode would group its
calls by slot). Times come from
Redis (``TIME``), never from an instance's clock, except a detached session's
absolute expiry, which the instance computes (``PEXPIREAT``).
"""

from __future__ import annotations

__all__ = [
    "ATTACH",
    "DETACH",
    "EPOCH",
    "FRAME_AT",
    "LEASE",
    "OPEN",
    "APPEND",
    "PRESENCE_ADD",
    "PRESENCE_BEAT",
    "PRESENCE_LIST",
    "PRESENCE_REMOVE",
    "PUBLISH",
    "REMEMBER",
    "ROOM_AFTER",
    "ROOM_SINCE",
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

# ------------------------------------------------------------------- rooms

#: KEYS: meta, log, dedupe (offsets by request, within the history). ARGV: channel, body,
#: candidate epoch, history size, history ttl (ms), keep (ms), publish id, dedupe key or "".
#: Next offset; store, trim, fan out. Returns {offset, epoch}, or for a retry of a publish
#: still in the history {its offset, epoch, its body} (body nil if the stream lost it).
PUBLISH = (
    """
local ep = redis.call('HGET', KEYS[1], 'epoch')
local off = tonumber(redis.call('HGET', KEYS[1], 'offset') or '0')
if not ep or (off > 0 and redis.call('EXISTS', KEYS[2]) == 0) then
  -- the room is new, or its history was lost: a new epoch, offsets from 1 again
  ep = ARGV[3]
  off = 0
  redis.call('DEL', KEYS[2], KEYS[3])
elseif ARGV[8] ~= '' then
  local seen = redis.call('ZSCORE', KEYS[3], ARGV[8])
  if seen then  -- a retry of a publish: answer with the first one, publish nothing
    local want = tonumber(seen)
    for _, entry in ipairs(redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', off - want + 1)) do
      if tonumber(entry[2][2]) == want then return {want, ep, entry[2][6]} end
    end
    return {want, ep, false}
  end
end
off = off + 1
local size = tonumber(ARGV[4])
local ttl = tonumber(ARGV[5])
redis.call('HSET', KEYS[1], 'epoch', ep, 'offset', off, 'size', size, 'ttl', ttl)
"""
    + _NOW
    + """
local o = string.format('%d', off)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', size, '*', 'o', o, 'p', ARGV[7], 'b', ARGV[2])
redis.call('XTRIM', KEYS[2], 'MINID', '~', string.format('%d', now - ttl))
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('PEXPIRE', KEYS[2], ARGV[6])
if ARGV[8] ~= '' then
  redis.call('ZADD', KEYS[3], off, ARGV[8])
  redis.call('PEXPIRE', KEYS[3], ARGV[6])
end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', off - size)
redis.call('PUBLISH', ARGV[1], o .. ' ' .. ep .. ' ' .. ARGV[7] .. ' ' .. ARGV[2])
return {off, ep}
"""
)

#: KEYS: meta, log, dedupe. ARGV: offset, epoch, candidate epoch, keep (ms).
#: Returns {current offset, epoch, covered (0/1), body...} with the bodies after offset.
ROOM_SINCE = (
    """
local ep = redis.call('HGET', KEYS[1], 'epoch')
if not ep then
  ep = ARGV[3]
  redis.call('DEL', KEYS[2], KEYS[3])
  redis.call('HSET', KEYS[1], 'epoch', ep, 'offset', 0)
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

_COPY_TTL = """
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then
  for i = 2, #KEYS do redis.call('PEXPIRE', KEYS[i], ttl) end
end
"""

#: KEYS: meta, outbox, answers, order. ARGV: principal, owner, lease (ms).
OPEN = """
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
redis.call('HSET', KEYS[1], 'p', ARGV[1], 'l', 0, 'b', 0, 'o', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

#: KEYS: (meta, outbox) of each session. ARGV: max frames, max bytes, owner, then for each
#: session its frame count and (seq, frame) pairs. The flusher sends the frames of many
#: sessions in one call (a room message fans out to every member's outbox), so the
#: per-session work is three commands per frame. Idempotent: a frame at or below the last
#: seq is skipped (a retried flush). Only the holder writes (an instance that lost the
#: session to a takeover writes nothing). Returns how many sessions took frames.
APPEND = """
local maxf, maxb, owner = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local a, done = 4, 0
for k = 1, #KEYS, 2 do
  local meta, box = KEYS[k], KEYS[k + 1]
  local first = a + 1
  a = first + 2 * tonumber(ARGV[a])
  local m = redis.call('HMGET', meta, 'o', 'l', 'b')
  if m[1] == owner then
    local last, bytes = tonumber(m[2] or '0'), tonumber(m[3] or '0')
    local n, fresh = -1, false
    for i = first, a - 1, 2 do
      local seq = tonumber(ARGV[i])
      if seq > last then
        if seq ~= last + 1 then
          redis.call('DEL', box)
          bytes = 0
        end
        n = redis.call('RPUSH', box, ARGV[i + 1])
        fresh = fresh or n == 1  -- the list was made now: it needs the session's ttl
        bytes = bytes + #ARGV[i + 1]
        last = seq
      end
    end
    if n >= 0 then
      while n > 0 and (n > maxf or bytes > maxb) do
        bytes = bytes - #redis.call('LPOP', box)
        n = n - 1
      end
      redis.call('HSET', meta, 'l', string.format('%d', last), 'b', bytes)
      if fresh then
        local ttl = redis.call('PTTL', meta)
        if ttl > 0 then redis.call('PEXPIRE', box, ttl) end
      end
      done = done + 1
    end
  end
end
return done
"""

#: KEYS: meta, answers, order. ARGV: most answers, owner, (request id, "ms:seq:digest")...
REMEMBER = (
    """
if redis.call('HGET', KEYS[1], 'o') ~= ARGV[2] then return 0 end
for i = 3, #ARGV, 2 do
  if redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) == 1 then
    redis.call('RPUSH', KEYS[3], ARGV[i])
  end
end
local n = redis.call('LLEN', KEYS[3])
while n > tonumber(ARGV[1]) do
  redis.call('HDEL', KEYS[2], redis.call('LPOP', KEYS[3]))
  n = n - 1
end
"""
    + _COPY_TTL
    + """
return 1
"""
)

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

#: KEYS: meta, outbox, answers, order. ARGV: owner, expiry (unix ms).
#: Only the instance that holds the session sets its expiry.
DETACH = """
if redis.call('HGET', KEYS[1], 'o') ~= ARGV[1] then return 0 end
for i = 1, #KEYS do redis.call('PEXPIREAT', KEYS[i], ARGV[2]) end
return 1
"""

#: KEYS: meta, outbox, answers, order. ARGV: owner, lease (ms), last seq, control channel
#: prefix, session id. This instance holds it now, from ``last seq``: frames the previous
#: holder added after this one read the session (neither it nor its client saw them) are
#: dropped, so seqs stay unique; the previous holder, if another instance, is told (in the
#: same atomic step, so it can write nothing after) to let go of it.
ATTACH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local previous = redis.call('HGET', KEYS[1], 'o')
local last = tonumber(redis.call('HGET', KEYS[1], 'l') or '0')
local seq = tonumber(ARGV[3])
if last > seq then
  local bytes = tonumber(redis.call('HGET', KEYS[1], 'b') or '0')
  for _ = 1, math.min(last - seq, redis.call('LLEN', KEYS[2])) do
    bytes = bytes - #redis.call('RPOP', KEYS[2])
  end
  redis.call('HSET', KEYS[1], 'l', string.format('%d', seq), 'b', bytes)
end
redis.call('HSET', KEYS[1], 'o', ARGV[1])
for i = 1, #KEYS do redis.call('PEXPIRE', KEYS[i], ARGV[2]) end
if previous and previous ~= ARGV[1] then
  local told = cjson.encode({op = 'takeover', session = ARGV[5], from = ARGV[1]})
  redis.call('PUBLISH', ARGV[4] .. previous, told)
end
return 1
"""

#: KEYS: meta, outbox, answers, order. ARGV: owner, lease (ms). Renew a held session's lease.
LEASE = """
if redis.call('HGET', KEYS[1], 'o') ~= ARGV[1] then return 0 end
for i = 1, #KEYS do redis.call('PEXPIRE', KEYS[i], ARGV[2]) end
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
for i = 1, #found, 2 do
  local entries = cjson.decode(found[i + 1])
  local kept = {}
  for _, e in ipairs(entries) do
    if live(e[1]) then table.insert(kept, e) end
  end
  if #kept == 0 then
    redis.call('HDEL', KEYS[1], found[i])
  elseif #kept < #entries then
    redis.call('HSET', KEYS[1], found[i], cjson.encode(kept))
  end
end
if scan[1] == '0' then
  redis.call('DEL', KEYS[3])
else
  redis.call('SET', KEYS[3], scan[1], 'PX', 3 * ttl)
end
return 1
"""
)

#: KEYS: members, instances. ARGV: instance, member, key, ttl (ms).
#: 1 when the member was not present (through any live instance) before.
PRESENCE_ADD = (
    _LIVE
    + _BEAT
    + """
local raw = redis.call('HGET', KEYS[1], ARGV[2])
local kept = {}
local had = false
local again = false
if raw then
  for _, e in ipairs(cjson.decode(raw)) do
    if live(e[1]) then
      table.insert(kept, e)
      had = true
      if e[1] == ARGV[1] and e[2] == ARGV[3] then again = true end
    end
  end
end
if not again then table.insert(kept, {ARGV[1], ARGV[3]}) end
redis.call('HSET', KEYS[1], ARGV[2], cjson.encode(kept))
if had then return 0 end
return 1
"""
)

#: KEYS: members, instances. ARGV: instance, member, key.
#: 1 when the member is no longer present at all.
PRESENCE_REMOVE = (
    _LIVE
    + """
local raw = redis.call('HGET', KEYS[1], ARGV[2])
if not raw then return 0 end
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
if found and #kept == 0 then return 1 end
return 0
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
  local entries = cjson.decode(all[i + 1])
  local kept = {}
  for _, e in ipairs(entries) do
    if live(e[1]) then table.insert(kept, e) end
  end
  if #kept == 0 then
    redis.call('HDEL', KEYS[1], all[i])
  else
    if #kept < #entries then redis.call('HSET', KEYS[1], all[i], cjson.encode(kept)) end
    table.insert(out, all[i])
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
table.sort(out)
return out
"""
)
