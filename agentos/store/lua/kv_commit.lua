-- Commit a KV snapshot: its chunks are already written; the manifest makes it valid.
-- Only the lease holder may commit. The previous snapshot's chunks are given a short
-- TTL here, in the same step that replaces its manifest: a commit whose reply is lost
-- (and whose save is then retried) can never leave them behind for good. EXPIRE, not
-- DEL: a reader that GOT the old manifest just before this commit still finds its
-- chunks for a while (it reads them in a second round trip).
-- KEYS[1] lease, KEYS[2] manifest, KEYS[3] pending marker, then the new chunks (written
-- with a TTL so that an uncommitted snapshot expires; the commit keeps them).
-- ARGV[1] "daemon|token", ARGV[2] new manifest bytes, ARGV[3] ttl (s) of the old chunks
-- Returns {1, number of old chunks given the TTL}, or {0} when the lease is not the
-- caller's.
-- The old chunk keys come from the old manifest (msgpack, decoded with cmsgpack: ~1.5 ms
-- for a 32k-token history). Only keys under KEYS[2] .. ':' are touched: the agent's own
-- chunks, in its hash slot, whatever a garbled manifest says.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return {0}
end
local new = {}
for i = 4, #KEYS do
  new[KEYS[i]] = true
  redis.call('PERSIST', KEYS[i])
end
local expired = 0
local old = redis.call('GET', KEYS[2])
if old then
  local ok, manifest = pcall(cmsgpack.unpack, old)
  if ok and type(manifest) == 'table' and type(manifest.chunks) == 'table' then
    local prefix = KEYS[2] .. ':'
    for _, chunk in ipairs(manifest.chunks) do
      local key = type(chunk) == 'table' and chunk.key
      if type(key) == 'string' and not new[key] and string.sub(key, 1, #prefix) == prefix then
        expired = expired + redis.call('EXPIRE', key, ARGV[3])
      end
    end
  end
end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('DEL', KEYS[3])
return {1, expired}
