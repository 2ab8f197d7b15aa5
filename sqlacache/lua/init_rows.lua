-- Initialise missing row versions for a fill.
-- A row version can expire, so "absent when the stamp was read and absent now" proves "no write in
-- between" only if less time passed than a written row's version lives (WRITTEN_ROW_TTL_MS); the
-- client knows how long its fill took and asks for the guard otherwise: then the row version is
-- created only if its table's version (which never expires, and changes with every write) is still
-- the one the reader saw.
-- KEYS: pairs (row version key, version key of its table).
-- ARGV: [1] TTL of the row versions (ms), [2] "1" to check the table versions, then per pair: the
--       new token, the table version the reader saw ("" if none), and the token this process's
--       fills create that table version with when it is missing ("" if none): finding it there
--       proves a fill created the key, not a write.
-- Returns, per pair, 1 if the row version now holds the new token.
local ttl = ARGV[1]
local guarded = ARGV[2] == '1'
local out = {}
for i = 1, #KEYS, 2 do
  local n = (i + 1) / 2
  local token, seen, planned = ARGV[3 * n], ARGV[3 * n + 1], ARGV[3 * n + 2]
  local unchanged = true
  if guarded then
    local current = redis.call('GET', KEYS[i + 1]) or ''
    unchanged = current == seen or (seen == '' and planned ~= '' and current == planned)
  end
  if unchanged and redis.call('SET', KEYS[i], token, 'NX', 'PX', ttl) then
    out[n] = 1
  else
    out[n] = 0
  end
end
return out
