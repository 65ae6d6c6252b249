"""``mxgate operator``: ProviderPolicy objects in Kubernetes -> policies and live limits in Redis.

The adapter between kopf and the rest of the control plane; every decision is made elsewhere (the
policy model validates, ``core`` decides limits, ``conditions`` writes the status). What it does:

- **Reconcile** (create, spec update, operator restart): the whole policy table is republished to
  Redis from kopf's index of every ProviderPolicy in the namespace (kopf fills the index before any
  handler runs, so a restarted operator never publishes half a table); the live limits are put within
  the policy's ceiling at once; the status says ``Ready``. A spec the model refuses (the CRD's schema
  catches most, but not e.g. a regex that does not compile) gets ``Ready=False/InvalidSpec`` and a
  Warning Event, and the last good version of that policy stays in force (taken from the table in Redis).
- **Control**: a kopf timer per object ticks every second: it samples the provider's connection leases
  and, every ``adaptive.evaluationWindow``, runs the adaptive loop on the fleet's telemetry, patches the
  status (effective limits, observed traffic, deferral %, ``lastAdjustment``, conditions) when it
  changed, and posts an Event for every tightening (Warning ``Tightened``) and recovery (Normal
  ``Recovered``).
- **Delete**: a finalizer (``mxgate.io/redis-state``) holds the object until the policy is out of the
  table and its live limits, leases and rate state are gone from Redis; queued mail stays queued.
- **Peering**: replicas share a ``KopfPeering`` object; only the highest priority one handles objects
  and runs timers (kopf pauses the others). Priorities are random unless ``--priority`` is given.

kopf's own bookkeeping (handler progress, the last handled spec) lives in annotations under
``mxgate.io/``, never in ``status`` (whose schema is ours, so it would be pruned and kopf would log
"Patching failed with inconsistencies"). The operator watches one namespace and needs no cluster-wide
permissions: resource scanning is off, so the CRD must exist before it starts (the chart installs it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import kopf
from pydantic import ValidationError

from mxgate import keys
from mxgate.limits.effective import Effective
from mxgate.limits.warmup import daily_cap, utc_date
from mxgate.policy import ProviderPolicy, format_validation_error
from mxgate.redisconn import RedisClient, RedisConnection, RedisTarget
from mxgate_operator.adaptive import AdaptiveLoop, adjustments_key, relaxes
from mxgate_operator.conditions import Observation, changed, invalid_status, policy_status
from mxgate_operator.core import Adjustment, Window
from mxgate_operator.crd import GROUP, PLURAL, VERSION
from mxgate_operator.publish import clear_provider_state, publish_policies

log = logging.getLogger("mxgate.operator")

FINALIZER = f"{GROUP}/redis-state"
REPUBLISH_INTERVAL = 30.0   # seconds: a Redis that lost its data gets the table back this soon
# Seconds a replica's peering entry lives without a keep-alive (kopf sends one every lifetime - 5..10 s).
# A killed active replica is presumed dead this long after its last keep-alive, then a standby takes over;
# kopf's 60 s default would leave limits unmanaged for a minute. One small PATCH per ~12 s per replica.
PEERING_LIFETIME = 20
TICK = 1.0                  # seconds between lease samples; evaluation follows each policy's window
POLICY_INDEX = "policy_index"   # the index's id: kopf passes the index to every handler under this keyword


@dataclass(frozen=True)
class OperatorConfig:
    redis: RedisTarget
    namespace: str
    peering: str | None = "mxgate"      # None: standalone (no peering object needed)
    priority: int | None = None         # None: random, so replicas never tie
    health_listen: tuple[str, int] | None = ("0.0.0.0", 8080)


@dataclass
class Parsed:
    """One ProviderPolicy object as the index keeps it."""

    policy: ProviderPolicy | None
    error: str | None
    deleting: bool


@dataclass
class Runtime:
    """Shared by every handler (kopf copies the memo per object; this object is shared by reference)."""

    connection: RedisConnection
    redis: RedisClient
    loop: AdaptiveLoop
    identity: str
    next_publish: float = 0.0
    publish_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def parse_object(body: Mapping[str, Any]) -> Parsed:
    meta = body.get("metadata", {})
    document = {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
                "metadata": {"name": meta.get("name"), "namespace": meta.get("namespace")},
                "spec": body.get("spec") or {}}
    deleting = bool(meta.get("deletionTimestamp"))
    try:
        return Parsed(ProviderPolicy.model_validate(document), None, deleting)
    except ValidationError as exc:
        return Parsed(None, format_validation_error("spec", exc).replace("spec: spec.", "spec."), deleting)


def _policy_index(kwargs: Mapping[str, Any]) -> kopf.Index[str, Parsed]:
    """The index from a handler's keywords. kopf's handler protocols (ChangingFn, TimerFn) cannot name an
    extra keyword such as an index, so handlers take it from ``**kwargs``."""
    return cast("kopf.Index[str, Parsed]", kwargs[POLICY_INDEX])


def _own_entry(kwargs: Mapping[str, Any], name: str) -> Parsed:
    """The handler's own object as the index parsed it (kopf indexes each event before any handler runs,
    so a handler never validates the spec again)."""
    return next(iter(_policy_index(kwargs)[name]))


def _entries(index: Mapping[str, Iterable[Parsed]]) -> dict[str, Parsed]:
    return {name: entry for name, store in index.items() for entry in store}


async def publish_table(runtime: Runtime, index: Mapping[str, Iterable[Parsed]], *, without: str | None = None
                        ) -> list[str]:
    """Publish every valid policy; an invalid one keeps its last good version from Redis."""
    async with runtime.publish_lock:
        published = await runtime.redis.hgetall(keys.POLICIES)
        policies = []
        for name, entry in sorted(_entries(index).items()):
            if name == without or entry.deleting:
                continue
            if entry.policy is not None:
                policies.append(entry.policy)
            elif name.encode() in published:
                policies.append(ProviderPolicy.from_json(published[name.encode()]))
        await publish_policies(runtime.redis, policies, writer=f"mxgate-operator/{runtime.identity}")
        runtime.next_publish = time.monotonic() + REPUBLISH_INTERVAL
        return [p.name for p in policies]


async def observe(redis: RedisClient, policy: ProviderPolicy, window: Window | None) -> Observation:
    seconds, _ = await redis.time()     # the day is Redis's, as the gateways count it (gcra.lua)
    day = int(seconds) // 86400
    pipe = redis.pipeline(transaction=False)
    pipe.hgetall(keys.limits(policy.name))
    pipe.zcard(keys.queue(policy.name))
    pipe.lindex(adjustments_key(policy.name), 0)
    pipe.get(keys.day_count(policy.name, day))
    raw_limits, queued, newest, sent = await pipe.execute()
    last = json.loads(newest) if newest else None
    today = utc_date(day)
    warmup = policy.spec.warmup
    return Observation(Effective.from_redis(raw_limits, policy.spec.limits), window, int(queued), last,
                       day_cap=daily_cap(policy.spec.limits.messages_per_day, warmup, today),
                       sent_today=int(sent or 0),
                       warmup_day=(today - warmup.start_date).days + 1 if warmup is not None else None)


def describe(move: Adjustment) -> str:
    def show(value: float | None) -> str:
        return "unlimited" if value is None else f"{value:g}"

    unit = "" if move.limit == "connections" else " msg/s"
    return f"{move.limit} {show(move.old)} -> {show(move.new)}{unit}"


def post_events(body: kopf.Body, moves: Iterable[Adjustment], reason: str) -> None:
    for move in moves:
        if move.signal == "policy":
            kopf.event(body, type="Normal", reason="LimitsChanged", message=f"{describe(move)}: {reason}")
        elif relaxes(move):
            kopf.event(body, type="Normal", reason="Recovered", message=f"{describe(move)}: {reason}")
        else:
            kopf.event(body, type="Warning", reason="Tightened", message=f"{describe(move)}: {reason}")


def build_registry(config: OperatorConfig) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    resource = (GROUP, VERSION, PLURAL)

    @kopf.on.login(id="login", registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # In a pod: the ServiceAccount token; elsewhere: $KUBECONFIG or ~/.kube/config.
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(id="configure", registry=registry)
    async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
        settings.persistence.finalizer = FINALIZER
        settings.scanning.disabled = True          # one namespace, no cluster-wide RBAC
        settings.peering.lifetime = PEERING_LIFETIME
        settings.posting.level = logging.WARNING   # kopf's own INFO logs are not Events; ours are explicit
        settings.watching.server_timeout = 300
        settings.execution.max_workers = 4
        # On SIGTERM kopf says goodbye to its peers through the API; an unreachable API server must not keep
        # the pod from exiting (Kubernetes would SIGKILL it at the end of the grace period anyway).
        settings.process.ultimate_exiting_timeout = 10
        connection = RedisConnection(config.redis)
        await connection.initialize()
        redis = connection.client
        runtime = Runtime(connection=connection, redis=redis, loop=AdaptiveLoop(redis, dict),
                          identity=socket.gethostname())
        memo.runtime = runtime
        # Gateways are ready only once a policy table exists. With no ProviderPolicy at all no handler would
        # ever publish one, so publish the empty table -- only if none exists: the handlers publish the real
        # table from the index, and overwriting an existing one here could hide policies for a moment.
        if not await redis.exists(keys.CONTROL):
            await publish_policies(redis, [], writer=f"mxgate-operator/{runtime.identity}")

    @kopf.on.cleanup(id="close", registry=registry)
    async def close(memo: kopf.Memo, **_: Any) -> None:
        runtime: Runtime | None = getattr(memo, "runtime", None)
        if runtime is not None:
            await runtime.connection.aclose()

    @kopf.index(*resource, id=POLICY_INDEX, registry=registry)
    def policy_index(name: str, body: kopf.Body, **_: Any) -> dict[str, Parsed]:
        return {name: parse_object(body)}

    @kopf.on.resume(*resource, id="reconcile", registry=registry)
    @kopf.on.create(*resource, id="reconcile", registry=registry)
    @kopf.on.update(*resource, id="reconcile", field="spec", registry=registry)
    async def reconcile(*, name: str, body: kopf.Body, meta: kopf.Meta, status: kopf.Status, patch: kopf.Patch,
                        memo: kopf.Memo, **kwargs: Any) -> None:
        runtime: Runtime = memo.runtime
        generation = meta.get("generation")
        entry = _own_entry(kwargs, name)
        await publish_table(runtime, _policy_index(kwargs))
        if entry.policy is None:
            assert entry.error is not None
            kopf.event(body, type="Warning", reason="InvalidSpec", message=entry.error[:1000])
            patch.status.update(invalid_status(generation=generation, message=entry.error[:1000],
                                               previous=status, now=time.time()))
            return
        decision = await runtime.loop.put_in_force(entry.policy)
        post_events(body, decision.adjustments, "the policy's ceiling changed")
        observation = await observe(runtime.redis, entry.policy, None)
        patch.status.update(policy_status(generation=generation, ceiling=entry.policy.spec.limits,
                                          observation=observation, previous=status, now=time.time()))

    @kopf.on.delete(*resource, id="remove", registry=registry)
    async def remove(*, name: str, memo: kopf.Memo, logger: kopf.Logger, **kwargs: Any) -> None:
        runtime: Runtime = memo.runtime
        remaining = await publish_table(runtime, _policy_index(kwargs), without=name)
        cleared = await clear_provider_state(runtime.redis, name)
        runtime.loop.forget(name)
        logger.info(f"policy {name} removed from the table ({len(remaining)} left); {cleared} Redis keys deleted")

    @kopf.timer(*resource, id="control", interval=TICK, registry=registry)
    async def control(*, name: str, body: kopf.Body, meta: kopf.Meta, status: kopf.Status, patch: kopf.Patch,
                      memo: kopf.Memo, **kwargs: Any) -> None:
        runtime: Runtime = memo.runtime
        if time.monotonic() >= runtime.next_publish:
            await publish_table(runtime, _policy_index(kwargs))
        entry = _own_entry(kwargs, name)
        if entry.policy is None or entry.deleting:
            return
        evaluation = await runtime.loop.tick_one(entry.policy)
        if evaluation is None:
            return
        post_events(body, evaluation.decision.adjustments, evaluation.decision.reason)
        observation = await observe(runtime.redis, entry.policy, evaluation.window)
        new = policy_status(generation=meta.get("generation"), ceiling=entry.policy.spec.limits,
                            observation=observation, previous=status, now=time.time())
        if changed(status, new):
            patch.status.update(new)

    return registry


async def run(config: OperatorConfig, *, stop: asyncio.Event | None = None) -> None:
    """Run the operator until ``stop`` is set (or the task is cancelled)."""
    registry = build_registry(config)
    liveness = None
    if config.health_listen is not None:
        host, port = config.health_listen
        liveness = f"http://{host}:{port}/healthz"
    priority = config.priority if config.priority is not None else random.randrange(1, 2**31)
    stop_flag: asyncio.Future[None] | asyncio.Event | None = stop
    await kopf.operator(
        registry=registry, namespaces=[config.namespace], clusterwide=False,
        standalone=config.peering is None, peering_name=config.peering, priority=priority,
        liveness_endpoint=liveness, stop_flag=stop_flag)
