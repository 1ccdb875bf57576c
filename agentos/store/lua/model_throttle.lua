-- Raise a model's fleet-wide throttle: KEYS[1] the throttle hash, ARGV[1] the model,
-- ARGV[2] epoch seconds. Only a later time replaces the stored one, so a short
-- throttle never shortens a longer one another daemon recorded meanwhile.
local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if tonumber(ARGV[2]) > cur then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
return 1
