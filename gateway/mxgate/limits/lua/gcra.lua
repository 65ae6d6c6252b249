-- gcra: may one more message go to this provider now? (Generic Cell Rate Algorithm, fleet-wide)
-- KEYS[1]  GCRA state STRING  mxg:{p:X}:gcra:<identity>   theoretical arrival time (epoch ms, float)
-- KEYS[2]  hourly counter     mxg:{p:X}:hour:<identity>:<hour number>
-- KEYS[3]  daily counter      mxg:{p:X}:day:<identity>:<day number>
-- ARGV[1]  emission interval T in ms (1000 / messages per second); 0 = no rate limit
-- ARGV[2]  burst: messages that may go at once (>= 1); tolerance tau = T * burst
-- ARGV[3]  hourly cap (0 = none)     ARGV[4]  daily cap (0 = none)
-- ARGV[5]  the hour number and ARGV[6] the day number the caller computed its keys (and, for a
--          warm-up, its daily cap) for, or '' when it has no such cap. The script recomputes both
--          from Redis time and refuses on a mismatch (the caller then retries with the right keys
--          and cap): Redis time decides which hour and day it is, for every pod alike.
-- ARGV[7]  '1': only look whether the caps leave room (before opening a connection); no rate
--          check, nothing counted or changed.
-- Returns  {1, 0} allowed (state updated, unless ARGV[7] is '1');
--          {0, retry_after_ms, kind} refused (state unchanged), kind 'rate', 'hour' or 'day': the
--          limit that refused (a cap's retry_after_ms is the time until its hour or day ends);
--          {-1, hour, day} the caller's hour/day numbers are stale: call again with these.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local hour = math.floor(tonumber(t[1]) / 3600)
local day = math.floor(tonumber(t[1]) / 86400)
local hcap, dcap = tonumber(ARGV[3]), tonumber(ARGV[4])
if (ARGV[5] ~= '' and tostring(hour) ~= ARGV[5]) or (ARGV[6] ~= '' and tostring(day) ~= ARGV[6]) then
  return {-1, hour, day}
end
if hcap > 0 and tonumber(redis.call('GET', KEYS[2]) or '0') >= hcap then
  return {0, math.ceil((hour + 1) * 3600000 - now), 'hour'}
end
if dcap > 0 and tonumber(redis.call('GET', KEYS[3]) or '0') >= dcap then
  return {0, math.ceil((day + 1) * 86400000 - now), 'day'}
end
if ARGV[7] == '1' then
  return {1, 0}
end
local interval = tonumber(ARGV[1])
if interval > 0 then
  local tau = interval * tonumber(ARGV[2])
  local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
  if tat < now then tat = now end
  local new_tat = tat + interval
  local allow_at = new_tat - tau
  if now < allow_at then
    return {0, math.ceil(allow_at - now), 'rate'}
  end
  -- Store as a string with full precision; expire once the bucket would be full again anyway.
  redis.call('SET', KEYS[1], string.format('%.3f', new_tat), 'PX', math.ceil(new_tat - now) + 1000)
end
if hcap > 0 then redis.call('INCR', KEYS[2]); redis.call('EXPIRE', KEYS[2], 7200) end
if dcap > 0 then redis.call('INCR', KEYS[3]); redis.call('EXPIRE', KEYS[3], 172800) end
return {1, 0}
