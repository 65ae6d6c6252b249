"""Metrics and traces through the OpenTelemetry SDK.

Metrics are exposed in Prometheus format on ``/metrics`` (the OTel Prometheus reader) and, when
``OTEL_EXPORTER_OTLP_ENDPOINT`` is set, also pushed over OTLP/HTTP. Traces (one span per delivery
attempt) are recorded and exported over OTLP/HTTP when that variable is set; otherwise the spans are
OpenTelemetry's non-recording ones and cost next to nothing.

The relay path counts events by adding to plain dictionaries; OTel *observable* counters read them when
metrics are collected. An OTel ``Counter.add`` with attributes costs ~15 µs, five of them per message
were 6 % of the gateway's CPU (profiled with py-spy under smtp-source load).
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Protocol

from opentelemetry import metrics as otel_metrics
from opentelemetry import trace
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

from mxgate.telemetry.fleet import TelemetryRecorder

Labels = tuple[tuple[str, str], ...]


class _JobLike(Protocol):
    queue_id: str
    job_id: str
    recipients: list[str]
    attempts: int


_METER_PROVIDER: MeterProvider | None = None


def _install(service: str) -> MeterProvider:
    """Process-wide providers, installed once (OTel allows setting the global providers only once)."""
    global _METER_PROVIDER
    if _METER_PROVIDER is None:
        resource = Resource.create({"service.name": service})
        readers: list[MetricReader] = [PrometheusMetricReader()]
        if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
            tracer_provider = TracerProvider(resource=resource)
            tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
            trace.set_tracer_provider(tracer_provider)
        _METER_PROVIDER = MeterProvider(resource=resource, metric_readers=readers)
        otel_metrics.set_meter_provider(_METER_PROVIDER)
    return _METER_PROVIDER


class _Counts:
    """Monotonic counts by label set, observed by an OTel observable counter."""

    def __init__(self) -> None:
        self.values: defaultdict[Labels, int] = defaultdict(int)

    def observe(self, _: CallbackOptions) -> Iterable[Observation]:
        return [Observation(value, dict(labels)) for labels, value in list(self.values.items())]


_COUNTS: dict[str, _Counts] = {}


class Metrics:
    """The gateway's instruments, named once here."""

    def __init__(self, service: str = "mxgate-gateway", *, recorder: TelemetryRecorder | None = None) -> None:
        self.recorder = recorder or TelemetryRecorder(None)
        meter = _install(service).get_meter("mxgate")
        self.tracer = trace.get_tracer("mxgate")
        # Process-wide: OTel keeps the first instrument registered under a name, so every Metrics of the
        # process (tests run several gateways in one) adds to the same counts.
        self._counts = _COUNTS
        if not _COUNTS:
            self._register(meter)
        self._lease_wait = meter.create_histogram("mxgate_lease_wait", unit="s",
                                                  description="Time waiting for a fleet-wide connection lease")

    @staticmethod
    def _register(meter: otel_metrics.Meter) -> None:
        for name, description in [
            ("mxgate_messages_received", "Messages accepted with 250"),
            ("mxgate_messages_rejected", "Messages refused at ingress, by reason"),
            ("mxgate_spool_errors", "Spool writes that failed (451 4.3.0)"),
            ("mxgate_delivery_attempts", "Delivery attempts (MAIL..DATA transactions), by provider"),
            ("mxgate_recipients", "Recipient outcomes, by provider, outcome and deferral class"),
            ("mxgate_connection_errors", "Outbound connections that failed or were refused in the greeting"),
            ("mxgate_local_reflex", "Local reactions to throttling replies: connections (no new connections "
                                    "for a while) or rate (pause)"),
            ("mxgate_internal_errors", "Exceptions (ours or a library's, not a remote reply) that ended a "
                                       "delivery step, by stage (egress.claimed.Stage: a fixed set)"),
        ]:
            counts = _COUNTS[name] = _Counts()
            meter.create_observable_counter(name, callbacks=[counts.observe], description=description)

    def _add(self, name: str, labels: Labels = (), n: int = 1) -> None:
        self._counts[name].values[labels] += n

    def received(self) -> None:
        self._add("mxgate_messages_received")

    def rejected(self, reason: str) -> None:
        self._add("mxgate_messages_rejected", (("reason", reason),))

    def spool_error(self) -> None:
        self._add("mxgate_spool_errors")

    def delivered(self, provider: str) -> None:
        self._add("mxgate_recipients", (("outcome", "delivered"), ("provider", provider)))
        self.recorder.count(provider, "delivered")

    def failed(self, provider: str) -> None:
        self._add("mxgate_recipients", (("outcome", "failed"), ("provider", provider)))
        self.recorder.count(provider, "failed")

    def deferred(self, provider: str, deferral: str) -> None:
        self._add("mxgate_recipients", (("class", str(deferral)), ("outcome", "deferred"), ("provider", provider)))
        self.recorder.count(provider, f"deferred_{deferral}")

    def connection_error(self, provider: str) -> None:
        self._add("mxgate_connection_errors", (("provider", provider),))
        self.recorder.count(provider, "connection_errors")

    def attempt_done(self, provider: str, seconds: float) -> None:
        self._add("mxgate_delivery_attempts", (("provider", provider),))
        self.recorder.count(provider, "attempts")

    def lease_wait(self, provider: str, seconds: float) -> None:
        # Once per connection, not per message: a real histogram is affordable here.
        self._lease_wait.record(seconds, {"provider": provider})
        self.recorder.count(provider, "lease_wait_ms", int(seconds * 1000))

    def internal_error(self, stage: str) -> None:
        # No provider label: one series per stage, however many providers fail.
        self._add("mxgate_internal_errors", (("stage", stage),))

    def reflex(self, provider: str, kind: str) -> None:
        self._add("mxgate_local_reflex", (("kind", kind), ("provider", provider)))

    @contextmanager
    def attempt_span(self, provider: str, job: _JobLike) -> Iterator[trace.Span]:
        with self.tracer.start_as_current_span("smtp.delivery_attempt", attributes={
            "mxgate.provider": provider, "mxgate.queue_id": job.queue_id, "mxgate.job_id": job.job_id,
            "mxgate.recipients": len(job.recipients), "mxgate.attempt": job.attempts + 1,
        }) as span:
            yield span
