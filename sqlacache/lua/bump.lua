-- Bump version tokens and take or release write leases in one atomic step.
-- KEYS: persistent version keys, then expiring (row) version keys, then leases to acquire,
--       then leases to release.
-- ARGV: [1] number of persistent keys, [2] number of expiring keys, [3] number of leases to
--       acquire, [4] the new token, [5] TTL of expiring keys (ms), [6] lease TTL (ms),
--       [7] the invalidation channel ('' publishes nothing), [8] the length of the key prefix
--       every version key shares (left out of the message).
-- The new token of every version key is published in the same step as the bump, so that
-- in-process tiers that follow the channel can never see a bump without its message:
-- 'v' .. token, then one stripped key per line.
-- A lease is a holder count: each writer adds one, and removes its own when its transaction
-- ends; the TTL bounds a lease whose holder died.
local persistent = tonumber(ARGV[1])
local expiring = tonumber(ARGV[2])
local acquire = tonumber(ARGV[3])
local token = ARGV[4]
local i = 1
for _ = 1, persistent do
  redis.call('SET', KEYS[i], token)
  i = i + 1
end
for _ = 1, expiring do
  redis.call('SET', KEYS[i], token, 'PX', ARGV[5])
  i = i + 1
end
for _ = 1, acquire do
  redis.call('INCR', KEYS[i])
  redis.call('PEXPIRE', KEYS[i], ARGV[6])
  i = i + 1
end
if ARGV[7] ~= '' and persistent + expiring > 0 then
  local strip = tonumber(ARGV[8]) + 1
  local parts = {'v' .. token}
  for j = 1, persistent + expiring do
    parts[j + 1] = string.sub(KEYS[j], strip)
  end
  redis.call('PUBLISH', ARGV[7], table.concat(parts, '\n'))
end
while i <= #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 and redis.call('DECR', KEYS[i]) <= 0 then
    redis.call('DEL', KEYS[i])
  end
  i = i + 1
end
return 1
