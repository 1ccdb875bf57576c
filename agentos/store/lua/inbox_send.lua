-- Put a message in an agent's inbox at most once per send id, and nudge the daemons.
-- A sender that lost the reply (a timeout, a cut connection) sends again with the same
-- id and gets the first message's id back; nothing is added twice.
-- With a check, the agent must be applied and the message within its inbox's size
-- limit (both from the fleet index), so a send is one round trip and never lands in
-- the inbox of an agent deleted a moment ago.
-- KEYS[1] the send id's dedupe key (agent hash tag), KEYS[2] the inbox, KEYS[3] the
-- daemons' signal stream, KEYS[4] the fleet index (both {fleet}: one script may touch
-- both slots on a single Redis; on Redis Cluster the signal and the check move out of
-- the script, see the Cluster issue).
-- ARGV[1] dedupe ttl (s), ARGV[2] agent name, ARGV[3] signals maxlen, ARGV[4] '' (no
-- check) or the size limit of an agent whose index entry names none, ARGV[5] the
-- message's size in bytes, then the message's field/value pairs.
-- Returns {'ok', message id}, {'missing', ''} or {'too-big', limit}.
local seen = redis.call('GET', KEYS[1])
if seen then
  return {'ok', seen}
end
if ARGV[4] ~= '' then
  local entry = redis.call('HGET', KEYS[4], ARGV[2])
  if not entry then
    return {'missing', ''}
  end
  local _, _, limit = string.find(entry, '^%S+ %S+ (%d+)')
  limit = tonumber(limit) or tonumber(ARGV[4])
  if tonumber(ARGV[5]) > limit then
    return {'too-big', tostring(limit)}
  end
end
local fields = {}
for i = 6, #ARGV do
  fields[#fields + 1] = ARGV[i]
end
local id = redis.call('XADD', KEYS[2], '*', unpack(fields))
redis.call('SET', KEYS[1], id, 'EX', ARGV[1])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 'cmd', 'message', 'agent', ARGV[2])
return {'ok', id}
