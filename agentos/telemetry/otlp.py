"""The SDK side of telemetry: instruments, exporters chosen by ``OTEL_*``, and records
turned into the SDK's ``ReadableSpan``.

Shared by the daemon's process (in-memory test processors, ``--otel console``) and the
exporter process (``agentos.telemetry.export``), so both export exactly the same spans
and metrics.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.attributes import BoundedAttributes
from opentelemetry.metrics import Meter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanLimits, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from agentos.telemetry.spans import Record

SEMCONV_VERSION = "1.37.0"
SCHEMA_URL = f"https://opentelemetry.io/schemas/{SEMCONV_VERSION}"
# Buckets the GenAI conventions recommend for token counts and durations (seconds).
TOKEN_BUCKETS = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304]
DURATION_BUCKETS = [
    0.01,
    0.02,
    0.04,
    0.08,
    0.16,
    0.32,
    0.64,
    1.28,
    2.56,
    5.12,
    10.24,
    20.48,
    40.96,
    81.92,
]
# (attribute on Telemetry, kind, metric name, unit, description); a measurement names
# its instrument by its index here.
INSTRUMENTS: list[tuple[str, str, str, str, str]] = [
    (
        "token_usage",
        "histogram",
        "gen_ai.client.token.usage",
        "{token}",
        "Tokens used per inference",
    ),
    (
        "operation_duration",
        "histogram",
        "gen_ai.client.operation.duration",
        "s",
        "Inference duration",
    ),
    (
        "time_to_first_token",
        "histogram",
        "gen_ai.server.time_to_first_token",
        "s",
        "Time to first token",
    ),
    ("active_seconds", "counter", "agentos.agent.active_time", "s", "Agent time not hibernated"),
    ("tasks", "counter", "agentos.tasks", "{task}", "Tasks finished, by status"),
    ("hibernations", "counter", "agentos.hibernations", "{hibernation}", "Agents swapped out"),
    ("wakes", "counter", "agentos.wakes", "{wake}", "Agents woken, by path"),
    ("wake_latency", "histogram", "agentos.wake.duration", "s", "Wake latency, by path"),
    ("hibernate_latency", "histogram", "agentos.hibernate.duration", "s", "Hibernation latency"),
    ("kv_bytes", "updown", "agentos.kv.stored", "By", "KV snapshot bytes stored in Redis"),
    ("queue_wait", "histogram", "agentos.task.queue_wait", "s", "Time from queued to running"),
    ("throttles", "counter", "agentos.quota.throttles", "{throttle}", "Inference calls delayed"),
    ("tool_calls", "counter", "agentos.tool.calls", "{call}", "Tool calls, by tool and outcome"),
    ("tool_duration", "histogram", "agentos.tool.duration", "s", "Tool call latency, by tool"),
]


def resource(env: Mapping[str, str]) -> Resource:
    """``service.name`` from ``OTEL_SERVICE_NAME`` (default ``agentos``), plus
    ``OTEL_RESOURCE_ATTRIBUTES`` (read by the SDK from the process environment)."""
    return Resource.create({"service.name": env.get("OTEL_SERVICE_NAME", "agentos")})


def meter_provider(env: Mapping[str, str], readers: Sequence[MetricReader]) -> MeterProvider:
    return MeterProvider(
        resource=resource(env),
        metric_readers=list(readers),
        views=[
            View(
                instrument_name="gen_ai.client.token.usage",
                aggregation=ExplicitBucketHistogramAggregation(TOKEN_BUCKETS),
            ),
            View(
                instrument_name="gen_ai.client.operation.duration",
                aggregation=ExplicitBucketHistogramAggregation(DURATION_BUCKETS),
            ),
        ],
    )


def instruments(meter: Meter) -> list[Any]:
    """The SDK instruments of :data:`INSTRUMENTS`, in order."""
    made: list[Any] = []
    for _, kind, name, unit, description in INSTRUMENTS:
        if kind == "histogram":
            made.append(meter.create_histogram(name, unit=unit, description=description))
        elif kind == "counter":
            made.append(meter.create_counter(name, unit=unit, description=description))
        else:
            made.append(meter.create_up_down_counter(name, unit=unit, description=description))
    return made


def record_measurement(made: list[Any], instrument: int, value: float, attrs: Any) -> None:
    target = made[instrument]
    if INSTRUMENTS[instrument][1] == "histogram":
        target.record(value, attrs)
    else:
        target.add(value, attrs)


def otlp_exporters(env: Mapping[str, str]) -> tuple[SpanExporter | None, Any | None]:
    """OTLP exporters chosen by the standard variables, or (None, None) when not configured.

    Endpoints are resolved here from ``env`` (so tests and embedders can pass their own);
    headers, timeouts, compression and certificates are read by the exporters from the
    process environment as usual.
    """
    traces, metrics, protocol = otlp_endpoints(env)
    if not traces and not metrics:
        return None, None
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (  # type: ignore[assignment]
            OTLPMetricExporter,
        )
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[assignment]
            OTLPSpanExporter,
        )
    return (
        OTLPSpanExporter(endpoint=traces) if traces else None,
        OTLPMetricExporter(endpoint=metrics) if metrics else None,
    )


def otlp_endpoints(env: Mapping[str, str]) -> tuple[str | None, str | None, str]:
    """(traces endpoint, metrics endpoint, protocol) from the standard variables."""
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").rstrip("/")
    traces = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    metrics = env.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
    protocol = env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    if protocol == "grpc":
        return traces or base or None, metrics or base or None, protocol
    # Per the spec, signal paths are appended to the base endpoint for OTLP/HTTP.
    traces = traces or (f"{base}/v1/traces" if base else None)
    metrics = metrics or (f"{base}/v1/metrics" if base else None)
    return traces, metrics, protocol


class Converter:
    """Records to ``ReadableSpan``, with the resource, scope and limits of one process."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.resource = resource(env)
        self.scope = InstrumentationScope("agentos", None, SCHEMA_URL)
        self.limits = SpanLimits()  # OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT and friends
        self._flags = TraceFlags(TraceFlags.SAMPLED)
        self._kinds = {k.value: k for k in SpanKind}
        self._codes = {c.value: c for c in StatusCode}

    def span(self, record: Record) -> ReadableSpan:
        (name, kind, trace_id, span_id, parent_id, remote, start, end) = record[:8]
        attributes, status, description, events = record[8:]
        flags = self._flags
        parent = SpanContext(trace_id, parent_id, remote, flags) if parent_id else None
        limits = self.limits
        return ReadableSpan(
            name=name,
            context=SpanContext(trace_id, span_id, False, flags),
            parent=parent,
            resource=self.resource,
            attributes=BoundedAttributes(
                limits.max_span_attributes,
                attributes,
                immutable=True,
                max_value_len=limits.max_span_attribute_length,
            ),
            events=[
                Event(
                    n,
                    BoundedAttributes(limits.max_event_attributes, a, immutable=True),
                    ts,
                )
                for n, ts, a in events or ()
            ],
            kind=self._kinds[kind],
            status=Status(self._codes[status], description),
            start_time=start,
            end_time=end,
            instrumentation_scope=self.scope,
        )


class InProcessSink:
    """Records handed at once, as ``ReadableSpan``, to span processors in this process
    (tests' in-memory exporters, ``--otel console``); measurements go to SDK instruments.
    """

    def __init__(
        self,
        env: Mapping[str, str],
        processors: Sequence[SpanProcessor],
        provider: MeterProvider | None,
    ) -> None:
        self._convert = Converter(env).span
        self._processors = list(processors)
        self._made = (
            instruments(provider.get_meter("agentos", schema_url=SCHEMA_URL)) if provider else []
        )
        self._provider = provider

    def emit(self, record: Record) -> None:
        if self._processors:
            span = self._convert(record)
            for p in self._processors:
                p.on_end(span)

    def measure(self, instrument: int, value: float, attributes: Mapping[str, Any] | None) -> None:
        if self._made:
            record_measurement(self._made, instrument, value, attributes)

    def shutdown(self, timeout_s: float) -> None:
        for p in self._processors:
            try:
                p.force_flush(int(timeout_s * 1000))
            finally:
                p.shutdown()
        if self._provider is not None:
            try:
                self._provider.force_flush(int(timeout_s * 1000))
            finally:
                self._provider.shutdown()


def child_env(env: Mapping[str, str]) -> dict[str, str]:
    """The exporter process's environment: ours, with the given ``OTEL_*`` on top."""
    return {**os.environ, **{k: v for k, v in env.items() if k.startswith("OTEL_")}}
