-- promote: a multi-domain message is committed (its commit record is written and replicated): make its
-- staged job due now, unless a worker already holds it (that worker asks the commit record itself).
-- KEYS[1]  queue ZSET      mxg:{p:X}:q
-- KEYS[2]  claims HASH     mxg:{p:X}:claims
-- KEYS[3]  job HASH        mxg:{p:X}:j:<id>
-- ARGV[1]  job id
-- ARGV[2]  channel and ARGV[3] message announcing new mail ("wake <provider>")
-- Returns  1 when promoted, 0 when the job is gone or claimed.
if redis.call('EXISTS', KEYS[3]) == 0 or redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local was_idle = #redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 1) == 0
redis.call('HDEL', KEYS[3], 'commit')
redis.call('ZADD', KEYS[1], 'XX', now, ARGV[1])
if was_idle then redis.call('PUBLISH', ARGV[2], ARGV[3]) end
return 1
