"""Building a daemon's tracer and meter providers, and settling the heap they churn.

:func:`providers` reads the standard ``OTEL_*`` variables (through :mod:`.otlp`) and the
``--otel`` mode and gives the SDK providers a :class:`~agentos.telemetry.Telemetry` is
made of: OTLP when configured, the console for development, or none at all (then every
span is the same no-op object). :func:`install_global` makes them the process's global
ones, so the spans and metrics of libraries the user instruments leave through the same
exporters. :func:`settle_heap` keeps the SDK's spans from turning into event-loop pauses.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from opentelemetry import metrics as otel_metrics
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.trace import SpanLimits, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SpanExporter

from agentos.telemetry import otlp
from agentos.telemetry.export import CountingBatchSpanProcessor, CountingExporter

__all__ = [
    "GC_GEN0_THRESHOLD",
    "Providers",
    "capture_content",
    "install_global",
    "providers",
    "settle_heap",
]

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


def capture_content(env: Mapping[str, str]) -> bool:
    """Whether message content may be recorded on spans (the GenAI conventions' opt-in)."""
    return env.get("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "").lower() == "true"


@dataclass(frozen=True, slots=True)
class Providers:
    """What :func:`providers` configured: a None provider is disabled; ``batch`` is the
    span processor exporting by OTLP or to the console, if any (its drops are counted)."""

    tracer_provider: TracerProvider | None
    meter_provider: MeterProvider | None
    batch: CountingBatchSpanProcessor | None
    capture_content: bool


def providers(
    mode: str,
    env: Mapping[str, str],
    *,
    span_processors: tuple[SpanProcessor, ...] = (),
    metric_readers: tuple[MetricReader, ...] = (),
) -> Providers | None:
    """The providers ``mode`` (``auto``: OTLP when configured, ``console``, ``none``) and
    ``env`` ask for, with the caller's own ``span_processors`` / ``metric_readers``
    (tests pass in-memory ones); None when nothing would be recorded."""
    if mode == "none" or env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    span_exporter: SpanExporter | None = None
    readers = list(metric_readers)
    if mode == "console":
        span_exporter = ConsoleSpanExporter(out=sys.stderr)
        readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter(out=sys.stderr), 10_000))
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
        return None
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
    return Providers(tracer_provider, meter_provider, batch, capture_content(env))


def install_global(
    tracer_provider: TracerProvider | None, meter_provider: MeterProvider | None
) -> None:
    """Make these providers the global ones (what ``trace.get_tracer`` and
    ``metrics.get_meter`` of instrumented libraries use), unless some were set."""
    if tracer_provider is not None and isinstance(
        trace.get_tracer_provider(), trace.ProxyTracerProvider
    ):
        trace.set_tracer_provider(tracer_provider)
    # The API names no proxy class for metrics; an SDK provider means one was set.
    if meter_provider is not None and not isinstance(
        otel_metrics.get_meter_provider(), MeterProvider
    ):
        otel_metrics.set_meter_provider(meter_provider)
