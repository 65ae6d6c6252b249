-- lease_release: give a lease back and wake the fleet's waiters.
-- KEYS[1]  leases ZSET     mxg:{p:X}:leases:<identity>
-- KEYS[2]  closing SET     mxg:{p:X}:closing:<identity>
-- ARGV[1]  lease token
-- ARGV[2]  channel to announce the release on
-- ARGV[3]  message to announce ("free <provider>")
-- Returns  1 if the lease was held, 0 if it had already expired or been dropped.
local removed = redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('SREM', KEYS[2], ARGV[1])
if removed == 1 then redis.call('PUBLISH', ARGV[2], ARGV[3]) end
return removed
