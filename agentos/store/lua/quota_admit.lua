-- Admit one inference call against its quota class and its agent, atomically, on the
-- server's clock (TIME), so that limits hold across daemons whose clocks differ.
--
-- KEYS (all share the class's hash tag):
--   1 class GCRA "theoretical arrival time" (us)   2 agent GCRA TAT (us)
--   3 class holders (zset agent|call -> expiry ms)  4 agent holders (zset call -> ms)
--   5 class waiters (zset agent|call -> fair score) 6 waiter expiries (zset member -> ms)
--   7 today's budget counters (hash)                 8 rate sleepers (zset agent -> until ms)
-- ARGV:
--   1 agent  2 call id  3 estimated tokens  4 max wait ms  5 slot lease ms
--   6 fair score  7 waiter ttl ms
--   8..11  class tokensPerMinute, maxConcurrent, dailyTokens, dailyAgentSeconds (0 = none)
--   12..15 agent limits, same order
--   16 ms until the budget day ends   17 budget key ttl s   18 burst ms
-- Returns {status, ms, what}:
--   { 1, wait, ''}        admitted; sleep `wait` ms before calling the engine
--   { 0, poll, what}      no free concurrency slot yet (queued fairly); ask again
--   {-1, retry, what}     the rate limit would make the caller wait past its max wait
--   {-2, retry, what}     a daily budget is spent; retry when the day ends
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now = math.floor(now_us / 1000)
local agent, call = ARGV[1], ARGV[2]
local est = tonumber(ARGV[3])
local max_wait = tonumber(ARGV[4])
local lease = tonumber(ARGV[5])
local member = agent .. '|' .. call

local c_tpm, c_conc, c_tokens, c_secs = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
local a_tpm, a_conc, a_tokens, a_secs = tonumber(ARGV[12]), tonumber(ARGV[13]), tonumber(ARGV[14]), tonumber(ARGV[15])

local function unqueue()
  redis.call('ZREM', KEYS[5], member)
  redis.call('ZREM', KEYS[6], member)
end

-- Holders past their lease (a daemon died mid-call) and waiters that stopped asking.
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
local gone = redis.call('ZRANGEBYSCORE', KEYS[6], '-inf', now, 'LIMIT', 0, 100)
if #gone > 0 then
  redis.call('ZREM', KEYS[5], unpack(gone))
  redis.call('ZREM', KEYS[6], unpack(gone))
end

-- Daily budgets: refused at once when this call could overspend them.
local used = redis.call('HMGET', KEYS[7], 'tokens', 'seconds', 'tokens:' .. agent, 'seconds:' .. agent)
local reset = tonumber(ARGV[16])
if c_tokens > 0 and (tonumber(used[1]) or 0) + est > c_tokens then
  unqueue(); return {-2, reset, 'class dailyTokens'}
end
if c_secs > 0 and (tonumber(used[2]) or 0) >= c_secs then
  unqueue(); return {-2, reset, 'class dailyAgentSeconds'}
end
if a_tokens > 0 and (tonumber(used[3]) or 0) + est > a_tokens then
  unqueue(); return {-2, reset, 'agent dailyTokens'}
end
if a_secs > 0 and (tonumber(used[4]) or 0) >= a_secs then
  unqueue(); return {-2, reset, 'agent dailyAgentSeconds'}
end

-- Concurrency: the agent's own limit first, then a fair place in the class's queue.
local poll = 25
if a_conc > 0 and redis.call('ZCARD', KEYS[4]) >= a_conc then
  unqueue(); return {0, poll, 'agent maxConcurrent'}
end
if c_conc > 0 then
  local free = c_conc - redis.call('ZCARD', KEYS[3])
  redis.call('ZADD', KEYS[5], ARGV[6], member)
  redis.call('ZADD', KEYS[6], now + tonumber(ARGV[7]), member)
  if free <= 0 or redis.call('ZRANK', KEYS[5], member) >= free then
    return {0, poll, 'class maxConcurrent'}
  end
end

-- Tokens per minute: GCRA with a burst of ARGV[18] ms worth of tokens, reserving the
-- call's place in time; the caller sleeps until then.
local burst_us = tonumber(ARGV[18]) * 1000
local function gcra(key, tpm)
  if tpm <= 0 then return 0, nil end
  local per_token = 60000000 / tpm
  local tat = tonumber(redis.call('GET', key)) or now_us
  if tat < now_us then tat = now_us end
  local new_tat = tat + est * per_token
  local wait = new_tat - burst_us - now_us
  if wait < 0 then wait = 0 end
  return wait, new_tat
end
local c_wait, c_tat = gcra(KEYS[1], c_tpm)
local a_wait, a_tat = gcra(KEYS[2], a_tpm)
local wait = math.max(c_wait, a_wait)
if wait > max_wait * 1000 then
  unqueue()
  local what = 'class tokensPerMinute'
  if a_wait > c_wait then what = 'agent tokensPerMinute' end
  return {-1, math.ceil(wait / 1000), what}
end
local function save(key, tat)
  if tat then
    redis.call('SET', key, string.format('%.0f', tat), 'PX', math.ceil((tat - now_us) / 1000) + 1000)
  end
end
save(KEYS[1], c_tat)
save(KEYS[2], a_tat)

local wait_ms = math.ceil(wait / 1000)
unqueue()
redis.call('ZADD', KEYS[3], now + wait_ms + lease, member)
redis.call('ZADD', KEYS[4], now + wait_ms + lease, call)
redis.call('HINCRBY', KEYS[7], 'tokens', est)
redis.call('HINCRBY', KEYS[7], 'tokens:' .. agent, est)
redis.call('EXPIRE', KEYS[7], tonumber(ARGV[17]))
if wait_ms > 0 then
  redis.call('ZADD', KEYS[8], now + wait_ms, agent)
end
return {1, wait_ms, ''}
