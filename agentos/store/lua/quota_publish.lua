-- Publish the evaluator's result, only while the caller holds the evaluator lease with
-- the same fencing token: a daemon that lost the lease (a pause, a partition) cannot
-- overwrite the limits and rule memory of the one that took over.
-- KEYS (all {fleet}): 1 evaluator lease  2 effective limits  3 rules' memory
--   4 fleet metrics  5 fleet event feed
-- ARGV: 1 "daemon|token"  2 effective JSON  3 memory JSON  4 metrics JSON  5 feed maxlen,
--   then pairs of (policy name, event JSON), one per rescale.
-- Returns 1 when written, 0 when the lease is not the caller's.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('SET', KEYS[3], ARGV[3])
redis.call('SET', KEYS[4], ARGV[4])
for i = 6, #ARGV, 2 do
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[5], '*', 'agent', ARGV[i], 'event', ARGV[i + 1])
end
return 1
