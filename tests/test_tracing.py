"""Cheap tracing: spans recorded as tuples, exported by a process of their own.

The encoder is checked against the SDK's own (same request, field for field); the
exporter process against a real OTLP/HTTP receiver; the bounded queue by counting what it
sent and dropped; sampling by the standard variables.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agentos.telemetry import Telemetry
from agentos.telemetry.encode import SpanEncoder
from agentos.telemetry.export import Traces
from agentos.telemetry.otlp import SCHEMA_URL, Converter
from agentos.telemetry.spans import NOOP_SPAN, Record
from tests.test_telemetry import collector

__all__ = ["collector"]  # the fixture, shared with test_telemetry

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
UNSAMPLED = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"


class _Records:
    """A sink that keeps what it gets."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.measures: list[tuple[int, float, Mapping[str, Any] | None]] = []

    def emit(self, record: Record) -> None:
        self.records.append(record)

    def measure(self, instrument: int, value: float, attributes: Mapping[str, Any] | None) -> None:
        self.measures.append((instrument, value, attributes))

    def shutdown(self, timeout_s: float) -> None:
        pass


def _a_task(t: Telemetry, *, traceparent: str | None = TRACEPARENT, fail: bool = False) -> None:
    with t.task(
        agent="späher",
        agent_id="späher",
        task_id="m-1-0",
        trigger="inbox",
        attempt=2,
        daemon_id="d-1",
        provider="sim",
        traceparent=traceparent,
    ) as root:
        with t.span("observe"):
            pass
        with t.span("act"), t.inference(model="sim-1", provider="sim", operation="chat") as inf:
            inf.finish(
                input_tokens=12, output_tokens=4, time_to_first_token_s=0.25, kv_restored=True
            )
        with t.tool("search", query="cats", limit=3, ratio=0.5):
            pass
        with t.span("x" * 300, **{"agentos.big": "y" * 500}):
            pass
        root.set_attribute("agentos.task.steps", 1)
        if fail:
            Telemetry.fail(root, RuntimeError("boom"))


def test_the_encoder_writes_the_request_the_sdk_writes() -> None:
    sink = _Records()
    t = Telemetry(sink=sink)
    _a_task(t)
    _a_task(t, traceparent=None)
    with pytest.raises(RuntimeError), t.span("learn"):
        raise RuntimeError("agent code failed")
    convert = Converter(os.environ)
    encoder = SpanEncoder(convert.resource, "agentos", SCHEMA_URL, 128)
    plain = [r for r in sink.records if not r[11]]
    with_events = [r for r in sink.records if r[11]]
    assert len(plain) == 12
    assert len(with_events) == 1
    assert encoder.span(with_events[0]) is None  # exceptions go through the SDK's encoder
    encoded = [encoder.span(r) for r in plain]
    assert all(e is not None for e in encoded)
    ours = ExportTraceServiceRequest.FromString(encoder.request([e for e in encoded if e]))
    sdk = ExportTraceServiceRequest.FromString(
        encode_spans([convert.span(r) for r in plain]).SerializePartialToString()
    )
    assert ours == sdk
    spans = ours.resource_spans[0].scope_spans[0].spans
    root = next(s for s in spans if s.name == "invoke_agent späher")
    assert root.parent_span_id == bytes.fromhex(TRACEPARENT.split("-")[2])
    assert root.flags == 0x300  # the parent is remote


def test_the_standard_http_exporter_posts_our_bytes() -> None:
    # The exporter process hands encoded bytes to the standard exporter's HTTP client;
    # an SDK release without it must fail here, not silently fall back to the slow path.
    traces = Traces(OTLPSpanExporter(endpoint="http://127.0.0.1:9/v1/traces"), os.environ)
    assert traces.client is not None
    traces.shutdown()


def test_spans_keep_their_tree_status_and_attributes() -> None:
    exporter = InMemorySpanExporter()
    t = Telemetry.from_env("tests", env={}, span_processors=(SimpleSpanProcessor(exporter),))
    _a_task(t, fail=True)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    root = spans["invoke_agent späher"]
    assert root.context is not None
    assert root.parent is not None
    assert root.context.trace_id == int(TRACEPARENT.split("-")[1], 16)
    assert root.parent.is_remote
    assert root.status.status_code.name == "ERROR"
    assert [e.name for e in root.events] == ["exception"]
    attrs = dict(root.attributes or {})
    assert attrs["gen_ai.agent.id"] == "späher"
    assert attrs["agentos.task.attempt"] == 2
    assert attrs["error.type"] == "RuntimeError"
    assert attrs["agentos.task.steps"] == 1
    chat = spans["chat sim-1"]
    assert chat.kind.name == "CLIENT"
    assert chat.parent is not None
    assert chat.parent.span_id == spans["act"].context.span_id
    assert dict(chat.attributes or {})["agentos.kv_restored"] is True
    assert dict(spans["execute_tool search"].attributes or {})["limit"] == 3


def test_an_exception_leaving_a_span_marks_it() -> None:
    exporter = InMemorySpanExporter()
    t = Telemetry.from_env("tests", env={}, span_processors=(SimpleSpanProcessor(exporter),))
    with pytest.raises(ValueError, match="bad plan"), t.span("plan"):
        raise ValueError("bad plan")
    (span,) = exporter.get_finished_spans()
    assert span.status.status_code.name == "ERROR"
    assert span.status.description == "ValueError: bad plan"
    assert span.events[0].attributes is not None
    assert span.events[0].attributes["exception.type"] == "ValueError"


@pytest.mark.parametrize(
    ("env", "traceparent", "exported"),
    [
        ({}, TRACEPARENT, True),
        ({}, UNSAMPLED, False),  # parentbased_always_on follows the sender
        ({}, None, True),
        ({"OTEL_TRACES_SAMPLER": "always_off"}, None, False),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"}, None, False),
        ({"OTEL_TRACES_SAMPLER": "parentbased_always_off"}, None, False),
        ({"OTEL_TRACES_SAMPLER": "parentbased_always_off"}, TRACEPARENT, True),
        ({"OTEL_TRACES_SAMPLER": "always_on"}, UNSAMPLED, True),
    ],
)
def test_sampling_follows_the_standard_variables(
    env: dict[str, str], traceparent: str | None, exported: bool
) -> None:
    exporter = InMemorySpanExporter()
    t = Telemetry.from_env("tests", env=env, span_processors=(SimpleSpanProcessor(exporter),))
    _a_task(t, traceparent=traceparent)
    assert bool(exporter.get_finished_spans()) is exported
    if exported:
        assert len(exporter.get_finished_spans()) == 6  # the whole tree, not only the root


def test_the_current_span_propagates_and_disabled_telemetry_costs_nothing() -> None:
    off = Telemetry.disabled()
    assert (
        off.task(
            agent="a",
            agent_id="a",
            task_id="t",
            trigger="inbox",
            attempt=1,
            daemon_id="d",
            provider="sim",
        )
        is NOOP_SPAN
    )
    with off.span("observe"):
        assert Telemetry.current_traceparent() is None
    t = Telemetry(sink=_Records())
    assert Telemetry.current_traceparent() is None
    with t.span("observe") as span:
        here = Telemetry.current_traceparent()
        assert here == f"00-{span.trace_id:032x}-{span.span_id:016x}-01"
        with t.span("child") as child:
            assert child.trace_id == span.trace_id
    assert Telemetry.current_traceparent() is None


def _received(bodies: list[bytes]) -> list[Any]:
    return [
        s
        for body in bodies
        for rs in ExportTraceServiceRequest.FromString(body).resource_spans
        for ss in rs.scope_spans
        for s in ss.spans
    ]


def test_the_exporter_process_delivers_every_span_and_metric(
    collector: tuple[int, dict[str, list[bytes]]],
) -> None:
    port, received = collector
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_SERVICE_NAME": "agentos-test",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }
    t = Telemetry.from_env(env=env)
    for _ in range(3):
        _a_task(t)
    _a_task(t, fail=True)
    t.tasks.add(1, {"agentos.task.status": "succeeded"})
    t.tasks.add(2, {"agentos.task.status": "succeeded"})
    t.shutdown(timeout_s=20)
    spans = _received(received["traces"])
    assert len(spans) == 4 * 6
    assert t.export_counts() == {"spans_sent": 24, "dropped": 0}
    by_id = {s.span_id: s for s in spans}
    chat = next(s for s in spans if s.name == "chat sim-1")
    assert by_id[chat.parent_span_id].name == "act"
    failed = [s for s in spans if s.events]
    assert [e.name for s in failed for e in s.events] == ["exception"]
    req = ExportTraceServiceRequest.FromString(received["traces"][0])
    resource = {a.key: a.value.string_value for a in req.resource_spans[0].resource.attributes}
    assert resource["service.name"] == "agentos-test"
    points: dict[str, list[Any]] = {}
    for body in received["metrics"]:
        for rm in ExportMetricsServiceRequest.FromString(body).resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    points.setdefault(m.name, []).append(m)
    assert {"gen_ai.client.token.usage", "gen_ai.server.time_to_first_token"} <= set(points)
    (tasks,) = points["agentos.tasks"][-1].sum.data_points
    assert tasks.as_int == 3  # summed in the exporter, same value as three adds
    usage = points["gen_ai.client.token.usage"][-1].histogram.data_points
    assert sum(p.count for p in usage) == 8  # input and output, four tasks


def test_a_full_queue_drops_and_counts_never_blocks(
    collector: tuple[int, dict[str, list[bytes]]],
) -> None:
    port, received = collector
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_BSP_MAX_QUEUE_SIZE": "8",
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "8",
    }
    t = Telemetry.from_env(env=env)
    for _ in range(5000):
        with t.span("observe"):
            pass
    t.shutdown(timeout_s=20)
    counts = t.export_counts()
    assert counts["dropped"] > 0
    assert counts["spans_sent"] + counts["dropped"] == 5000
    assert len(_received(received["traces"])) == counts["spans_sent"]


def test_a_dead_exporter_process_only_costs_telemetry(
    collector: tuple[int, dict[str, list[bytes]]],
) -> None:
    port, _ = collector
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_BSP_SCHEDULE_DELAY": "10",
    }
    t = Telemetry.from_env(env=env)
    sink: Any = t._sink
    sink.proc.kill()
    sink.proc.wait()
    for _ in range(2000):
        _a_task(t)
    t.shutdown(timeout_s=5)
    counts = t.export_counts()
    assert counts["dropped"] > 0
    assert counts["spans_sent"] + counts["dropped"] == 2000 * 6


class _Captured:
    """A metric exporter that keeps what it is given (the SDK's interface: ``export``)."""

    def __init__(self, preferred: dict[type, Any] | None = None) -> None:
        self._preferred_temporality = preferred or {}
        self.exported: list[Any] = []

    def export(self, data: Any) -> None:
        self.exported.append(data)

    def shutdown(self) -> None:
        pass


def _points(data: Any) -> dict[tuple[str, tuple[tuple[str, Any], ...]], Any]:
    return {
        (m.name, tuple(sorted(p.attributes.items()))): p
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        for p in m.data.data_points
    }


_MEASURES = [
    (0, 12, {"gen_ai.token.type": "input", "gen_ai.request.model": "m"}),
    (0, 3, {"gen_ai.token.type": "output", "gen_ai.request.model": "m"}),
    (0, 70000, {"gen_ai.token.type": "input", "gen_ai.request.model": "m"}),
    (1, 0.05, {"gen_ai.request.model": "m"}),
    (1, 0.32, {"gen_ai.request.model": "m"}),
    (2, 7.5, None),
    (4, 1, {"agentos.task.status": "succeeded"}),
    (4, 2, {"agentos.task.status": "succeeded"}),
    (4, 1, {"agentos.task.status": "failed"}),
    (9, 100, None),
    (9, -40, None),
]


def test_the_exporter_process_aggregates_as_the_sdk_does() -> None:
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    from agentos.telemetry import otlp
    from agentos.telemetry.aggregate import Aggregator

    reader = InMemoryMetricReader()
    made = otlp.instruments(otlp.meter_provider({}, [reader]).get_meter("agentos"))
    for instrument, value, attrs in _MEASURES:
        otlp.record_measurement(made, instrument, value, attrs)
    expected = _points(reader.get_metrics_data())
    exporter = _Captured()
    agg = Aggregator(exporter, otlp.resource({}), InstrumentationScope("agentos"), 1)
    agg.add(_MEASURES)
    agg.export()
    got = _points(exporter.exported[0])
    assert set(got) == set(expected)
    for key, want in expected.items():
        have = got[key]
        if hasattr(want, "bucket_counts"):
            assert (have.count, have.sum, have.min, have.max) == (
                want.count, want.sum, want.min, want.max,
            ), key  # fmt: skip
            assert list(have.bucket_counts) == list(want.bucket_counts), key
            assert list(have.explicit_bounds) == list(want.explicit_bounds), key
        else:
            assert have.value == want.value, key
    assert got[("agentos.tasks", (("agentos.task.status", "succeeded"),))].value == 3
    # cumulative: a second export repeats every series from the same start
    agg.add([(4, 1, {"agentos.task.status": "failed"})])
    agg.export()
    again = _points(exporter.exported[1])
    assert set(again) == set(got)
    assert again[("agentos.tasks", (("agentos.task.status", "failed"),))].value == 2


def test_delta_temporality_exports_only_what_arrived_since() -> None:
    from opentelemetry.sdk.metrics import Counter, Histogram
    from opentelemetry.sdk.metrics.export import AggregationTemporality
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    from agentos.telemetry import otlp
    from agentos.telemetry.aggregate import Aggregator

    delta = AggregationTemporality.DELTA
    exporter = _Captured({Counter: delta, Histogram: delta})
    agg = Aggregator(exporter, otlp.resource({}), InstrumentationScope("agentos"), 1)
    agg.add(_MEASURES)
    agg.export()
    agg.add([(4, 5, {"agentos.task.status": "failed"}), (9, 1, None)])
    agg.export()
    first, second = (_points(d) for d in exporter.exported)
    failed = ("agentos.tasks", (("agentos.task.status", "failed"),))
    assert first[failed].value == 1
    assert second[failed].value == 5
    assert second[failed].start_time_unix_nano == first[failed].time_unix_nano
    kv = ("agentos.kv.stored", ())
    assert second[kv].value == 61  # up-down counters stay cumulative under delta
    assert set(second) == {failed, kv}
    metric = exporter.exported[1].resource_metrics[0].scope_metrics[0].metrics
    assert [m.data.aggregation_temporality for m in metric] == [
        delta,
        AggregationTemporality.CUMULATIVE,
    ]
