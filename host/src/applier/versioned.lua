-- keepwarm versioned apply, contract v4: the versioned writes of many messages in one call.
--
-- Applies each operation only where its change is newer than what Redis holds, and answers for
-- each message on its own: a message Redis refuses (WRONGTYPE, …) does not stop the others.
--
-- KEYS: per keyed operation, in order, the data key then its companion version key (a hash that
--       shares the data key's hash slot). Field "" holds the key's version; field "m:<member>" a
--       member's. keepwarm sends the keys of one hash slot per call, so the script runs on Redis
--       Cluster.
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

local KEYS, ARGV = KEYS, ARGV
local call, pcall, tonumber = redis.call, pcall, tonumber
local tomb = ARGV[1]
local last = #ARGV
-- The argument and the key to read next, and the version of the message being applied.
local a, k = 2, 1
local ver

-- The arguments of each operation after its name; -1: a count, then that many arguments.
local ARITY = {
  SET = 2, DEL = 0, PEXPIRE = 1, PUBLISH = 2,
  HSET = -1, HDEL = -1, SADD = -1, SREM = -1, ZADD = -1, ZREM = -1,
}

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

-- The companion takes the data key's time to live; when the key is gone, what the companion
-- holds are tombstones, kept for the tombstone time to live.
local function sync_ttl(key, vkey)
  local ttl = call('PTTL', key)
  if ttl > 0 then call('PEXPIRE', vkey, ttl)
  elseif ttl == -1 then call('PERSIST', vkey)
  else call('PEXPIRE', vkey, tomb) end
end

local function set(i, key, vkey)
  if not fresh(call('HGET', vkey, '')) then return 1 end
  local ttl = ARGV[i + 1]
  if ttl == '' then call('SET', key, ARGV[i]) else call('SET', key, ARGV[i], 'PX', ttl) end
  if ver ~= '' then
    call('HSET', vkey, '', ver)
    -- The companion of a key with a time to live expires with it; otherwise it persists.
    if ttl == '' then call('PERSIST', vkey) else call('PEXPIRE', vkey, ttl) end
  end
  return 0
end

-- Deletes a key at this version. Members (hash fields) written by newer changes stay, with their
-- versions: a late delete of an aggregate cannot undo what came after it.
local function delete(key, vkey)
  local fields = call('HGETALL', vkey)
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
    -- A tombstone: older writes arriving late must not resurrect the key.
    call('DEL', key)
    if #fields > 2 or (#fields == 2 and not stored) then call('DEL', vkey) end
    call('HSET', vkey, '', ver)
    call('PEXPIRE', vkey, tomb)
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
  if not fresh(call('HGET', vkey, '')) then return 1 end
  call('PEXPIRE', key, ARGV[i])
  if ver ~= '' then
    call('HSET', vkey, '', ver)
    sync_ttl(key, vkey)
  end
  return 0
end

-- Member operations: each member (or hash field) is versioned on its own.
local function members(op, i, n, key, vkey)
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

local replies = {}
while a <= last do
  ver = ARGV[a]
  a = a + 1
  local ok, result = pcall(message)
  if not ok then
    -- Moves past the operations the failure left unapplied.
    while next_op() do end
    result = refusal(result)
  end
  replies[#replies + 1] = result
end
return replies
