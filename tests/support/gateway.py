"""Run a real gateway (ingress + delivery engine) inside the test's event loop, against a real Redis."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any

import redis.asyncio as aioredis
import yaml

from mxgate.app import Gateway, GatewaySettings
from mxgate.policy import ProviderPolicy, parse_policy
from mxgate_operator.publish import publish_policies


def policy(name: str, *, domains: Sequence[str] = (), mx_hosts: Sequence[str] = (),
           route: Sequence[str] | None = None, **limits: Any) -> ProviderPolicy:
    spec: dict[str, Any] = {"match": {"domains": list(domains), "mxHosts": list(mx_hosts)}}
    if route is not None:
        spec["route"] = {"hosts": list(route)}
    if limits:
        spec["limits"] = limits
    return parse_policy({"apiVersion": "mxgate.io/v1alpha1", "kind": "ProviderPolicy",
                         "metadata": {"name": name}, "spec": spec}, source=f"test:{name}")


def policy_yaml(p: ProviderPolicy) -> str:
    return yaml.safe_dump(p.model_dump(by_alias=True, exclude_none=True))


async def publish(redis_url: str, policies: Sequence[ProviderPolicy]) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        await publish_policies(client, policies)
    finally:
        await client.aclose()


def settings(redis_url: str, **overrides: Any) -> GatewaySettings:
    base = GatewaySettings(redis_url=redis_url, listen=("127.0.0.1", 0), metrics_listen=("127.0.0.1", 0),
                           hostname="mxgate.test", visibility_seconds=5.0, shutdown_grace=2.0)
    return replace(base, **overrides)


@contextlib.asynccontextmanager
async def running_gateway(redis_url: str, **overrides: Any) -> AsyncIterator[Gateway]:
    gateway = Gateway(settings(redis_url, **overrides))
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.shutdown()
