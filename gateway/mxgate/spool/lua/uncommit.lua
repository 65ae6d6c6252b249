-- uncommit: delete a commit record: one whose replication was not confirmed (before the client hears 451),
-- or one no job needs any more (all of its jobs were promoted).
-- KEYS[1]  commit STRING   mxg:{p:X}:commit:<qid>
-- Returns  1 when it was deleted.
return redis.call('DEL', KEYS[1])
