-- A daemon claims a due agent for activation: only if it is due by ARGV[2]; the
-- claim moves it to ARGV[3], so that if the claimer dies it is due again then.
-- KEYS[1] the agent's due shard; ARGV[1] agent, ARGV[2] now, ARGV[3] claim until.
-- Returns 1 when claimed, 0 when not due (or claimed by another daemon).
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not s or tonumber(s) > tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
return 1
