-- Ask for a wake task: recorded in the agent's status (``woken``), so that it is not
-- lost whether a daemon holds the agent (it is signalled, and takes the field with the
-- task) or none does (the caller makes the agent due; the runner that activates it
-- takes the field).
-- KEYS[1] the lease, KEYS[2] the status hash (both the agent's hash tag); ARGV[1] now.
-- Returns 1 when a daemon holds the agent, 0 when it is released.
redis.call('HSET', KEYS[2], 'woken', ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 1
end
return 0
