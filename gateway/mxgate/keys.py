"""The Redis key layout: the one place that names keys.

Every key of one provider carries the hash tag ``{p:<provider>}``, so all of a provider's keys live in one
Redis Cluster slot and each Lua script touches a single slot. Keys shared by the whole fleet are few and
small (the policy table, the provider index).

    mxg:policies                    HASH    policy name -> ProviderPolicy JSON          (controller writes)
    mxg:control                     HASH    rev, updated_ms, writer                     (controller writes;
                                                                                          gateways are ready
                                                                                          once it exists)
    mxg:providers                   SET     provider ids that have had jobs             (ingress adds)
    mxg:events                      channel "policies" after a policy change; "wake <provider>" after an
                                            enqueue, so idle dispatchers start at once instead of polling

    mxg:{p:<provider>}:q            ZSET    job id -> epoch ms when the job may be claimed: its due time
                                            while waiting, its claim expiry while a worker holds it. One
                                            structure, so a crashed worker's job simply becomes due again.
    mxg:{p:<provider>}:j:<job id>   HASH    one delivery job (one message x one recipient domain):
                                            qid, from, rcpts (JSON), domain, body, created, attempts,
                                            claim (token of the current holder), last (last reply), dsn

Provider ids are policy names (``microsoft``) or ``domain:<domain>`` for unmatched domains.
"""

from __future__ import annotations

PREFIX = "mxg"

POLICIES = f"{PREFIX}:policies"
CONTROL = f"{PREFIX}:control"
PROVIDERS = f"{PREFIX}:providers"
EVENTS = f"{PREFIX}:events"

EVENT_POLICIES = "policies"
EVENT_WAKE = "wake"


def provider_tag(provider: str) -> str:
    # '{' and '}' would break the hash tag; provider ids never contain them (validated names, domains).
    return f"{PREFIX}:{{p:{provider}}}"


def queue(provider: str) -> str:
    return f"{provider_tag(provider)}:q"


def job_prefix(provider: str) -> str:
    return f"{provider_tag(provider)}:j:"


def job(provider: str, job_id: str) -> str:
    return f"{job_prefix(provider)}{job_id}"
