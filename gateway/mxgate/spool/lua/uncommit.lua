-- uncommit: a commit record whose replication was not confirmed is taken back before the client hears 451.
-- KEYS[1]  commit STRING   mxg:{p:X}:commit:<qid>
-- Returns  1 when it was deleted.
return redis.call('DEL', KEYS[1])
