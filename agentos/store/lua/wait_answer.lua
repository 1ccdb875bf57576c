-- Record the answer to a waiting task exactly once and make the agent due now.
-- The caller validated the answer against the wait it read (park id ARGV[3]); if the
-- wait changed since, nothing is written.
-- KEYS[1] the wait hash, KEYS[2] the agent's due shard (same slot).
-- ARGV[1] agent, ARGV[2] task id, ARGV[3] park id, ARGV[4] resolution JSON,
-- ARGV[5] answer id (a retry with the same id is recognised), ARGV[6] now.
-- Returns 1 recorded (or recorded before by this answer id), 0 the task does not wait,
-- 2 answered before by another answer, 3 the wait changed since it was read.
local w = redis.call('HMGET', KEYS[1], 'task', 'park', 'answer', 'answer_id')
if not w[1] or w[1] ~= ARGV[2] then
  return 0
end
if w[3] then
  if w[4] == ARGV[5] then
    return 1
  end
  return 2
end
if w[2] ~= ARGV[3] then
  return 3
end
redis.call('HSET', KEYS[1], 'answer', ARGV[4], 'answer_id', ARGV[5])
redis.call('ZADD', KEYS[2], ARGV[6], ARGV[1])
return 1
