-- The version half of lua/fill.lua, for Redis Cluster: there an entry and the version keys it
-- depends on live in different slots, and one script may touch only one slot. This script touches
-- only version keys (they share the prefix's hash tag); the client then writes the entry with a
-- plain SET PX on its own node, and only if this script answered 1.
--
-- KEYS: R pairs (row version key, version key of its table); then I table version keys to create
--       if missing; then the row version keys whose TTL must be raised.
-- ARGV: [1] R, [2] I, [3] the row versions' TTL (ms), [4] "1" to guard row versions by their
--       table's version, then per pair: the new token, the table version the reader saw ("" if
--       none) and the token this process's fills create that table version with ("" if none);
--       then per table version: its token.
--
-- The rules are those of lua/fill.lua (row versions created only if absent, and for a slow fill
-- only if their table's version is unchanged; table versions never overwritten; TTLs only raised).
-- Returns 1 if every version the entry was stamped with now holds its token (the entry can
-- validate and may be written), else 0.
local rows, inits, row_ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local guarded = ARGV[4] == '1'
local valid = 1
for n = 1, rows do
  local key, table_key = KEYS[2 * n - 1], KEYS[2 * n]
  local token, seen, planned = ARGV[2 + 3 * n], ARGV[3 + 3 * n], ARGV[4 + 3 * n]
  local unchanged = true
  if guarded then
    local current = redis.call('GET', table_key) or ''
    unchanged = current == seen or (seen == '' and planned ~= '' and current == planned)
  end
  if not (unchanged and redis.call('SET', key, token, 'NX', 'PX', row_ttl)) then
    if not unchanged or redis.call('GET', key) ~= token then
      valid = 0
    end
  end
end
local first_init = 1 + 2 * rows
for i = 0, inits - 1 do
  local key, token = KEYS[first_init + i], ARGV[5 + 3 * rows + i]
  if not redis.call('SET', key, token, 'NX') and redis.call('GET', key) ~= token then
    valid = 0
  end
end
for k = first_init + inits, #KEYS do
  redis.call('PEXPIRE', KEYS[k], row_ttl, 'GT')
end
return valid
