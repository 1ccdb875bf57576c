"""OTLP protobuf bytes for span records, an order of magnitude cheaper than the SDK's encoder.

The SDK encodes a span by building a tree of protobuf objects from a ``ReadableSpan``:
about 50 microseconds a span on a small machine, which made the exporter process the
daemon's biggest competitor for CPU on two cores. The spans agentos records repeat
themselves (the same names, the same agent, model and provider attributes), so here the
wire bytes of each name and each (key, value) attribute are built once, by the official
protobuf classes, and cached; a span is then a join of byte strings (a few
microseconds). The request layout is the one ``encode_spans`` produces, field for field:
``tests/test_tracing.py`` parses both and compares them.

Records this encoder does not cover (with events, array values, more attributes than the
limit, ints beyond 64 bits) return None, and go through the SDK's own encoder.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource as PB2Resource
from opentelemetry.sdk.resources import Resource

from agentos.telemetry.spans import Record

__all__ = ["SpanEncoder"]

_PAIR = struct.Struct(">QQ").pack  # a trace id, in two halves
_ID = struct.Struct(">Q").pack
_TIMES = struct.Struct("<BQBQ").pack  # fixed64 start (field 7), fixed64 end (field 8)
_FLAGS = struct.Struct("<BBI").pack  # fixed32 flags (field 16)
_LOW = (1 << 64) - 1
_HAS_IS_REMOTE, _IS_REMOTE = 0x100, 0x200
_CACHE_MAX = 65536


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    return tag + _varint(len(payload)) + payload


def _any_value(value: Any) -> AnyValue:
    t = type(value)
    if t is str:
        return AnyValue(string_value=value)
    if t is bool:
        return AnyValue(bool_value=value)
    if t is int:
        return AnyValue(int_value=value)
    if t is float:
        return AnyValue(double_value=value)
    raise TypeError(t)


class SpanEncoder:
    """Encodes batches of records as one ``ExportTraceServiceRequest`` for one resource
    and the ``agentos`` instrumentation scope."""

    def __init__(self, resource: Resource, scope_name: str, schema_url: str, max_attributes: int):
        attrs = [KeyValue(key=k, value=_any_value(v)) for k, v in resource.attributes.items()]
        self._resource = _field(b"\x0a", PB2Resource(attributes=attrs).SerializeToString())
        if resource.schema_url:
            self._resource_tail = _field(b"\x1a", resource.schema_url.encode())
        else:
            self._resource_tail = b""
        scope = InstrumentationScope(name=scope_name).SerializeToString()
        self._scope = _field(b"\x0a", scope)
        self._scope_tail = _field(b"\x1a", schema_url.encode()) if schema_url else b""
        self._max_attributes = max_attributes
        self._attrs: dict[tuple[str, type, Any], bytes] = {}
        self._names: dict[tuple[str, int], bytes] = {}

    def _attribute(self, key: str, value: Any) -> bytes:
        cache_key = (key, type(value), value)
        got = self._attrs.get(cache_key)
        if got is None:
            kv = KeyValue(key=key, value=_any_value(value)).SerializeToString()
            got = _field(b"\x4a", kv)  # Span.attributes, field 9
            if len(self._attrs) < _CACHE_MAX:
                self._attrs[cache_key] = got
        return got

    def span(self, record: Record) -> bytes | None:
        """One ``Span`` message as a ``ScopeSpans.spans`` field, or None when the record
        needs the SDK's encoder."""
        name, kind, trace_id, span_id, parent_id, remote, start, end = record[:8]
        attributes, status, description, events = record[8:]
        if events or len(attributes) > self._max_attributes:
            return None
        head = self._names.get((name, kind))
        if head is None:
            # name (field 5), kind (field 6: the OTLP enum is the API's value plus one)
            head = _field(b"\x2a", name.encode()) + b"\x30" + _varint(kind + 1)
            if len(self._names) < _CACHE_MAX:
                self._names[(name, kind)] = head
        # trace_id (field 1) and span_id (field 2), bytes of 16 and 8
        parts = [b"\x0a\x10", _PAIR(trace_id >> 64, trace_id & _LOW), b"\x12\x08", _ID(span_id)]
        if parent_id:
            parts += (b"\x22\x08", _ID(parent_id))
        parts += (head, _TIMES(0x39, start, 0x41, end))
        try:
            parts += [self._attribute(k, v) for k, v in attributes.items()]
        except (TypeError, ValueError):
            return None
        if status:
            detail = b"\x18" + _varint(status)  # Status.code, field 3
            if description:
                detail = _field(b"\x12", description.encode()) + detail  # message, field 2
            parts.append(_field(b"\x7a", detail))  # Span.status, field 15
        else:
            parts.append(b"\x7a\x00")
        flags = _HAS_IS_REMOTE | (_IS_REMOTE if remote else 0)
        parts.append(_FLAGS(0x85, 0x01, flags))  # Span.flags, field 16, fixed32
        body = b"".join(parts)
        return b"\x12" + _varint(len(body)) + body

    def request(self, spans: Sequence[bytes]) -> bytes:
        """The serialized ``ExportTraceServiceRequest`` holding ``spans`` (from :meth:`span`)."""
        scope_spans = _field(b"\x12", self._scope + b"".join(spans) + self._scope_tail)
        return _field(b"\x0a", self._resource + scope_spans + self._resource_tail)
