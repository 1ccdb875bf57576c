-- Admit a batch of inference calls of one quota class, atomically, on the server's
-- clock (TIME), so that limits hold across daemons whose clocks differ. One round trip
-- decides for every call a daemon has waiting for the class.
--
-- KEYS (all share the class's hash tag):
--   1 class GCRA "theoretical arrival time" (us)   2 class holders (zset agent|call -> expiry ms)
--   3 class waiters (zset agent|call -> fair score) 4 waiter expiries (zset member -> ms)
--   5 today's budget counters (hash)                 6 rate sleepers (zset agent -> until ms)
--   then per call i (from 0): 7+2i agent GCRA TAT, 8+2i agent holders (zset call -> ms)
-- ARGV:
--   1 calls  2 slot lease ms  3 waiter ttl ms
--   4..7 class tokensPerMinute, maxConcurrent, dailyTokens, dailyAgentSeconds (0 = none)
--   8 ms until the budget day ends  9 budget key ttl s  10 GCRA burst ms
--   then per call (9 each, from 11): agent, call id, estimated tokens, max wait ms,
--   fair score, agent tokensPerMinute, maxConcurrent, dailyTokens, dailyAgentSeconds
-- Returns, per call, {status, ms, what}:
--   { 1, wait, ''}    admitted; sleep `wait` ms before calling the engine
--   { 0, poll, what}  no free concurrency slot yet (queued fairly); ask again
--   {-1, retry, what} the rate limit would make the caller wait past its max wait
--   {-2, retry, what} a daily budget is spent; retry when the day ends
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now = math.floor(now_us / 1000)
local n = tonumber(ARGV[1])
local lease = tonumber(ARGV[2])
local waiter_ttl = tonumber(ARGV[3])
local c_tpm, c_conc, c_tokens, c_secs = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local reset = tonumber(ARGV[8])
local budget_ttl = tonumber(ARGV[9])
local burst_us = tonumber(ARGV[10]) * 1000
local poll = 25

-- Holders past their lease (a daemon died mid-call) and waiters that stopped asking.
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local gone = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now, 'LIMIT', 0, 100)
if #gone > 0 then
  redis.call('ZREM', KEYS[3], unpack(gone))
  redis.call('ZREM', KEYS[4], unpack(gone))
end

-- GCRA: the wait before `est` tokens conform, and the arrival time to store if taken.
local function gcra(key, tpm, est)
  if tpm <= 0 then return 0, nil end
  local tat = tonumber(redis.call('GET', key)) or now_us
  if tat < now_us then tat = now_us end
  local new_tat = tat + est * 60000000 / tpm
  local wait = new_tat - burst_us - now_us
  if wait < 0 then wait = 0 end
  return wait, new_tat
end
local function save(key, tat)
  if tat then
    redis.call('SET', key, string.format('%.0f', tat), 'PX', math.ceil((tat - now_us) / 1000) + 1000)
  end
end

local day = redis.call('HMGET', KEYS[5], 'tokens', 'seconds')
local c_used_tokens, c_used_secs = tonumber(day[1]) or 0, tonumber(day[2]) or 0
local out = {}
for i = 0, n - 1 do
  local a = 11 + 9 * i
  local agent, call = ARGV[a], ARGV[a + 1]
  local est, max_wait = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local a_tpm, a_conc, a_tokens, a_secs = tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6]), tonumber(ARGV[a + 7]), tonumber(ARGV[a + 8])
  local a_tat_key, a_holders = KEYS[7 + 2 * i], KEYS[8 + 2 * i]
  local member = agent .. '|' .. call
  local status, ms, what = 1, 0, ''
  redis.call('ZREMRANGEBYSCORE', a_holders, '-inf', now)

  -- Daily budgets: refused at once when this call could overspend them.
  local mine = redis.call('HMGET', KEYS[5], 'tokens:' .. agent, 'seconds:' .. agent)
  if c_tokens > 0 and c_used_tokens + est > c_tokens then
    status, ms, what = -2, reset, 'class dailyTokens'
  elseif c_secs > 0 and c_used_secs >= c_secs then
    status, ms, what = -2, reset, 'class dailyAgentSeconds'
  elseif a_tokens > 0 and (tonumber(mine[1]) or 0) + est > a_tokens then
    status, ms, what = -2, reset, 'agent dailyTokens'
  elseif a_secs > 0 and (tonumber(mine[2]) or 0) >= a_secs then
    status, ms, what = -2, reset, 'agent dailyAgentSeconds'
  -- Concurrency: the agent's own limit first, then a fair place in the class's queue.
  elseif a_conc > 0 and redis.call('ZCARD', a_holders) >= a_conc then
    status, ms, what = 0, poll, 'agent maxConcurrent'
  elseif c_conc > 0 then
    local free = c_conc - redis.call('ZCARD', KEYS[2])
    redis.call('ZADD', KEYS[3], ARGV[a + 4], member)
    redis.call('ZADD', KEYS[4], now + waiter_ttl, member)
    if free <= 0 or redis.call('ZRANK', KEYS[3], member) >= free then
      status, ms, what = 0, poll, 'class maxConcurrent'
    end
  end

  if status == 1 then
    -- Tokens per minute: reserve the call's place in time; the caller sleeps until then.
    local c_wait, c_tat = gcra(KEYS[1], c_tpm, est)
    local a_wait, a_tat = gcra(a_tat_key, a_tpm, est)
    local wait = math.max(c_wait, a_wait)
    if wait > max_wait * 1000 then
      status, ms, what = -1, math.ceil(wait / 1000), 'class tokensPerMinute'
      if a_wait > c_wait then what = 'agent tokensPerMinute' end
    else
      save(KEYS[1], c_tat)
      save(a_tat_key, a_tat)
      ms = math.ceil(wait / 1000)
      redis.call('ZADD', KEYS[2], now + ms + lease, member)
      redis.call('ZADD', a_holders, now + ms + lease, call)
      redis.call('HINCRBY', KEYS[5], 'tokens', est)
      redis.call('HINCRBY', KEYS[5], 'tokens:' .. agent, est)
      c_used_tokens = c_used_tokens + est
      if ms > 0 then redis.call('ZADD', KEYS[6], now + ms, agent) end
    end
  end
  if status ~= 0 or what == 'agent maxConcurrent' then
    redis.call('ZREM', KEYS[3], member)
    redis.call('ZREM', KEYS[4], member)
  end
  out[#out + 1] = status
  out[#out + 1] = ms
  out[#out + 1] = what
end
redis.call('EXPIRE', KEYS[5], budget_ttl)
-- A class (or an agent) nobody admits any more leaves no sets behind; entries inside
-- expire far sooner (slot leases, waiter ttl, rate sleeps), so a day is safe.
local idle_ttl = 86400
for _, i in ipairs({2, 3, 4, 6}) do
  redis.call('EXPIRE', KEYS[i], idle_ttl)
end
for i = 0, n - 1 do
  redis.call('EXPIRE', KEYS[8 + 2 * i], idle_ttl)
end
return out
