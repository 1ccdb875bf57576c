-- Finish an admitted call: free its concurrency slot and replace the estimate it was
-- admitted with by the tokens it really used (in the rate limiters and the budgets).
-- KEYS: 1 class TAT  2 agent TAT  3 class holders  4 agent holders  5 budget hash
--       6 this minute's usage hash  7 rate sleepers
-- ARGV: 1 agent  2 call id  3 estimate  4 actual tokens  5 class tpm  6 agent tpm
--       7 budget key ttl s  8 seconds the call took (agent-seconds are charged elsewhere)
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local agent, call = ARGV[1], ARGV[2]
local delta = tonumber(ARGV[4]) - tonumber(ARGV[3])
redis.call('ZREM', KEYS[3], agent .. '|' .. call)
redis.call('ZREM', KEYS[4], call)
local function adjust(key, tpm)
  if tpm <= 0 or delta == 0 then return end
  local tat = tonumber(redis.call('GET', key))
  if not tat then
    if delta < 0 then return end
    tat = now_us
  end
  tat = tat + delta * 60000000 / tpm
  if tat <= now_us then
    redis.call('DEL', key)
  else
    redis.call('SET', key, string.format('%.0f', tat), 'PX', math.ceil((tat - now_us) / 1000) + 1000)
  end
end
adjust(KEYS[1], tonumber(ARGV[5]))
adjust(KEYS[2], tonumber(ARGV[6]))
if delta ~= 0 then
  redis.call('HINCRBY', KEYS[5], 'tokens', delta)
  redis.call('HINCRBY', KEYS[5], 'tokens:' .. agent, delta)
  redis.call('EXPIRE', KEYS[5], tonumber(ARGV[7]))
end
local actual = tonumber(ARGV[4])
if actual > 0 then
  redis.call('HINCRBY', KEYS[6], '', actual)
  redis.call('HINCRBY', KEYS[6], agent, actual)
  redis.call('EXPIRE', KEYS[6], 180)
end
local s = redis.call('ZSCORE', KEYS[7], agent)
if s and tonumber(s) <= math.floor(now_us / 1000) then redis.call('ZREM', KEYS[7], agent) end
return 1
