-- enqueue: store one delivery job, due now or (for a multi-domain message not yet committed) staged.
-- KEYS[1]  queue ZSET      mxg:{p:X}:q
-- KEYS[2]  claims HASH     mxg:{p:X}:claims   (declared only: the job key order is the same for every script)
-- KEYS[3]  job HASH        mxg:{p:X}:j:<id>
-- ARGV[1]  job id
-- ARGV[2]  channel and ARGV[3] message announcing new mail ("wake <provider>")
-- ARGV[4]  staging delay in ms: 0 = due now; otherwise the job is not claimable before it (its message is
--          committed, or withdrawn, meanwhile; a claim after it asks the commit record)
-- ARGV[5..] field, value pairs of the job
-- Returns  {enqueue time in epoch ms (Redis time), 1 if stored now or 0 if the job already existed}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- Idempotent: a client retrying a timed-out enqueue (or a replayed one) must not reset an existing job,
-- which may be claimed, half-delivered or rescheduled by now.
-- It still writes: WAIT counts the replicas that have everything *this connection* wrote, and a retry on a new
-- connection that wrote nothing would pass WAIT at once, whether or not the first attempt's job reached them.
-- Replication is in order, so once this write is acknowledged, so is the job.
if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('HINCRBY', KEYS[3], 'replays', 1)
  return {now, 0}
end
local stage = tonumber(ARGV[4])
-- Announce only when no job was due: with a backlog, dispatchers are already claiming, and one
-- message per enqueue would cost every gateway a wake-up per message.
local was_idle = #redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 1) == 0
redis.call('HSET', KEYS[3], 'created', now, 'attempts', 0, unpack(ARGV, 5))
redis.call('ZADD', KEYS[1], 'NX', now + stage, ARGV[1])
if was_idle and stage == 0 then redis.call('PUBLISH', ARGV[2], ARGV[3]) end
return {now, 1}
