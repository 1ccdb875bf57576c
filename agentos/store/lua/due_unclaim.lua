-- Drop a claim of the due index once the claimer holds the agent (or another live
-- daemon does): only if the entry is still the claim, ARGV[2]. A message or wake that
-- made the agent due again since has moved it, and then the entry stays.
-- KEYS[1] the agent's due shard; ARGV[1] agent, ARGV[2] the claim's score.
-- Returns 1 when removed.
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
if s and tonumber(s) == tonumber(ARGV[2]) then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 1
end
return 0
