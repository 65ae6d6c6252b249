"""The ProviderPolicy model: defined once, used by the gateway, the controller, the validator and the CRD.

A ProviderPolicy says which recipient domains belong to one mailbox provider (by domain or by the MX
host names the domains publish), where its mail goes (DNS MX, or static ``route.hosts``), and the limits
the whole fleet must stay within when talking to it.

The field names are the public interface (the same object as the Kubernetes custom resource): extend,
never rename. The model rejects unknown fields so a typo is an error, not a silently ignored setting.

``parse_policy`` turns one document into a policy or a PolicyError naming the source and the field;
``mxgate.policy_files`` reads them from files.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import InitErrorDetails, PydanticCustomError

from mxgate.duration import DurationRange, parse_duration_ms
from mxgate.errors import PolicyError

API_VERSION = "mxgate.io/v1alpha1"
KIND = "ProviderPolicy"

#: The name of the policy whose limits apply, per domain, to domains no other policy matches.
DEFAULT_POLICY_NAME = "default"

# RFC 1123 label rules; policy domains are ASCII (IDNA A-labels for international domains).
_DOMAIN_RE = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")
_GLOB_RE = re.compile(r"^[a-z0-9*?.\[\]!-]{1,253}$")
# Kubernetes object names (RFC 1123 subdomain): the provider id ends up in Redis keys and metric labels.
_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


def _integer(value: object) -> object:
    # As the CRD's "type: integer" (measured on the API server): 5 and 5.0 are integers, true and "5" are
    # not; pydantic alone would take both.
    if isinstance(value, bool | str):
        raise PydanticCustomError("int_type", "Input should be a valid integer")
    return value


#: An integer field; the number fields are Field(strict=True): 5 but not true or "5" (as the CRD's
#: "type: number"), as ``enabled`` is a StrictBool.
Integer = Annotated[int, BeforeValidator(_integer)]


class _Model(BaseModel):
    # allow_inf_nan=False: a NaN would otherwise be refused as "should be less than or equal to ...".
    model_config = ConfigDict(
        extra="forbid", frozen=True, alias_generator=to_camel, populate_by_name=True, str_strip_whitespace=True,
        allow_inf_nan=False)


class Match(_Model):
    """Which recipient domains belong to this provider."""

    domains: list[str] = Field(
        default_factory=list, max_length=1000,
        description="Recipient domains of this provider; a domain also matches its subdomains.",
    )
    mx_hosts: list[str] = Field(
        default_factory=list, max_length=100,
        description='Shell-style globs over MX host names, e.g. "*.protection.outlook.com": every domain '
        "whose primary MX matches rolls up to this provider.",
    )

    @field_validator("domains")
    @classmethod
    def _check_domains(cls, value: list[str]) -> list[str]:
        out = []
        for domain in value:
            norm = domain.lower().rstrip(".")
            if not _DOMAIN_RE.match(norm):
                raise ValueError(f"{domain!r} is not a valid domain name")
            out.append(norm)
        return out

    @field_validator("mx_hosts")
    @classmethod
    def _check_globs(cls, value: list[str]) -> list[str]:
        out = []
        for glob in value:
            norm = glob.lower().rstrip(".")
            if not _GLOB_RE.match(norm):
                raise ValueError(f"{glob!r} is not a host-name glob (letters, digits, '-', '.', '*', '?', [])")
            out.append(norm)
        return out


class Route(_Model):
    """A static next hop instead of DNS MX."""

    hosts: Annotated[list[str], Field(min_length=1, max_length=16)] = Field(
        description='Next hops as "host:port" (port defaults to 25), tried in order.'
    )

    @field_validator("hosts")
    @classmethod
    def _check_hosts(cls, value: list[str]) -> list[str]:
        for entry in value:
            parse_host_port(entry, default_port=25)
        return value

    def next_hops(self) -> list[tuple[str, int]]:
        return [parse_host_port(entry, default_port=25) for entry in self.hosts]


# Rates are kept to two decimals by the controller (core._round_rate): a smaller one would round to 0, which
# the gateways read as "no limit". Counts stay far below 2**53, where Redis's Lua numbers stop being exact.
MIN_RATE = 0.01
MAX_RATE = 1_000_000
MAX_COUNT = 1_000_000_000


class Limits(_Model):
    """The limits the whole fleet keeps towards this provider (the ceiling the adaptive loop works under)."""

    max_connections: Integer = Field(
        default=10, ge=1, le=10_000,
        description="Concurrent SMTP connections to this provider, fleet-wide, from 1 to 10000.")
    max_messages_per_connection: Integer = Field(
        default=100, ge=1, le=1_000_000,
        description="Messages sent over one connection before it is closed, from 1 to 1000000.")
    messages_per_second: float | None = Field(
        strict=True, default=None, ge=MIN_RATE, le=MAX_RATE,
        description="Message rate, fleet-wide, from 0.01 to 1000000; unset means no rate limit.")
    # Optional integers carry their bounds inside the Annotated type, before the validator: after it (or on
    # the field), pydantic writes them into the JSON schema (and so the CRD) as "ge"/"le", not minimum/maximum.
    burst: Annotated[int, Field(ge=1, le=1_000_000), BeforeValidator(_integer)] | None = Field(
        default=None,
        description="Messages that may be sent at once, from 1 to 1000000 (default: a tenth of a second's "
        "worth, at least 1).",
    )
    messages_per_hour: Annotated[int, Field(ge=1, le=MAX_COUNT), BeforeValidator(_integer)] | None = Field(
        default=None,
        description="Cap on messages per clock hour, fleet-wide (IP warm-up), up to 1000000000; unset: none.")
    messages_per_day: Annotated[int, Field(ge=1, le=MAX_COUNT), BeforeValidator(_integer)] | None = Field(
        default=None,
        description="Cap on messages per UTC day, fleet-wide, up to 1000000000; unset: none. A warm-up "
        "(spec.warmup) caps the day lower while it lasts.")
    idle_timeout_seconds: float = Field(
        strict=True, default=5.0, gt=0, le=3600, description="An idle connection is closed after this many seconds."
    )


# Bounds of each kind of duration (mxgate.duration has the syntax). The CRD gets the same ones.
#: Retry delays: below 100 ms a deferral is retried in a hot loop; above a day, "retry" means "hold".
RetryDelay = Annotated[str, DurationRange("100ms", "24h")]
#: Queue lifetime: RFC 5321 asks for 4-5 days (Postfix: 5d); a month is the longest a sender still cares.
QueueLifetime = Annotated[str, DurationRange("1s", "30d")]
#: Evaluation window: telemetry is counted per second and kept 15 minutes (mxgate.telemetry.fleet).
EvaluationWindow = Annotated[str, DurationRange("1s", "10m")]
#: A Suspend rule's pause: providers ask for minutes to hours ([TSS04]); longer would strand the queue.
SuspendDuration = Annotated[str, DurationRange("1s", "24h")]


class Retry(_Model):
    """When deferred mail is tried again, and when it is given up (bounced to the sender).

    Durations as in Kubernetes (Go's syntax: ``500ms``, ``30s``, ``1m30s``, ``2h``) or in days, first
    (``5d``, ``1.5d``, ``1d12h``); the delays from 100ms to 24h, ``maxAge`` from 1s to 30d.
    """

    initial_delay: RetryDelay = Field(
        default="1m", description="First retry after an ordinary deferral; from 100ms to 24h.")
    max_delay: RetryDelay = Field(
        default="1h", description="Longest wait between retries; delays double up to it. From 100ms to 24h, "
        "not shorter than initialDelay.")
    throttled_delay: RetryDelay = Field(
        default="5s", description="First retry after a throttling deferral (connections, rate): the limiter "
        "paces it. From 100ms to 24h.")
    throttled_max_delay: RetryDelay = Field(
        default="5m", description="Longest wait after throttling deferrals; from 100ms to 24h, not shorter than "
        "throttledDelay.")
    max_age: QueueLifetime = Field(
        default="5d", description="Mail still undelivered after this is bounced (5.4.7); from 1s to 30d.")

    @model_validator(mode="after")
    def _caps_not_below_first_delays(self) -> Retry:
        for first, cap in (("initial_delay", "max_delay"), ("throttled_delay", "throttled_max_delay")):
            if parse_duration_ms(getattr(self, cap)) < parse_duration_ms(getattr(self, first)):  # as the CRD
                # Located at the field (spec.retry.maxDelay), which a plain ValueError here would not be.
                raise ValidationError.from_exception_data("Retry", [InitErrorDetails(
                    type=PydanticCustomError("duration_order", "{cap} ({value}) must not be shorter than "
                                             "{first} ({first_value})",
                                             {"cap": to_camel(cap), "value": getattr(self, cap),
                                              "first": to_camel(first), "first_value": getattr(self, first)}),
                    loc=(to_camel(cap),), input=getattr(self, cap))])
        return self


#: Outbound SMTP stage timeouts: a second is the least a loaded next hop needs; an hour the longest a
#: connection may sit on one command (RFC 5321's longest, the end of DATA, is 10 minutes).
StageTimeout = Annotated[str, DurationRange("1s", "1h")]


class Timeouts(_Model):
    """How long a connection to this provider waits at each SMTP stage before the attempt is deferred
    (``451 4.4.2 timed out``) and the connection closed. Defaults: RFC 5321 section 4.5.3.2, and Postfix's
    ``smtp_connect_timeout`` for the TCP connection, which the RFC leaves open. From 1s to 1h each."""

    connect: StageTimeout = Field(
        default="30s", description="Opening the TCP connection to one address of a next hop (then the next "
        "address is tried). From 1s to 1h.")
    greeting: StageTimeout = Field(
        default="5m", description="The next hop's 220 greeting once connected (RFC 5321: 5 minutes). From 1s to 1h.")
    helo: StageTimeout = Field(
        default="5m",
        description="Each of EHLO (or HELO) and STARTTLS with its handshake (Postfix: 300s). From 1s to 1h.")
    mail: StageTimeout = Field(
        default="5m", description="The reply to MAIL FROM (RFC 5321: 5 minutes). From 1s to 1h.")
    rcpt: StageTimeout = Field(
        default="5m", description="The reply to each RCPT TO (RFC 5321: 5 minutes). From 1s to 1h.")
    data_init: StageTimeout = Field(
        default="2m", description="The 354 reply to the DATA command (RFC 5321: 2 minutes). From 1s to 1h.")
    data_done: StageTimeout = Field(
        default="10m", description="Sending the message and the reply to its final dot (RFC 5321: 10 minutes "
        "for the reply; the transfer counts into it). From 1s to 1h.")


class ConnectionsAndRate(_Model):
    """A pair of values: one for the connection limit, one for the message rate."""

    connections: Integer = Field(default=1, ge=1, le=10_000, description="Connections fleet-wide.")
    messages_per_second: float = Field(strict=True, default=1.0, ge=MIN_RATE, le=MAX_RATE,
                                       description="Messages per second fleet-wide, from 0.01 to 1000000.")


class Adaptive(_Model):
    """How the controller tightens limits on throttling replies and relaxes them when the provider is calm."""

    enabled: StrictBool = Field(default=True, description="Adjust the live limits from deferral telemetry.")
    floor: ConnectionsAndRate = Field(
        default_factory=ConnectionsAndRate, description="Limits are never cut below these values.")
    decrease_factor: float = Field(
        strict=True, default=0.7, gt=0, lt=1,
        description="A connection-limit cut multiplies the limit by at most this factor. The rate is cut to "
        "the goodput the provider accepted instead (at least 5 %, at most to a quarter at once), except in a "
        "window dominated by connection deferrals, where it is cut by at most this factor.")
    increase_step: ConnectionsAndRate = Field(
        default_factory=lambda: ConnectionsAndRate(connections=1, messages_per_second=5.0),
        description="Added to a limit after enough calm windows (additive increase), up to the ceiling.")
    evaluation_window: EvaluationWindow = Field(
        default="5s", description="How often telemetry is evaluated; from 1s to 10m (telemetry is counted per "
        "second and kept 15 minutes).")
    deferral_threshold: float = Field(
        strict=True, default=0.01, ge=0, le=1,
        description="Fraction of recipient outcomes in a window, per signal, that triggers a cut.")
    calm_windows: Integer = Field(
        default=3, ge=1, le=1000,
        description="Windows with traffic and no signal before a limit is raised; doubled each time a raise "
        "back to a level that drew deferrals draws them again (damping).")


_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def _calendar_date(value: object) -> object:
    # Only "YYYY-MM-DD" (or a date YAML already parsed): pydantic alone would also take a datetime with
    # zero time or a Unix timestamp, which the CRD (format: date) refuses; both must agree.
    if isinstance(value, date) and not isinstance(value, datetime):
        return value
    if isinstance(value, str) and _DATE_RE.match(value.strip()):
        return value.strip()
    raise ValueError("must be a calendar date written YYYY-MM-DD, e.g. 2026-11-01")


CalendarDate = Annotated[date, BeforeValidator(_calendar_date)]


class WarmupStep(_Model):
    """One step of a warm-up ramp: from its day on, at most messagesPerDay messages a day."""

    day: Integer = Field(
        ge=1, le=366,
        description="Day of the warm-up the step starts on; day 1 is startDate. The step lasts until the day "
        "before the next step's; the last step lasts its day only.")
    messages_per_day: Integer = Field(
        ge=1, le=100_000_000,
        description="Messages to this provider per UTC day, fleet-wide, while the step lasts.")


class Warmup(_Model):
    """A daily volume ramp for new sending IPs: each UTC day's volume is capped by the step in force.

    On day N of the ramp (day 1 is ``startDate``) the day's cap is the volume of the last step whose
    ``day`` is at most N (and never above ``limits.messagesPerDay``). Before ``startDate`` the first
    step's volume applies, so an IP that starts early still starts slowly. After the last step's day the
    warm-up is over and only ``limits.messagesPerDay`` caps the day. Mail over a day's cap waits in the
    queue for the next day.
    """

    start_date: CalendarDate = Field(
        description='Day 1 of the ramp, a UTC calendar date "YYYY-MM-DD". Before it, the first step\'s '
        "volume applies.")
    schedule: Annotated[list[WarmupStep], Field(min_length=1, max_length=100)] = Field(
        description="The steps, by increasing day, starting on day 1, with volumes that never decrease, e.g. "
        "[{day: 1, messagesPerDay: 200}, {day: 2, messagesPerDay: 500}, {day: 4, messagesPerDay: 2000}].")

    @field_validator("schedule")
    @classmethod
    def _ramp(cls, steps: list[WarmupStep]) -> list[WarmupStep]:
        if steps[0].day != 1:
            raise ValueError(f"schedule[0].day must be 1 (the startDate), not {steps[0].day}")
        for i in range(1, len(steps)):
            before, step = steps[i - 1], steps[i]
            if step.day <= before.day:
                raise ValueError(f"schedule[{i}].day must be greater than schedule[{i - 1}].day ({before.day})")
            if step.messages_per_day < before.messages_per_day:
                raise ValueError(f"schedule[{i}].messagesPerDay must not be less than "
                                 f"schedule[{i - 1}].messagesPerDay ({before.messages_per_day}): a ramp goes up")
        return steps


#: How a rule's ``match`` is compiled, by the model's check and by the gateway (egress.outcome) alike.
REPLY_MATCH_FLAGS = re.IGNORECASE
MAX_MATCH_NESTING = 50


def _nesting(pattern: str) -> int:
    """Deepest nesting of "(" in a regex, not counting escaped ones or those in [...] (an upper bound)."""
    depth = deepest = 0
    i, in_class = 0, False
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            i += 1
        elif in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
            if pattern[i + 1:i + 2] == "^":
                i += 1
            if pattern[i + 1:i + 2] == "]":   # "[]...]" and "[^]...]": the first "]" is a member
                i += 1
        elif char == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif char == ")":
            depth = max(0, depth - 1)
        i += 1
    return deepest


ResponseAction = Literal["TightenConnections", "TightenRate", "Suspend", "Bounce", "Retry"]


class ResponseRule(_Model):
    """What a remote reply means: rules are tried in order before the built-in classification."""

    match: str = Field(min_length=1, max_length=1024,
                       description='Regex searched in "<code> <enhanced code> <text>", case-insensitive.')
    action: ResponseAction = Field(
        description="TightenConnections / TightenRate: a throttling signal for the controller; Suspend: no "
        "delivery to the provider for `duration`; Bounce: treat as a permanent failure; Retry: an "
        "ordinary deferral that changes no limit.")
    duration: SuspendDuration | None = Field(
        default=None, description="How long a Suspend lasts, from 1s to 24h, e.g. 30m or 2h.")

    @field_validator("match")
    @classmethod
    def _compiles(cls, value: str) -> str:
        if _nesting(value) > MAX_MATCH_NESTING:
            # Python compiles regexes recursively: some 500 levels are a RecursionError, wherever it happens.
            raise ValueError(f"not a usable regular expression: groups nested deeper than {MAX_MATCH_NESTING}")
        try:
            re.compile(value, REPLY_MATCH_FLAGS)
        except (re.error, OverflowError, RecursionError) as exc:   # OverflowError: a{4294967296}
            raise ValueError(f"not a valid regular expression: {exc}") from exc
        return value

    @model_validator(mode="after")
    def _suspend_has_duration(self) -> ResponseRule:
        if (self.action == "Suspend") != (self.duration is not None):
            raise ValueError("duration is required for action Suspend and only allowed there")
        return self


class ProviderPolicySpec(_Model):
    """What makes up one mailbox provider and the limits towards it."""

    match: Match = Field(default_factory=Match, description="Which recipient domains belong to this provider.")
    route: Route | None = Field(default=None, description="Static next hops; when unset, DNS MX is used.")
    limits: Limits = Field(default_factory=Limits, description="Fleet-wide limits towards this provider.")
    retry: Retry = Field(default_factory=Retry, description="Retry schedule and maximum age of deferred mail.")
    timeouts: Timeouts = Field(default_factory=Timeouts,
                               description="Outbound SMTP timeouts per stage (RFC 5321 section 4.5.3.2 defaults).")
    adaptive: Adaptive = Field(default_factory=Adaptive, description="Automatic tightening and recovery.")
    responses: list[ResponseRule] = Field(
        default_factory=list, max_length=64,
        description="Reply rules tried before the built-in ones (reference replies).")
    warmup: Warmup | None = Field(
        default=None,
        description="A daily volume ramp for new sending IPs: on each UTC day of the ramp at most the volume of "
        "the step in force goes to this provider (and never more than limits.messagesPerDay); the rest waits "
        "queued for the next day. Unset: no ramp.")

    @model_validator(mode="after")
    def _floor_below_ceiling(self) -> ProviderPolicySpec:
        floor = self.adaptive.floor
        if floor.connections > self.limits.max_connections:
            raise ValueError("adaptive.floor.connections must not exceed limits.maxConnections")
        if self.limits.messages_per_second is not None and floor.messages_per_second > self.limits.messages_per_second:
            raise ValueError("adaptive.floor.messagesPerSecond must not exceed limits.messagesPerSecond")
        return self


class Metadata(_Model):
    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True)

    name: str
    namespace: str | None = None

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError(f"{value!r} is not a valid name (lower-case letters, digits, '-' and '.')")
        return value


class ProviderPolicy(_Model):
    """A ProviderPolicy object, as in a YAML file or the Kubernetes API."""

    api_version: Literal["mxgate.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["ProviderPolicy"]
    metadata: Metadata
    spec: ProviderPolicySpec = Field(default_factory=ProviderPolicySpec)

    @model_validator(mode="after")
    def _default_has_no_match(self) -> ProviderPolicy:
        if self.metadata.name == DEFAULT_POLICY_NAME and (self.spec.match.domains or self.spec.match.mx_hosts):
            raise ValueError(f"the policy named {DEFAULT_POLICY_NAME!r} applies to unmatched domains: "
                             "it must not have spec.match")
        return self

    @property
    def name(self) -> str:
        return self.metadata.name

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, exclude_none=True)

    @classmethod
    def from_json(cls, raw: str | bytes) -> ProviderPolicy:
        return cls.model_validate_json(raw)


def parse_host_port(entry: str, *, default_port: int) -> tuple[str, int]:
    """``"host:port"``, ``"[v6]:port"`` or ``"host"`` -> (host, port); ValueError on nonsense."""
    text = entry.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"{entry!r}: missing ']'")
        port_text = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ValueError(f"{entry!r}: junk after ']'")
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, ""
    if not host:
        raise ValueError(f"{entry!r}: empty host")
    port = default_port
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"{entry!r}: port must be 1-65535")
        port = int(port_text)
    return host, port


def format_validation_error(source: str, exc: ValidationError) -> str:
    """One readable line per problem: ``source: spec.limits.maxConnections: Input should be ...``."""
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(document)"
        lines.append(f"{source}: {where}: {err['msg']}")
    return "\n".join(lines)


def parse_policy(document: Mapping[str, Any], *, source: str) -> ProviderPolicy:
    try:
        return ProviderPolicy.model_validate(document)
    except ValidationError as exc:
        raise PolicyError(format_validation_error(source, exc)) from exc


# --------------------------------------------------------------------------------------------------------
# Classification: recipient domain (and its MX hosts) -> provider. Pure.


@dataclass(frozen=True, slots=True)
class ProviderTable:
    """The policies in force, indexed for classification."""

    policies: Mapping[str, ProviderPolicy]

    @classmethod
    def of(cls, policies: Iterable[ProviderPolicy]) -> ProviderTable:
        return cls({p.name: p for p in policies})

    def by_domain(self, domain: str) -> str | None:
        """The provider whose ``match.domains`` holds ``domain`` or its nearest parent domain."""
        labels = domain.lower().rstrip(".").split(".")
        for i in range(len(labels)):
            candidate = ".".join(labels[i:])
            for policy in self._sorted():
                if candidate in policy.spec.match.domains:
                    return policy.name
        return None

    def by_mx(self, mx_hosts: Sequence[str]) -> str | None:
        """The provider one of whose ``match.mxHosts`` globs matches the most preferred MX host."""
        for host in mx_hosts:
            name = host.lower().rstrip(".")
            for policy in self._sorted():
                if any(fnmatch.fnmatchcase(name, glob) for glob in policy.spec.match.mx_hosts):
                    return policy.name
            # Only the most preferred host decides: a backup MX at another provider must not re-route.
            break
        return None

    def has_mx_rules(self) -> bool:
        return any(p.spec.match.mx_hosts for p in self.policies.values())

    def _sorted(self) -> list[ProviderPolicy]:
        return [self.policies[k] for k in sorted(self.policies)]


def default_provider_id(domain: str) -> str:
    """Queue/limit identity of an unmatched domain: each such domain gets its own limits."""
    return f"domain:{domain.lower().rstrip('.')}"
