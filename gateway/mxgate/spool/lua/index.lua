-- index: a provider has (or may have) a job due at a time: bring its entry in the due index forward to it.
-- KEYS[1]  due index ZSET  mxg:{due:N}:due   (provider -> epoch ms when a gateway should look at its queue)
-- ARGV[1]  provider
-- ARGV[2]  delay in ms from now (Redis server time): when the job becomes due
-- Returns  the entry's score after the call.
-- Only ever earlier (LT): a later job must not hide an earlier one. Every write of a job is followed by this
-- call, so an entry is never later than its provider's earliest job for longer than it takes to write it
-- (dispatchers move entries later or drop them with `settle`, then look at the queue again).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], 'LT', now + tonumber(ARGV[2]), ARGV[1])
return redis.call('ZSCORE', KEYS[1], ARGV[1])
