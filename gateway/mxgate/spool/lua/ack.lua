-- ack: claimed jobs are finished (delivered, or bounced and their notification queued): delete them.
-- KEYS[1]  queue ZSET      mxg:{p:X}:q
-- KEYS[2]  claims HASH     mxg:{p:X}:claims
-- KEYS[3..n+2] the n job HASHes
-- ARGV[1..n]   their job ids, ARGV[n+1..2n] the claim tokens
-- Returns  the number of jobs deleted. A job whose token no longer matches (its lease expired and
--          another worker claimed it) is left alone: that worker owns it now.
local n = #KEYS - 2
local deleted = 0
for i = 1, n do
  local id = ARGV[i]
  if redis.call('HGET', KEYS[2], id) == ARGV[n + i] then
    redis.call('DEL', KEYS[i + 2])
    redis.call('ZREM', KEYS[1], id)
    redis.call('HDEL', KEYS[2], id)
    deleted = deleted + 1
  end
end
return deleted
