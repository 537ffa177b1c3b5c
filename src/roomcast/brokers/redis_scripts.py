"""The Lua scripts of the Redis broker: every write to a room happens in one of them.

Redis runs a script atomically, so whatever a script reads, writes and publishes is one
step in the room's total order. Every pub/sub payload names the room's *run* (its epoch)
and its position (the room's ``seq`` counter), which is what lets a worker tell a stale,
a duplicate and a missed event apart (see :mod:`roomcast.brokers.redis`).

Payloads on ``<channel prefix><room>`` (only the last field may hold a ``|``, and none a
newline: epochs are URL-safe tokens, member entries are ``<id>:<JSON [user, name]>`` and
events are JSON, both with newlines escaped):

- ``M|<epoch>|<seq>|<event>\\n<seq>|<event>...``: a batch of messages, consecutive seqs;
- ``J|<epoch>|<seq>|<count>|<entry>\\n<entry>...``: members joined (``count`` after them);
- ``L|<epoch>|<seq>|<count>|<entry>\\n<entry>...``: members left or expired.

and on ``<namespace>control``, for every worker: ``D|<report list>|<user>`` (the server
API's disconnect: close the user's connections, report how many on the list).

A room's keys share the hash tag ``{room}``. The scripts that serve several rooms at once
(publishing a batch, presence upkeep) take several rooms' keys, which a single Redis
accepts; on Redis Cluster they would be called once per hash slot.
"""

from __future__ import annotations

from typing import Final

__all__ = ["JOIN", "LEAVE", "PRESENCE", "PUBLISH", "READ", "REPORT", "UPKEEP"]

_HELPERS: Final = """
local function run_of(epoch_key, token)
  redis.call('SET', epoch_key, token, 'NX')
  return redis.call('GET', epoch_key)
end
local function seq_of(seq_key)
  return tonumber(redis.call('GET', seq_key) or '0')
end
local function reap(presence, now)
  local gone = redis.call('ZRANGEBYSCORE', presence, '-inf', now)
  if #gone > 0 then redis.call('ZREMRANGEBYSCORE', presence, '-inf', now) end
  return gone
end
local function notice(channel, kind, epoch, seq, count, entries)
  redis.call('PUBLISH', channel,
    kind .. '|' .. epoch .. '|' .. seq .. '|' .. count .. '|' .. table.concat(entries, '\\n'))
end
"""

#: KEYS seq, epoch, history, presence; ARGV entry, now, expires, capacity, token,
#: with history ('1'/'0'), channel -> {epoch, seq, count, present (first 200), history} or nil
JOIN: Final = (
    _HELPERS
    + """
local gone = reap(KEYS[4], ARGV[2])
local epoch = run_of(KEYS[2], ARGV[5])
local seq = seq_of(KEYS[1])
local count = redis.call('ZCARD', KEYS[4])
if #gone > 0 then notice(ARGV[7], 'L', epoch, seq, count, gone) end
local capacity = tonumber(ARGV[4])
if capacity > 0 and count >= capacity then return false end
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])
count = count + 1
local present = redis.call('ZRANGE', KEYS[4], 0, 199)
local history = {}
if ARGV[6] == '1' then history = redis.call('LRANGE', KEYS[3], 0, -1) end
notice(ARGV[7], 'J', epoch, seq, count, {ARGV[1]})
return {epoch, seq, count, present, history}
"""
)

#: KEYS seq, epoch, presence; ARGV entry, now, channel, token -> 1 if the entry was there
LEAVE: Final = (
    _HELPERS
    + """
local removed = redis.call('ZREM', KEYS[3], ARGV[1])
local gone = reap(KEYS[3], ARGV[2])
if removed == 1 then table.insert(gone, 1, ARGV[1]) end
if #gone > 0 then
  local count = redis.call('ZCARD', KEYS[3])
  notice(ARGV[3], 'L', run_of(KEYS[2], ARGV[4]), seq_of(KEYS[1]), count, gone)
end
return removed
"""
)

#: KEYS per room: seq, epoch, history, history bytes; ARGV history size, token, history
#: bytes, then per room: channel, n, then n pairs (head, tail) of events split around their
#: seq -> first seq per room. History keeps the newest entries within both bounds; its
#: bytes key counts their UTF-8 length (a history from before that key is counted from its
#: next message on, and trimmed by count meanwhile).
PUBLISH: Final = (
    _HELPERS
    + """
local keep, budget = tonumber(ARGV[1]), tonumber(ARGV[3])
local a = 4
local firsts = {}
for r = 1, #KEYS / 4 do
  local history, size = KEYS[4 * r - 1], KEYS[4 * r]
  local channel, n = ARGV[a], tonumber(ARGV[a + 1])
  a = a + 2
  local first = redis.call('INCRBY', KEYS[4 * r - 3], n) - n + 1
  local epoch = run_of(KEYS[4 * r - 2], ARGV[2])
  local entries = {}
  local added = 0
  for i = 0, n - 1 do
    entries[i + 1] = (first + i) .. '|' .. ARGV[a] .. (first + i) .. ARGV[a + 1]
    added = added + #entries[i + 1]
    a = a + 2
  end
  if keep > 0 and budget > 0 then
    local length = redis.call('RPUSH', history, unpack(entries))
    local held = tonumber(redis.call('GET', size) or '0') + added
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
  firsts[r] = first
end
return firsts
"""
)

#: KEYS presence; ARGV now, n -> {count, the first n live entries}: a room's presence now
PRESENCE: Final = """
local live = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], '+inf', 'LIMIT', 0, tonumber(ARGV[2]))
return {redis.call('ZCOUNT', KEYS[1], ARGV[1], '+inf'), live}
"""

#: KEYS seq, epoch, history; ARGV token -> {epoch, seq, history}: one consistent snapshot
READ: Final = (
    _HELPERS
    + """
local epoch = run_of(KEYS[2], ARGV[1])
return {epoch, seq_of(KEYS[1]), redis.call('LRANGE', KEYS[3], 0, -1)}
"""
)

#: KEYS per room: seq, epoch, presence; ARGV now, expires, token, then per room: channel,
#: r, j, r entries to refresh (only if still present), j entries to add back (announced
#: as joins) -> per room, the refreshed entries that were no longer present.
#: Expired entries (a dead worker's members) are removed and announced as leaves.
UPKEEP: Final = (
    _HELPERS
    + """
local now, expires, token = ARGV[1], ARGV[2], ARGV[3]
local a = 4
local result = {}
for r = 1, #KEYS / 3 do
  local presence = KEYS[3 * r]
  local channel, refresh, rejoin = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  a = a + 3
  local absent = {}
  for i = 1, refresh do
    if redis.call('ZADD', presence, 'XX', 'CH', expires, ARGV[a]) == 0 then
      absent[#absent + 1] = ARGV[a]
    end
    a = a + 1
  end
  local back = {}
  for i = 1, rejoin do
    if redis.call('ZADD', presence, 'NX', expires, ARGV[a]) == 1 then back[#back + 1] = ARGV[a] end
    a = a + 1
  end
  local gone = reap(presence, now)
  if #gone > 0 or #back > 0 then
    local epoch, seq = run_of(KEYS[3 * r - 1], token), seq_of(KEYS[3 * r - 2])
    local count = redis.call('ZCARD', presence)
    if #gone > 0 then notice(channel, 'L', epoch, seq, count, gone) end
    if #back > 0 then notice(channel, 'J', epoch, seq, count, back) end
  end
  result[r] = absent
end
return result
"""
)

#: KEYS report lists; ARGV ttl (ms), then one count per list: each worker's answer to the
#: server API's disconnect (how many connections it closed), for the requester's BLPOP
REPORT: Final = """
for i, key in ipairs(KEYS) do
  redis.call('RPUSH', key, ARGV[i + 1])
  redis.call('PEXPIRE', key, ARGV[1])
end
"""
