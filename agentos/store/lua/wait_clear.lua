-- Remove a wait that was resumed (or found stale), with its due entry: only if the
-- wait is still park ARGV[2], or when there is no wait at all (a due entry left over).
-- KEYS[1] the wait hash, KEYS[2] the agent's due shard (same slot).
-- ARGV[1] agent, ARGV[2] park id. Returns 1 when removed, 0 when the wait is another.
local park = redis.call('HGET', KEYS[1], 'park')
if park and park ~= ARGV[2] then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
