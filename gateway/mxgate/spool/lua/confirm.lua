-- confirm: a claimed job's message turned out committed (its commit record exists): it is an ordinary job
-- from now on, so later claims need not ask again.
-- KEYS[1]  claims HASH     mxg:{p:X}:claims
-- KEYS[2]  job HASH        mxg:{p:X}:j:<id>
-- ARGV[1]  job id
-- ARGV[2]  claim token
-- Returns  1 when confirmed, 0 when the token does not match.
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[2], 'commit')
return 1
