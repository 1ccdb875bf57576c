"""The spans agentos opens, and the current-context helpers around them.

A span is made current in the OpenTelemetry context for the code inside it
(:class:`Current`), so a span a library opens with the global tracer API inside an
agent's ``act`` is its child; an inference records its usage on its span and on the
GenAI client metrics (:class:`Inference`). The W3C trace context of the current span is
what a message or request we send carries on (:func:`current_traceparent`,
:func:`inject`, :func:`trace_headers`). With telemetry disabled every span is
:data:`NOOP_SPAN`, which records nothing and is never current.
"""

from __future__ import annotations

import time
from collections.abc import MutableMapping, Sequence
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, Protocol

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.metrics import Histogram
from opentelemetry.trace import Status, StatusCode
from opentelemetry.util.types import AttributeValue

__all__ = [
    "NOOP_SPAN",
    "Current",
    "Inference",
    "InferenceMetrics",
    "clean",
    "current_traceparent",
    "evaluation",
    "fail",
    "inject",
    "trace_headers",
]

# What disabled telemetry hands out: one span that records nothing and is never current.
NOOP_SPAN: trace.Span = trace.INVALID_SPAN
_PLAIN = (str, bool, int, float)


def clean(value: Any) -> AttributeValue:
    """An attribute value OTLP can carry: plain values as they are, sequences as tuples of
    plain values, anything else as its ``str``."""
    if type(value) in _PLAIN:
        return value  # type: ignore[no-any-return]
    if isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        return tuple(v if type(v) in _PLAIN else str(v) for v in value)
    return str(value)


class Current:
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


class InferenceMetrics(Protocol):
    """The GenAI client instruments an inference records to (a :class:`Telemetry`'s)."""

    token_usage: Histogram
    operation_duration: Histogram
    time_to_first_token: Histogram


class Inference:
    """An inference in flight; :meth:`finish` records its usage on the span and metrics.

    A context manager around the engine call: an exception leaving it sets ``error.type``
    and records the duration with it.
    """

    __slots__ = ("_scope", "attributes", "span", "started", "telemetry")

    def __init__(
        self,
        span: trace.Span,
        telemetry: InferenceMetrics,
        attributes: dict[str, Any],
    ) -> None:
        self.span = span
        self._scope: AbstractContextManager[trace.Span] = (
            Current(span) if span is not NOOP_SPAN else NOOP_SPAN
        )
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


def fail(span: trace.Span, error: BaseException) -> None:
    """Mark ``span`` as failed with ``error`` (status and ``error.type``)."""
    span.set_status(Status(StatusCode.ERROR, str(error)[:200]))
    span.set_attribute("error.type", type(error).__name__)
    span.record_exception(error)


def evaluation(
    span: trace.Span,
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


def current_traceparent() -> str | None:
    """The W3C traceparent of the current span (ours or any other SDK span current in
    this context), to hand to a message or request we send; None outside a span."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def inject(carrier: MutableMapping[str, str]) -> None:
    """Add the current context to outgoing headers with the global propagator
    (``OTEL_PROPAGATORS``; W3C ``traceparent`` and ``baggage`` by default)."""
    propagate.inject(carrier)


def trace_headers() -> dict[str, str]:
    """The current context as outgoing headers (:func:`inject` into a new dict): what
    a layer that may not import opentelemetry (the MCP tool pool) is handed."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier
