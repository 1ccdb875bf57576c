-- Charge active agent-seconds to one class's daily budget, at most once per op id.
-- KEYS[1] the op id's marker (class hash tag), KEYS[2] the class's day hash.
-- ARGV[1] op id ('' = no dedupe), ARGV[2] the day hash's TTL in seconds, then pairs
-- of agent name and seconds. Returns 1 when charged now, 0 when charged before.
if ARGV[1] ~= '' and not redis.call('SET', KEYS[1], '1', 'NX', 'EX', 3600) then
  return 0
end
for i = 3, #ARGV, 2 do
  redis.call('HINCRBYFLOAT', KEYS[2], 'seconds', ARGV[i + 1])
  redis.call('HINCRBYFLOAT', KEYS[2], 'seconds:' .. ARGV[i], ARGV[i + 1])
end
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 1
