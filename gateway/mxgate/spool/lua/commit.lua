-- commit: every job of a multi-domain message is stored: write its commit record, after which its jobs count.
-- KEYS[1]  commit STRING   mxg:{p:X}:commit:<qid>
-- ARGV[1]  time to live in seconds (longer than any job may live: retry.maxAge is at most 30 days)
-- Returns  1.
redis.call('SET', KEYS[1], '1', 'EX', tonumber(ARGV[1]))
return 1
