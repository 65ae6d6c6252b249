-- lease_renew: extend leases still held, and give up those above a lowered limit.
-- KEYS[1]  leases ZSET     mxg:{p:X}:leases:<identity>
-- ARGV[1]  lease length in ms
-- ARGV[2]  limit now in force: while the fleet holds more, this caller's leases are dropped in the
--          order given (the caller lists idle connections first)
-- ARGV[3..] lease tokens of the caller
-- Returns  one status per token, in order: 1 renewed; 0 lost (it had expired: another holder may
--          have it, close the connection now); -1 dropped because the fleet is above the limit
--          (close the connection once its current message is done).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expiry = now + tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZCARD', KEYS[1])
local out = {}
for i = 3, #ARGV do
  local token = ARGV[i]
  if not redis.call('ZSCORE', KEYS[1], token) then
    out[#out + 1] = 0
  elseif held > limit then
    redis.call('ZREM', KEYS[1], token)
    held = held - 1
    out[#out + 1] = -1
  else
    redis.call('ZADD', KEYS[1], 'XX', expiry, token)
    out[#out + 1] = 1
  end
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]) * 2)
return out
