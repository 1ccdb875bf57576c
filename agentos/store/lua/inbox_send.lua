-- Put a message in an agent's inbox at most once per send id, and nudge the daemons.
-- A sender that lost the reply (a timeout, a cut connection) sends again with the same
-- id and gets the first message's id back; nothing is added twice.
-- KEYS[1] the send id's dedupe key (agent hash tag), KEYS[2] the inbox, KEYS[3] the
-- daemons' signal stream ({fleet}: one script may touch both slots on a single Redis;
-- on Redis Cluster the signal moves out of the script, see the Cluster issue).
-- ARGV[1] dedupe ttl (s), ARGV[2] agent name, ARGV[3] signals maxlen, then the message's
-- field/value pairs. Returns the message id.
local seen = redis.call('GET', KEYS[1])
if seen then
  return seen
end
local fields = {}
for i = 4, #ARGV do
  fields[#fields + 1] = ARGV[i]
end
local id = redis.call('XADD', KEYS[2], '*', unpack(fields))
redis.call('SET', KEYS[1], id, 'EX', ARGV[1])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 'cmd', 'message', 'agent', ARGV[2])
return id
