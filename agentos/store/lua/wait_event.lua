-- Deliver a named event to an agent: it answers the agent's wait for that event (and
-- makes it due now), or else is kept for its next wait_for of that name (latest wins).
-- KEYS[1] the wait hash, KEYS[2] the agent's due shard, KEYS[3] its buffered events;
-- all in the agent's {due:N} slot.
-- ARGV[1] agent, ARGV[2] event name, ARGV[3] resolution JSON, ARGV[4] now,
-- ARGV[5] how long a buffered event is kept (s), ARGV[6] event id (a retry after a lost
-- reply is recognised and not buffered a second time).
-- ARGV[7] the most events kept per agent, ARGV[8] the most bytes they hold together:
-- an agent that never waits must not let senders fill Redis through it.
-- Returns 1 when it answered a wait, 0 when buffered, -1 refused (as many events are
-- kept as ARGV[7] allows, this one's name not among them), -2 refused (the bytes kept
-- would pass ARGV[8]).
local w = redis.call('HMGET', KEYS[1], 'kind', 'question', 'answer', 'answer_id')
if w[4] == ARGV[6] then
  return 1
end
if w[1] == 'event' and w[2] == ARGV[2] and not w[3] then
  redis.call('HSET', KEYS[1], 'answer', ARGV[3], 'answer_id', ARGV[6])
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
  return 1
end
-- A new value for a name replaces the old one (latest wins): it takes no new place.
local names = redis.call('HKEYS', KEYS[3])
if redis.call('HEXISTS', KEYS[3], ARGV[2]) == 0 and #names >= tonumber(ARGV[7]) then
  return -1
end
local bytes = #ARGV[2] + #ARGV[3]
for _, name in ipairs(names) do
  if name ~= ARGV[2] then
    bytes = bytes + #name + redis.call('HSTRLEN', KEYS[3], name)
  end
end
if bytes > tonumber(ARGV[8]) then
  return -2
end
redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
redis.call('EXPIRE', KEYS[3], ARGV[5])
return 0
