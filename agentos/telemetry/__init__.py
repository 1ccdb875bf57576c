"""OpenTelemetry traces and metrics for agent tasks; the only package that imports opentelemetry.

One trace per task: a root span ``invoke_agent {agent}`` with children ``observe``,
``plan``, ``act``, ``learn``, an inference span ``{operation} {model}`` per model call,
``execute_tool {tool}`` for tools and ``agentos.hibernate`` / ``agentos.wake`` spans.
Attribute and metric names follow the OpenTelemetry GenAI semantic conventions as of
semantic-conventions 1.37 (status: Development; ``gen_ai.*``), the version pinned by
``opentelemetry-semantic-conventions`` 0.58b0 and newer.

Export is configured only by the standard ``OTEL_*`` variables: with
``OTEL_EXPORTER_OTLP_ENDPOINT`` (or the per-signal ``..._TRACES_ENDPOINT`` /
``..._METRICS_ENDPOINT``) spans and metrics go out by OTLP, over HTTP/protobuf unless
``OTEL_EXPORTER_OTLP_PROTOCOL=grpc``; headers, service name, resource attributes,
batching (``OTEL_BSP_*``) and sampler (``OTEL_TRACES_SAMPLER``) come from their
variables too. ``--otel console`` prints to stderr for development; with nothing
configured nothing is exported.

Tracing must not cost the agents it watches (target: under 5% of task throughput), so
the hot path records spans and measurements as plain tuples (:mod:`.spans`) and OTLP
export runs in a process of its own with the SDK's standard exporters (:mod:`.export`);
a dead or slow collector drops telemetry, it never blocks agents. Message content is
recorded only when ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT`` is ``true``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.trace import SpanProcessor
from opentelemetry.sdk.trace import sampling as sdk_sampling
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    get_current_span,
    set_span_in_context,
)

from agentos.telemetry import otlp
from agentos.telemetry.spans import (
    NOOP_SPAN,
    Remote,
    Sink,
    Span,
    clean,
    current,
    parse_traceparent,
)

__all__ = ["Inference", "Span", "Telemetry"]

log = logging.getLogger("agentos.telemetry")

SEMCONV_VERSION = otlp.SEMCONV_VERSION
TOKEN_BUCKETS = otlp.TOKEN_BUCKETS
DURATION_BUCKETS = otlp.DURATION_BUCKETS
_INTERNAL = SpanKind.INTERNAL.value
_CLIENT = SpanKind.CLIENT.value


def _capture_content(env: Mapping[str, str]) -> bool:
    return env.get("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "").lower() == "true"


class _Instrument:
    """A metric instrument whose measurements go to the sink (cheap: a tuple queued)."""

    __slots__ = ("_index", "_sink")

    def __init__(self, sink: Sink | None, index: int) -> None:
        self._sink = sink
        self._index = index

    def add(self, amount: float, attributes: Mapping[str, Any] | None = None) -> None:
        if self._sink is not None:
            self._sink.measure(self._index, amount, attributes)

    record = add


class Inference:
    """An inference in flight; :meth:`finish` records its usage on the span and metrics.

    A context manager around the engine call: an exception leaving it sets ``error.type``
    and records the duration with it.
    """

    __slots__ = ("attributes", "span", "started", "telemetry")

    def __init__(self, span: Span, telemetry: Telemetry, attributes: dict[str, Any]) -> None:
        self.span = span
        self.telemetry = telemetry
        self.attributes = attributes
        self.started = time.perf_counter()

    def __enter__(self) -> Inference:
        self.span.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            self.span.set_attribute("error.type", type(exc).__name__)
            self.telemetry.operation_duration.record(
                time.perf_counter() - self.started,
                {**self.attributes, "error.type": type(exc).__name__},
            )
        self.span.__exit__(exc_type, exc, tb)

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
        attrs = self.span._attributes
        if self.span.is_recording():
            attrs["gen_ai.usage.input_tokens"] = input_tokens
            attrs["gen_ai.usage.output_tokens"] = output_tokens
            attrs["agentos.time_to_first_token_s"] = time_to_first_token_s
            attrs["agentos.kv_restored"] = kv_restored
            attrs["agentos.queue_wait_s"] = queue_wait_s
        t = self.telemetry
        base = self.attributes
        t.token_usage.record(input_tokens, {**base, "gen_ai.token.type": "input"})
        t.token_usage.record(output_tokens, {**base, "gen_ai.token.type": "output"})
        t.operation_duration.record(time.perf_counter() - self.started, base)
        t.time_to_first_token.record(time_to_first_token_s, base)


def _sampler(env: Mapping[str, str]) -> Any:
    """The root sampler ``OTEL_TRACES_SAMPLER`` names; None for the default
    (``parentbased_always_on``), which costs nothing to apply."""
    name = env.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    arg = env.get("OTEL_TRACES_SAMPLER_ARG", "")
    try:
        rate = float(arg) if arg else 1.0
    except ValueError:
        log.warning("OTEL_TRACES_SAMPLER_ARG=%r is not a number; using 1.0", arg)
        rate = 1.0
    samplers: dict[str, Any] = {
        "always_on": sdk_sampling.ALWAYS_ON,
        "always_off": sdk_sampling.ALWAYS_OFF,
        "traceidratio": sdk_sampling.TraceIdRatioBased(rate),
        "parentbased_always_off": sdk_sampling.ParentBased(sdk_sampling.ALWAYS_OFF),
        "parentbased_traceidratio": sdk_sampling.ParentBased(sdk_sampling.TraceIdRatioBased(rate)),
    }
    if name == "parentbased_always_on":
        return None
    if name not in samplers:
        log.warning("unknown OTEL_TRACES_SAMPLER %r; using parentbased_always_on", name)
        return None
    sampler = samplers[name]
    kinds = {k.value: k for k in SpanKind}

    def decide(
        trace_id: int, name: str, kind: int, attrs: Mapping[str, Any], parent: Remote | None
    ) -> bool:
        context = None
        if parent is not None:
            flags = TraceFlags(TraceFlags.SAMPLED if parent.sampled else TraceFlags.DEFAULT)
            remote = SpanContext(parent.trace_id, parent.span_id, True, flags)
            context = set_span_in_context(NonRecordingSpan(remote))
        result = sampler.should_sample(context, trace_id, name, kinds[kind], attrs)
        return bool(result.decision.is_sampled())

    return decide


class Telemetry:
    """Spans and metrics for one daemon (or one test); no-op unless configured.

    ``sink`` receives the ended spans and the measurements; None disables both.
    """

    def __init__(
        self,
        *,
        sink: Any = None,
        sampler: Any = None,
        capture_content: bool = False,
    ) -> None:
        self.enabled = sink is not None
        self._sink = sink
        self._closed: Any = None
        self._sampler = sampler
        self.capture_content = capture_content
        for index, (attr, *_) in enumerate(otlp.INSTRUMENTS):
            setattr(self, attr, _Instrument(sink, index))
        # Spelled out for type checkers; set by the loop above.
        self.token_usage: _Instrument
        self.operation_duration: _Instrument
        self.time_to_first_token: _Instrument
        self.active_seconds: _Instrument
        self.tasks: _Instrument
        self.hibernations: _Instrument
        self.wakes: _Instrument
        self.wake_latency: _Instrument
        self.hibernate_latency: _Instrument
        self.kv_bytes: _Instrument
        self.queue_wait: _Instrument
        self.throttles: _Instrument
        self.tool_calls: _Instrument
        self.tool_duration: _Instrument

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

        Tests pass their own ``span_processors`` / ``metric_readers`` (in-memory): spans
        reach them as ``ReadableSpan`` as soon as they end. OTLP export runs in an
        exporter process (:mod:`agentos.telemetry.export`).
        """
        env = os.environ if env is None else env
        if mode == "none" or env.get("OTEL_SDK_DISABLED", "").lower() == "true":
            return cls.disabled()
        processors = list(span_processors)
        readers = list(metric_readers)
        sink: Any = None
        if mode == "console":
            processors.append(BatchSpanProcessor(ConsoleSpanExporter()))
            readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter(), 10_000))
        elif mode == "auto":
            traces, metrics, _ = otlp.otlp_endpoints(env)
            if traces or metrics:
                sink = _exporter_sink(env)
        if processors or readers:
            provider = otlp.meter_provider(env, readers) if readers else None
            local = otlp.InProcessSink(env, processors, provider)
            sink = local if sink is None else _Both(local, sink)
        if sink is None:
            return cls.disabled()
        return cls(sink=sink, sampler=_sampler(env), capture_content=_capture_content(env))

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Flush what can be flushed within ``timeout_s`` and stop the exporters."""
        if self._sink is not None:
            sink, self._sink = self._sink, None
            self._closed = sink
            sink.shutdown(timeout_s)

    def export_counts(self) -> dict[str, int]:
        """Spans handed to the exporter process so far, and spans dropped because its queue
        was full or it had exited (empty when nothing is exported by OTLP)."""
        sink = self._sink if self._sink is not None else self._closed
        if isinstance(sink, _Both):
            sink = sink.second
        if not hasattr(sink, "sent"):
            return {}
        return {"spans_sent": sink.sent, "dropped": sink.dropped}

    # ------------------------------------------------------------------ spans

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
    ) -> Span:
        """The root span of one task (``invoke_agent {agent}``), continuing ``traceparent``;
        a context manager."""
        if self._sink is None:
            return NOOP_SPAN
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
        parent = parse_traceparent(traceparent) or current()
        return Span(
            self._sink, self._sampler, f"invoke_agent {agent}", _INTERNAL, attributes, parent
        )

    def span(self, name: str, **attributes: Any) -> Span:
        """A child span of the current one (``observe``, ``plan``, ``agentos.wake``...);
        a context manager."""
        if self._sink is None:
            return NOOP_SPAN
        return Span(self._sink, self._sampler, name, _INTERNAL, attributes, current())

    def tool(self, name: str, **attributes: Any) -> Span:
        """``execute_tool {name}`` around a tool call made by agent code."""
        if self._sink is None:
            return NOOP_SPAN
        attrs = {k: clean(v) for k, v in attributes.items()}
        return Span(
            self._sink,
            self._sampler,
            f"execute_tool {name}",
            _INTERNAL,
            {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": name, **attrs},
            current(),
        )

    def inference(
        self, *, model: str, provider: str, operation: str = "text_completion", prompt: str = ""
    ) -> Inference:
        """``{operation} {model}`` around one model call (CLIENT: the engine is a service)."""
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": provider,
            "gen_ai.request.model": model,
        }
        if self._sink is None:
            return Inference(NOOP_SPAN, self, attributes)
        span = Span(
            self._sink, self._sampler, f"{operation} {model}", _CLIENT, dict(attributes), current()
        )
        if self.capture_content and prompt:
            span.set_attribute("gen_ai.input.messages", prompt)
        return Inference(span, self, attributes)

    @staticmethod
    def fail(span: Any, error: BaseException) -> None:
        """Mark ``span`` as failed with ``error`` (status and ``error.type``)."""
        span.set_status(Status(StatusCode.ERROR, str(error)[:200]))
        span.set_attribute("error.type", type(error).__name__)
        span.record_exception(error)

    @staticmethod
    def current_traceparent() -> str | None:
        """The W3C traceparent of the current span, to hand to a message we send."""
        span = current()
        if isinstance(span, Span):
            return span.traceparent() if span.trace_id else None
        if isinstance(span, Remote):
            return f"00-{span.trace_id:032x}-{span.span_id:016x}-{'01' if span.sampled else '00'}"
        other = get_current_span().get_span_context()  # a span of the caller's own SDK
        if not other.is_valid:
            return None
        return f"00-{other.trace_id:032x}-{other.span_id:016x}-{int(other.trace_flags):02x}"


class _Both:
    """In-memory processors (tests) and OTLP export at once."""

    def __init__(self, first: Any, second: Any) -> None:
        self.first, self.second = first, second

    def emit(self, record: Any) -> None:
        self.first.emit(record)
        self.second.emit(record)

    def measure(self, instrument: int, value: float, attributes: Any) -> None:
        self.first.measure(instrument, value, attributes)
        self.second.measure(instrument, value, attributes)

    def shutdown(self, timeout_s: float) -> None:
        try:
            self.first.shutdown(timeout_s)
        finally:
            self.second.shutdown(timeout_s)


def _exporter_sink(env: Mapping[str, str]) -> Any:
    """OTLP export: in an exporter process; in this one if that cannot start."""
    from agentos.telemetry.export import PipeSink

    try:
        return PipeSink(env, otlp.child_env(env))
    except OSError as e:
        log.warning("cannot start the telemetry exporter process (%s); exporting in-process", e)
    span_exporter, metric_exporter = otlp.otlp_exporters(env)
    processors = [BatchSpanProcessor(span_exporter)] if span_exporter is not None else []
    readers: list[MetricReader] = []
    if metric_exporter is not None:
        interval = int(env.get("OTEL_METRIC_EXPORT_INTERVAL", "15000"))
        readers.append(PeriodicExportingMetricReader(metric_exporter, interval))
    provider = otlp.meter_provider(env, readers) if readers else None
    return otlp.InProcessSink(env, processors, provider)
