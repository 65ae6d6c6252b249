-- ack: a claimed job is finished (delivered, or bounced and its notification queued): delete it.
-- KEYS[1]  queue ZSET      mxg:{p:X}:q
-- ARGV[1]  job key prefix  mxg:{p:X}:j:
-- ARGV[2..] job id, claim token, job id, claim token, ...
-- Returns  the number of jobs deleted. A job whose token no longer matches (its lease expired and
--          another worker claimed it) is left alone: that worker owns it now.
local n = 0
for i = 2, #ARGV, 2 do
  local key = ARGV[1] .. ARGV[i]
  if redis.call('HGET', key, 'claim') == ARGV[i + 1] then
    redis.call('DEL', key)
    redis.call('ZREM', KEYS[1], ARGV[i])
    n = n + 1
  end
end
return n
