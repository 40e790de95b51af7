-- keepwarm versioned apply, contract v1.
--
-- Applies the operations of one change only where they are newer than what Redis holds.
-- KEYS: per keyed operation, the data key then its companion version key (a hash that shares the
--       data key's hash slot). Field "" holds the key's version; field "m:<member>" a member's.
-- ARGV[1]: the change's version "LLLLLLLLLLLLLLLLLLLL:IIIIIIIIIIIIIIIIIIII" (zero-padded decimal,
--          so string order is version order), or "" for a backfill read, which only fills keys
--          (members) that hold no version at all.
-- ARGV[2]: tombstone time to live in milliseconds.
-- ARGV[3..]: operations, each as: name, argument count, arguments.
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

while a <= #ARGV do
  local op = ARGV[a]
  local n = tonumber(ARGV[a + 1])
  local args = {}
  for i = 1, n do args[i] = ARGV[a + 1 + i] end
  a = a + 2 + n
  if op == 'publish' then
    redis.call('PUBLISH', args[1], args[2])
  else
    local key, vkey = KEYS[k], KEYS[k + 1]
    k = k + 2
    if op == 'set' then
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
    elseif op == 'del' then
      if may_write(vkey) then
        redis.call('DEL', key)
        if ver ~= '' then
          -- A tombstone: older writes arriving late must not resurrect the key.
          redis.call('DEL', vkey)
          redis.call('HSET', vkey, '', ver)
          redis.call('PEXPIRE', vkey, tomb)
        end
      else
        skipped = skipped + 1
      end
    elseif op == 'expire' then
      if may_write(vkey) then
        redis.call('PEXPIRE', key, args[1])
        stamp(vkey, '')
        follow_ttl(vkey, args[1])
      else
        skipped = skipped + 1
      end
    else
      -- Member operations: each member (or hash field) is versioned on its own.
      local step = (op == 'hset' or op == 'zadd') and 2 or 1
      local i = 1
      while i <= n do
        local member = (op == 'zadd') and args[i + 1] or args[i]
        local field = 'm:' .. member
        if may_write(vkey, field) then
          if op == 'hset' then redis.call('HSET', key, args[i], args[i + 1])
          elseif op == 'zadd' then redis.call('ZADD', key, args[i], args[i + 1])
          elseif op == 'hdel' then redis.call('HDEL', key, args[i])
          elseif op == 'sadd' then redis.call('SADD', key, args[i])
          elseif op == 'srem' then redis.call('SREM', key, args[i])
          elseif op == 'zrem' then redis.call('ZREM', key, args[i])
          else return redis.error_reply('keepwarm: unknown operation ' .. op) end
          stamp(vkey, field)
        else
          skipped = skipped + 1
        end
        i = i + step
      end
    end
  end
end
return skipped
