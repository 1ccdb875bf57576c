-- Move a message whose task failed (or was interrupted) too many times in a row from the
-- agent's inbox to its dead letters, while the caller still holds the agent's lease: the
-- agent goes on with its next message, and an operator can look at the message
-- (`agentos tasks NAME --dead`), re-drive it or drop it. One atomic step: the message is
-- never in both places, nor in neither.
-- KEYS[1] the lease, KEYS[2] the inbox, KEYS[3] the dead letters (hash), KEYS[4] their
-- order (zset), KEYS[5] the task record, KEYS[6] the task index, KEYS[7] the agent's
-- events (all the agent's hash tag), KEYS[8] the fleet feed shard, only on a single
-- Redis (on a cluster the caller copies the event after).
-- ARGV[1] "daemon|token", ARGV[2] message id, ARGV[3] task id, ARGV[4] consumer group,
-- ARGV[5] attempts, ARGV[6] last error, ARGV[7] now, ARGV[8] agent, ARGV[9] dead letters
-- kept, ARGV[10] ttl (s) of dead letters and task records, ARGV[11] event JSON,
-- ARGV[12] events maxlen, ARGV[13] fleet feed maxlen.
-- Returns 1 moved, 0 the lease is not the caller's (nothing done), 2 the message is no
-- longer in the inbox (moved or dropped before: nothing done).
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
local entry = redis.call('XRANGE', KEYS[2], ARGV[2], ARGV[2])
if #entry == 0 then
  return 2
end
local letter = {}
local flat = entry[1][2]
for i = 1, #flat, 2 do
  letter[flat[i]] = flat[i + 1]
end
letter['task'] = ARGV[3]
letter['message_id'] = ARGV[2]
letter['attempts'] = ARGV[5]
letter['error'] = ARGV[6]
letter['dead_at'] = ARGV[7]
local ttl = tonumber(ARGV[10])
redis.call('HSET', KEYS[3], ARGV[3], cjson.encode(letter))
redis.call('ZADD', KEYS[4], ARGV[7], ARGV[3])
local over = redis.call('ZCARD', KEYS[4]) - tonumber(ARGV[9])
if over > 0 then
  local oldest = redis.call('ZRANGE', KEYS[4], 0, over - 1)
  redis.call('ZREMRANGEBYRANK', KEYS[4], 0, over - 1)
  redis.call('HDEL', KEYS[3], unpack(oldest))
end
redis.call('EXPIRE', KEYS[3], ttl)
redis.call('EXPIRE', KEYS[4], ttl)
redis.call('XACK', KEYS[2], ARGV[4], ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
redis.call('HSET', KEYS[5], 'status', 'dead', 'error', ARGV[6], 'finished_at', ARGV[7],
  'attempt', ARGV[5])
redis.call('HSETNX', KEYS[5], 'id', ARGV[3])
redis.call('HSETNX', KEYS[5], 'agent', ARGV[8])
redis.call('HSETNX', KEYS[5], 'trigger', 'inbox')
redis.call('HSETNX', KEYS[5], 'message_id', ARGV[2])
redis.call('HSETNX', KEYS[5], 'created_at', ARGV[7])
redis.call('EXPIRE', KEYS[5], ttl)
redis.call('ZADD', KEYS[6], 'NX', ARGV[7], ARGV[3])
redis.call('EXPIRE', KEYS[6], ttl)
redis.call('XADD', KEYS[7], 'MAXLEN', '~', ARGV[12], '*', 'event', ARGV[11])
if KEYS[8] then
  redis.call('XADD', KEYS[8], 'MAXLEN', '~', ARGV[13], '*', 'agent', ARGV[8], 'event', ARGV[11])
end
return 1
