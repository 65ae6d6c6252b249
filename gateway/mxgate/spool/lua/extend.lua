-- extend: renew the visibility lease of claimed jobs still being worked on.
-- KEYS[1]  queue ZSET      mxg:{p:X}:q
-- KEYS[2]  claims HASH     mxg:{p:X}:claims
-- ARGV[1]  visibility lease in ms from now
-- ARGV[2..] job id, claim token, ...
-- Returns  the number of leases renewed (jobs whose token no longer matches are skipped).
local t = redis.call('TIME')
local until_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
local n = 0
for i = 2, #ARGV, 2 do
  if redis.call('HGET', KEYS[2], ARGV[i]) == ARGV[i + 1] then
    redis.call('ZADD', KEYS[1], 'XX', until_ms, ARGV[i])
    n = n + 1
  end
end
return n
