-- due: the providers of one due-index shard whose queues a gateway should look at now.
-- KEYS[1]  due index ZSET  mxg:{due:N}:due
-- ARGV[1]  at most this many providers
-- Returns  {now_ms, the earliest later entry's score or -1, provider1, provider2, ...}: a watcher wakes the
--          dispatchers of the providers listed and sleeps until that score (or a wake event).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {now, -1}
for _, provider in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))) do
  out[#out + 1] = provider
end
local later = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
if later[2] then out[2] = tonumber(later[2]) end
return out
