-- Write an agent's status, and optionally an event, its durable state and an inbox
-- acknowledgement, all at once and only while the caller holds the agent's lease
-- with the same fencing token. A daemon that lost its lease cannot overwrite the
-- work of the one that took over, and a state save and its message ack never part.
-- KEYS[1] lease, KEYS[2] status hash, KEYS[3] events stream, KEYS[4] state, KEYS[5] inbox
-- ARGV[1] "daemon|token"    ARGV[2] status fields as a flat JSON object ("" = none)
-- ARGV[3] event JSON ("" = none)   ARGV[4] events max length
-- ARGV[5] "1" to write state, ARGV[6] state bytes
-- ARGV[7] inbox group ("" = no ack), ARGV[8] message id
-- ARGV[9] status fields to delete, JSON array ("" = none)
-- ARGV[10] "1" to release the lease after writing (a clean stop)
-- Returns 1 when written, 0 when the lease is not the caller's.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
if ARGV[2] ~= '' then
  local fields = cjson.decode(ARGV[2])
  local flat = {}
  for k, v in pairs(fields) do
    flat[#flat + 1] = k
    flat[#flat + 1] = tostring(v)
  end
  if #flat > 0 then
    redis.call('HSET', KEYS[2], unpack(flat))
  end
end
if ARGV[9] ~= '' then
  local gone = cjson.decode(ARGV[9])
  if #gone > 0 then
    redis.call('HDEL', KEYS[2], unpack(gone))
  end
end
if ARGV[3] ~= '' then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'event', ARGV[3])
end
if ARGV[5] == '1' then
  redis.call('SET', KEYS[4], ARGV[6])
end
if ARGV[7] ~= '' then
  redis.call('XACK', KEYS[5], ARGV[7], ARGV[8])
end
if ARGV[10] == '1' then
  redis.call('DEL', KEYS[1])
end
return 1
