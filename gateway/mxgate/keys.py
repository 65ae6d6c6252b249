"""The Redis key layout: the one place that names keys.

Every key of one provider carries the hash tag ``{p:<provider>}``, so all of a provider's keys live in one
Redis Cluster slot and each Lua script touches a single slot. Keys shared by the whole fleet are few and
small (the policy table, the provider index) and share the tag ``{fleet}``, so the policy table and its
revision change in one transaction on a cluster too. Every key a script touches is passed in KEYS.

    mxg:{fleet}:policies            HASH    policy name -> ProviderPolicy JSON          (controller writes)
    mxg:{fleet}:control             HASH    rev, updated_ms, writer                     (controller writes;
                                                                                          gateways are ready
                                                                                          once it exists)
    mxg:{due:<n>}:due               ZSET    the due index, in DUE_SHARDS shards (a provider's shard: crc32 of
                                            its id): provider -> epoch ms when a gateway should next look at
                                            its queue; never later than its earliest job (every job write
                                            brings it forward), dropped when the queue is empty. Gateways
                                            sleep until the earliest entry instead of polling providers.
    mxg:events                      channel "policies" after a policy change; "wake <provider>" after an
                                            enqueue, so idle dispatchers start at once instead of polling
                                            (a channel, not a key: classic pub/sub reaches every cluster node)

    mxg:{p:<provider>}:q            ZSET    job id -> epoch ms when the job may be claimed: its due time
                                            while waiting, its claim expiry while a worker holds it. One
                                            structure, so a crashed worker's job simply becomes due again.
    mxg:{p:<provider>}:j:<job id>   HASH    one delivery job (one message x one recipient domain):
                                            qid, from, rcpts (JSON), domain, body, created, attempts,
                                            last (last reply), dsn, and while its message is not yet
                                            acknowledged: commit (the commit record's key, see below)
    mxg:{p:<provider>}:claims       HASH    job id -> claim token of the worker holding it (ack, defer
                                            and extend present the token)
    mxg:{p:<provider>}:commit:<qid> STRING  "1" once every job of a multi-domain message is stored (and
                                            replicated): its jobs may be delivered. Written last, so a
                                            message refused with 451 half-way never is. Deleted once
                                            every job is promoted; TTL 31 days (> any retry.maxAge).

  Fleet limits (per egress identity <id>: the sending IP or pool; "default" until pools exist)
    mxg:{p:<provider>}:limits       HASH    effective limits in force now (controller/operator writes):
                                            maxConnections, messagesPerSecond, suspendedUntil, reason, and the
                                            controller's state (see limits/effective.py, adaptive.py)
    mxg:{p:<provider>}:leases:<id>  ZSET    connection lease token -> expiry ms (a distributed semaphore)
    mxg:{p:<provider>}:closing:<id> SET     leases above a lowered limit whose connection must close
    mxg:{p:<provider>}:waiters:<id> ZSET    waiting connection attempt -> arrival ms (FIFO across pods)
    mxg:{p:<provider>}:waitbeat:<id> ZSET   waiting connection attempt -> last seen ms (stale ones go)
    mxg:{p:<provider>}:gcra:<id>    STRING  GCRA theoretical arrival time (ms) of the message rate
    mxg:{p:<provider>}:hour:<id>:<n> STRING messages sent in hour n (hourly cap); day:<id>:<n> likewise

  Telemetry (each gateway adds its counters once per second; the operator and `mxgate status` read)
    mxg:{p:<provider>}:tm:<second>  HASH    counter name -> count for that epoch second, TTL 15 minutes
    mxg:{p:<provider>}:adjustments  LIST    the adaptive loop's changes to the live limits, newest first,
                                            the last 200: JSON {time, signal, limit, old, new, reason}
                                            (controller writes; `mxgate status` and the plots read)

Provider ids are policy names (``microsoft``) or ``domain:<domain>`` for unmatched domains.
"""

from __future__ import annotations

import zlib

PREFIX = "mxg"

FLEET_TAG = f"{PREFIX}:{{fleet}}"
POLICIES = f"{FLEET_TAG}:policies"
CONTROL = f"{FLEET_TAG}:control"
PROVIDERS = f"{FLEET_TAG}:providers"   # the provider index of mxgate <= 0.1.x: moved into the due index at start
DUE_SHARDS = 4                         # spreads the due index over Cluster slots (and nodes)
EVENTS = f"{PREFIX}:events"

EVENT_POLICIES = "policies"
EVENT_WAKE = "wake"          # "wake <provider>": new mail queued
EVENT_FREE = "free"          # "free <provider>": a connection lease was released
EVENT_LIMITS = "limits"      # "limits <provider>": effective limits changed
EVENT_WANT = "want"          # "want <provider>": a connection waits for a lease (idle ones elsewhere close)

DEFAULT_IDENTITY = "default"


def due_shard(shard: int) -> str:
    return f"{PREFIX}:{{due:{shard}}}:due"


def due(provider: str) -> str:
    """The due-index shard that holds ``provider``."""
    return due_shard(zlib.crc32(provider.encode()) % DUE_SHARDS)


def due_shards() -> list[str]:
    return [due_shard(n) for n in range(DUE_SHARDS)]


def provider_tag(provider: str) -> str:
    # '{' and '}' would break the hash tag; provider ids never contain them (validated names, domains).
    return f"{PREFIX}:{{p:{provider}}}"


def queue(provider: str) -> str:
    return f"{provider_tag(provider)}:q"


def job_prefix(provider: str) -> str:
    return f"{provider_tag(provider)}:j:"


def job(provider: str, job_id: str) -> str:
    return f"{job_prefix(provider)}{job_id}"


def claims(provider: str) -> str:
    return f"{provider_tag(provider)}:claims"


def commit(provider: str, queue_id: str) -> str:
    return f"{provider_tag(provider)}:commit:{queue_id}"


def limits(provider: str) -> str:
    return f"{provider_tag(provider)}:limits"


def leases(provider: str, identity: str = DEFAULT_IDENTITY) -> str:
    return f"{provider_tag(provider)}:leases:{identity}"


def closing(provider: str, identity: str = DEFAULT_IDENTITY) -> str:
    return f"{provider_tag(provider)}:closing:{identity}"


def waiters(provider: str, identity: str = DEFAULT_IDENTITY) -> str:
    return f"{provider_tag(provider)}:waiters:{identity}"


def waitbeat(provider: str, identity: str = DEFAULT_IDENTITY) -> str:
    return f"{provider_tag(provider)}:waitbeat:{identity}"


def gcra(provider: str, identity: str = DEFAULT_IDENTITY) -> str:
    return f"{provider_tag(provider)}:gcra:{identity}"


def hour_count(provider: str, hour: int, identity: str = DEFAULT_IDENTITY) -> str:
    return f"{provider_tag(provider)}:hour:{identity}:{hour}"


def day_count(provider: str, day: int, identity: str = DEFAULT_IDENTITY) -> str:
    return f"{provider_tag(provider)}:day:{identity}:{day}"


def telemetry(provider: str, second: int) -> str:
    return f"{provider_tag(provider)}:tm:{second}"


ADJUSTMENTS_KEPT = 200   # entries of a provider's adjustments list (the controller's and the gateways' changes)


def adjustments(provider: str) -> str:
    return f"{provider_tag(provider)}:adjustments"
