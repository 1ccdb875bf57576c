-- Begin writing a KV snapshot: only the lease holder may, so that a stale writer never
-- removes or replaces the marker of the owner's snapshot in progress.
-- KEYS[1] lease, KEYS[2] pending marker; ARGV[1] "daemon|token", ARGV[2] the new marker
-- (snapshot id and chunk count), ARGV[3] its ttl (s).
-- Returns {1, the marker it replaced or false} (that writer's chunks are garbage now),
-- or {0} when the lease is not the caller's.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return {0}
end
local old = redis.call('GET', KEYS[2])
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
return {1, old}
