"""The :class:`Telemetry` object a daemon passes down: where its code records spans and metrics.

One per daemon (or test), built from the ``OTEL_*`` variables (:func:`Telemetry.from_env`,
through :mod:`.configure`); disabled, it hands out :data:`~.spans.NOOP_SPAN` and no-op
instruments, so recording costs next to nothing. Its attributes are the metric
instruments (:mod:`.otlp` names them); its methods open the spans of a task.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, MutableMapping
from contextlib import AbstractContextManager
from typing import Any

from opentelemetry import metrics as otel_metrics
from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, Counter, Histogram, Observation, UpDownCounter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from agentos.telemetry import configure, otlp, spans
from agentos.telemetry.export import SPANS_DROPPED, CountingBatchSpanProcessor, CountingExporter
from agentos.telemetry.spans import NOOP_SPAN, Current, Inference, clean

__all__ = ["Telemetry"]

_TRACECONTEXT = TraceContextTextMapPropagator()


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
        made = configure.providers(
            mode, env, span_processors=span_processors, metric_readers=metric_readers
        )
        if made is None:
            return cls.disabled()
        telemetry = cls(
            tracer_provider=made.tracer_provider,
            meter_provider=made.meter_provider,
            batch=made.batch,
            capture_content=made.capture_content,
        )
        if install_global if install_global is not None else made.batch is not None:
            telemetry.install_global()
        return telemetry

    def install_global(self) -> None:
        """Make these providers the global ones (what ``trace.get_tracer`` and
        ``metrics.get_meter`` of instrumented libraries use), unless some were set."""
        configure.install_global(self.tracer_provider, self.meter_provider)

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
        return Current(span)

    def span(self, name: str, **attributes: Any) -> AbstractContextManager[trace.Span]:
        """A child span of the current one (``observe``, ``plan``, ``agentos.wake``...);
        a context manager that gives the span."""
        if not self.enabled:
            return NOOP_SPAN
        return Current(self._tracer.start_span(name, attributes=attributes))

    def tool(self, name: str, **attributes: Any) -> AbstractContextManager[trace.Span]:
        """``execute_tool {name}`` around a tool call made by agent code."""
        if not self.enabled:
            return NOOP_SPAN
        attrs = {k: clean(v) for k, v in attributes.items()}
        span = self._tracer.start_span(
            f"execute_tool {name}",
            attributes={"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": name, **attrs},
        )
        return Current(span)

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

    # The current-context helpers (:mod:`.spans`), where callers holding a Telemetry look.

    @staticmethod
    def fail(span: trace.Span, error: BaseException) -> None:
        """Mark ``span`` as failed with ``error`` (status and ``error.type``)."""
        spans.fail(span, error)

    @staticmethod
    def evaluation(
        span: trace.Span,
        *,
        name: str,
        verdict: str,
        score: float | None = None,
        reason: str | None = None,
        error: str | None = None,
    ) -> None:
        """Record the verdict on the task of ``span`` (:func:`.spans.evaluation`)."""
        spans.evaluation(span, name=name, verdict=verdict, score=score, reason=reason, error=error)

    @staticmethod
    def current_traceparent() -> str | None:
        """The W3C traceparent of the current span; None outside a span."""
        return spans.current_traceparent()

    @staticmethod
    def inject(carrier: MutableMapping[str, str]) -> None:
        """Add the current context to outgoing headers with the global propagator."""
        spans.inject(carrier)

    @staticmethod
    def trace_headers() -> dict[str, str]:
        """The current context as outgoing headers (for the MCP tool pool)."""
        return spans.trace_headers()
