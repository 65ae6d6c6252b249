-- withdraw: take back a job whose message was refused (451) before any worker claimed it, so the client's
-- retry does not deliver it twice.
-- KEYS[1]  queue ZSET      mxg:{p:X}:q
-- KEYS[2]  claims HASH     mxg:{p:X}:claims
-- KEYS[3]  job HASH        mxg:{p:X}:j:<id>
-- ARGV[1]  job id
-- Returns  1 when withdrawn, 0 when a worker holds it (it will be delivered: a possible duplicate) or it is gone.
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
return redis.call('DEL', KEYS[3])
