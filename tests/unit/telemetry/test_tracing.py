"""Tracing on the OpenTelemetry SDK: span trees, sampling, context, OTLP export, drops.

Spans are checked in memory and at a real OTLP/HTTP receiver; the bounded queue by
counting what it sent and dropped; sampling by the standard variables; context by spans
of the global tracer API and the ``traceparent`` we hand on.
"""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agentos.telemetry import NOOP_SPAN, TOKEN_BUCKETS, Telemetry
from tests.otel_support import collector
from tests.otel_support import free_port as _free_port

__all__ = ["collector"]  # the fixture, shared with test_telemetry

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
UNSAMPLED = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"


def _in_memory(env: dict[str, str] | None = None) -> tuple[Telemetry, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    t = Telemetry.from_env("tests", env=env or {}, span_processors=(SimpleSpanProcessor(exporter),))
    return t, exporter


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
    assert not off.enabled
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
    t, exporter = _in_memory()
    assert t.tracer_provider is not None
    library = t.tracer_provider.get_tracer("some.library")
    assert Telemetry.current_traceparent() is None
    with t.span("observe") as span:
        ctx = span.get_span_context()
        assert trace.get_current_span() is span  # current in the OpenTelemetry context
        here = Telemetry.current_traceparent()
        assert here is not None
        assert here[:-2] == f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-"
        assert int(here[-2:], 16) & 1  # sampled (W3C level 2 may add the "random" bit)
        headers: dict[str, str] = {}
        Telemetry.inject(headers)
        assert headers["traceparent"] == here
        # A library's span, through the API, then ours inside it.
        with library.start_as_current_span("GET"), t.span("child") as child:
            assert child.get_span_context().trace_id == ctx.trace_id
    assert Telemetry.current_traceparent() is None
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert spans["GET"].parent is not None
    assert spans["GET"].parent.span_id == spans["observe"].context.span_id
    assert spans["child"].parent is not None
    assert spans["child"].parent.span_id == spans["GET"].context.span_id


def _received(bodies: list[bytes]) -> list[Any]:
    return [
        s
        for body in bodies
        for rs in ExportTraceServiceRequest.FromString(body).resource_spans
        for ss in rs.scope_spans
        for s in ss.spans
    ]


def test_otlp_export_delivers_every_span_and_metric(
    collector: tuple[int, dict[str, list[bytes]]],
) -> None:
    port, received = collector
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_SERVICE_NAME": "agentos-test",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }
    t = Telemetry.from_env(env=env, install_global=False)
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
    root = next(s for s in spans if s.name == "invoke_agent späher")
    assert root.parent_span_id == bytes.fromhex(TRACEPARENT.split("-")[2])
    assert root.flags == 0x300  # the parent is remote
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
    assert tasks.as_int == 3
    usage = points["gen_ai.client.token.usage"][-1].histogram.data_points
    assert sum(p.count for p in usage) == 8  # input and output, four tasks
    assert list(usage[0].explicit_bounds) == [float(b) for b in TOKEN_BUCKETS]
    (dropped,) = points["agentos.telemetry.spans_dropped"][-1].sum.data_points
    assert dropped.as_int == 0


def test_a_full_queue_drops_and_counts_never_blocks(
    collector: tuple[int, dict[str, list[bytes]]],
) -> None:
    port, received = collector
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_BSP_MAX_QUEUE_SIZE": "8",
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "8",
    }
    reader = InMemoryMetricReader()
    t = Telemetry.from_env(env=env, metric_readers=(reader,), install_global=False)
    for _ in range(5000):
        with t.span("observe"):
            pass
    counts = t.export_counts()
    assert counts["dropped"] > 0
    (metric,) = [
        m
        for rm in reader.get_metrics_data().resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == "agentos.telemetry.spans_dropped"
    ]
    (point,) = metric.data.data_points
    assert point.value >= counts["dropped"]  # read later: more may have dropped since
    t.shutdown(timeout_s=20)
    counts = t.export_counts()
    assert counts["spans_sent"] + counts["dropped"] == 5000
    assert len(_received(received["traces"])) == counts["spans_sent"]


def test_a_dead_collector_only_costs_telemetry() -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{_free_port()}",  # nobody there
        "OTEL_EXPORTER_OTLP_TIMEOUT": "500",
        "OTEL_BSP_SCHEDULE_DELAY": "10",
        "OTEL_BSP_MAX_QUEUE_SIZE": "512",
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "64",
    }
    t = Telemetry.from_env(env=env, install_global=False)
    for _ in range(2000):
        _a_task(t)
    t.shutdown(timeout_s=2)
    counts = t.export_counts()
    assert counts["spans_sent"] == 0
    assert counts["dropped"] > 2000 * 6 - 512 - 64  # at most a queue and a batch unaccounted
