-- lease_acquire: take one of LIMIT connection leases of a provider, first come first served.
-- KEYS[1]  leases ZSET     mxg:{p:X}:leases:<identity>   lease token -> expiry (epoch ms)
-- KEYS[2]  waiters ZSET    mxg:{p:X}:waiters:<identity>  waiter id -> first-seen time (queue order)
-- KEYS[3]  heartbeats ZSET mxg:{p:X}:waitbeat:<identity> waiter id -> last-seen time (stale waiters go)
-- ARGV[1]  lease token (unique per connection)
-- ARGV[2]  limit: maximum concurrent leases fleet-wide
-- ARGV[3]  lease length in ms (the holder renews it while the connection lives)
-- ARGV[4]  waiter id (unique per waiting connection attempt)
-- ARGV[5]  waiter staleness in ms: a waiter not seen for this long has given up (crashed pod)
-- ARGV[6]  channel, ARGV[7] message announcing a new waiter ("want <provider>"): a connection idling
--          elsewhere in the fleet then closes and hands its lease over
-- Returns  {1, expiry_ms} when granted; {0, ms until the earliest lease expires, queue position}
--          when the caller must wait (it is then queued and must call again, at the latest after
--          staleness/2, or when a release is announced).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local stale = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now - tonumber(ARGV[5]))
for _, id in ipairs(stale) do
  redis.call('ZREM', KEYS[2], id)
  redis.call('ZREM', KEYS[3], id)
end
local held = redis.call('ZCARD', KEYS[1])
local free = limit - held
if free > 0 then
  -- Fairness: with others queued, only the first `free` of the queue may take a lease.
  local rank = redis.call('ZRANK', KEYS[2], ARGV[4])
  if redis.call('ZCARD', KEYS[2]) == 0 or (rank and rank < free) then
    local expiry = now + tonumber(ARGV[3])
    redis.call('ZADD', KEYS[1], expiry, ARGV[1])
    redis.call('ZREM', KEYS[2], ARGV[4])
    redis.call('ZREM', KEYS[3], ARGV[4])
    redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) * 2)
    return {1, expiry}
  end
end
if redis.call('ZADD', KEYS[2], 'NX', now, ARGV[4]) == 1 and ARGV[6] then
  redis.call('PUBLISH', ARGV[6], ARGV[7])
end
redis.call('ZADD', KEYS[3], now, ARGV[4])
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[5]) * 2)
redis.call('PEXPIRE', KEYS[3], tonumber(ARGV[5]) * 2)
local head = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local wait = 1000
if head[2] then wait = math.max(1, tonumber(head[2]) - now) end
return {0, wait, redis.call('ZRANK', KEYS[2], ARGV[4])}
