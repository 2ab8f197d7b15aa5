-- Release a fill lock only if this process still holds it (its token is the value).
-- KEYS: [1] the lock key. ARGV: [1] the holder's token.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
