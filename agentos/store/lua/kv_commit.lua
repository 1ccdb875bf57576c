-- Commit a KV snapshot: its chunks are already written; the manifest makes it valid.
-- Only the lease holder may commit, and the previous manifest is returned so that its
-- chunks can be deleted after (never before) the new one is in place.
-- KEYS[1] lease, KEYS[2] manifest, KEYS[3] pending marker, then the new chunks (written
-- with a TTL so that an uncommitted snapshot expires; the commit keeps them).
-- ARGV[1] "daemon|token", ARGV[2] new manifest bytes
-- Returns {1, old manifest or false}, or {0} when the lease is not the caller's.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return {0}
end
local old = redis.call('GET', KEYS[2])
for i = 4, #KEYS do
  redis.call('PERSIST', KEYS[i])
end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('DEL', KEYS[3])
return {1, old}
