"""The Lua scripts of the Redis broker: every write to a room happens in one of them.

Redis runs a script atomically, so whatever a script reads, writes and publishes is one
step in the room's total order. Every pub/sub payload names the room's *run* (its epoch)
and its position (the room's ``seq`` counter), which is what lets a worker tell a stale,
a duplicate and a missed event apart (see :mod:`.delivery`).

Payloads on ``<channel prefix><room>`` (only the last field may hold a ``|``, and none a
newline: epochs are URL-safe tokens, member entries are ``<id>:<JSON [user, name,
skeleton, skeleton]>`` (see :func:`roomcast.names.skeleton`; no skeletons for a member
without a name, nor in entries written before names were claimed) and events are JSON,
both with newlines escaped):

- ``M|<epoch>|<seq>|<event>\\n<seq>|<event>...``: a batch of messages, consecutive seqs;
- ``J|<epoch>|<seq>|<count>|<entry>\\n<entry>...``: members joined (``count`` after them);
- ``L|<epoch>|<seq>|<count>|<entry>\\n<entry>...``: members left or expired.

and on ``<namespace>control``, for every worker: ``D|<report list>|<user>`` (the server
API's disconnect: close the user's connections, report how many on the list).

Every script that changes a room's presence or history also keeps the idle rooms within
their budgets (``settle`` and ``evict`` below; see *Idle rooms* in :mod:`.keys`):
:data:`IDLE` and :data:`IDLE_BYTES` track the rooms without presence, and a room
forgotten beyond the budgets has all its keys deleted.

A room's keys share the hash tag ``{room}``. The scripts that serve several rooms at once
(publishing a batch, presence upkeep) take several rooms' keys, which a single Redis
accepts; on Redis Cluster they are called once per hash slot, with ``SPUBLISH`` and
without the global idle keys (:func:`.cluster.cluster_script`, which reads
:data:`HELPERS`). Evicting an idle room touches keys no script was given (built in Lua
from the room's name, which every room key carries) and the two global idle keys: a
single Redis allows it, Redis Cluster does not.
"""

from __future__ import annotations

from typing import Final

#: what :data:`JOIN` returns (spelt out in its Lua) when another owner holds a name that
#: looks like the joiner's
TAKEN: Final = "taken"
#: sorted set: the idle rooms (no presence, history kept) -> when they became idle (ms)
IDLE: Final = "roomcast:idle"
#: the UTF-8 bytes of history the rooms in :data:`IDLE` hold together
IDLE_BYTES: Final = "roomcast:idle-bytes"

__all__ = [
    "CLAIM",
    "IDLE",
    "IDLE_BYTES",
    "JOIN",
    "LEAVE",
    "PRESENCE",
    "PUBLISH",
    "READ",
    "REFRESH_CLAIMS",
    "RENAME",
    "REPORT",
    "RESTART",
    "TAKEN",
    "UPKEEP",
]

HELPERS: Final = (
    f"local IDLE, IDLE_BYTES = '{IDLE}', '{IDLE_BYTES}'\n"
    + """
local function run_of(epoch_key, token)
  redis.call('SET', epoch_key, token, 'NX')
  return redis.call('GET', epoch_key)
end
local function seq_of(seq_key)
  return tonumber(redis.call('GET', seq_key) or '0')
end
-- the user of a presence entry, '' for an anonymous one, nil for one from before entries
-- carried users ('<id>:<name>', counted by nobody: it expires within the presence TTL)
local function user_of(entry)
  local colon = string.find(entry, ':', 1, true)
  if not colon then return nil end
  local ok, who = pcall(cjson.decode, string.sub(entry, colon + 1))
  if not ok or type(who) ~= 'table' then return nil end
  if type(who[1]) == 'string' then return who[1] end
  return ''
end
-- who holds an entry's name ('u' .. user, or 'm' .. member id for an anonymous member)
-- and its distinct skeletons; nil for an entry without skeletons (no name, or written
-- before names were claimed: it claims nothing)
local function name_of(entry)
  local colon = string.find(entry, ':', 1, true)
  if not colon then return nil end
  local ok, who = pcall(cjson.decode, string.sub(entry, colon + 1))
  if not ok or type(who) ~= 'table' or type(who[3]) ~= 'string' then return nil end
  local owner = 'm' .. string.sub(entry, 1, colon - 1)
  if type(who[1]) == 'string' then owner = 'u' .. who[1] end
  local skeletons = {who[3]}
  if type(who[4]) == 'string' and who[4] ~= who[3] then skeletons[2] = who[4] end
  return owner, skeletons
end
-- a claim in a room's names hash (skeleton -> '<count>|<owner>'): count, owner
local function claim_of(names, skeleton)
  local held = redis.call('HGET', names, skeleton)
  if not held then return 0, nil end
  local bar = string.find(held, '|', 1, true)
  return tonumber(string.sub(held, 1, bar - 1)), string.sub(held, bar + 1)
end
-- whether no other owner holds a name that looks like the entry's
local function name_free(names, entry)
  local owner, skeletons = name_of(entry)
  if owner == nil then return true end
  for _, skeleton in ipairs(skeletons) do
    local count, holder = claim_of(names, skeleton)
    if holder ~= nil and holder ~= owner then return false end
  end
  return true
end
-- hold (delta 1: an entry added) or let go of (-1: an entry removed) the entry's name
local function hold_name(names, entry, delta)
  local owner, skeletons = name_of(entry)
  if owner == nil then return end
  for _, skeleton in ipairs(skeletons) do
    local count, holder = claim_of(names, skeleton)
    if holder == nil or holder == owner then
      count = count + delta
      if count > 0 then
        redis.call('HSET', names, skeleton, count .. '|' .. owner)
      else
        redis.call('HDEL', names, skeleton)
      end
    end
  end
end
-- count an entry just added to the presence set; true if a person arrived (a user's
-- first connection in the room, or an anonymous one)
local function arrived(users, entry)
  local user = user_of(entry)
  if user == nil then return true end
  return redis.call('HINCRBY', users, user, 1) == 1 or user == ''
end
-- uncount an entry just removed; true if a person left (a user's last connection)
local function departed(users, entry)
  local user = user_of(entry)
  if user == nil then return true end
  local left = redis.call('HINCRBY', users, user, -1)
  if left <= 0 then redis.call('HDEL', users, user) end
  return left <= 0 or user == ''
end
-- the room's people: each user once, each anonymous connection
local function people(users)
  local n = redis.call('HLEN', users)
  local anonymous = tonumber(redis.call('HGET', users, '') or '0')
  if anonymous > 0 then n = n - 1 + anonymous end
  return n
end
-- remove expired entries (and let go of their names); returns those whose person left
local function reap(presence, users, names, now)
  local expired = redis.call('ZRANGEBYSCORE', presence, '-inf', now)
  local gone = {}
  if #expired == 0 then return gone end
  redis.call('ZREMRANGEBYSCORE', presence, '-inf', now)
  for _, entry in ipairs(expired) do
    hold_name(names, entry, -1)
    if departed(users, entry) then gone[#gone + 1] = entry end
  end
  if redis.call('EXISTS', presence) == 0 then redis.call('DEL', users, names) end
  return gone
end
local function notice(channel, kind, epoch, seq, count, entries)
  redis.call('PUBLISH', channel,
    kind .. '|' .. epoch .. '|' .. seq .. '|' .. count .. '|' .. table.concat(entries, '\\n'))
end
-- the room a key belongs to ('roomcast:{<room>}:<suffix>'; no suffix holds a '}'), and a
-- key of a room: idle rooms are evicted by name, so their keys are built here
local function room_of(key)
  return string.match(key, '^roomcast:{(.*)}:[^}]*$')
end
local function key_of(room, suffix)
  return 'roomcast:{' .. room .. '}:' .. suffix
end
local function bytes_of(room)
  return tonumber(redis.call('GET', key_of(room, 'history-bytes')) or '0')
end
local function forget(room)
  local keys = {}
  for i, suffix in ipairs({'seq', 'epoch', 'history', 'history-bytes', 'presence', 'users',
                           'names'}) do
    keys[i] = key_of(room, suffix)
  end
  redis.call('DEL', unpack(keys))
end
-- forget the least recently emptied idle rooms while beyond either budget
local function evict(rooms, budget)
  rooms, budget = tonumber(rooms), tonumber(budget)
  local held = tonumber(redis.call('GET', IDLE_BYTES) or '0')
  local idle = redis.call('ZCARD', IDLE)
  while idle > 0 and (idle > rooms or held > budget) do
    local oldest = redis.call('ZRANGE', IDLE, 0, 0)[1]
    held = held - bytes_of(oldest)
    idle = idle - 1
    redis.call('ZREM', IDLE, oldest)
    -- (never a room with presence: joins take rooms off the idle set; a guard all the same)
    if redis.call('EXISTS', key_of(oldest, 'presence')) == 0 then forget(oldest) end
  end
  if idle == 0 then redis.call('DEL', IDLE_BYTES) else redis.call('SET', IDLE_BYTES, held) end
end
-- after a room's presence may have changed: a room with presence is not idle; one without
-- keeps its history as the newest idle room (evicting beyond the budgets), or is forgotten
-- at once if it has none to keep
local function settle(room, rooms, budget)
  if redis.call('EXISTS', key_of(room, 'presence')) == 1 then
    if redis.call('ZREM', IDLE, room) == 1 then
      redis.call('DECRBY', IDLE_BYTES, bytes_of(room))
    end
    return
  end
  if redis.call('ZSCORE', IDLE, room) then return end
  if tonumber(rooms) <= 0 or redis.call('LLEN', key_of(room, 'history')) == 0 then
    forget(room)
    return
  end
  local time = redis.call('TIME')
  local at = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
  local newest = redis.call('ZRANGE', IDLE, -1, -1, 'WITHSCORES')[2]
  if newest and tonumber(newest) >= at then at = tonumber(newest) + 1 end  -- keep the order
  redis.call('ZADD', IDLE, at, room)
  redis.call('INCRBY', IDLE_BYTES, bytes_of(room))
  evict(rooms, budget)
end
"""
)

#: KEYS seq, epoch, history, presence, users, names; ARGV entry, now, expires, capacity,
#: token, with history ('1'/'0'), channel, idle rooms, idle history bytes -> {epoch, seq,
#: count, present (first 200), history, 1 if the entry is a new person in the room
#: (announced as a join) else 0}, nil if full, or :data:`TAKEN` if another owner holds a
#: name that looks like the entry's.
#: Capacity counts connections, as each worker's hub does. The room stops being idle.
JOIN: Final = (
    HELPERS
    + """
local gone = reap(KEYS[4], KEYS[5], KEYS[6], ARGV[2])
local epoch = run_of(KEYS[2], ARGV[5])
local seq = seq_of(KEYS[1])
if #gone > 0 then notice(ARGV[7], 'L', epoch, seq, people(KEYS[5]), gone) end
local capacity = tonumber(ARGV[4])
if capacity > 0 and redis.call('ZCARD', KEYS[4]) >= capacity then return false end
if not name_free(KEYS[6], ARGV[1]) then return 'taken' end
local new = 0
if redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1]) == 1 then
  hold_name(KEYS[6], ARGV[1], 1)
  if arrived(KEYS[5], ARGV[1]) then new = 1 end
end
settle(room_of(KEYS[4]), ARGV[8], ARGV[9])
local count = people(KEYS[5])
local present = redis.call('ZRANGE', KEYS[4], 0, 199)
local history = {}
if ARGV[6] == '1' then history = redis.call('LRANGE', KEYS[3], 0, -1) end
if new == 1 then notice(ARGV[7], 'J', epoch, seq, count, {ARGV[1]}) end
return {epoch, seq, count, present, history, new}
"""
)

#: KEYS seq, epoch, presence, users, names; ARGV now, channel, token, idle rooms, idle
#: history bytes, then the entries of one member (its own, and one a rename may have
#: written) -> how many were there. A leave is announced only for its user's last
#: connection in the room; a room left empty becomes idle (or is forgotten).
LEAVE: Final = (
    HELPERS
    + """
local removed, left = 0, {}
for i = 6, #ARGV do
  if redis.call('ZREM', KEYS[3], ARGV[i]) == 1 then
    removed = removed + 1
    hold_name(KEYS[5], ARGV[i], -1)
    if departed(KEYS[4], ARGV[i]) then left[#left + 1] = ARGV[i] end
  end
end
local gone = reap(KEYS[3], KEYS[4], KEYS[5], ARGV[1])
for i, entry in ipairs(left) do table.insert(gone, i, entry) end
if #gone > 0 then
  notice(ARGV[2], 'L', run_of(KEYS[2], ARGV[3]), seq_of(KEYS[1]), people(KEYS[4]), gone)
end
settle(room_of(KEYS[3]), ARGV[4], ARGV[5])
return removed
"""
)

#: KEYS seq, epoch, presence, users, names; ARGV old entry, new entry, now, channel, token,
#: idle rooms, idle history bytes -> 1 if the old entry was replaced by the new one (same
#: expiry; the new name held, the old one let go), 0 if another owner holds a name that
#: looks like the new entry's, -1 if the old entry is not there (it left, or expired).
#: Nothing is announced but what expired.
RENAME: Final = (
    HELPERS
    + """
local gone = reap(KEYS[3], KEYS[4], KEYS[5], ARGV[3])
if #gone > 0 then
  notice(ARGV[4], 'L', run_of(KEYS[2], ARGV[5]), seq_of(KEYS[1]), people(KEYS[4]), gone)
end
settle(room_of(KEYS[3]), ARGV[6], ARGV[7])
local expires = redis.call('ZSCORE', KEYS[3], ARGV[1])
if not expires then return -1 end
if not name_free(KEYS[5], ARGV[2]) then return 0 end
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZADD', KEYS[3], expires, ARGV[2])
hold_name(KEYS[5], ARGV[2], 1)
hold_name(KEYS[5], ARGV[1], -1)
return 1
"""
)

#: KEYS per room: seq, epoch, history, history bytes; ARGV history size, token, history
#: bytes, idle rooms, idle history bytes, then per room: channel, n, then n pairs (head,
#: tail) of events split around their seq -> {first seq, epoch} per room. History keeps the
#: newest
#: entries within both bounds; its bytes key counts their UTF-8 length (a history from
#: before that key is counted from its next message on, and trimmed by count meanwhile).
#: A room without presence (the server API posts into any room) is idle: its growth
#: counts against the idle budget.
PUBLISH: Final = (
    HELPERS
    + """
local keep, budget = tonumber(ARGV[1]), tonumber(ARGV[3])
local a = 6
local firsts = {}
local grown = false
for r = 1, #KEYS / 4 do
  local history, size = KEYS[4 * r - 1], KEYS[4 * r]
  local channel, n = ARGV[a], tonumber(ARGV[a + 1])
  a = a + 2
  local first = redis.call('INCRBY', KEYS[4 * r - 3], n) - n + 1
  local epoch = run_of(KEYS[4 * r - 2], ARGV[2])
  local room = room_of(KEYS[4 * r - 3])
  local before = tonumber(redis.call('GET', size) or '0')
  local entries = {}
  local added = 0
  for i = 0, n - 1 do
    entries[i + 1] = (first + i) .. '|' .. ARGV[a] .. (first + i) .. ARGV[a + 1]
    added = added + #entries[i + 1]
    a = a + 2
  end
  if keep > 0 and budget > 0 then
    local length = redis.call('RPUSH', history, unpack(entries))
    local held = before + added
    if length > keep then
      for _, entry in ipairs(redis.call('LRANGE', history, 0, length - keep - 1)) do
        held = held - #entry
      end
      redis.call('LTRIM', history, length - keep, -1)
      length = keep
    end
    while length > 0 and held > budget do
      held = held - #redis.call('LPOP', history)
      length = length - 1
    end
    redis.call('SET', size, math.max(held, 0))
  end
  redis.call('PUBLISH', channel, 'M|' .. epoch .. '|' .. table.concat(entries, '\\n'))
  if redis.call('ZSCORE', IDLE, room) then
    redis.call('INCRBY', IDLE_BYTES, bytes_of(room) - before)
    grown = true
  elseif redis.call('EXISTS', key_of(room, 'presence')) == 0 then
    settle(room, ARGV[4], ARGV[5])  -- (a room with presence is not idle: nothing to settle)
  end
  firsts[r] = {first, epoch}
end
if grown then evict(ARGV[4], ARGV[5]) end
return firsts
"""
)

#: KEYS seq, epoch, presence, users, names; ARGV now, n (-1: all), channel, token, idle
#: rooms, idle history bytes -> {count (people), the first n entries}: a room's presence
#: now, after removing (and announcing) what expired (a room left empty becomes idle)
PRESENCE: Final = (
    HELPERS
    + """
local gone = reap(KEYS[3], KEYS[4], KEYS[5], ARGV[1])
local count = people(KEYS[4])
if #gone > 0 then
  notice(ARGV[3], 'L', run_of(KEYS[2], ARGV[4]), seq_of(KEYS[1]), count, gone)
end
settle(room_of(KEYS[3]), ARGV[5], ARGV[6])
local n = tonumber(ARGV[2])
local live = {}
if n ~= 0 then live = redis.call('ZRANGE', KEYS[3], 0, n < 0 and -1 or n - 1) end
return {count, live}
"""
)

#: KEYS seq, epoch, history; ARGV token -> {epoch, seq, history}: one consistent snapshot
READ: Final = (
    HELPERS
    + """
local epoch = run_of(KEYS[2], ARGV[1])
return {epoch, seq_of(KEYS[1]), redis.call('LRANGE', KEYS[3], 0, -1)}
"""
)

#: KEYS per room: seq, epoch, presence, users, names; ARGV now, expires, token, idle rooms,
#: idle history bytes, then per room: channel, r, j, r entries to refresh (only if still
#: present), j entries to add back (announced as joins if their person was not there) ->
#: per room, {the refreshed entries that were no longer present, the entries not added
#: back because another owner holds a name that looks like theirs}. Expired entries (a
#: dead worker's members) are removed, letting go of their names, and announced as leaves,
#: each user's with its last connection; then entries come back, claiming their names
#: again. A room left empty becomes idle (or is forgotten); one with entries back stops
#: being idle.
UPKEEP: Final = (
    HELPERS
    + """
local now, expires, token = ARGV[1], ARGV[2], ARGV[3]
local a = 6
local result = {}
for r = 1, #KEYS / 5 do
  local presence, users, names = KEYS[5 * r - 2], KEYS[5 * r - 1], KEYS[5 * r]
  local channel, refresh, rejoin = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  a = a + 3
  local absent = {}
  for i = 1, refresh do
    if redis.call('ZADD', presence, 'XX', 'CH', expires, ARGV[a]) == 0 then
      absent[#absent + 1] = ARGV[a]
    end
    a = a + 1
  end
  local gone = reap(presence, users, names, now)
  local back, refused = {}, {}
  for i = 1, rejoin do
    local entry = ARGV[a]
    if redis.call('ZSCORE', presence, entry) then
      -- still (or already) there: nothing to add
    elseif not name_free(names, entry) then
      refused[#refused + 1] = entry
    else
      redis.call('ZADD', presence, expires, entry)
      hold_name(names, entry, 1)
      if arrived(users, entry) then back[#back + 1] = entry end
    end
    a = a + 1
  end
  if #gone > 0 or #back > 0 then
    local epoch, seq = run_of(KEYS[5 * r - 3], token), seq_of(KEYS[5 * r - 4])
    local count = people(users)
    if #gone > 0 then notice(channel, 'L', epoch, seq, count, gone) end
    if #back > 0 then notice(channel, 'J', epoch, seq, count, back) end
  end
  settle(room_of(presence), ARGV[4], ARGV[5])
  result[r] = {absent, refused}
end
return result
"""
)

#: KEYS seq, epoch, history, history bytes; ARGV idle rooms, idle history bytes -> {epoch,
#: seq}, or nil for a room Redis does not hold: the server API's DELETE of a room's
#: messages. The retained history goes, its epoch and seq stay (a client resuming from
#: before gets ``history_gap``), unless nobody is in the room: then, left without history,
#: it is forgotten as any such room is (its next message starts a new run).
CLEAR: Final = (
    HELPERS
    + """
local epoch = redis.call('GET', KEYS[2])
if not epoch then return nil end
local seq = seq_of(KEYS[1])
local room = room_of(KEYS[1])
if redis.call('ZSCORE', IDLE, room) then
  redis.call('ZREM', IDLE, room)
  redis.call('DECRBY', IDLE_BYTES, bytes_of(room))
end
redis.call('DEL', KEYS[3], KEYS[4], key_of(room, 'idle'))
settle(room, ARGV[1], ARGV[2])
return {epoch, seq}
"""
)

#: KEYS seq, epoch, history, history bytes; ARGV a run a worker found rewound (Redis lost
#: seqs it had delivered: a failover to a replica that had not copied them): end that run,
#: so that no seq of it is ever reused for another message (the next call starts a new one)
RESTART: Final = """
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', unpack(KEYS)) end
"""

#: KEYS report lists; ARGV ttl (ms), then one count per list: each worker's answer to the
#: server API's disconnect (how many connections it closed), for the requester's BLPOP
REPORT: Final = """
for i, key in ipairs(KEYS) do
  redis.call('RPUSH', key, ARGV[i + 1])
  redis.call('PEXPIRE', key, ARGV[1])
end
"""

#: KEYS[1] a user's connections (sorted set: claim id -> expiry, ms); ARGV now, expiry,
#: limit, claim id: 1 if the claim is added, 0 if the user already holds ``limit`` live
#: ones. Expired claims (their worker died) are dropped first; the key dies with its
#: latest claim (the latest by score: servers' clocks may differ a little).
CLAIM: Final = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  return 0
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
local latest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], latest[2])
return 1
"""

#: KEYS users' connection sets; ARGV now, expiry, limit, then one claim id per key: a
#: worker's live claims, kept for another presence lifetime -> the ids of those that had
#: lapsed (their worker paused, or Redis lost them) and could not be taken back, as the
#: user holds ``limit`` live claims without them. A claim still in the set was counted by
#: every CLAIM since (which drops lapsed ones before counting), so it is simply extended.
REFRESH_CLAIMS: Final = """
local refused = {}
for i, key in ipairs(KEYS) do
  local id = ARGV[i + 3]
  if redis.call('ZSCORE', key, id) then
    redis.call('ZADD', key, ARGV[2], id)
  else
    redis.call('ZREMRANGEBYSCORE', key, '-inf', ARGV[1])
    if redis.call('ZCARD', key) >= tonumber(ARGV[3]) then
      refused[#refused + 1] = id
    else
      redis.call('ZADD', key, ARGV[2], id)
    end
  end
  local latest = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if latest[2] then redis.call('PEXPIREAT', key, latest[2]) end
end
return refused
"""
