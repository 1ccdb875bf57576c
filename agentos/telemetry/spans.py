"""Spans that cost microseconds: what the daemon records on its hot path.

The SDK's own spans cost tens of microseconds each on a small machine (a sampler call,
a lock per span, attribute validation, a context attach and detach, a readable copy at
the end), and a task opens seven of them. Here a span is a slotted object that takes
its ids from ``random.getrandbits``, finds its parent in one context variable and, when
it ends, hands one plain tuple (a :data:`Record`) to a sink. The sink turns records into
the SDK's ``ReadableSpan`` where that costs nothing to the event loop: in the exporter
process (``agentos.telemetry.export``), or at once for in-memory test processors.

Sampling is decided once per trace, at its root, by the ``OTEL_TRACES_SAMPLER`` sampler;
children follow their parent (the default ``parentbased_always_on`` semantics). A span
of an unsampled trace records nothing but still propagates its context.
"""

from __future__ import annotations

import random
import re
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar, Token
from types import TracebackType
from typing import Any, Protocol

from opentelemetry import trace
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.util.types import Attributes, AttributeValue

__all__ = ["NOOP_SPAN", "Record", "Sink", "Span", "parse_traceparent"]

# name, kind, trace id, span id, parent span id (0: root), parent is remote, start ns,
# end ns, attributes, status code, status description, events (name, ns, attributes).
Record = tuple[
    str,
    int,
    int,
    int,
    int,
    bool,
    int,
    int,
    dict[str, Any],
    int,
    str | None,
    list[tuple[str, int, dict[str, Any]]] | None,
]
# A root's sampling decision: (trace id, name, kind, attributes, remote parent) -> sampled.
Sampler = Callable[[int, str, int, Mapping[str, Any], "Remote | None"], bool]

_CURRENT: ContextVar[Span | Remote | None] = ContextVar("agentos_span", default=None)
_bits = random.getrandbits
_now = time.time_ns
_PLAIN = (str, bool, int, float)
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_ERROR = StatusCode.ERROR.value


class Sink(Protocol):
    """Where ended spans and metric measurements go."""

    def emit(self, record: Record) -> None: ...

    def measure(
        self, instrument: int, value: float, attributes: Mapping[str, Any] | None
    ) -> None: ...


class Remote:
    """A parent span in another process, from a W3C ``traceparent``."""

    __slots__ = ("sampled", "span_id", "trace_id")

    def __init__(self, trace_id: int, span_id: int, sampled: bool) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.sampled = sampled


def parse_traceparent(value: str | None) -> Remote | None:
    """The parent a ``traceparent`` header names, or None when it is absent or invalid."""
    if not value:
        return None
    m = _TRACEPARENT.match(value.strip().lower())
    if m is None or m.group(1) == "ff":
        return None
    trace_id, span_id = int(m.group(2), 16), int(m.group(3), 16)
    if not trace_id or not span_id:
        return None
    return Remote(trace_id, span_id, bool(int(m.group(4), 16) & 1))


def clean(value: Any) -> AttributeValue:
    """An attribute value OTLP can carry: plain values as they are, sequences as tuples of
    plain values, anything else as its ``str``."""
    if type(value) in _PLAIN:
        return value  # type: ignore[no-any-return]
    if isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        return tuple(v if type(v) in _PLAIN else str(v) for v in value)
    return str(value)


class Span(trace.Span):
    """A span of a task; a context manager that makes itself current while it is open.

    On an exception leaving the ``with`` block it records the exception and sets an
    error status, as the SDK's ``start_as_current_span`` does.
    """

    __slots__ = (
        "_attributes",
        "_end",
        "_events",
        "_kind",
        "_name",
        "_parent_id",
        "_remote",
        "_sink",
        "_span_id",
        "_start",
        "_status",
        "_status_description",
        "_token",
        "_trace_id",
        "sampled",
    )

    def __init__(
        self,
        sink: Sink,
        sampler: Sampler | None,
        name: str,
        kind: int,
        attributes: dict[str, Any],
        parent: Span | Remote | None,
    ) -> None:
        if parent is None:
            self._trace_id = trace_id = _bits(128) or 1
            self._parent_id = 0
            self._remote = False
            self.sampled = sampler is None or sampler(trace_id, name, kind, attributes, None)
        else:
            self._trace_id = parent.trace_id
            self._parent_id = parent.span_id
            self._remote = type(parent) is Remote
            if self._remote and sampler is not None:
                self.sampled = sampler(parent.trace_id, name, kind, attributes, parent)  # type: ignore[arg-type]
            else:
                self.sampled = parent.sampled
        self._span_id = _bits(64) or 1
        self._sink: Sink | None = sink if self.sampled else None
        self._name = name
        self._kind = kind
        self._attributes = attributes
        self._events: list[tuple[str, int, dict[str, Any]]] | None = None
        self._status = 0
        self._status_description: str | None = None
        self._token: Token[Span | Remote | None] | None = None
        self._end = 0
        self._start = _now()

    # The context a child or a propagated message takes from this span.
    @property
    def trace_id(self) -> int:
        return self._trace_id

    @property
    def span_id(self) -> int:
        return self._span_id

    @property
    def name(self) -> str:
        return self._name

    @property
    def attributes(self) -> Mapping[str, Any]:
        return self._attributes

    def traceparent(self) -> str:
        """This span's W3C ``traceparent``."""
        flags = "01" if self.sampled else "00"
        return f"00-{self._trace_id:032x}-{self._span_id:016x}-{flags}"

    def __enter__(self) -> Span:
        self._token = _CURRENT.set(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None and self._sink is not None:
            self.record_exception(exc)
            self.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        if self._token is not None:
            _CURRENT.reset(self._token)
            self._token = None
        self.end()

    # -------------------------------------------------- opentelemetry.trace.Span

    def end(self, end_time: int | None = None) -> None:
        if self._end:
            return
        self._end = end_time or _now()
        if self._sink is not None:
            self._sink.emit(
                (
                    self._name,
                    self._kind,
                    self._trace_id,
                    self._span_id,
                    self._parent_id,
                    self._remote,
                    self._start,
                    self._end,
                    self._attributes,
                    self._status,
                    self._status_description,
                    self._events,
                )
            )
            self._sink = None

    def get_span_context(self) -> SpanContext:
        flags = TraceFlags(TraceFlags.SAMPLED if self.sampled else TraceFlags.DEFAULT)
        return SpanContext(self._trace_id, self._span_id, is_remote=False, trace_flags=flags)

    def is_recording(self) -> bool:
        return self._sink is not None

    def set_attribute(self, key: str, value: Any) -> None:
        if self._sink is not None:
            self._attributes[key] = value if type(value) in _PLAIN else clean(value)

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        for key, value in attributes.items():
            self.set_attribute(key, value)

    def add_event(
        self, name: str, attributes: Attributes = None, timestamp: int | None = None
    ) -> None:
        if self._sink is None:
            return
        if self._events is None:
            self._events = []
        attrs = {k: clean(v) for k, v in (attributes or {}).items()}
        self._events.append((name, timestamp or _now(), attrs))

    def add_link(self, context: SpanContext, attributes: Attributes = None) -> None:
        pass  # agentos spans carry no links

    def update_name(self, name: str) -> None:
        self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if self._sink is None:
            return
        if isinstance(status, Status):
            code, description = status.status_code, status.description
        else:
            code = status
        if self._status == StatusCode.OK.value:
            return  # OK is final, as in the SDK
        self._status = code.value
        self._status_description = description if code.value == _ERROR else None

    def record_exception(
        self,
        exception: BaseException,
        attributes: Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        if self._sink is None:
            return
        stack = "".join(traceback.format_exception(exception))
        self.add_event(
            "exception",
            {
                "exception.type": type(exception).__qualname__,
                "exception.message": str(exception),
                "exception.stacktrace": stack,
                "exception.escaped": str(escaped),
                **dict(attributes or {}),
            },
            timestamp,
        )


class _NoopSpan(Span):
    """What disabled telemetry hands out: one object, nothing recorded, nothing current."""

    def __init__(self) -> None:
        self._trace_id = 0
        self._span_id = 0
        self._parent_id = 0
        self._remote = False
        self.sampled = False
        self._sink = None
        self._name = ""
        self._kind = SpanKind.INTERNAL.value
        self._attributes = {}
        self._events = None
        self._status = 0
        self._status_description = None
        self._token = None
        self._end = 0
        self._start = 0

    def __enter__(self) -> Span:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def end(self, end_time: int | None = None) -> None:
        pass

    def get_span_context(self) -> SpanContext:
        return trace.INVALID_SPAN_CONTEXT


NOOP_SPAN: Span = _NoopSpan()


def current() -> Span | Remote | None:
    """The span open in this context, if any."""
    return _CURRENT.get()
