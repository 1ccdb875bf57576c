-- Apply a list of writes to one agent's keys, all at once and only while the caller
-- holds the agent's lease with the same fencing token. A daemon that lost its lease
-- cannot overwrite the work of the one that took over, and writes that belong
-- together (a state save, its inbox ack, the task's outcome, the idempotency key)
-- never part.
-- KEYS[1] the lease, then every key the ops touch (all with the agent's hash tag).
-- ARGV[1] "daemon|token"; ARGV[2] JSON list of ops [command, key index, args...];
-- an argument {"argv": n} stands for ARGV[n] (binary values such as agent state).
-- Returns 1 when applied, 0 when the lease is not the caller's.
local allowed = {
  HSET = true, HDEL = true, SET = true, DEL = true, XADD = true, XACK = true,
  ZADD = true, ZREM = true, ZREMRANGEBYSCORE = true, HINCRBYFLOAT = true, SADD = true,
}
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
local ops = cjson.decode(ARGV[2])
for _, op in ipairs(ops) do
  if not allowed[op[1]] then
    return redis.error_reply('fenced_ops: command not allowed: ' .. tostring(op[1]))
  end
end
for _, op in ipairs(ops) do
  local args = {op[1], KEYS[tonumber(op[2])]}
  for i = 3, #op do
    local arg = op[i]
    if type(arg) == 'table' then
      arg = ARGV[tonumber(arg.argv)]
    end
    args[#args + 1] = arg
  end
  redis.call(unpack(args))
end
return 1
