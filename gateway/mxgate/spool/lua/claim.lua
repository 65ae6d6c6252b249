-- claim: take up to N due jobs of one provider with a visibility lease (at-least-once delivery).
-- KEYS[1]  queue ZSET      mxg:{p:X}:q   (score = epoch ms when claimable)
-- ARGV[1]  job key prefix  mxg:{p:X}:j:
-- ARGV[2]  maximum number of jobs to claim
-- ARGV[3]  visibility lease in ms: an unacknowledged job becomes due again after it
-- ARGV[4]  claim token (unique per call); ack/defer/extend must present it
-- Returns  {now_ms, next_due_ms or -1, id1, {field, value, ...}, id2, {...}, ...}
--          next_due_ms is set only when nothing was claimed, so the caller can sleep until then.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
local out = {now, -1}
local until_ms = now + tonumber(ARGV[3])
for _, id in ipairs(ids) do
  local key = ARGV[1] .. id
  if redis.call('EXISTS', key) == 0 then
    -- An index entry without its job (a half-finished ack): drop it.
    redis.call('ZREM', KEYS[1], id)
  else
    redis.call('ZADD', KEYS[1], 'XX', until_ms, id)
    redis.call('HSET', key, 'claim', ARGV[4])
    out[#out + 1] = id
    out[#out + 1] = redis.call('HGETALL', key)
  end
end
if #out == 2 then
  local head = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if head[2] then out[2] = tonumber(head[2]) end
end
return out
