-- After a park committed: the agent is due at its deadline (+inf: never by time), or
-- now if an answer came meanwhile. Nothing happens if the wait is no longer this park.
-- KEYS[1] the wait hash, KEYS[2] the agent's due shard (same slot).
-- ARGV[1] agent, ARGV[2] park id, ARGV[3] deadline or '+inf', ARGV[4] now.
-- Returns 1 when answered (due now), 0 armed at the deadline, -1 not this park.
if redis.call('HGET', KEYS[1], 'park') ~= ARGV[2] then
  return -1
end
if redis.call('HEXISTS', KEYS[1], 'answer') == 1 then
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
  return 1
end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return 0
