-- limits_write: the adaptive loop writes a provider's live limits and its state, unless a gateway lowered
-- the connection limit after a refusal (refused.lua) since the loop read the hash: the loop's decision was
-- made on older limits and would undo the cut. It is then dropped; the next window decides again.
-- KEYS[1]  live limits HASH  mxg:{p:X}:limits
-- KEYS[2]  adjustments LIST  mxg:{p:X}:adjustments (newest first)
-- ARGV[1]  the hash's refusedAt as the loop read it ('' = none); '*' writes whatever it is now
-- ARGV[2]  adjustments kept
-- ARGV[3]  n: field/value pairs that follow (ARGV[4] .. ARGV[3 + 2n]); the rest are adjustments (JSON,
--          oldest first)
-- Returns  1 when written, 0 when dropped.
if ARGV[1] ~= '*' and (redis.call('HGET', KEYS[1], 'refusedAt') or '') ~= ARGV[1] then return 0 end
local n = tonumber(ARGV[3])
local pairs_ = {}
for i = 4, 3 + 2 * n do pairs_[#pairs_ + 1] = ARGV[i] end
if n > 0 then redis.call('HSET', KEYS[1], unpack(pairs_)) end
for i = 4 + 2 * n, #ARGV do redis.call('LPUSH', KEYS[2], ARGV[i]) end
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[2]) - 1)
return 1
