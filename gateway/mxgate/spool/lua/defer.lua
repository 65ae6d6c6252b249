-- defer: give a claimed job back, due again after a delay (a retry, or a hand-back on shutdown).
-- KEYS[1]  queue ZSET      mxg:{p:X}:q
-- ARGV[1]  job key prefix  mxg:{p:X}:j:
-- ARGV[2]  job id
-- ARGV[3]  claim token
-- ARGV[4]  delay in ms from now (Redis server time)
-- ARGV[5..] field, value pairs to update (attempts, last reply, ...)
-- Returns  1 when deferred, 0 when the token does not match (someone else owns the job).
local key = ARGV[1] .. ARGV[2]
if redis.call('HGET', key, 'claim') ~= ARGV[3] then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if #ARGV >= 5 then redis.call('HSET', key, unpack(ARGV, 5)) end
redis.call('HDEL', key, 'claim')
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[4]), ARGV[2])
return 1
