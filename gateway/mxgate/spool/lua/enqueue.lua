-- enqueue: store one delivery job and make it due now (Redis server time).
-- KEYS[1]  queue ZSET      mxg:{p:X}:q
-- KEYS[2]  job HASH        mxg:{p:X}:j:<id>
-- ARGV[1]  job id
-- ARGV[2]  channel and ARGV[3] message announcing new mail ("wake <provider>")
-- ARGV[4..] field, value pairs of the job
-- Returns  the enqueue time in epoch milliseconds.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- Announce only when no job was due: with a backlog, dispatchers are already claiming, and one
-- message per enqueue would cost every gateway a wake-up per message.
local was_idle = #redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 1) == 0
redis.call('HSET', KEYS[2], 'created', now, 'attempts', 0, unpack(ARGV, 4))
-- NX: a client retrying a timed-out enqueue must not push an existing job's due time around.
redis.call('ZADD', KEYS[1], 'NX', now, ARGV[1])
if was_idle then redis.call('PUBLISH', ARGV[2], ARGV[3]) end
return now
