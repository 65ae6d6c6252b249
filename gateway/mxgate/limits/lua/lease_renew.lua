-- lease_renew: extend leases still held, and mark those above a lowered limit for closing.
-- KEYS[1]  leases ZSET     mxg:{p:X}:leases:<identity>   token -> expiry (epoch ms)
-- KEYS[2]  closing SET     mxg:{p:X}:closing:<identity>  leases whose connection must close
-- ARGV[1]  lease length in ms
-- ARGV[2]  limit now in force
-- ARGV[3..] lease tokens of the caller, idle connections first (they are the ones to close first)
-- Returns  one status per token, in order: 1 renewed; 0 lost (it had expired: another holder may have
--          it, close the connection now); -1 surplus: close the connection once its current message is
--          done, then release the lease as usual.
-- A surplus lease stays in the leases set until its connection releases it, so a lowered limit never
-- lets anyone open a new connection while the surplus ones are still open: the fleet only ever
-- converges down. Leases already marked closing count towards the surplus of every caller, so two
-- gateways renewing at once do not both close connections for the same excess.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expiry = now + tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
for _, token in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if not redis.call('ZSCORE', KEYS[1], token) then redis.call('SREM', KEYS[2], token) end
end
local excess = redis.call('ZCARD', KEYS[1]) - redis.call('SCARD', KEYS[2]) - tonumber(ARGV[2])
local out = {}
for i = 3, #ARGV do
  local token = ARGV[i]
  if not redis.call('ZSCORE', KEYS[1], token) then
    out[#out + 1] = 0
  else
    redis.call('ZADD', KEYS[1], 'XX', expiry, token)
    if redis.call('SISMEMBER', KEYS[2], token) == 1 then
      out[#out + 1] = -1
    elseif excess > 0 then
      redis.call('SADD', KEYS[2], token)
      excess = excess - 1
      out[#out + 1] = -1
    else
      out[#out + 1] = 1
    end
  end
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]) * 2)
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[1]) * 2)
return out
