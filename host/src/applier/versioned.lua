-- keepwarm versioned apply, contract v5: the versioned writes of many messages in one call.
--
-- Applies each operation only where its change is newer than what Redis holds, and answers for
-- each message on its own: a message Redis refuses (WRONGTYPE, …) does not stop the others.
--
-- KEYS: per keyed operation, in order, the data key then its companion version key (it shares
--       the data key's hash slot). keepwarm sends the keys of one hash slot per call, so the
--       script runs on Redis Cluster. The companion is one of:
--       - a string: the key's version. A key written as a whole (SET, DEL, PEXPIRE) has one; the
--         applier's transactions (applier/watched.rs) read and write only these, with MGET and
--         MSET, keeping the values out of Lua.
--       - a hash: field "" the key's version, field "m:<member>" a member's. A set, sorted set
--         or hash written member by member has one. Contract v4 kept every key's version so; a
--         hash holding only field "" is read as a string companion and becomes one when written.
--       - nothing: no change has written the key.
-- ARGV[1]: tombstone time to live in milliseconds.
-- ARGV[2..]: the messages, one after the other, each as its version, then its operations.
--   The version is "LLLLLLLLLLLLLLLLLLLL:IIIIIIIIIIIIIIIIIIII" (zero-padded decimal, so string
--   order is version order), or "" for a backfill read, which only fills keys (members) that hold
--   no version at all. A version is never an operation name, so it starts the next message.
--   An operation is its name (the Redis command it stands for, as `Op::name` in ops.rs spells
--   it), then its arguments (see ARITY): SET value ttl ("" for none); DEL; PEXPIRE ttl; PUBLISH
--   channel message; HSET, HDEL, SADD, SREM, ZADD, ZREM a count, then that many arguments (field
--   value or score member pairs for HSET and ZADD).
-- Returns one reply per message, in order: the number of its writes skipped as stale, or the
-- error Redis answered to one of its operations (the operations before it stay applied, those
-- after it are not applied).
--
-- Writes of whole keys without a time to live wait in `batch` and go in one MSET, before any
-- other write and at the end: inside a script only the order of writes to one key matters.

local KEYS, ARGV = KEYS, ARGV
local call, pcall, tonumber, unpack = redis.call, pcall, tonumber, unpack
local tomb = ARGV[1]
local last = #ARGV
-- The argument and the key to read next, the version of the message being applied and its
-- place in the reply.
local a, k = 2, 1
local ver, msg

-- The arguments of each operation after its name; -1: a count, then that many arguments.
local ARITY = {
  SET = 2, DEL = 0, PEXPIRE = 1, PUBLISH = 2,
  HSET = -1, HDEL = -1, SADD = -1, SREM = -1, ZADD = -1, ZREM = -1,
}

-- Fewer values than Lua's stack takes at once (unpack fails past about 8,000).
local CHUNK = 4000

-- What each companion holds, as far as this call knows: a version (a string companion), NONE
-- (nothing), HASH (a hash), or nil (not known: read it).
local NONE, HASH = {}, {}
local known = {}

local function version_like(s)
  return #s == 41 and string.byte(s, 21) == 58
end

local function not_a_version(vkey, kind)
  return {err = 'WRONGTYPE keepwarm: ' .. vkey .. ' holds a ' .. (kind or 'string') ..
    ' that is not a version'}
end

-- The string companions of every key of the call, in one read (MGET answers nothing for a
-- hash or a missing key).
do
  local vkeys = {}
  for i = 2, #KEYS, 2 do vkeys[#vkeys + 1] = KEYS[i] end
  for first = 1, #vkeys, CHUNK do
    local upto = math.min(first + CHUNK - 1, #vkeys)
    local values = call('MGET', unpack(vkeys, first, upto))
    for i = first, upto do
      local v = values[i - first + 1]
      if v then known[vkeys[i]] = v end
    end
  end
end

-- What the companion `vkey` holds (see `known`); raises WRONGTYPE for anything else.
local function companion(vkey)
  local c = known[vkey]
  if c == nil then
    local kind = call('TYPE', vkey)['ok']
    if kind == 'none' then c = NONE
    elseif kind == 'hash' then c = HASH
    elseif kind == 'string' then c = call('GET', vkey)
    else error(not_a_version(vkey, kind)) end
    known[vkey] = c
  end
  if type(c) == 'string' and not version_like(c) then error(not_a_version(vkey)) end
  return c
end

-- Whole-key writes waiting for the next MSET (key, value, …), and the messages they came from.
local batch, batched, from = {}, 0, {}
local replies = {}

-- Sends the waiting writes. When Redis refuses them, every message they came from answers with
-- that error, and the message being applied stops here.
local function flush()
  if batched == 0 then return end
  local reply = redis.pcall('MSET', unpack(batch, 1, batched))
  local failure = type(reply) == 'table' and reply.err and reply
  local mine = from[#from] == msg
  if failure then
    for _, m in ipairs(from) do replies[m] = failure end
  end
  batch, batched, from = {}, 0, {}
  if failure and mine then error(failure) end
end

local function later(key, value)
  batch[batched + 1], batch[batched + 2] = key, value
  batched = batched + 2
  if from[#from] ~= msg then from[#from + 1] = msg end
  if batched >= CHUNK then flush() end
end

-- Reads the operation at `a` and moves past it: its name, the index of its first argument, its
-- argument count, its key and companion key (none for PUBLISH). Nothing at the end of a message.
local function next_op()
  local op = ARGV[a]
  local n = ARITY[op]
  if n == nil then return nil end
  local i = a + 1
  if n < 0 then
    n = tonumber(ARGV[i])
    i = i + 1
  end
  a = i + n
  if op == 'PUBLISH' then return op, i, n end
  k = k + 2
  return op, i, n, KEYS[k - 2], KEYS[k - 1]
end

-- Whether a write of this message may replace what holds the version `stored` (false: none).
-- Its own version counts as not newer: a message's later operation on a key it already wrote
-- (DEL then HSET, SET then PEXPIRE) applies, and a redelivered message writes what it wrote.
local function fresh(stored)
  if ver == '' then return not stored end
  return (not stored) or stored <= ver
end

-- The version a string companion or nothing holds (false: none).
local function held(c)
  if c == NONE then return false end
  return c
end

-- A hash companion takes the data key's time to live; when the key is gone, what it holds are
-- tombstones, kept for the tombstone time to live.
local function sync_ttl(key, vkey)
  local ttl = call('PTTL', key)
  if ttl > 0 then call('PEXPIRE', vkey, ttl)
  elseif ttl == -1 then call('PERSIST', vkey)
  else call('PEXPIRE', vkey, tomb) end
end

-- Writes this message's version as the string companion of `key`, which lives as long as the
-- key (a tombstone when the key is gone).
local function stamp(key, vkey)
  local ttl = call('PTTL', key)
  if ttl > 0 then call('SET', vkey, ver, 'PX', ttl)
  elseif ttl == -1 then call('SET', vkey, ver)
  else call('SET', vkey, ver, 'PX', tomb) end
  known[vkey] = ver
end

-- The version a hash companion holding only the key's version (contract v4's layout) holds;
-- nil for a hash with member versions.
local function version_only(vkey)
  if call('HLEN', vkey) ~= 1 then return nil end
  local stored = call('HGET', vkey, '')
  if stored and version_like(stored) then return stored end
  return nil
end

local function set(i, key, vkey)
  local c = companion(vkey)
  local ttl = ARGV[i + 1]
  if c == HASH then
    flush()
    c = version_only(vkey)
    if not c then
      -- A key with member versions: they stay, as in contract v4.
      if not fresh(call('HGET', vkey, '')) then return 1 end
      if ttl == '' then call('SET', key, ARGV[i]) else call('SET', key, ARGV[i], 'PX', ttl) end
      if ver ~= '' then
        call('HSET', vkey, '', ver)
        if ttl == '' then call('PERSIST', vkey) else call('PEXPIRE', vkey, ttl) end
      end
      return 0
    end
  end
  if not fresh(held(c)) then return 1 end
  if ttl == '' then
    -- SET (and MSET) drop a time to live: the key's and its companion's.
    later(key, ARGV[i])
    if ver ~= '' then
      later(vkey, ver)
      known[vkey] = ver
    end
  else
    flush()
    call('SET', key, ARGV[i], 'PX', ttl)
    if ver ~= '' then
      call('SET', vkey, ver, 'PX', ttl)
      known[vkey] = ver
    end
  end
  return 0
end

-- Deletes a key at this version. Members (hash fields) written by newer changes stay, with their
-- versions: a late delete of an aggregate cannot undo what came after it.
local function delete(key, vkey)
  local c = known[vkey]
  flush()
  local fields
  if c == nil or c == HASH then
    -- One read tells nothing, a version-only hash and a hash with member versions apart.
    fields = call('HGETALL', vkey)
    if #fields == 0 then c = NONE
    elseif #fields == 2 and fields[1] == '' and version_like(fields[2]) then c = fields[2]
    else c = HASH end
  elseif c ~= NONE and not version_like(c) then
    error(not_a_version(vkey))
  end
  if c ~= HASH then
    if not fresh(held(c)) then return 1 end
    call('DEL', key)
    -- A tombstone: older writes arriving late must not resurrect the key.
    if ver ~= '' then
      call('SET', vkey, ver, 'PX', tomb)
      known[vkey] = ver
    end
    return 0
  end
  known[vkey] = nil
  local stored = false
  for i = 1, #fields, 2 do
    if fields[i] == '' then stored = fields[i + 1] end
  end
  if not fresh(stored) then return 1 end
  if ver == '' then
    call('DEL', key)
    return 0
  end
  local keep, newer = {}, {}
  for i = 1, #fields, 2 do
    local f, v = fields[i], fields[i + 1]
    if f ~= '' and v > ver then
      keep[string.sub(f, 3)] = true
      newer[#newer + 1] = i
    end
  end
  if #newer == 0 then
    call('DEL', key)
    call('SET', vkey, ver, 'PX', tomb)
    known[vkey] = ver
    return 0
  end
  call('DEL', vkey)
  call('HSET', vkey, '', ver)
  for _, i in ipairs(newer) do call('HSET', vkey, fields[i], fields[i + 1]) end
  local kind = call('TYPE', key)['ok']
  local members, remove = {}, nil
  if kind == 'set' then members, remove = call('SMEMBERS', key), 'SREM'
  elseif kind == 'zset' then members, remove = call('ZRANGE', key, 0, -1), 'ZREM'
  elseif kind == 'hash' then members, remove = call('HKEYS', key), 'HDEL'
  else call('DEL', key) end
  for _, m in ipairs(members) do
    if not keep[m] then call(remove, key, m) end
  end
  sync_ttl(key, vkey)
  return 0
end

local function expire(i, key, vkey)
  local c = companion(vkey)
  flush()
  if c == HASH then c = version_only(vkey) or HASH end
  if c ~= HASH then
    if not fresh(held(c)) then return 1 end
    call('PEXPIRE', key, ARGV[i])
    if ver ~= '' then stamp(key, vkey) end
    return 0
  end
  if not fresh(call('HGET', vkey, '')) then return 1 end
  call('PEXPIRE', key, ARGV[i])
  if ver ~= '' then
    call('HSET', vkey, '', ver)
    sync_ttl(key, vkey)
  end
  return 0
end

-- Member operations: each member (or hash field) is versioned on its own, in a hash companion.
local function members(op, i, n, key, vkey)
  local c = known[vkey]
  flush()
  if type(c) == 'string' then
    if not version_like(c) then error(not_a_version(vkey)) end
    -- The key's version moves into a hash, which keeps the string's time to live.
    local ttl = call('PTTL', vkey)
    call('DEL', vkey)
    call('HSET', vkey, '', c)
    if ttl > 0 then call('PEXPIRE', vkey, ttl) end
  end
  -- A hash now, or nothing (a backfill read writes no version).
  known[vkey] = nil
  local paired = op == 'HSET' or op == 'ZADD'
  local skipped, wrote = 0, false
  for j = i, i + n - 1, paired and 2 or 1 do
    local field = 'm:' .. ((op == 'ZADD') and ARGV[j + 1] or ARGV[j])
    local versions = call('HMGET', vkey, '', field)
    local stored, mine = versions[1], versions[2]
    if mine and ((not stored) or mine > stored) then stored = mine end
    if fresh(stored) then
      if paired then call(op, key, ARGV[j], ARGV[j + 1]) else call(op, key, ARGV[j]) end
      if ver ~= '' then call('HSET', vkey, field, ver) end
      wrote = true
    else
      skipped = skipped + 1
    end
  end
  if wrote and ver ~= '' then sync_ttl(key, vkey) end
  return skipped
end

-- Applies the operations of the message at `a`; returns the writes skipped as stale.
local function message()
  local skipped = 0
  while true do
    local op, i, n, key, vkey = next_op()
    if op == nil then return skipped end
    if op == 'SET' then skipped = skipped + set(i, key, vkey)
    elseif op == 'DEL' then skipped = skipped + delete(key, vkey)
    elseif op == 'PEXPIRE' then skipped = skipped + expire(i, key, vkey)
    elseif op == 'PUBLISH' then call('PUBLISH', ARGV[i], ARGV[i + 1])
    else skipped = skipped + members(op, i, n, key, vkey) end
  end
end

-- A failure as an error reply: Redis's own keeps its code (WRONGTYPE, OOM, READONLY, …), which
-- redis.call raises as a string or, on newer Redis, as an error table.
local function refusal(failure)
  if type(failure) == 'table' and failure.err then return failure end
  failure = tostring(failure)
  if string.find(failure, '^%u+ ') then return {err = failure} end
  return {err = 'ERR keepwarm: ' .. failure}
end

msg = 0
while a <= last do
  ver = ARGV[a]
  a = a + 1
  msg = msg + 1
  local ok, result = pcall(message)
  if not ok then
    -- Moves past the operations the failure left unapplied.
    while next_op() do end
    result = refusal(result)
  end
  -- A refused MSET may have answered for this message already.
  if replies[msg] == nil then replies[msg] = result end
end
msg = nil
flush()
return replies
