"""Every Lua script Postbox runs on Redis, in one place.

A process counts as alive while its liveness key ``<prefix>:alive:<id>``
exists (the cluster's heartbeat keeps it; see ``server.cluster.cluster``).
Every script that must skip dead processes asks ``alive`` (defined once in
``ALIVE``, memoised per call) or ``live_members``; each takes the liveness
key prefix as an argument, so no script spells the check itself.

The scripts are grouped by their user: fan-out (room sets and routing),
presence, connection counts, throttles. Each comment says what KEYS and
ARGV hold and what comes back.
"""

# alive(prefix, host): is the process ``host`` alive? Asked at most once
# per host per script call.
# live_members(key, me, prefix): the members of the set ``key`` other than
# ``me`` (pass '' to keep every one) that are alive; dead ones are removed
# from the set on the way, so a crashed process drops out by itself.
ALIVE = """
local alive_known = {}
local function alive(prefix, host)
  local live = alive_known[host]
  if live == nil then
    live = redis.call('EXISTS', prefix .. host) == 1
    alive_known[host] = live
  end
  return live
end
local function live_members(key, me, prefix)
  local list = {}
  for _, host in ipairs(redis.call('SMEMBERS', key)) do
    if host ~= me then
      if alive(prefix, host) then
        table.insert(list, host)
      else
        redis.call('SREM', key, host)
      end
    end
  end
  return list
end
"""

# -- fan-out -------------------------------------------------------------

# Enter (ARGV[4] = "1") or leave (ARGV[4] = "") one room set (KEYS[1]) and
# send ARGV[5], a notice, to every other live process in it (unless it is
# empty: on a cluster the caller sends it). Returns those other processes.
# ARGV[1..3]: own id, host channel prefix, liveness key prefix.
HOLDER_SCRIPT = ALIVE + """
local me, chan, alive_prefix = ARGV[1], ARGV[2], ARGV[3]
if ARGV[4] == '1' then
  redis.call('SADD', KEYS[1], me)
else
  redis.call('SREM', KEYS[1], me)
end
local others = live_members(KEYS[1], me, alive_prefix)
if ARGV[5] ~= '' then
  for _, host in ipairs(others) do
    redis.call('PUBLISH', chan .. host, ARGV[5])
  end
end
return others
"""

# One call carries a whole batch of messages, in few arguments (redis-py
# encodes each argument in Python: one per message cost about 15 us per
# message). KEYS: the distinct room sets the batch targets. ARGV: own id,
# host channel prefix, liveness key prefix, an index with one
# "<payload bytes>:<key number>,<key number>..." entry per message separated
# by ";", and every message's JSON payload concatenated. Each room set is
# read once per batch. Each live process found in a message's sets (never
# ourselves) gets that message once; all messages for one process go out as
# one JSON list in one PUBLISH, so a busy receiver decodes one pub/sub
# message per batch, not one per emit. With ARGV[6] = "1" (a cluster, where
# a script cannot publish to another slot's channel) nothing is published
# and the payloads are not needed (ARGV[5] may be empty): the script
# returns host, "<message numbers, 1-based, comma separated>", host, ...
# for the caller to build and SPUBLISH the batches.
PUBLISH_SCRIPT = ALIVE + """
local me, chan, alive_prefix = ARGV[1], ARGV[2], ARGV[3]
local index, blob = ARGV[4], ARGV[5]
local holders, out, hosts = {}, {}, {}
local routes_only = ARGV[6] == '1'
local pos, n = 1, 0
for size, keylist in string.gmatch(index, '(%d+):([%d,]+)') do
  n = n + 1
  local payload = n
  if not routes_only then
    size = tonumber(size)
    payload = string.sub(blob, pos, pos + size - 1)
    pos = pos + size
  end
  local sent = {}
  for j in string.gmatch(keylist, '%d+') do
    j = tonumber(j)
    if holders[j] == nil then
      holders[j] = live_members(KEYS[j], me, alive_prefix)
    end
    for _, host in ipairs(holders[j]) do
      if not sent[host] then
        sent[host] = true
        if out[host] == nil then
          out[host] = {}
          table.insert(hosts, host)
        end
        table.insert(out[host], payload)
      end
    end
  end
end
local routes = {}
for _, host in ipairs(hosts) do
  if routes_only then
    table.insert(routes, host)
    table.insert(routes, table.concat(out[host], ','))
  else
    local batch = '[' .. table.concat(out[host], ',') .. ']'
    redis.call('PUBLISH', chan .. host, batch)
  end
end
if routes_only then
  return routes
end
return #hosts
"""


def script_arguments(messages):
    """KEYS and the index and payload ARGV of PUBLISH_SCRIPT for
    ``messages``, a list of (room set keys, JSON payload)."""
    keys, numbers, index, payloads = [], {}, [], []
    for targets, payload in messages:
        data = payload.encode() if isinstance(payload, str) else payload
        mine = []
        for key in targets:
            if key not in numbers:
                keys.append(key)
                numbers[key] = len(keys)
            mine.append(str(numbers[key]))
        index.append(f'{len(data)}:{",".join(mine)}')
        payloads.append(data)
    return keys, [';'.join(index), b''.join(payloads)]


# -- presence --------------------------------------------------------------

# KEYS: online set, this process's user set, process set.
# ARGV: me, alive prefix, user id. Returns how many other live processes
# already held the user.
PRESENCE_ADD_SCRIPT = ALIVE + """
local others = #live_members(KEYS[1], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[3])
redis.call('SADD', KEYS[3], ARGV[1])
return others
"""

# KEYS: online set, this process's user set, seen key.
# ARGV: me, alive prefix, user id, last seen ms, seen ttl. Returns how
# many other live processes still hold the user (0: last seen is stored).
PRESENCE_REMOVE_SCRIPT = ALIVE + """
redis.call('SREM', KEYS[1], ARGV[1])
redis.call('SREM', KEYS[2], ARGV[3])
local others = #live_members(KEYS[1], ARGV[1], ARGV[2])
if others == 0 then
  redis.call('SET', KEYS[3], ARGV[4], 'EX', ARGV[5])
end
return others
"""

# Put back what this process holds after Redis lost it (restart) or missed
# changes (an outage): KEYS: process set, this process's user set. ARGV:
# me, online prefix, then the users held. Users this process no longer
# holds (they left while Redis was away) are taken off, so they do not
# stay online in Redis for as long as this process lives.
PRESENCE_REGISTER_SCRIPT = """
local held = {}
for i = 3, #ARGV do held[ARGV[i]] = true end
for _, u in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if not held[u] then
    redis.call('SREM', ARGV[2] .. u, ARGV[1])
    redis.call('SREM', KEYS[2], u)
  end
end
redis.call('SADD', KEYS[1], ARGV[1])
for i = 3, #ARGV do
  redis.call('SADD', ARGV[2] .. ARGV[i], ARGV[1])
  redis.call('SADD', KEYS[2], ARGV[i])
end
return 0
"""

# KEYS: online sets. ARGV: alive prefix. Returns 1/0 per key.
PRESENCE_STATUS_SCRIPT = ALIVE + """
local out = {}
for i, key in ipairs(KEYS) do
  out[i] = #live_members(key, '', ARGV[1]) > 0 and 1 or 0
end
return out
"""

# KEYS: process set. ARGV: alive prefix, users prefix, online prefix,
# seen prefix, now ms, seen ttl, me. Drops dead processes and returns the
# users that no live process holds any more.
PRESENCE_REAP_SCRIPT = ALIVE + """
local prefix = ARGV[1]
local gone = {}
for _, h in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if h ~= ARGV[7] and not alive(prefix, h) then
    redis.call('SREM', KEYS[1], h)
    local ukey = ARGV[2] .. h
    for _, u in ipairs(redis.call('SMEMBERS', ukey)) do
      local okey = ARGV[3] .. u
      redis.call('SREM', okey, h)
      if #live_members(okey, '', prefix) == 0 then
        redis.call('SET', ARGV[4] .. u, ARGV[5], 'EX', ARGV[6])
        table.insert(gone, u)
      end
    end
    redis.call('DEL', ukey)
  end
end
return gone
"""

# -- connection counts ----------------------------------------------------

# KEYS: hashes {process id: sockets} (a user's, an address's).
# ARGV: own process id, liveness key prefix, then the limit of each key in
# turn. Adds one socket of this process to every hash, or, when one of them
# is at its limit, to none and returns that key's position (1-based); 0 when
# counted. Counts of processes whose liveness key expired (crashed) are
# dropped, so a crash never locks a user or an address out for long.
COUNT_ACQUIRE_SCRIPT = ALIVE + """
local me, alive_prefix = ARGV[1], ARGV[2]
for i, key in ipairs(KEYS) do
  local total = 0
  local counts = redis.call('HGETALL', key)
  for j = 1, #counts, 2 do
    local host, n = counts[j], tonumber(counts[j + 1])
    if host == me or alive(alive_prefix, host) then
      total = total + n
    else
      redis.call('HDEL', key, host)
    end
  end
  if total >= tonumber(ARGV[2 + i]) then return i end
end
for _, key in ipairs(KEYS) do
  redis.call('HINCRBY', key, me, 1)
  redis.call('EXPIRE', key, 86400)
end
return 0
"""

# KEYS: the hashes COUNT_ACQUIRE_SCRIPT counted in. ARGV[1]: own process
# id. Takes one socket of this process off every hash; in one step, so an
# acquire elsewhere cannot slip in between the decrement and the HDEL of a
# count that reached 0.
COUNT_RELEASE_SCRIPT = """
for _, key in ipairs(KEYS) do
  if redis.call('HINCRBY', key, ARGV[1], -1) <= 0 then
    redis.call('HDEL', key, ARGV[1])
  end
end
return 0
"""

# Put this process's counts back after Redis lost them (restart) or missed
# changes (an outage). KEYS: the hashes this process holds sockets in, then
# those it released while Redis was away. ARGV: own process id, how many
# held keys, then the count of each. Sets the held counts, drops the rest.
COUNT_REGISTER_SCRIPT = """
local me, held = ARGV[1], tonumber(ARGV[2])
for i, key in ipairs(KEYS) do
  if i <= held then
    redis.call('HSET', key, me, ARGV[2 + i])
    redis.call('EXPIRE', key, 86400)
  else
    redis.call('HDEL', key, me)
  end
end
return 0
"""

# -- throttles ------------------------------------------------------------

# Token buckets that only counted tries spend, all of one try in one step.
# KEYS: the buckets. ARGV[1]: 'take' (spend a try from every bucket, or
# from none and return the seconds to wait while one is below 1) or 'give'
# (return a try); then allowed and refill per second for each key in turn.
# Returns the seconds to wait as a string (Lua numbers become integers on
# the way out), '0' when the try was taken.
THROTTLE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local take = ARGV[1] == 'take'
local tokens, wait = {}, 0
for i, key in ipairs(KEYS) do
  local allowed, rate = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  local b = redis.call('HMGET', key, 'tokens', 'at')
  local n = tonumber(b[1]) or allowed
  local at = tonumber(b[2]) or now
  tokens[i] = math.min(allowed, n + (now - at) * rate)
  if take and tokens[i] < 1 then
    wait = math.max(wait, (1 - tokens[i]) / rate)
  end
end
if wait > 0 then return tostring(wait) end
for i, key in ipairs(KEYS) do
  local allowed, rate = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  local n = take and tokens[i] - 1 or math.min(allowed, tokens[i] + 1)
  if n >= allowed then
    redis.call('DEL', key)  -- a full bucket is the same as none
  else
    redis.call('HSET', key, 'tokens', tostring(n), 'at', tostring(now))
    redis.call('EXPIRE', key, math.ceil(allowed / rate) + 60)
  end
end
return '0'
"""
