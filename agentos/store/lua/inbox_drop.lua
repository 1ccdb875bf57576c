-- Drop a message an operator gave up on (a poison message): out of the agent's inbox
-- (acknowledged and deleted, whoever had read it) or out of its dead letters, its task
-- recorded as dropped, a 'Dropped' event written; one atomic step. No lease is needed:
-- the owner of the agent, if any, is told by a 'drop' signal (it must not start the task
-- it may have read already), and a message that is gone is never delivered again.
-- KEYS[1] the inbox, KEYS[2] the dead letters (hash), KEYS[3] their order (zset),
-- KEYS[4] the task record, KEYS[5] the task index, KEYS[6] the agent's events,
-- KEYS[7] the lease (all the agent's hash tag), KEYS[8] the fleet feed shard, only on a
-- single Redis (on a cluster the caller copies the event after).
-- ARGV[1] message id, ARGV[2] task id, ARGV[3] consumer group, ARGV[4] now, ARGV[5]
-- agent, ARGV[6] the record's result text, ARGV[7] task record ttl (s), ARGV[8] event
-- JSON, ARGV[9] events maxlen, ARGV[10] fleet feed maxlen, ARGV[11] the status to record
-- (dropped, or cancelled for `agentos tasks cancel`).
-- Returns {0} when the message is neither in the inbox nor a dead letter (nothing
-- done), else {1, 'inbox' | 'dead', 1 held / 0 released}.
local where
if #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) > 0 then
  redis.call('XACK', KEYS[1], ARGV[3], ARGV[1])
  redis.call('XDEL', KEYS[1], ARGV[1])
  where = 'inbox'
elseif redis.call('HDEL', KEYS[2], ARGV[2]) == 1 then
  redis.call('ZREM', KEYS[3], ARGV[2])
  where = 'dead'
else
  return {0}
end
local ttl = tonumber(ARGV[7])
redis.call('HSET', KEYS[4], 'status', ARGV[11], 'finished_at', ARGV[4], 'result', ARGV[6])
redis.call('HSETNX', KEYS[4], 'id', ARGV[2])
redis.call('HSETNX', KEYS[4], 'agent', ARGV[5])
redis.call('HSETNX', KEYS[4], 'trigger', 'inbox')
redis.call('HSETNX', KEYS[4], 'message_id', ARGV[1])
redis.call('HSETNX', KEYS[4], 'created_at', ARGV[4])
redis.call('EXPIRE', KEYS[4], ttl)
redis.call('ZADD', KEYS[5], 'NX', ARGV[4], ARGV[2])
redis.call('EXPIRE', KEYS[5], ttl)
redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[9], '*', 'event', ARGV[8])
if KEYS[8] then
  redis.call('XADD', KEYS[8], 'MAXLEN', '~', ARGV[10], '*', 'agent', ARGV[5], 'event', ARGV[8])
end
return {1, where, redis.call('EXISTS', KEYS[7])}
