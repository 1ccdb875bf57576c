"""What the standard ``OTEL_*`` variables configure: resource, sampler, batching, OTLP exporters.

Read from a mapping (the process environment, or a test's own) and handed to the SDK's
own classes, so a daemon configured like any other OpenTelemetry service behaves like
one. Also the metric instruments agentos records, with the histogram buckets the GenAI
semantic conventions recommend.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.metrics import Meter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricExporter, MetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import sampling
from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger("agentos.telemetry")

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
# (attribute on Telemetry, kind, metric name, unit, description)
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


def instruments(meter: Meter) -> dict[str, Any]:
    """The instruments of :data:`INSTRUMENTS`, by attribute name."""
    made: dict[str, Any] = {}
    for attr, kind, name, unit, description in INSTRUMENTS:
        if kind == "histogram":
            made[attr] = meter.create_histogram(name, unit=unit, description=description)
        elif kind == "counter":
            made[attr] = meter.create_counter(name, unit=unit, description=description)
        else:
            made[attr] = meter.create_up_down_counter(name, unit=unit, description=description)
    return made


def resource(env: Mapping[str, str]) -> Resource:
    """``service.name`` from ``OTEL_SERVICE_NAME`` (default ``agentos``), plus
    ``OTEL_RESOURCE_ATTRIBUTES`` (read by the SDK from the process environment)."""
    return Resource.create({"service.name": env.get("OTEL_SERVICE_NAME", "agentos")})


def meter_provider(env: Mapping[str, str], readers: Sequence[MetricReader]) -> MeterProvider:
    """An SDK meter provider with the GenAI buckets for tokens and durations."""
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


def int_env(env: Mapping[str, str], name: str, default: int) -> int:
    """A positive integer variable, or ``default`` (with a warning when it is not one)."""
    raw = env.get(name, "")
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        log.warning("%s=%r is not a positive integer; using %d", name, raw, default)
        return default
    return value


def batching(env: Mapping[str, str]) -> dict[str, int]:
    """``BatchSpanProcessor`` arguments from ``OTEL_BSP_*`` (the SDK's defaults otherwise)."""
    queue = int_env(env, "OTEL_BSP_MAX_QUEUE_SIZE", 2048)
    return {
        "max_queue_size": queue,
        "schedule_delay_millis": int_env(env, "OTEL_BSP_SCHEDULE_DELAY", 5000),
        "max_export_batch_size": min(int_env(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512), queue),
        "export_timeout_millis": int_env(env, "OTEL_BSP_EXPORT_TIMEOUT", 30000),
    }


def sampler(env: Mapping[str, str]) -> sampling.Sampler:
    """The sampler ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG`` name (default
    ``parentbased_always_on``: a task continues its sender's decision)."""
    name = env.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    arg = env.get("OTEL_TRACES_SAMPLER_ARG", "")
    try:
        rate = float(arg) if arg else 1.0
        if not 0.0 <= rate <= 1.0:
            raise ValueError(arg)
    except ValueError:
        log.warning("OTEL_TRACES_SAMPLER_ARG=%r is not a rate in [0, 1]; using 1.0", arg)
        rate = 1.0
    if name == "always_on":
        return sampling.ALWAYS_ON
    if name == "always_off":
        return sampling.ALWAYS_OFF
    if name == "traceidratio":
        return sampling.TraceIdRatioBased(rate)
    if name == "parentbased_always_off":
        return sampling.ParentBased(sampling.ALWAYS_OFF)
    if name == "parentbased_traceidratio":
        return sampling.ParentBased(sampling.TraceIdRatioBased(rate))
    if name != "parentbased_always_on":
        log.warning("unknown OTEL_TRACES_SAMPLER %r; using parentbased_always_on", name)
    return sampling.ParentBased(sampling.ALWAYS_ON)


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


def _timeout_s(env: Mapping[str, str], signal: str) -> float | None:
    raw = env.get(f"OTEL_EXPORTER_OTLP_{signal}_TIMEOUT") or env.get("OTEL_EXPORTER_OTLP_TIMEOUT")
    if not raw:
        return None  # the exporter's default (10 s), or the process environment's
    try:
        return float(raw) / 1000 if float(raw) > 0 else None
    except ValueError:
        log.warning("OTLP timeout %r is not a number of milliseconds; ignored", raw)
        return None


def otlp_exporters(
    env: Mapping[str, str],
) -> tuple[SpanExporter | None, MetricExporter | None]:
    """OTLP exporters chosen by the standard variables, or (None, None) when not configured.

    Endpoints and timeouts are resolved here from ``env`` (so tests and embedders can pass
    their own); headers, compression and certificates are read by the exporters from the
    process environment as usual.
    """
    traces, metrics, protocol = otlp_endpoints(env)
    span_exporter: SpanExporter | None = None
    metric_exporter: MetricExporter | None = None
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
            OTLPMetricExporter as GrpcMetrics,
        )
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcSpans,
        )

        if traces:
            span_exporter = GrpcSpans(endpoint=traces, timeout=_timeout_s(env, "TRACES"))
        if metrics:
            metric_exporter = GrpcMetrics(endpoint=metrics, timeout=_timeout_s(env, "METRICS"))
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
            OTLPMetricExporter as HttpMetrics,
        )
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpSpans,
        )

        if traces:
            span_exporter = HttpSpans(endpoint=traces, timeout=_timeout_s(env, "TRACES"))
        if metrics:
            metric_exporter = HttpMetrics(endpoint=metrics, timeout=_timeout_s(env, "METRICS"))
    return span_exporter, metric_exporter
