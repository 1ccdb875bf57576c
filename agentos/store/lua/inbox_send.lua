-- Put a message in an agent's inbox at most once per send id, and nudge its holder.
-- A sender that lost the reply (a timeout, a cut connection) sends again with the same
-- id and gets the first message's id back; nothing is added twice. With a digest of the
-- body, the dedupe key keeps it too: the same id with another body is a conflict (an
-- Idempotency-Key reused for a different message), never silently the first message.
-- With a check, the agent must be applied, the message within its inbox's size limit
-- and the inbox below its depth limit (all from the agent's applied marker, its copy of
-- the fleet index entry), so a send is one atomic step that never lands in the inbox of
-- an agent deleted a moment ago, nor grows a stuck agent's inbox without end. Acks
-- delete entries, so the stream's length is the messages not yet done.
-- Whether a daemon holds the agent is read in the same step: a holder is nudged with a
-- 'message' signal (it also looks at its inbox before it lets the agent go), a released
-- agent is made due by the caller. A release and a send never cross unseen.
-- KEYS[1] the send id's dedupe key, KEYS[2] the inbox, KEYS[3] the applied marker,
-- KEYS[4] the lease (all the agent's hash tag), KEYS[5] the signal stream, only on a
-- single Redis: on a cluster it is in another slot and the sender adds the signal after.
-- ARGV[1] dedupe ttl (s) or '' (no send id), ARGV[2] agent name, ARGV[3] signals
-- maxlen, ARGV[4] '' (no check) or the size limit of an agent whose marker names none,
-- ARGV[5] the message's size in bytes, ARGV[6] the body's digest or '', ARGV[7] the
-- depth limit of an agent whose marker names none, then the message's field/value pairs.
-- Returns {'ok', message id, 1 held / 0 released}, {'missing', ''}, {'too-big', limit},
-- {'full', depth, limit} or {'conflict', the first message's id}.
local held = redis.call('EXISTS', KEYS[4])
if ARGV[1] ~= '' then
  local seen = redis.call('GET', KEYS[1])
  if seen then
    local _, _, id, digest = string.find(seen, '^(%S+) ?(%S*)$')
    if ARGV[6] ~= '' and digest ~= '' and digest ~= ARGV[6] then
      return {'conflict', id}
    end
    return {'ok', id, held}
  end
end
if ARGV[4] ~= '' then
  local entry = redis.call('GET', KEYS[3])
  if not entry then
    return {'missing', ''}
  end
  local _, _, size_limit, depth_limit = string.find(entry, '^%S+ %S+ (%d+) ?(%d*)')
  size_limit = tonumber(size_limit) or tonumber(ARGV[4])
  depth_limit = tonumber(depth_limit) or tonumber(ARGV[7])
  if tonumber(ARGV[5]) > size_limit then
    return {'too-big', tostring(size_limit)}
  end
  local depth = redis.call('XLEN', KEYS[2])
  if depth >= depth_limit then
    return {'full', depth, depth_limit}
  end
end
local fields = {}
for i = 8, #ARGV do
  fields[#fields + 1] = ARGV[i]
end
local id = redis.call('XADD', KEYS[2], '*', unpack(fields))
if ARGV[1] ~= '' then
  local value = id
  if ARGV[6] ~= '' then
    value = id .. ' ' .. ARGV[6]
  end
  redis.call('SET', KEYS[1], value, 'EX', ARGV[1])
end
if KEYS[5] and held == 1 then
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[3], '*', 'cmd', 'message', 'agent', ARGV[2])
end
return {'ok', id, held}
