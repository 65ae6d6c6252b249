-- claim: take up to N due jobs of one provider with a visibility lease (at-least-once delivery).
-- KEYS[1]  queue ZSET      mxg:{p:X}:q   (score = epoch ms when claimable)
-- KEYS[2]  claims HASH     mxg:{p:X}:claims   (job id -> claim token)
-- ARGV[1]  maximum number of jobs to claim
-- ARGV[2]  visibility lease in ms: an unacknowledged job becomes due again after it
-- ARGV[3]  claim token (unique per call); ack/defer/extend must present it
-- Returns  {now_ms, next_due_ms or -1, id1, id2, ...}; the caller then reads the job hashes (plain HGETALL:
--          this script touches only declared keys, as Redis Cluster wants). next_due_ms is set only when
--          nothing was claimed, so the caller can sleep until then.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local out = {now, -1}
local until_ms = now + tonumber(ARGV[2])
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], 'XX', until_ms, id)
  redis.call('HSET', KEYS[2], id, ARGV[3])
  out[#out + 1] = id
end
if #out == 2 then
  local head = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if head[2] then out[2] = tonumber(head[2]) end
end
return out
