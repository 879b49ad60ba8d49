"""Every Lua script the project runs in Redis. Each touches the keys of one user or one item only
(one hash tag, one cluster slot), so each step is atomic on a single node or on Redis Cluster."""

from __future__ import annotations

#: Apply a batch of a user's events: compare-and-set on ``seq`` (a concurrent writer makes it return
#: the current seq so the caller re-reads and recomputes), then state + watermarks + history in one step.
#: KEYS: state hash, history string.
#: ARGV: expected_seq, n_events, coarse_bytes, last_ts, history_records, record_size, cap,
#: replacement history ('' keeps it; a codebook switch re-encodes it), [field, value]...
#: (an empty value deletes the field)
#: Returns {new_seq, refined_seq} or {-1, current_seq} on conflict.
APPLY_EVENTS = """
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
if seq ~= tonumber(ARGV[1]) then
  return {-1, seq}
end
local new_seq = seq + tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'coarse', ARGV[3], 'seq', new_seq)
local last = tonumber(redis.call('HGET', KEYS[1], 'last_ts') or '0')
if tonumber(ARGV[4]) > last then
  redis.call('HSET', KEYS[1], 'last_ts', ARGV[4])
end
for i = 9, #ARGV, 2 do
  if ARGV[i + 1] == '' then
    redis.call('HDEL', KEYS[1], ARGV[i])
  else
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
if #ARGV[8] > 0 then
  redis.call('SET', KEYS[2], ARGV[8])
end
if #ARGV[5] > 0 then
  local len = redis.call('APPEND', KEYS[2], ARGV[5])
  local keep = tonumber(ARGV[6]) * tonumber(ARGV[7])
  if len > keep then
    redis.call('SET', KEYS[2], redis.call('GETRANGE', KEYS[2], len - keep, -1))
  end
end
local refined = tonumber(redis.call('HGET', KEYS[1], 'refined_seq') or '0')
return {new_seq, refined}
"""

#: Store an item: its codes in the writer's codebook replace those of any other codebook (they were
#: made from the item's previous content), then the other fields.
#: KEYS: item hash. ARGV: [field, value]... (one of them ``code:<codebook id>``)
PUT_ITEM = """
for _, name in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.sub(name, 1, 5) == 'code:' then
    redis.call('HDEL', KEYS[1], name)
  end
end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""

#: Write refined vectors unless newer ones (a higher seq) are already there, to the latest key and to
#: the key of this model version (kept ``ttl`` seconds, so readers can pin a version during a roll-out).
#: KEYS: vectors hash, state hash, vectors hash of this version.
#: ARGV: seq, version, updated_at, event_ts, produced_at, k, d, ttl, [field, bytes]...
#: Returns 1 when the latest key was written, 0 when it was skipped as stale.
WRITE_VECTORS = """
local function write(key)
  redis.call('HSET', key, 'seq', ARGV[1], 'version', ARGV[2], 'updated_at', ARGV[3], 'event_ts', ARGV[4],
             'produced_at', ARGV[5], 'k', ARGV[6], 'd', ARGV[7])
  for i = 9, #ARGV, 2 do
    redis.call('HSET', key, ARGV[i], ARGV[i + 1])
  end
end
if tonumber(redis.call('HGET', KEYS[3], 'seq') or '-1') <= tonumber(ARGV[1]) then
  write(KEYS[3])
  if tonumber(ARGV[8]) > 0 then
    redis.call('EXPIRE', KEYS[3], ARGV[8])
  end
end
if tonumber(redis.call('HGET', KEYS[1], 'seq') or '-1') > tonumber(ARGV[1]) then
  return 0
end
write(KEYS[1])
local refined = tonumber(redis.call('HGET', KEYS[2], 'refined_seq') or '0')
if tonumber(ARGV[1]) > refined then
  redis.call('HSET', KEYS[2], 'refined_seq', ARGV[1])
end
return 1
"""

#: Remove a user from a dirty set only if no newer event re-marked it meanwhile.
#: KEYS: dirty zset. ARGV: member, score seen when it was picked.
CLEAR_DIRTY = """
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
if s and tonumber(s) <= tonumber(ARGV[2]) then
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
"""

#: Drop the first N parked events of an item (after they were re-produced); deletes an empty list.
#: KEYS: parked list. ARGV: n. Returns how many remain.
DROP_PARKED = """
redis.call('LTRIM', KEYS[1], tonumber(ARGV[1]), -1)
local left = redis.call('LLEN', KEYS[1])
if left == 0 then
  redis.call('DEL', KEYS[1])
end
return left
"""
