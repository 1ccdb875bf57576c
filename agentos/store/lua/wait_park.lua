-- Park a task's wait: write its record and put the agent in the due index at a
-- provisional time (soon: if the parking daemon dies before its fenced park commits,
-- the agent is activated again and the torn park is discarded). An event wait whose
-- event was already sent takes it now: the wait is answered at once.
-- KEYS[1] the wait hash, KEYS[2] the agent's due shard, KEYS[3] its buffered events;
-- all in the {due:N} slot of the agent.
-- ARGV[1] agent, ARGV[2] provisional due time, ARGV[3] kind, ARGV[4] event name,
-- then field/value pairs of the wait record.
-- Returns 1 when the wait was answered by a buffered event, else 0.
redis.call('DEL', KEYS[1])
for i = 5, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
local answered = 0
if ARGV[3] == 'event' then
  local data = redis.call('HGET', KEYS[3], ARGV[4])
  if data then
    redis.call('HDEL', KEYS[3], ARGV[4])
    redis.call('HSET', KEYS[1], 'answer', data, 'answer_id', 'buffered')
    answered = 1
  end
end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return answered
