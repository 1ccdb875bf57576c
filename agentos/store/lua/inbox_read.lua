-- Read an agent's inbox through the consumer group, only while the caller holds the
-- agent's lease. A daemon that lost the lease and does not know it yet could otherwise
-- take a new message into its own pending list after the new owner claimed the old
-- ones: the message would sit there, delivered to nobody, until the next takeover.
-- KEYS[1] the lease, KEYS[2] the inbox (both the agent's hash tag).
-- ARGV[1] "daemon|token", ARGV[2] group, ARGV[3] consumer, ARGV[4] count,
-- ARGV[5] '>' (new messages) or '0' (the consumer's own pending ones).
-- Returns {0} when the lease is not the caller's, else {1, XREADGROUP's reply}.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return {0}
end
local reply = redis.call('XREADGROUP', 'GROUP', ARGV[2], ARGV[3], 'COUNT', ARGV[4],
  'STREAMS', KEYS[2], ARGV[5])
return {1, reply}
