-- defer: give a claimed job back, due again after a delay (a retry, or a hand-back on shutdown).
-- KEYS[1]  queue ZSET      mxg:{p:X}:q
-- KEYS[2]  claims HASH     mxg:{p:X}:claims
-- KEYS[3]  job HASH        mxg:{p:X}:j:<id>
-- ARGV[1]  job id
-- ARGV[2]  claim token
-- ARGV[3]  delay in ms from now (Redis server time)
-- ARGV[4..] field, value pairs to update (attempts, last reply, ...); a field given as "-" is deleted
-- Returns  1 when deferred, 0 when the token does not match (someone else owns the job) or the job is gone.
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then return 0 end
if redis.call('EXISTS', KEYS[3]) == 0 then
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 4, #ARGV, 2 do
  if ARGV[i + 1] == '-' then redis.call('HDEL', KEYS[3], ARGV[i])
  else redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1]) end
end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[3]), ARGV[1])
return 1
