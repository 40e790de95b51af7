-- keepwarm versioned apply, contract v3.
--
-- Applies the operations of one change only where they are newer than what Redis holds.
-- KEYS: per keyed operation, the data key then its companion version key (a hash that shares the
--       data key's hash slot). Field "" holds the key's version; field "m:<member>" a member's.
--       keepwarm sends the keys of one hash slot per call, so the script runs on Redis Cluster.
-- ARGV[1]: the change's version "LLLLLLLLLLLLLLLLLLLL:IIIIIIIIIIIIIIIIIIII" (zero-padded decimal,
--          so string order is version order), or "" for a backfill read, which only fills keys
--          (members) that hold no version at all.
-- ARGV[2]: tombstone time to live in milliseconds.
-- ARGV[3..]: operations, each as: name (the Redis command it stands for, as `Op::name` in
--           ops.rs spells it), argument count, arguments.
-- Returns the number of writes skipped as stale.

local ver = ARGV[1]
local tomb = ARGV[2]
local skipped = 0
local a = 3
local k = 1

local function may_write(vkey, field)
  local stored = redis.call('HGET', vkey, '')
  if field then
    local member = redis.call('HGET', vkey, field)
    if member and ((not stored) or member > stored) then stored = member end
  end
  if ver == '' then return not stored end
  return (not stored) or stored < ver
end

local function stamp(vkey, field)
  if ver ~= '' then redis.call('HSET', vkey, field, ver) end
end

-- The companion of a key with a time to live expires with it; otherwise it persists.
local function follow_ttl(vkey, ttl)
  if ver == '' then return end
  if ttl and ttl ~= '' then redis.call('PEXPIRE', vkey, ttl) else redis.call('PERSIST', vkey) end
end

-- The companion takes the data key's time to live; when the key is gone, what the companion
-- holds are tombstones, kept for the tombstone time to live.
local function sync_ttl(key, vkey)
  if ver == '' then return end
  local ttl = redis.call('PTTL', key)
  if ttl > 0 then redis.call('PEXPIRE', vkey, ttl)
  elseif ttl == -1 then redis.call('PERSIST', vkey)
  else redis.call('PEXPIRE', vkey, tomb) end
end

-- Deletes a key at this version. Members (hash fields) written by newer changes stay, with their
-- versions: a late delete of an aggregate cannot undo what came after it.
local function delete(key, vkey)
  if ver == '' then
    redis.call('DEL', key)
    return
  end
  local fields = redis.call('HGETALL', vkey)
  local keep = {}
  local newer = {}
  for i = 1, #fields, 2 do
    local f, v = fields[i], fields[i + 1]
    if f ~= '' and v > ver then
      keep[string.sub(f, 3)] = true
      newer[#newer + 1] = {f, v}
    end
  end
  redis.call('DEL', vkey)
  redis.call('HSET', vkey, '', ver)
  if #newer == 0 then
    redis.call('DEL', key)
  else
    for _, fv in ipairs(newer) do redis.call('HSET', vkey, fv[1], fv[2]) end
    local kind = redis.call('TYPE', key)['ok']
    local members, remove = {}, nil
    if kind == 'set' then members, remove = redis.call('SMEMBERS', key), 'SREM'
    elseif kind == 'zset' then members, remove = redis.call('ZRANGE', key, 0, -1), 'ZREM'
    elseif kind == 'hash' then members, remove = redis.call('HKEYS', key), 'HDEL'
    else redis.call('DEL', key) end
    for _, m in ipairs(members) do
      if not keep[m] then redis.call(remove, key, m) end
    end
  end
  sync_ttl(key, vkey)
end

while a <= #ARGV do
  local op = ARGV[a]
  local n = tonumber(ARGV[a + 1])
  local args = {}
  for i = 1, n do args[i] = ARGV[a + 1 + i] end
  a = a + 2 + n
  if op == 'PUBLISH' then
    redis.call('PUBLISH', args[1], args[2])
  else
    local key, vkey = KEYS[k], KEYS[k + 1]
    k = k + 2
    if op == 'SET' then
      if may_write(vkey) then
        if args[2] ~= '' then
          redis.call('SET', key, args[1], 'PX', args[2])
        else
          redis.call('SET', key, args[1])
        end
        stamp(vkey, '')
        follow_ttl(vkey, args[2])
      else
        skipped = skipped + 1
      end
    elseif op == 'DEL' then
      if may_write(vkey) then
        -- A tombstone: older writes arriving late must not resurrect the key.
        delete(key, vkey)
      else
        skipped = skipped + 1
      end
    elseif op == 'PEXPIRE' then
      if may_write(vkey) then
        redis.call('PEXPIRE', key, args[1])
        stamp(vkey, '')
        sync_ttl(key, vkey)
      else
        skipped = skipped + 1
      end
    else
      -- Member operations: each member (or hash field) is versioned on its own.
      local step = (op == 'HSET' or op == 'ZADD') and 2 or 1
      local i = 1
      local wrote = false
      while i <= n do
        local member = (op == 'ZADD') and args[i + 1] or args[i]
        local field = 'm:' .. member
        if may_write(vkey, field) then
          if op == 'HSET' then redis.call('HSET', key, args[i], args[i + 1])
          elseif op == 'ZADD' then redis.call('ZADD', key, args[i], args[i + 1])
          elseif op == 'HDEL' then redis.call('HDEL', key, args[i])
          elseif op == 'SADD' then redis.call('SADD', key, args[i])
          elseif op == 'SREM' then redis.call('SREM', key, args[i])
          elseif op == 'ZREM' then redis.call('ZREM', key, args[i])
          else return redis.error_reply('keepwarm: unknown operation ' .. op) end
          stamp(vkey, field)
          wrote = true
        else
          skipped = skipped + 1
        end
        i = i + step
      end
      if wrote then sync_ttl(key, vkey) end
    end
  end
end
return skipped
