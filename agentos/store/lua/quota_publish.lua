-- Publish the evaluator's result, only while the caller holds the evaluator lease with
-- the same fencing token: a daemon that lost the lease (a pause, a partition) cannot
-- overwrite the limits and rule memory of the one that took over. The rescale events
-- go to the sharded fleet feed afterwards (another slot on a cluster).
-- KEYS (all {fleet}): 1 evaluator lease  2 effective limits  3 rules' memory
--   4 fleet metrics
-- ARGV: 1 "daemon|token"  2 effective JSON  3 memory JSON  4 metrics JSON
-- Returns 1 when written, 0 when the lease is not the caller's.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('SET', KEYS[3], ARGV[3])
redis.call('SET', KEYS[4], ARGV[4])
return 1
