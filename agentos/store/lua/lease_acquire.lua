-- Take an agent's lease, or extend it when the caller already holds it.
-- KEYS[1] lease, KEYS[2] fencing counter; ARGV[1] daemon id, ARGV[2] ttl ms.
-- Returns the fencing token (> 0), or 0 when another daemon holds the lease.
local current = redis.call('GET', KEYS[1])
if current then
  local owner, token = string.match(current, '^(.*)|(%d+)$')
  if owner == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return tonumber(token)
  end
  return 0
end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. token, 'PX', ARGV[2])
return token
