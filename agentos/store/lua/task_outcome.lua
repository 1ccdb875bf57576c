-- Set the verdict of a task that ended normally (`agentos eval`) and move its count in the
-- usage of the day it was counted on: from the old verdict to the new one, for the agent
-- and for the model that served the task's last call. One atomic step, so judging the
-- same task again with the same verdict changes nothing but the outcome's text.
-- KEYS[1] the task record, KEYS[2] the usage hash of the day, KEYS[3] the usage-days set
-- (all the agent's hash tag).
-- ARGV[1] the outcome (JSON), ARGV[2] its verdict (pass, fail, unknown), ARGV[3] the day
-- (the record's counted_on, or the day it finished when it has none), ARGV[4] the usage
-- ttl (s), ARGV[5] the agent's own outcome (JSON) to keep beside it, or ''.
-- Returns {1, old verdict or ''} when set; {0, 'missing' | 'status' | 'day'} when not
-- (no such record; not a task that ended normally; counted on another day than ARGV[3]).
local verdicts = {pass = true, fail = true, unknown = true}
local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  return {0, 'missing'}
end
if status ~= 'succeeded' then
  return {0, 'status'}
end
local day = redis.call('HGET', KEYS[1], 'counted_on')
local old = ''
if day then
  if day ~= ARGV[3] then
    return {0, 'day'}
  end
  old = redis.call('HGET', KEYS[1], 'verdict') or ''
  if not verdicts[old] then
    old = ''
  end
end
local new = ARGV[2]
redis.call('HSET', KEYS[1], 'outcome', ARGV[1], 'verdict', new, 'counted_on', ARGV[3])
if ARGV[5] ~= '' then
  redis.call('HSETNX', KEYS[1], 'agent_outcome', ARGV[5])
end
if old ~= new then
  local models = redis.call('HGET', KEYS[1], 'models')
  local model = models and string.match(models, '([^,]+)$')
  if old ~= '' then
    redis.call('HINCRBYFLOAT', KEYS[2], 'tasks_' .. old, -1)
    if model then
      redis.call('HINCRBYFLOAT', KEYS[2], 'model:' .. model .. ':' .. old, -1)
    end
  end
  redis.call('HINCRBYFLOAT', KEYS[2], 'tasks_' .. new, 1)
  if model then
    redis.call('HINCRBYFLOAT', KEYS[2], 'model:' .. model .. ':' .. new, 1)
  end
  redis.call('SADD', KEYS[3], ARGV[3])
  redis.call('EXPIRE', KEYS[2], ARGV[4])
  redis.call('EXPIRE', KEYS[3], ARGV[4])
end
return {1, old}
