-- Send a dead letter again: back into the agent's inbox as a new message (same body,
-- idempotency key and trace), out of the dead letters, in one atomic step, with the same
-- checks as a send (the agent applied, its inbox below its depth limit). The old task
-- record says which task took its message over; a 'Redriven' event says so too.
-- KEYS[1] the dead letters (hash), KEYS[2] their order (zset), KEYS[3] the inbox,
-- KEYS[4] the applied marker, KEYS[5] the lease, KEYS[6] the old task record,
-- KEYS[7] the agent's events (all the agent's hash tag), KEYS[8] the signal stream and
-- KEYS[9] the fleet feed shard, only on a single Redis (on a cluster the caller adds
-- the signal and the event's copy after).
-- ARGV[1] task id, ARGV[2] the depth limit of an agent whose marker names none,
-- ARGV[3] now, ARGV[4] agent, ARGV[5] signals maxlen, ARGV[6] event JSON with the new
-- task id written as '{task}', ARGV[7] events maxlen, ARGV[8] fleet feed maxlen,
-- ARGV[9] task record ttl (s).
-- Returns {'ok', message id, 1 held / 0 released, event JSON}, {'missing', ''} (not a
-- dead letter), {'gone', ''} (the agent is not applied) or {'full', depth, limit}.
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then
  return {'missing', ''}
end
local entry = redis.call('GET', KEYS[4])
if not entry then
  return {'gone', ''}
end
local _, _, depth_limit = string.find(entry, '^%S+ %S+ %d+ (%d+)')
depth_limit = tonumber(depth_limit) or tonumber(ARGV[2])
local depth = redis.call('XLEN', KEYS[3])
if depth >= depth_limit then
  return {'full', depth, depth_limit}
end
local letter = cjson.decode(raw)
local fields = {'body', letter['body'] or '', 'sent_at', ARGV[3], 'redriven_from', ARGV[1]}
for _, f in ipairs({'key', 'traceparent'}) do
  if letter[f] then
    fields[#fields + 1] = f
    fields[#fields + 1] = letter[f]
  end
end
local id = redis.call('XADD', KEYS[3], '*', unpack(fields))
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('EXISTS', KEYS[6]) == 1 then
  redis.call('HSET', KEYS[6], 'redriven_as', 'm-' .. id)
  redis.call('EXPIRE', KEYS[6], tonumber(ARGV[9]))
end
local event = string.gsub(ARGV[6], '{task}', 'm-' .. id)
redis.call('XADD', KEYS[7], 'MAXLEN', '~', ARGV[7], '*', 'event', event)
local held = redis.call('EXISTS', KEYS[5])
if KEYS[9] then
  redis.call('XADD', KEYS[9], 'MAXLEN', '~', ARGV[8], '*', 'agent', ARGV[4], 'event', event)
end
if KEYS[8] and held == 1 then
  redis.call('XADD', KEYS[8], 'MAXLEN', '~', ARGV[5], '*', 'cmd', 'message', 'agent', ARGV[4])
end
return {'ok', id, held, event}
