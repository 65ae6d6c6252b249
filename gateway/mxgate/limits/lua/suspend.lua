-- suspend: no deliveries to a provider until a time (a Suspend response rule matched), fleet-wide.
-- KEYS[1]  effective limits HASH   mxg:{p:X}:limits
-- ARGV[1]  suspension length in ms from now (Redis server time)
-- ARGV[2]  reason
-- ARGV[3]  channel, ARGV[4] message announcing the change ("limits <provider>")
-- Returns  the suspension end in epoch ms (an existing later end is kept, never shortened).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local wanted = now + tonumber(ARGV[1])
local current = tonumber(redis.call('HGET', KEYS[1], 'suspendedUntil') or '0') or 0
if wanted > current then
  -- suspendReason too: the controller rewrites 'reason' every window, the suspension's cause must stay.
  redis.call('HSET', KEYS[1], 'suspendedUntil', wanted, 'reason', ARGV[2], 'suspendReason', ARGV[2])
  redis.call('PUBLISH', ARGV[3], ARGV[4])
  return wanted
end
return current
