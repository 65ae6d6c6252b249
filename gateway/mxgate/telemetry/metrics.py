"""Metrics and traces through the OpenTelemetry SDK.

Metrics are exposed in Prometheus format on ``/metrics`` (the OTel Prometheus reader) and, when
``OTEL_EXPORTER_OTLP_ENDPOINT`` is set, also pushed over OTLP/HTTP; traces (one span per delivery
attempt) are exported over OTLP/HTTP when that variable is set, and otherwise only created.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import metrics as otel_metrics
from opentelemetry import trace
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from typing import Protocol

from mxgate.telemetry.fleet import TelemetryRecorder

class _JobLike(Protocol):
    queue_id: str
    job_id: str
    recipients: list[str]
    attempts: int


_PROVIDERS: tuple[MeterProvider, TracerProvider] | None = None


def _install(service: str) -> tuple[MeterProvider, TracerProvider]:
    """Process-wide providers, installed once (OTel allows setting the global providers only once)."""
    global _PROVIDERS
    if _PROVIDERS is None:
        resource = Resource.create({"service.name": service})
        readers: list[MetricReader] = [PrometheusMetricReader()]
        tracer_provider = TracerProvider(resource=resource)
        if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
            tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        meter_provider = MeterProvider(resource=resource, metric_readers=readers)
        otel_metrics.set_meter_provider(meter_provider)
        trace.set_tracer_provider(tracer_provider)
        _PROVIDERS = (meter_provider, tracer_provider)
    return _PROVIDERS


class Metrics:
    """The gateway's instruments, named once here."""

    def __init__(self, service: str = "mxgate-gateway", *, recorder: TelemetryRecorder | None = None) -> None:
        self.recorder = recorder or TelemetryRecorder(None)
        meter_provider, tracer_provider = _install(service)
        meter = meter_provider.get_meter("mxgate")
        self.tracer = tracer_provider.get_tracer("mxgate")
        self._received = meter.create_counter("mxgate_messages_received", description="Messages accepted with 250")
        self._rejected = meter.create_counter("mxgate_messages_rejected", description="Messages refused at ingress, by reason")
        self._spool_errors = meter.create_counter("mxgate_spool_errors", description="Spool writes that failed (451 4.3.0)")
        self._attempts = meter.create_counter("mxgate_delivery_attempts", description="Delivery attempts (per job)")
        self._outcomes = meter.create_counter("mxgate_recipients", description="Recipient outcomes, by provider and outcome")
        self._conn_errors = meter.create_counter("mxgate_connection_errors", description="Failed outbound connections")
        self._reflex = meter.create_counter("mxgate_local_reflex", description="Local reactions to throttling "
                                            "replies: connections (no new connections for a while) or rate (pause)")
        self._lease_wait = meter.create_histogram("mxgate_lease_wait", unit="s",
                                                  description="Time waiting for a fleet-wide connection lease")
        self._duration = meter.create_histogram("mxgate_delivery_duration", unit="s",
                                                description="Time of one MAIL..DATA transaction")

    def received(self, recipients: int) -> None:
        self._received.add(1)
        self._outcomes.add(recipients, {"provider": "-", "outcome": "received"})

    def rejected(self, reason: str) -> None:
        self._rejected.add(1, {"reason": reason})

    def spool_error(self) -> None:
        self._spool_errors.add(1)

    def delivered(self, provider: str) -> None:
        self._outcomes.add(1, {"provider": provider, "outcome": "delivered"})
        self.recorder.count(provider, "delivered")

    def failed(self, provider: str) -> None:
        self._outcomes.add(1, {"provider": provider, "outcome": "failed"})
        self.recorder.count(provider, "failed")

    def deferred(self, provider: str, deferral: str) -> None:
        self._outcomes.add(1, {"provider": provider, "outcome": "deferred", "class": str(deferral)})
        self.recorder.count(provider, f"deferred_{deferral}")

    def connection_error(self, provider: str) -> None:
        self._conn_errors.add(1, {"provider": provider})
        self.recorder.count(provider, "connection_errors")

    def attempt_done(self, provider: str, seconds: float) -> None:
        self._attempts.add(1, {"provider": provider})
        self._duration.record(seconds, {"provider": provider})
        self.recorder.count(provider, "attempts")

    def lease_wait(self, provider: str, seconds: float) -> None:
        self._lease_wait.record(seconds, {"provider": provider})
        self.recorder.count(provider, "lease_wait_ms", int(seconds * 1000))

    def reflex(self, provider: str, kind: str) -> None:
        self._reflex.add(1, {"provider": provider, "kind": kind})

    @contextmanager
    def attempt_span(self, provider: str, job: _JobLike) -> Iterator[trace.Span]:
        with self.tracer.start_as_current_span("smtp.delivery_attempt", attributes={
            "mxgate.provider": provider, "mxgate.queue_id": job.queue_id, "mxgate.job_id": job.job_id,
            "mxgate.recipients": len(job.recipients), "mxgate.attempt": job.attempts + 1,
        }) as span:
            yield span
