-- Apply a list of writes to one agent's keys, all at once and only while the caller
-- holds the agent's lease with the same fencing token. A daemon that lost its lease
-- cannot overwrite the work of the one that took over, and writes that belong
-- together (a state save, its inbox ack, the task's outcome, the idempotency key,
-- the event and its copy in the fleet feed) never part.
-- With an operation id the writes are applied at most once: the agent's most recent op
-- ids are kept in KEYS[2]. A repeat of one of them (a retry after a lost reply) returns
-- 2 without applying anything and without looking at the lease, which the first
-- attempt may have released.
-- KEYS[1] the lease, KEYS[2] the agent's recent op ids (sorted set), then every key the
-- ops touch. All carry the agent's hash tag, except on a single Redis the agent's shard
-- of the fleet event feed ({events:N}), whose copy of the event then goes in the same
-- step; on Redis Cluster the caller copies the event after this script.
-- ARGV[1] "daemon|token"; ARGV[2] JSON list of ops [command, key index, args...];
-- an argument {"argv": n} stands for ARGV[n] (ARGV[3]: binary values such as agent
-- state); ARGV[4] op id or ''; ARGV[5] how many op ids to keep; ARGV[6] their ttl (s).
-- ARGV[7..9] an optional guard (a task start that also checks its message's idempotency
-- key, so the check costs no round trip of its own): the key index of the idempotency
-- set, the key, and the ops to apply instead when the key already completed (ack the
-- message, record the task as skipped); '' when there is no guard.
-- Returns 1 when applied, 2 when the op id was applied before, 3 when the guard's ops
-- were applied instead (now or by an earlier attempt with this op id), 0 when the lease
-- is not the caller's.
local allowed = {
  HSET = true, HDEL = true, SET = true, DEL = true, XADD = true, XACK = true, XDEL = true,
  ZADD = true, ZREM = true, ZREMRANGEBYSCORE = true, HINCRBYFLOAT = true, SADD = true,
  EXPIRE = true,
}
local op_id = ARGV[4]
local guarded = ARGV[7] ~= nil and ARGV[7] ~= ''
if op_id ~= '' then
  if redis.call('ZSCORE', KEYS[2], op_id) then
    return 2
  end
  if guarded and redis.call('ZSCORE', KEYS[2], op_id .. '#dup') then
    return 3
  end
end
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
local result = 1
local ops
if guarded and redis.call('ZSCORE', KEYS[tonumber(ARGV[7])], ARGV[8]) then
  ops = cjson.decode(ARGV[9])
  result = 3
  if op_id ~= '' then op_id = op_id .. '#dup' end
else
  ops = cjson.decode(ARGV[2])
end
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
if op_id ~= '' then
  -- Scores count up, so the newest ids survive the trim (no clock involved).
  local top = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
  local score = 1
  if top[2] then score = tonumber(top[2]) + 1 end
  redis.call('ZADD', KEYS[2], score, op_id)
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -(tonumber(ARGV[5]) + 1))
  redis.call('EXPIRE', KEYS[2], ARGV[6])
end
return result
