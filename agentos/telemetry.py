"""OpenTelemetry traces and metrics for agent tasks; the only module that imports opentelemetry.

One trace per task: a root span ``invoke_agent {agent}`` with children ``observe``,
``plan``, ``act``, ``learn``, an inference span ``{operation} {model}`` per model call,
``execute_tool {tool}`` for tools and ``agentos.hibernate`` / ``agentos.wake`` spans.
Attribute and metric names follow the OpenTelemetry GenAI semantic conventions as of
semantic-conventions 1.37 (status: Development; ``gen_ai.*``), the version pinned by
``opentelemetry-semantic-conventions`` 0.58b0 and newer.

Export is configured only by the standard ``OTEL_*`` variables: with
``OTEL_EXPORTER_OTLP_ENDPOINT`` (or the per-signal ``..._TRACES_ENDPOINT`` /
``..._METRICS_ENDPOINT``) spans and metrics go out by OTLP, over HTTP/protobuf unless
``OTEL_EXPORTER_OTLP_PROTOCOL=grpc``; headers, service name, resource attributes and
sampler come from their variables too. ``--otel console`` prints to stderr for
development; with nothing configured nothing is exported. Spans leave through a
batch processor with a bounded queue and metrics through a periodic reader, both on
their own threads: a dead or slow collector drops telemetry, it never blocks agents.
Message content is recorded only when ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT``
is ``true``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.metrics import Meter, NoOpMeterProvider
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import NoOpTracerProvider, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = ["Inference", "Telemetry"]

SEMCONV_VERSION = "1.37.0"
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

_PROPAGATOR = TraceContextTextMapPropagator()


def _capture_content(env: Mapping[str, str]) -> bool:
    return env.get("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "").lower() == "true"


def _otlp_exporters(env: Mapping[str, str]) -> tuple[SpanExporter | None, Any | None]:
    """OTLP exporters chosen by the standard variables, or (None, None) when not configured.

    Endpoints are resolved here from ``env`` (so tests and embedders can pass their own);
    headers, timeouts, compression and certificates are read by the exporters from the
    process environment as usual.
    """
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").rstrip("/")
    traces = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    metrics = env.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
    protocol = env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    if protocol == "grpc":
        traces, metrics = traces or base or None, metrics or base or None
    else:
        # Per the spec, signal paths are appended to the base endpoint for OTLP/HTTP.
        traces = traces or (f"{base}/v1/traces" if base else None)
        metrics = metrics or (f"{base}/v1/metrics" if base else None)
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


@dataclass
class Inference:
    """An inference in flight; :meth:`finish` records its usage on the span and metrics."""

    span: Span
    telemetry: Telemetry
    attributes: dict[str, Any]
    started: float = field(default_factory=time.perf_counter)

    def finish(
        self,
        *,
        input_tokens: int,
        output_tokens: int,
        time_to_first_token_s: float,
        kv_restored: bool,
        queue_wait_s: float = 0.0,
    ) -> None:
        """Set the usage attributes and record the GenAI client metrics."""
        self.span.set_attribute("gen_ai.usage.input_tokens", input_tokens)
        self.span.set_attribute("gen_ai.usage.output_tokens", output_tokens)
        self.span.set_attribute("agentos.time_to_first_token_s", time_to_first_token_s)
        self.span.set_attribute("agentos.kv_restored", kv_restored)
        self.span.set_attribute("agentos.queue_wait_s", queue_wait_s)
        t = self.telemetry
        t.token_usage.record(input_tokens, {**self.attributes, "gen_ai.token.type": "input"})
        t.token_usage.record(output_tokens, {**self.attributes, "gen_ai.token.type": "output"})
        t.operation_duration.record(time.perf_counter() - self.started, self.attributes)
        t.time_to_first_token.record(time_to_first_token_s, self.attributes)


class Telemetry:
    """Tracer and meter for one daemon (or one test); no-op unless configured."""

    def __init__(
        self,
        *,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: Any = None,
        capture_content: bool = False,
        owned: tuple[Any, ...] = (),
    ) -> None:
        self.enabled = tracer_provider is not None or meter_provider is not None
        self._tracer_provider = tracer_provider or NoOpTracerProvider()
        self._meter_provider = meter_provider or NoOpMeterProvider()
        self._owned = owned
        self.capture_content = capture_content
        self.tracer = self._tracer_provider.get_tracer("agentos", schema_url=_schema())
        meter: Meter = self._meter_provider.get_meter("agentos", schema_url=_schema())
        self.token_usage = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}", description="Tokens used per inference"
        )
        self.operation_duration = meter.create_histogram(
            "gen_ai.client.operation.duration", unit="s", description="Inference duration"
        )
        self.time_to_first_token = meter.create_histogram(
            "gen_ai.server.time_to_first_token", unit="s", description="Time to first token"
        )
        self.active_seconds = meter.create_counter(
            "agentos.agent.active_time", unit="s", description="Agent time not hibernated"
        )
        self.tasks = meter.create_counter(
            "agentos.tasks", unit="{task}", description="Tasks finished, by status"
        )
        self.hibernations = meter.create_counter(
            "agentos.hibernations", unit="{hibernation}", description="Agents swapped out"
        )
        self.wakes = meter.create_counter(
            "agentos.wakes", unit="{wake}", description="Agents woken, by path"
        )
        self.wake_latency = meter.create_histogram(
            "agentos.wake.duration", unit="s", description="Wake latency, by path"
        )
        self.hibernate_latency = meter.create_histogram(
            "agentos.hibernate.duration", unit="s", description="Hibernation latency"
        )
        self.kv_bytes = meter.create_up_down_counter(
            "agentos.kv.stored", unit="By", description="KV snapshot bytes stored in Redis"
        )
        self.queue_wait = meter.create_histogram(
            "agentos.task.queue_wait", unit="s", description="Time from queued to running"
        )
        self.throttles = meter.create_counter(
            "agentos.quota.throttles", unit="{throttle}", description="Inference calls delayed"
        )

    @classmethod
    def disabled(cls) -> Telemetry:
        """No tracing, no metrics."""
        return cls()

    @classmethod
    def from_env(
        cls,
        mode: str = "auto",
        *,
        env: Mapping[str, str] | None = None,
        span_processors: tuple[SpanProcessor, ...] = (),
        metric_readers: tuple[MetricReader, ...] = (),
    ) -> Telemetry:
        """Build from ``OTEL_*`` variables. ``mode``: ``auto`` (OTLP when configured),
        ``console`` (stderr, for development) or ``none``.

        Tests pass their own ``span_processors`` / ``metric_readers`` (in-memory).
        """
        env = os.environ if env is None else env
        if mode == "none" or env.get("OTEL_SDK_DISABLED", "").lower() == "true":
            return cls.disabled()
        processors = list(span_processors)
        readers = list(metric_readers)
        if mode == "console":
            processors.append(BatchSpanProcessor(ConsoleSpanExporter()))
            readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter(), 10_000))
        else:
            span_exporter, metric_exporter = _otlp_exporters(env)
            if span_exporter is not None:
                # Bounded queue, background thread: a dead collector drops spans instead
                # of slowing agents.
                processors.append(
                    BatchSpanProcessor(
                        span_exporter, max_queue_size=4096, export_timeout_millis=5000
                    )
                )
            if metric_exporter is not None:
                interval = int(env.get("OTEL_METRIC_EXPORT_INTERVAL", "15000"))
                readers.append(PeriodicExportingMetricReader(metric_exporter, interval))
        if not processors and not readers:
            return cls.disabled()
        resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME", "agentos")})
        tracer_provider = TracerProvider(resource=resource)  # sampler from OTEL_TRACES_SAMPLER
        for p in processors:
            tracer_provider.add_span_processor(p)
        meter_provider = MeterProvider(
            resource=resource,
            metric_readers=readers,
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
        return cls(
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
            capture_content=_capture_content(env),
            owned=(tracer_provider, meter_provider),
        )

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Flush what can be flushed within ``timeout_s`` and stop the exporters."""
        for provider in self._owned:
            try:
                provider.force_flush(int(timeout_s * 1000))
            finally:
                provider.shutdown()

    # ------------------------------------------------------------------ spans

    @contextmanager
    def task(
        self,
        *,
        agent: str,
        agent_id: str,
        task_id: str,
        trigger: str,
        attempt: int,
        daemon_id: str,
        provider: str,
        traceparent: str | None = None,
    ) -> Iterator[Span]:
        """The root span of one task (``invoke_agent {agent}``), continuing ``traceparent``."""
        parent = None
        if traceparent:
            parent = _PROPAGATOR.extract({"traceparent": traceparent})
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "invoke_agent",
            "gen_ai.provider.name": provider,
            "gen_ai.agent.name": agent,
            "gen_ai.agent.id": agent_id,
            "gen_ai.conversation.id": task_id,
            "agentos.task.trigger": trigger,
            "agentos.task.attempt": attempt,
            "agentos.daemon.id": daemon_id,
        }
        with self.tracer.start_as_current_span(
            f"invoke_agent {agent}",
            context=parent,
            kind=SpanKind.INTERNAL,
            attributes=attributes,
            record_exception=True,
            set_status_on_exception=True,
        ) as span:
            yield span

    @contextmanager
    def span(self, name: str, **attributes: Any) -> Iterator[Span]:
        """A child span of the current one (``observe``, ``plan``, ``agentos.wake``...)."""
        with self.tracer.start_as_current_span(
            name, kind=SpanKind.INTERNAL, attributes=attributes
        ) as span:
            yield span

    @contextmanager
    def tool(self, name: str, **attributes: Any) -> Iterator[Span]:
        """``execute_tool {name}`` around a tool call made by agent code."""
        with self.tracer.start_as_current_span(
            f"execute_tool {name}",
            kind=SpanKind.INTERNAL,
            attributes={
                "gen_ai.operation.name": "execute_tool",
                "gen_ai.tool.name": name,
                **attributes,
            },
        ) as span:
            yield span

    @contextmanager
    def inference(
        self, *, model: str, provider: str, operation: str = "text_completion", prompt: str = ""
    ) -> Iterator[Inference]:
        """``{operation} {model}`` around one model call (CLIENT: the engine is a service)."""
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": provider,
            "gen_ai.request.model": model,
        }
        with self.tracer.start_as_current_span(
            f"{operation} {model}", kind=SpanKind.CLIENT, attributes=attributes
        ) as span:
            if self.capture_content and prompt:
                span.set_attribute("gen_ai.input.messages", prompt)
            handle = Inference(span, self, attributes)
            try:
                yield handle
            except BaseException as e:
                span.set_attribute("error.type", type(e).__name__)
                self.operation_duration.record(
                    time.perf_counter() - handle.started,
                    {**attributes, "error.type": type(e).__name__},
                )
                raise

    @staticmethod
    def fail(span: Span, error: BaseException) -> None:
        """Mark ``span`` as failed with ``error`` (status and ``error.type``)."""
        span.set_status(Status(StatusCode.ERROR, str(error)[:200]))
        span.set_attribute("error.type", type(error).__name__)
        span.record_exception(error)

    @staticmethod
    def current_traceparent() -> str | None:
        """The W3C traceparent of the current span, to hand to a message we send."""
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=otel_context.get_current())
        return carrier.get("traceparent")


def _schema() -> str:
    return f"https://opentelemetry.io/schemas/{SEMCONV_VERSION}"
