-- enqueue: store one delivery job and make it due now (Redis server time).
-- KEYS[1]  queue ZSET      mxg:{p:X}:q
-- KEYS[2]  job HASH        mxg:{p:X}:j:<id>
-- ARGV[1]  job id
-- ARGV[2..] field, value pairs of the job
-- Returns  the enqueue time in epoch milliseconds.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[2], 'created', now, 'attempts', 0, unpack(ARGV, 2))
-- NX: a client retrying a timed-out enqueue must not push an existing job's due time around.
redis.call('ZADD', KEYS[1], 'NX', now, ARGV[1])
return now
