"""The SDK's batch export, with what it loses counted.

Spans leave the daemon through the standard ``BatchSpanProcessor``: ending a span only
appends it to a bounded queue (``OTEL_BSP_MAX_QUEUE_SIZE``); a thread of the SDK encodes
and posts batches. A collector that is down or slow therefore fills that queue, never the
event loop, and the queue drops what does not fit. The SDK only logs a drop; operators
need to see the count, so :class:`CountingBatchSpanProcessor` counts drops (exported as
``agentos.telemetry.spans_dropped``) and :class:`CountingExporter` counts what the
collector accepted or refused.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

__all__ = ["CountingBatchSpanProcessor", "CountingExporter"]

log = logging.getLogger("agentos.telemetry")
SPANS_DROPPED = "agentos.telemetry.spans_dropped"


class CountingExporter(SpanExporter):
    """Another exporter, counting the spans it delivered (``sent``) and failed to
    deliver (``failed``). Called by one export thread at a time."""

    def __init__(self, inner: SpanExporter) -> None:
        self.inner = inner
        self.sent = 0
        self.failed = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.inner.export(spans)
        except Exception:
            self.failed += len(spans)
            raise
        if result is SpanExportResult.SUCCESS:
            self.sent += len(spans)
        else:
            self.failed += len(spans)
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class CountingBatchSpanProcessor(BatchSpanProcessor):
    """``BatchSpanProcessor`` that counts the spans it drops: those that find its queue
    full or arrive after shutdown (not queued: the SDK would drop the oldest instead, and
    log each drop), and those still queued when :meth:`shutdown_within` gives up.

    Exact with one thread ending spans (the event loop): between the check and the
    append only the export thread touches the queue, and it only takes from it.
    """

    def __init__(self, exporter: SpanExporter, **batching: int) -> None:
        super().__init__(exporter, **batching)  # type: ignore[arg-type]
        self.dropped = 0
        self._batch = self._batch_processor
        # Reading the SDK's queue: fail here, loudly, if a release renames it.
        self._queue = self._batch._queue
        self._max_queue_size: int = self._batch._max_queue_size

    def on_end(self, span: ReadableSpan) -> None:
        if not (span.context and span.context.trace_flags.sampled):
            return
        if len(self._queue) >= self._max_queue_size or self._batch._shutdown:
            if not self.dropped:
                log.warning("telemetry export is behind: dropping spans (%s)", SPANS_DROPPED)
            self.dropped += 1
            return
        self._batch.emit(span)

    def shutdown_within(self, timeout_s: float) -> None:
        """Export what is queued for at most ``timeout_s``, then stop; what is left counts
        as dropped."""
        self._batch.shutdown(timeout_millis=int(timeout_s * 1000))
        self.dropped += len(self._queue)
        self._queue.clear()
