-- Record a daemon's heartbeat and forget daemons not seen for a while, so that a daemon
-- that died without saying goodbye leaves nothing behind forever.
-- KEYS[1] the daemons hash; ARGV[1] daemon id, ARGV[2] its JSON (with seen_at),
-- ARGV[3] forget other entries whose seen_at is older than this, ARGV[4] the hash's ttl (s).
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local cutoff = tonumber(ARGV[3])
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  if all[i] ~= ARGV[1] then
    local ok, body = pcall(cjson.decode, all[i + 1])
    local seen = ok and type(body) == 'table' and tonumber(body.seen_at) or nil
    if seen ~= nil and seen < cutoff then
      redis.call('HDEL', KEYS[1], all[i])
    end
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
