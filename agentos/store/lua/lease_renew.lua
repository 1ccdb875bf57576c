-- Extend a lease only if the caller still holds it with the same fencing token.
-- KEYS[1] lease; ARGV[1] "daemon|token", ARGV[2] ttl ms. Returns 1, or 0 if lost.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
