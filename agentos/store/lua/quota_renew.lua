-- Extend the lease of an admitted call's concurrency slot (long generations, and calls
-- that wait for their rate or a local turn). Never shortens it: a call admitted to wait
-- for its rate holds its slot until then plus a lease.
-- KEYS: 1 class holders  2 agent holders; ARGV: 1 agent  2 call id  3 lease ms
local t = redis.call('TIME')
local until_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], 'XX', 'GT', until_ms, ARGV[1] .. '|' .. ARGV[2])
redis.call('ZADD', KEYS[2], 'XX', 'GT', until_ms, ARGV[2])
-- Same bound as quota_admit.lua: a day after the last write.
redis.call('EXPIRE', KEYS[1], 86400)
redis.call('EXPIRE', KEYS[2], 86400)
return 1
