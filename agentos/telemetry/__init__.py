"""OpenTelemetry traces and metrics for agent tasks; the only package that imports opentelemetry.

One trace per task: a root span ``invoke_agent {agent}`` with children ``observe``,
``plan``, ``act``, ``learn``, an inference span ``{operation} {model}`` per model call,
``execute_tool {tool}`` for tools and ``agentos.hibernate`` / ``agentos.wake`` spans.
Attribute and metric names follow the OpenTelemetry GenAI semantic conventions as of
semantic-conventions 1.37 (status: Development; ``gen_ai.*``), the version pinned by
``opentelemetry-semantic-conventions`` 0.58b0 and newer.

They are spans of the standard SDK (``TracerProvider``), and each is the current span of
the OpenTelemetry context while the code inside it runs: a span that a library opens with
the global tracer API (httpx, a database driver, the MCP client, instrumented by the
user) inside an agent's ``act`` is a child of that ``act``, and a ``traceparent`` sent on
(:meth:`Telemetry.current_traceparent`, :meth:`Telemetry.inject`) names the current span.
A daemon that exports sets its providers as the global ones unless some were set before,
so those libraries' spans and metrics leave through the same exporters.

Export is configured only by the standard ``OTEL_*`` variables (:mod:`.otlp`): with
``OTEL_EXPORTER_OTLP_ENDPOINT`` (or the per-signal ``..._TRACES_ENDPOINT`` /
``..._METRICS_ENDPOINT``) spans and metrics go out by OTLP, over HTTP/protobuf unless
``OTEL_EXPORTER_OTLP_PROTOCOL=grpc``; headers, service name, resource attributes,
batching (``OTEL_BSP_*``) and sampler (``OTEL_TRACES_SAMPLER``) come from their
variables too. ``--otel console`` prints to stderr for development; with nothing
configured nothing is exported and every span is the same no-op object.

Export runs off the agents' path, in the SDK's ``BatchSpanProcessor`` and
``PeriodicExportingMetricReader`` threads: a dead or slow collector fills a bounded queue
and drops telemetry (counted in ``agentos.telemetry.spans_dropped``, :mod:`.export`), it
never blocks agents. Message content is recorded only when
``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT`` is ``true``.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import time
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import metrics as otel_metrics
from opentelemetry import propagate, trace
from opentelemetry.metrics import CallbackOptions, Counter, Histogram, Observation, UpDownCounter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.trace import SpanLimits, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from agentos.telemetry import otlp
from agentos.telemetry.export import SPANS_DROPPED, CountingBatchSpanProcessor, CountingExporter

__all__ = ["NOOP_SPAN", "Inference", "Telemetry", "settle_heap"]

log = logging.getLogger("agentos.telemetry")

SEMCONV_VERSION = otlp.SEMCONV_VERSION
TOKEN_BUCKETS = otlp.TOKEN_BUCKETS
DURATION_BUCKETS = otlp.DURATION_BUCKETS
# What disabled telemetry hands out: one span that records nothing and is never current.
NOOP_SPAN: trace.Span = trace.INVALID_SPAN
_TRACECONTEXT = TraceContextTextMapPropagator()
_PLAIN = (str, bool, int, float)


# Young collections between full ones: the default (700) runs one every few traced tasks.
GC_GEN0_THRESHOLD = 5000
_settled = False


def settle_heap() -> None:
    """Once per process, after startup: move what is alive now (modules, classes, the
    daemon's own objects) out of the collector's reach (``gc.freeze``) and collect young
    objects less often.

    Why here: SDK spans and their attribute dicts live until the batch processor exports
    them, so they survive young collections and trigger full ones, and a full collection
    walked the whole startup heap, a pause of about 140 ms on the event loop (measured in
    ``bench/tracing.py``). Frozen objects are still freed by reference counting; only
    cycles among them are never collected, which startup objects do not form. Later
    calls do nothing (a test process starts many daemons).
    """
    global _settled
    if _settled:
        return
    _settled = True
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def _capture_content(env: Mapping[str, str]) -> bool:
    return env.get("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "").lower() == "true"


def clean(value: Any) -> AttributeValue:
    """An attribute value OTLP can carry: plain values as they are, sequences as tuples of
    plain values, anything else as its ``str``."""
    if type(value) in _PLAIN:
        return value  # type: ignore[no-any-return]
    if isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        return tuple(v if type(v) in _PLAIN else str(v) for v in value)
    return str(value)


class _Current:
    """An SDK span, current in the OpenTelemetry context for the ``with`` block (entering
    gives the span). An exception leaving the block is recorded and sets an error status,
    as ``start_as_current_span`` does, at a fraction of its cost."""

    __slots__ = ("_span", "_token")

    def __init__(self, span: trace.Span) -> None:
        self._span = span
        self._token: object = None

    def __enter__(self) -> trace.Span:
        self._token = otel_context.attach(trace.set_span_in_context(self._span))
        return self._span

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self._span.__exit__(exc_type, exc, tb)  # the SDK's: records exc, ends the span
        finally:
            otel_context.detach(self._token)  # type: ignore[arg-type]


class Inference:
    """An inference in flight; :meth:`finish` records its usage on the span and metrics.

    A context manager around the engine call: an exception leaving it sets ``error.type``
    and records the duration with it.
    """

    __slots__ = ("_scope", "attributes", "span", "started", "telemetry")

    def __init__(
        self,
        span: trace.Span,
        telemetry: Telemetry,
        attributes: dict[str, Any],
    ) -> None:
        self.span = span
        self._scope: Any = _Current(span) if span is not NOOP_SPAN else NOOP_SPAN
        self.telemetry = telemetry
        self.attributes = attributes
        self.started = time.perf_counter()

    def __enter__(self) -> Inference:
        self._scope.__enter__()
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
        self._scope.__exit__(exc_type, exc, tb)

    def finish(
        self,
        *,
        input_tokens: int,
        output_tokens: int,
        time_to_first_token_s: float,
        kv_restored: bool,
        queue_wait_s: float = 0.0,
        cached_tokens: int = 0,
        response_model: str = "",
        route_reason: str = "",
        server_address: str = "",
    ) -> None:
        """Set the usage attributes and record the GenAI client metrics; on a routed
        call, the model that served it (``gen_ai.response.model``), where it ran
        (``server.address``) and why it was chosen (``agentos.route.reason``)."""
        if self.span.is_recording():
            attributes: dict[str, Any] = {
                "gen_ai.usage.input_tokens": input_tokens,
                "gen_ai.usage.output_tokens": output_tokens,
                "gen_ai.usage.cache_read.input_tokens": cached_tokens,
                "agentos.time_to_first_token_s": time_to_first_token_s,
                "agentos.kv_restored": kv_restored,
                "agentos.queue_wait_s": queue_wait_s,
            }
            if response_model:
                attributes["gen_ai.response.model"] = response_model
            if route_reason:
                attributes["agentos.route.reason"] = route_reason
            if server_address:
                attributes["server.address"] = server_address
            self.span.set_attributes(attributes)
        t = self.telemetry
        base = self.attributes
        t.token_usage.record(input_tokens, {**base, "gen_ai.token.type": "input"})
        t.token_usage.record(output_tokens, {**base, "gen_ai.token.type": "output"})
        t.operation_duration.record(time.perf_counter() - self.started, base)
        t.time_to_first_token.record(time_to_first_token_s, base)


class Telemetry:
    """Spans and metrics for one daemon (or one test); no-op unless configured.

    ``tracer_provider`` None disables spans (every span is :data:`NOOP_SPAN`);
    ``meter_provider`` None makes the instruments no-ops. ``batch`` is the span processor
    that exports by OTLP or to the console, if any (its drops are counted).
    """

    def __init__(
        self,
        *,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        batch: CountingBatchSpanProcessor | None = None,
        capture_content: bool = False,
    ) -> None:
        self.enabled = tracer_provider is not None
        self.tracer_provider = tracer_provider
        self.meter_provider = meter_provider
        self.capture_content = capture_content
        self._batch = batch
        self._tracer: trace.Tracer = (
            tracer_provider.get_tracer("agentos", schema_url=otlp.SCHEMA_URL)
            if tracer_provider is not None
            else trace.NoOpTracer()
        )
        meter = (
            meter_provider.get_meter("agentos", schema_url=otlp.SCHEMA_URL)
            if meter_provider is not None
            else otel_metrics.NoOpMeterProvider().get_meter("agentos")
        )
        made = otlp.instruments(meter)
        self.token_usage: Histogram = made["token_usage"]
        self.operation_duration: Histogram = made["operation_duration"]
        self.time_to_first_token: Histogram = made["time_to_first_token"]
        self.active_seconds: Counter = made["active_seconds"]
        self.tasks: Counter = made["tasks"]
        self.hibernations: Counter = made["hibernations"]
        self.wakes: Counter = made["wakes"]
        self.wake_latency: Histogram = made["wake_latency"]
        self.hibernate_latency: Histogram = made["hibernate_latency"]
        self.kv_bytes: UpDownCounter = made["kv_bytes"]
        self.queue_wait: Histogram = made["queue_wait"]
        self.throttles: Counter = made["throttles"]
        self.tool_calls: Counter = made["tool_calls"]
        self.tool_duration: Histogram = made["tool_duration"]
        if batch is not None:
            meter.create_observable_counter(
                SPANS_DROPPED,
                callbacks=[self._observe_dropped],
                unit="{span}",
                description="Spans dropped because the export queue was full",
            )
        self._exporter = batch.span_exporter if batch is not None else None

    def _observe_dropped(self, options: CallbackOptions) -> Iterable[Observation]:
        assert self._batch is not None
        return [Observation(self._batch.dropped)]

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
        install_global: bool | None = None,
    ) -> Telemetry:
        """Build from ``OTEL_*`` variables. ``mode``: ``auto`` (OTLP when configured),
        ``console`` (stderr, for development) or ``none``.

        Tests pass their own ``span_processors`` / ``metric_readers`` (in-memory).
        ``install_global`` (default: when spans are exported by OTLP or to the console)
        makes the providers the process's global ones, unless some were set before.
        """
        env = os.environ if env is None else env
        if mode == "none" or env.get("OTEL_SDK_DISABLED", "").lower() == "true":
            return cls.disabled()
        span_exporter: Any = None
        readers = list(metric_readers)
        if mode == "console":
            span_exporter = ConsoleSpanExporter(out=sys.stderr)
            readers.append(
                PeriodicExportingMetricReader(ConsoleMetricExporter(out=sys.stderr), 10_000)
            )
        elif mode == "auto":
            span_exporter, metric_exporter = otlp.otlp_exporters(env)
            if metric_exporter is not None:
                interval = otlp.int_env(env, "OTEL_METRIC_EXPORT_INTERVAL", 60_000)
                readers.append(PeriodicExportingMetricReader(metric_exporter, interval))
        batch = (
            CountingBatchSpanProcessor(CountingExporter(span_exporter), **otlp.batching(env))
            if span_exporter is not None
            else None
        )
        processors = [*span_processors, *([batch] if batch is not None else [])]
        if not processors and not readers:
            return cls.disabled()
        tracer_provider = None
        if processors:
            tracer_provider = TracerProvider(
                sampler=otlp.sampler(env),
                resource=otlp.resource(env),
                shutdown_on_exit=False,
                span_limits=SpanLimits(),
            )
            for p in processors:
                tracer_provider.add_span_processor(p)
        meter_provider = otlp.meter_provider(env, readers) if readers else None
        telemetry = cls(
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
            batch=batch,
            capture_content=_capture_content(env),
        )
        if install_global if install_global is not None else batch is not None:
            telemetry.install_global()
        return telemetry

    def install_global(self) -> None:
        """Make these providers the global ones (what ``trace.get_tracer`` and
        ``metrics.get_meter`` of instrumented libraries use), unless some were set."""
        if self.tracer_provider is not None and isinstance(
            trace.get_tracer_provider(), trace.ProxyTracerProvider
        ):
            trace.set_tracer_provider(self.tracer_provider)
        # The API names no proxy class for metrics; an SDK provider means one was set.
        if self.meter_provider is not None and not isinstance(
            otel_metrics.get_meter_provider(), MeterProvider
        ):
            otel_metrics.set_meter_provider(self.meter_provider)

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Flush what can be flushed within ``timeout_s`` and stop the exporters."""
        deadline = time.monotonic() + timeout_s
        tracer_provider, self.tracer_provider = self.tracer_provider, None
        meter_provider, self.meter_provider = self.meter_provider, None
        if tracer_provider is not None:
            if self._batch is not None:
                self._batch.shutdown_within(timeout_s)
            tracer_provider.shutdown()  # the batch is done; in-memory processors are quick
        if meter_provider is not None:
            left_ms = max(0.0, deadline - time.monotonic()) * 1000
            meter_provider.shutdown(timeout_millis=max(left_ms, 100))

    def export_counts(self) -> dict[str, int]:
        """Spans the collector accepted so far, and spans dropped (a full queue, a failed
        export, a shutdown timeout); empty when spans are not exported."""
        if self._batch is None or not isinstance(self._exporter, CountingExporter):
            return {}
        return {
            "spans_sent": self._exporter.sent,
            "dropped": self._batch.dropped + self._exporter.failed,
        }

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
    ) -> AbstractContextManager[trace.Span]:
        """The root span of one task (``invoke_agent {agent}``), continuing ``traceparent``
        (else the current span); a context manager that gives the span."""
        if not self.enabled:
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
        parent = None
        if traceparent:
            remote = _TRACECONTEXT.extract({"traceparent": traceparent})
            if trace.get_current_span(remote).get_span_context().is_valid:
                parent = remote
        span = self._tracer.start_span(f"invoke_agent {agent}", parent, attributes=attributes)
        return _Current(span)

    def span(self, name: str, **attributes: Any) -> AbstractContextManager[trace.Span]:
        """A child span of the current one (``observe``, ``plan``, ``agentos.wake``...);
        a context manager that gives the span."""
        if not self.enabled:
            return NOOP_SPAN
        return _Current(self._tracer.start_span(name, attributes=attributes))

    def tool(self, name: str, **attributes: Any) -> AbstractContextManager[trace.Span]:
        """``execute_tool {name}`` around a tool call made by agent code."""
        if not self.enabled:
            return NOOP_SPAN
        attrs = {k: clean(v) for k, v in attributes.items()}
        span = self._tracer.start_span(
            f"execute_tool {name}",
            attributes={"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": name, **attrs},
        )
        return _Current(span)

    def inference(
        self, *, model: str, provider: str, operation: str = "text_completion", prompt: str = ""
    ) -> Inference:
        """``{operation} {model}`` around one model call (CLIENT: the engine is a service)."""
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": provider,
            "gen_ai.request.model": model,
        }
        if not self.enabled:
            return Inference(NOOP_SPAN, self, attributes)
        span = self._tracer.start_span(
            f"{operation} {model}", kind=SpanKind.CLIENT, attributes=attributes
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
    def evaluation(
        span: Any,
        *,
        name: str,
        verdict: str,
        score: float | None = None,
        reason: str | None = None,
        error: str | None = None,
    ) -> None:
        """Record the verdict on the task of ``span`` as a ``gen_ai.evaluation.result``
        event on it: ``name`` is who judged (the evaluator's entrypoint, ``agent`` or
        ``runtime``), ``verdict`` the label (pass, fail, unknown); ``error`` (its type
        or text) when the evaluator gave no verdict."""
        if not span.is_recording():
            return
        attributes: dict[str, AttributeValue] = {
            "gen_ai.evaluation.name": name,
            "gen_ai.evaluation.score.label": verdict,
        }
        if score is not None:
            attributes["gen_ai.evaluation.score.value"] = float(score)
        if reason:
            attributes["gen_ai.evaluation.explanation"] = reason[:1000]
        if error:
            attributes["error.type"] = error[:200]
        span.add_event("gen_ai.evaluation.result", attributes)

    @staticmethod
    def current_traceparent() -> str | None:
        """The W3C traceparent of the current span (ours or any other SDK span current in
        this context), to hand to a message or request we send; None outside a span."""
        context = trace.get_current_span().get_span_context()
        if not context.is_valid:
            return None
        return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"

    @staticmethod
    def inject(carrier: MutableMapping[str, str]) -> None:
        """Add the current context to outgoing headers with the global propagator
        (``OTEL_PROPAGATORS``; W3C ``traceparent`` and ``baggage`` by default)."""
        propagate.inject(carrier)

    @staticmethod
    def trace_headers() -> dict[str, str]:
        """The current context as outgoing headers (:meth:`inject` into a new dict): what
        a layer that may not import opentelemetry (the MCP tool pool) is handed."""
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        return carrier
