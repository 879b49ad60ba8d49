"""Every Lua script the project runs in Redis.  Each is written for the keys of one user or one item (one
hash tag, one cluster slot), so each step is atomic on a single node or on Redis Cluster; the hot ones
also run in bulk through ``per_entity``: one call for many users, all of them in one slot."""

from __future__ import annotations

from state.users import COARSE_IN_STATE, MARKS_CAP, ROW_FIELDS

#: Lua: set or drop an o:/p: mark, keeping the count ``nm``; past ``MARKS_CAP`` marks, drop the older half
#: (by the ``ver`` each was written at, then by name).  KEYS[1] is the state hash; ``ver`` the new version.
_MARKS = """
local function mark(name, ver)
  if redis.call('HSET', KEYS[1], name, ver) == 1 then redis.call('HINCRBY', KEYS[1], 'nm', 1) end
end
local function unmark(name)
  if redis.call('HDEL', KEYS[1], name) == 1 then redis.call('HINCRBY', KEYS[1], 'nm', -1) end
end
local function prune()
  if tonumber(redis.call('HGET', KEYS[1], 'nm') or '0') <= __CAP__ then return end
  local marks = {}
  for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
    local kind = string.sub(f, 1, 2)
    if kind == 'o:' or kind == 'p:' then
      marks[#marks + 1] = {f, tonumber(redis.call('HGET', KEYS[1], f))}
    end
  end
  table.sort(marks, function(a, b) return a[2] < b[2] or (a[2] == b[2] and a[1] < b[1]) end)
  local drop = #marks - math.floor(__CAP__ / 2)
  for i = 1, drop do redis.call('HDEL', KEYS[1], marks[i][1]) end
  redis.call('HSET', KEYS[1], 'nm', #marks - drop)
end
""".replace("__CAP__", str(MARKS_CAP))

#: One consistent snapshot of a user: its state fields, the coarse state and the history, in one atomic
#: step.  KEYS: state hash, history string, coarse-state string.  ARGV: a batch's watermark and origin-mark
#: fields.  Returns the values of ``state.users.ROW_FIELDS`` (written into the script, so a batch does not
#: send them for every user), then of the ARGV fields, then the coarse state (from the state hash's
#: ``coarse`` field for a state written before it had a key of its own), then the history.
READ_USER = """
local vals = redis.call('HMGET', KEYS[1], __ROW_FIELDS__, unpack(ARGV))
vals[#vals + 1] = redis.call('GET', KEYS[3]) or redis.call('HGET', KEYS[1], '__LEGACY__')
vals[#vals + 1] = redis.call('GET', KEYS[2])
return vals
""".replace("__LEGACY__", COARSE_IN_STATE).replace("__ROW_FIELDS__", ", ".join(f"'{f}'" for f in ROW_FIELDS))

#: Apply one planned update of a user (``state.users.UserUpdate``): only if ``ver`` and ``gen`` are still
#: what the plan read; bumps ``ver``; watermarks, ``last_ts`` and ``kts`` only ever move up.
#: The coarse state goes to its own string; a state written before that had it in the state hash's
#: ``coarse`` field, which the first write of a new coarse state drops (rewriting the hash, so Redis can
#: store it as a listpack again).  Nothing is written, to any key, unless ``ver`` and ``gen`` match.
#: KEYS: state hash, history string, coarse-state string.
#: ARGV: expected ver, expected gen ('' none), n_events, has_coarse ('1'), coarse, last_ts, kts,
#: records (appended as given: the planner trims, by rewriting the whole history, see ``streams.planner``),
#: has_history ('1'), history, new gen ('' keeps), new cb, backfill time ('' keeps), backfill ids
#: ('\n'-joined), n_watermarks,
#: [watermark field, offset]..., then [applied-mark field, parked-mark field]... of applied parked events.
#: Returns {new seq, refined seq, new ver}, or {-1, current ver} on conflict.
APPLY_USER = (
    _MARKS
    + """
local ver = tonumber(redis.call('HGET', KEYS[1], 'ver') or '0')
local gen = redis.call('HGET', KEYS[1], 'gen') or ''
if ver ~= tonumber(ARGV[1]) or gen ~= ARGV[2] then
  return {-1, ver}
end
local function raise(name, value)
  local cur = redis.call('HGET', KEYS[1], name)
  if (not cur) or tonumber(value) > tonumber(cur) then
    redis.call('HSET', KEYS[1], name, value)
  end
end
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0') + tonumber(ARGV[3])
ver = ver + 1
redis.call('HSET', KEYS[1], 'ver', ver, 'seq', seq)
if ARGV[4] == '1' then
  redis.call('SET', KEYS[3], ARGV[5], 'KEEPTTL')
  if redis.call('HDEL', KEYS[1], '__LEGACY__') == 1 then
    local all, ttl = redis.call('HGETALL', KEYS[1]), redis.call('PTTL', KEYS[1])
    redis.call('DEL', KEYS[1])
    redis.call('HSET', KEYS[1], unpack(all))
    if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
  end
end
if tonumber(ARGV[6]) > 0 then raise('last_ts', ARGV[6]) end
if tonumber(ARGV[7]) > 0 then raise('kts', ARGV[7]) end
if ARGV[9] == '1' then
  if #ARGV[10] > 0 then redis.call('SET', KEYS[2], ARGV[10]) else redis.call('DEL', KEYS[2]) end
end
if #ARGV[8] > 0 then  -- one SET of the concatenation: APPEND would grow the string's buffer up to 2x
  redis.call('SET', KEYS[2], (redis.call('GET', KEYS[2]) or '') .. ARGV[8], 'KEEPTTL')
end
if ARGV[11] ~= '' then
  redis.call('HSET', KEYS[1], 'gen', ARGV[11], 'cb', ARGV[12])
end
if ARGV[13] ~= '' then
  redis.call('HSET', KEYS[1], 'bts', ARGV[13], 'bids', ARGV[14])
end
local n = tonumber(ARGV[15])
for i = 16, 15 + 2 * n, 2 do
  raise(ARGV[i], ARGV[i + 1])
end
for i = 16 + 2 * n, #ARGV, 2 do
  mark(ARGV[i], ver)
  unmark(ARGV[i + 1])
end
prune()
local refined = tonumber(redis.call('HGET', KEYS[1], 'refined_seq') or '0')
return {seq, refined, ver}
""".replace("__LEGACY__", COARSE_IN_STATE)
)

#: Note in a user's state that events are about to be parked (before the watermark passes them), as a
#: versioned write: only if ``ver`` and ``gen`` are still what the plan read; bumps ``ver``.
#: KEYS: state hash.  ARGV: expected ver, expected gen ('' none), parked-mark fields...
#: Returns the new ver, or -1 on conflict.
MARK_PARKED = (
    _MARKS
    + """
local ver = tonumber(redis.call('HGET', KEYS[1], 'ver') or '0')
local gen = redis.call('HGET', KEYS[1], 'gen') or ''
if ver ~= tonumber(ARGV[1]) or gen ~= ARGV[2] then
  return -1
end
ver = ver + 1
redis.call('HSET', KEYS[1], 'ver', ver)
for i = 3, #ARGV do
  mark(ARGV[i], ver)
end
prune()
return ver
"""
)

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

#: Write refined vectors unless newer ones (a higher seq) are already there.  The latest key holds one
#: model version's vectors; ``:v@<version>`` holds a version's vectors only while they are not the latest
#: (kept ``ttl`` seconds, so readers can pin a version during a roll-out): when a write of another version
#: takes the latest key, the vectors it replaces move to their version's key; a version that becomes the
#: latest drops its own copy.  So one model version costs one copy, two during a roll-out.  The latest key
#: takes the state's idle-user TTL when it has one.
#: KEYS: vectors hash, state hash, vectors hash of this version.
#: ARGV: seq, version, updated_at, event_ts, produced_at, k, d, ttl, [field, bytes]...
#: Returns 1 when the latest key was written, 0 when it was skipped as stale.
WRITE_VECTORS = """
local seq, ttl = tonumber(ARGV[1]), tonumber(ARGV[8])
local function write(key)
  redis.call('DEL', key)
  redis.call('HSET', key, 'seq', ARGV[1], 'version', ARGV[2], 'updated_at', ARGV[3], 'event_ts', ARGV[4],
             'produced_at', ARGV[5], 'k', ARGV[6], 'd', ARGV[7])
  for i = 9, #ARGV, 2 do
    redis.call('HSET', key, ARGV[i], ARGV[i + 1])
  end
end
local cur = redis.call('HMGET', KEYS[1], 'seq', 'version')
local own = tonumber(redis.call('HGET', KEYS[3], 'seq') or '-1')
if tonumber(cur[1] or '-1') > seq then
  if cur[2] ~= ARGV[2] and own <= seq then  -- stale as the latest, the newest of its version
    write(KEYS[3])
    if ttl > 0 then redis.call('EXPIRE', KEYS[3], ttl) end
  end
  return 0
end
if cur[2] and cur[2] ~= ARGV[2] then  -- the latest was another version's: keep it for its pinned readers
  local other = KEYS[1] .. '@' .. cur[2]  -- the same hash tag, so the same slot
  redis.call('COPY', KEYS[1], other, 'REPLACE')
  if ttl > 0 then redis.call('EXPIRE', other, ttl) else redis.call('PERSIST', other) end
end
write(KEYS[1])
if own <= seq then redis.call('DEL', KEYS[3]) end
local idle = redis.call('PTTL', KEYS[2])  -- an idle-user TTL on the state (user_ttl_s): the vectors share it
if idle > 0 then redis.call('PEXPIRE', KEYS[1], idle) end
local refined = tonumber(redis.call('HGET', KEYS[2], 'refined_seq') or '0')
if seq > refined then
  redis.call('HSET', KEYS[2], 'refined_seq', ARGV[1])
end
return 1
"""

#: One model version's vectors, read atomically: the latest key when it holds that version, else the
#: version's own key (``WRITE_VECTORS`` keeps a version in one of the two).
#: KEYS: vectors hash, vectors hash of the version.  ARGV: version.  Returns HGETALL's flat reply.
READ_VECTORS_OF = """
if redis.call('HGET', KEYS[1], 'version') == ARGV[1] then
  return redis.call('HGETALL', KEYS[1])
end
return redis.call('HGETALL', KEYS[2])
"""

#: Mark users dirty (awaiting refinement).  The queue is ordered by when a user was first marked, so it is
#: served oldest first and a busy user cannot push a quiet one back; the seq to refine up to is kept
#: beside it, raised only.  Both keys share the partition's hash tag.
#: KEYS: queue zset, seq hash.  ARGV: now (ms), [user, seq]...
MARK_DIRTY = """
for i = 2, #ARGV, 2 do
  redis.call('ZADD', KEYS[1], 'NX', ARGV[1], ARGV[i])
  local cur = redis.call('HGET', KEYS[2], ARGV[i])
  if (not cur) or tonumber(ARGV[i + 1]) > tonumber(cur) then
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  end
end
return 1
"""

#: The oldest dirty users and the seq each one awaits.  KEYS: queue zset, seq hash.  ARGV: limit.
#: Returns [user, seq, user, seq, ...].
DIRTY_USERS = """
local users = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
local out = {}
for _, u in ipairs(users) do
  out[#out + 1] = u
  out[#out + 1] = redis.call('HGET', KEYS[2], u) or '0'
end
return out
"""

#: Leave the queue once refined up to the seq it awaits (a newer mark keeps the user queued, in its place).
#: KEYS: queue zset, seq hash.  ARGV: user, refined seq.
CLEAR_DIRTY = """
local s = redis.call('HGET', KEYS[2], ARGV[1])
if (not s) or tonumber(s) <= tonumber(ARGV[2]) then
  redis.call('HDEL', KEYS[2], ARGV[1])
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
"""

#: Park an event until its item arrives, unless the item's parking list is full.
#: KEYS: parked list.  ARGV: max length, event body.  Returns 1 when parked, 0 when the list is full.
PARK = """
if redis.call('LLEN', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('RPUSH', KEYS[1], ARGV[2])
return 1
"""

#: Remove parked events by value (once re-produced or dead-lettered): two releasers of the same events
#: each remove what is there, so nothing another parker added meanwhile is lost.
#: KEYS: parked list.  ARGV: event bodies.  Returns {removed, left}.
UNPARK = """
local removed = 0
for i = 1, #ARGV do
  removed = removed + redis.call('LREM', KEYS[1], 1, ARGV[i])
end
return {removed, redis.call('LLEN', KEYS[1])}
"""

#: Count events in an item's trend (``state.trend``): each (offset, ts) above the offset already counted
#: for its (topic, partition) adds exp(-(tt - ts) / tau) to ``tc`` (moving ``tt`` up first when newer).
#: KEYS: item hash.  ARGV: tau seconds, mark field, [offset, ts]... in offset order.
#: Returns how many events were added.
TREND_ADD = """
local tau = tonumber(ARGV[1])
local counted = tonumber(redis.call('HGET', KEYS[1], ARGV[2]) or '-1')
local c = tonumber(redis.call('HGET', KEYS[1], 'tc') or '0')
local t = redis.call('HGET', KEYS[1], 'tt')
if t then t = tonumber(t) end
local added = 0
for i = 3, #ARGV, 2 do
  local off, ts = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
  if off > counted then
    if not t then
      c, t = 1.0, ts
    elseif ts >= t then
      c, t = c * math.exp(-(ts - t) / tau) + 1.0, ts
    else
      c = c + math.exp(-(t - ts) / tau)
    end
    counted, added = off, added + 1
  end
end
if added > 0 then
  redis.call('HSET', KEYS[1], 'tc', string.format('%.17g', c), 'tt', string.format('%.17g', t),
             ARGV[2], string.format('%d', counted))
end
return added
"""


def per_entity(body: str, keys_each: int) -> str:
    """``body`` (a script for one user or item: its KEYS and ARGV) run for many in one call, so that a
    batch costs one script call instead of one per user (the caller's packing, the reply parsing and
    the server's per-call work, ~4x less client CPU for 250 users).  KEYS: ``keys_each`` per entity, in
    order; ARGV: per entity, the count of its arguments, then them.  Returns each entity's reply, in
    order.  A whole call is one atomic step; each entity's step is the one ``body`` makes alone (its
    compare-and-set included), so one entity's conflict changes nothing for the others.  ``body`` must
    return a value, never nil (a nil would end the reply's array early: the store's strict zip raises).
    On Redis Cluster every key of a call must share a slot: ``state.store`` groups entities by slot."""
    return f"""
local function one(KEYS, ARGV)
{body}
end
local out, a = {{}}, 1
for e = 0, #KEYS / {keys_each} - 1 do
  local keys, args, n = {{}}, {{}}, tonumber(ARGV[a])
  for i = 1, {keys_each} do keys[i] = KEYS[e * {keys_each} + i] end
  for i = 1, n do args[i] = ARGV[a + i] end
  a = a + n + 1
  out[e + 1] = one(keys, args)
end
return out
"""


READ_USERS = per_entity(READ_USER, 3)
APPLY_USERS = per_entity(APPLY_USER, 3)
MARKS_PARKED = per_entity(MARK_PARKED, 1)
TREND_ADDS = per_entity(TREND_ADD, 1)
WRITE_VECTORS_MANY = per_entity(WRITE_VECTORS, 3)
CLEAR_DIRTIES = per_entity(CLEAR_DIRTY, 2)
#: KEYS: item hashes.  ARGV per item: 1, its code field.  Returns each item's code (nil: none).
ITEM_CODES = per_entity("return redis.call('HGET', KEYS[1], ARGV[1])", 1)
