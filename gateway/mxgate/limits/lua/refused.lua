-- refused: a connection was refused for too many connections (4.7.652, 421 4.4.5) while others of the
-- fleet were open: the provider has just said how many it allows. The live connection limit comes down to
-- that number at once (never below the floor, never up), instead of by a factor per evaluation window.
-- KEYS[1]  leases ZSET       mxg:{p:X}:leases:<identity>   lease token -> expiry (epoch ms)
-- KEYS[2]  live limits HASH  mxg:{p:X}:limits
-- KEYS[3]  adjustments LIST  mxg:{p:X}:adjustments        newest first, as the controller writes them
-- ARGV[1]  the refused connection's lease token (not counted: it is the one too many)
-- ARGV[2]  the connection limit in force (the policy's ceiling when the hash has none)
-- ARGV[3]  the floor (adaptive.floor.connections)
-- ARGV[4]  the refusal, for the reason ("451 4.7.652 ...", at most 200 characters)
-- ARGV[5]  adjustments kept
-- ARGV[6]  channel, ARGV[7] message announcing the change ("limits <provider>")
-- Returns  {1, old, new} when the limit came down; {0, limit, others} when it stays.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local others = redis.call('ZCARD', KEYS[1])
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then others = others - 1 end
local current = tonumber(redis.call('HGET', KEYS[2], 'maxConnections') or '') or tonumber(ARGV[2])
local new = math.max(tonumber(ARGV[3]), others)
-- No other connection open: the refusal says nothing about a number (the controller weighs it).
if others < 1 or new >= current then return {0, current, others} end
local reason = 'a connection was refused while ' .. others .. ' others were open: ' .. ARGV[4]
redis.call('HSET', KEYS[2], 'maxConnections', new, 'refusedAt', now, 'calm', 0, 'reason', reason)
-- The level that drew the refusal is known to be too many; a known-good level at or above it is not good.
local bad = tonumber(redis.call('HGET', KEYS[2], 'connectionsBad') or '')
if bad == nil or others + 1 < bad then
  redis.call('HSET', KEYS[2], 'connectionsBad', others + 1, 'connectionStrikes', 0)
end
local good = tonumber(redis.call('HGET', KEYS[2], 'connectionsGood') or '')
if good ~= nil and good > others then redis.call('HSET', KEYS[2], 'connectionsGood', '') end
redis.call('LPUSH', KEYS[3], cjson.encode({time = now / 1000, signal = 'refused', limit = 'connections',
                                           old = current, new = new, reason = reason}))
redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[5]) - 1)
redis.call('PUBLISH', ARGV[6], ARGV[7])
return {1, current, new}
