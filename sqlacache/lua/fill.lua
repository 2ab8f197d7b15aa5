-- Store one entry with the version keys it needs, atomically (a reader sees the entry and the
-- versions it creates together or not at all: see `stampede`), in one command.
--
-- KEYS: [1] the entry; then R pairs (row version key, version key of its table); then I table
--       version keys to create if missing; then the row version keys whose TTL must be raised.
-- ARGV: [1] the entry's value, [2] its TTL (ms), [3] R, [4] I, [5] the row versions' TTL (ms),
--       [6] "1" to guard row versions by their table's version, then per pair: the new token, the
--       table version the reader saw ("" if none) and the token this process's fills create that
--       table version with when it is missing ("" if none); then per table version: its token.
--
-- A row version can expire, so "absent when the stamp was read and absent now" proves "no write in
-- between" only if less time passed than a written row's version lives (WRITTEN_ROW_TTL_MS); the
-- client knows how long its fill took and asks for the guard otherwise: then the row version is
-- created only if its table's version (which never expires, and changes with every write) is still
-- the one the reader saw, or the token a fill of this process created it with.
--
-- The entry is written only if every version it was stamped with for a missing key now holds that
-- token: otherwise it could never validate, and writing it would only overwrite a valid entry that
-- another process stored meanwhile for the same key (two processes filling at once).
-- Returns, per pair, 1 if the row version now holds the new token.
local rows, inits, row_ttl = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local guarded = ARGV[6] == '1'
local out = {}
local valid = true
for n = 1, rows do
  local key, table_key = KEYS[2 * n], KEYS[2 * n + 1]
  local token, seen, planned = ARGV[4 + 3 * n], ARGV[5 + 3 * n], ARGV[6 + 3 * n]
  local unchanged = true
  if guarded then
    local current = redis.call('GET', table_key) or ''
    unchanged = current == seen or (seen == '' and planned ~= '' and current == planned)
  end
  if unchanged and redis.call('SET', key, token, 'NX', 'PX', row_ttl) then
    out[n] = 1
  else
    out[n] = 0
    if not unchanged or redis.call('GET', key) ~= token then
      valid = false
    end
  end
end
local first_init = 2 + 2 * rows
for i = 0, inits - 1 do
  local key, token = KEYS[first_init + i], ARGV[7 + 3 * rows + i]
  if not redis.call('SET', key, token, 'NX') and redis.call('GET', key) ~= token then
    valid = false
  end
end
for k = first_init + inits, #KEYS do
  redis.call('PEXPIRE', KEYS[k], row_ttl, 'GT')
end
if valid then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return out
