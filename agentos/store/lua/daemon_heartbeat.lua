-- Record a daemon's heartbeat and forget daemons not seen for a while, so that a daemon
-- that died without saying goodbye leaves nothing behind forever.
-- KEYS[1] the daemons hash; ARGV[1] daemon id, ARGV[2] its JSON object (without seen_at),
-- ARGV[3] forget other entries not seen for this many seconds, ARGV[4] the hash's ttl (s),
-- ARGV[5] this daemon's instance (a nonce per process; '' for none), ARGV[6] seconds for
-- which another instance's heartbeat under the same id counts as alive, ARGV[7] the time
-- to record ('' for the server's clock: liveness never compares two hosts' clocks).
-- Returns {1, seen_at} when written, {0, seen_at of the live instance} when a live
-- instance of another process uses the id (nothing is written then).
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local seen_at = now
if ARGV[7] ~= '' then
  seen_at = tonumber(ARGV[7])
end
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current and ARGV[5] ~= '' then
  local ok, body = pcall(cjson.decode, current)
  if ok and type(body) == 'table' and type(body.instance) == 'string'
      and body.instance ~= ARGV[5] then
    local seen = tonumber(body.seen_at)
    if seen ~= nil and seen > now - tonumber(ARGV[6]) then
      return {0, string.format('%.6f', seen)}
    end
  end
end
local info = ARGV[2]
local sep = ','
if string.len(info) <= 2 then
  sep = ''
end
info = string.sub(info, 1, -2) .. sep .. '"seen_at":' .. string.format('%.6f', seen_at) .. '}'
redis.call('HSET', KEYS[1], ARGV[1], info)
local cutoff = seen_at - tonumber(ARGV[3])
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
return {1, string.format('%.6f', seen_at)}
