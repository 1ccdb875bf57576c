"""Traces, metrics and metering: the span tree of a task, OTLP export, dead collectors, usage."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import anyio
import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agentos.client import Client
from agentos.core.metering import Prices
from agentos.core.spec import parse_text
from agentos.engine import SimEngine
from agentos.store import Store
from agentos.telemetry import Telemetry
from tests.cli_support import base_env, cli, spawn
from tests.helpers import agent_doc, apply, running_daemon, status_is, wait_until
from tests.otel_support import (  # re-exported: modules that import them from here
    collector as collector,
)
from tests.otel_support import free_port as _free_port  # noqa: F401 (the same)

pytestmark = pytest.mark.anyio

RESEARCHER = "tests.fixture_agents:Researcher"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
def traced() -> tuple[Telemetry, InMemorySpanExporter, InMemoryMetricReader]:
    spans = InMemorySpanExporter()
    metrics = InMemoryMetricReader()
    telemetry = Telemetry.from_env(
        "none-but-tests",
        env={},
        span_processors=(SimpleSpanProcessor(spans),),
        metric_readers=(metrics,),
    )
    return telemetry, spans, metrics


async def test_a_task_is_one_trace_with_phases_inferences_and_a_tool(
    store: Store, traced: tuple[Telemetry, InMemorySpanExporter, InMemoryMetricReader]
) -> None:
    telemetry, exporter, reader = traced
    await apply(store, agent_doc("scout", RESEARCHER, triggers=[{"inbox": {}}]))
    async with running_daemon(store, SimEngine(), telemetry=telemetry):
        msg_id = await Client(store).store.inbox.send("scout", "find cats", traceparent=TRACEPARENT)
        await Client(store).wait_task("scout", f"m-{msg_id}", timeout_s=10)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    root = spans["invoke_agent scout"]
    assert root.context.trace_id == int(TRACEPARENT.split("-")[1], 16)  # continues the sender
    attrs = dict(root.attributes or {})
    assert attrs["gen_ai.operation.name"] == "invoke_agent"
    assert attrs["gen_ai.provider.name"] == "sim"
    assert attrs["gen_ai.agent.name"] == "scout"
    assert attrs["gen_ai.conversation.id"] == f"m-{msg_id}"
    assert attrs["agentos.task.trigger"] == "inbox"
    assert attrs["agentos.phase_path"] == "Idle > Running > Idle"
    tree = [s for s in exporter.get_finished_spans() if s.context.trace_id == root.context.trace_id]
    by_parent: dict[int | None, list[str]] = {}
    for s in tree:
        by_parent.setdefault(s.parent.span_id if s.parent else None, []).append(s.name)
    phases = sorted(by_parent[root.context.span_id])
    # One iteration, then a second observe that finds nothing and ends the task.
    assert phases == ["act", "learn", "observe", "observe", "plan"]
    plan, act = spans["plan"], spans["act"]
    assert by_parent[plan.context.span_id] == ["text_completion sim-1"]
    assert sorted(by_parent[act.context.span_id]) == ["chat sim-1", "execute_tool search"]
    chat = dict(spans["chat sim-1"].attributes or {})
    assert chat["gen_ai.request.model"] == "sim-1"
    assert chat["gen_ai.usage.output_tokens"] == 4
    assert chat["gen_ai.usage.input_tokens"] > 0
    assert "gen_ai.input.messages" not in chat  # content only when opted in
    tool = dict(spans["execute_tool search"].attributes or {})
    assert tool["gen_ai.tool.name"] == "search"
    names = {
        m.name
        for rm in reader.get_metrics_data().resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }
    assert {
        "gen_ai.client.token.usage",
        "gen_ai.client.operation.duration",
        "agentos.tasks",
    } <= names


async def test_a_failing_task_sets_error_status(
    store: Store, traced: tuple[Telemetry, InMemorySpanExporter, InMemoryMetricReader]
) -> None:
    telemetry, exporter, _ = traced
    policy = {"backoff": {"initial": "20ms", "max": "40ms"}, "crashLoopAfter": 1}
    await apply(store, agent_doc("bad", "tests.fixture_agents:Crasher", restartPolicy=policy))
    async with running_daemon(store, telemetry=telemetry):
        await wait_until(lambda: status_is(store, "bad", phase="Failed"))
    (root,) = [s for s in exporter.get_finished_spans() if s.name == "invoke_agent bad"]
    assert root.status.status_code.name == "ERROR"
    assert dict(root.attributes or {})["error.type"] == "RuntimeError"


class _Hanging(SpanExporter):
    """A collector that never answers (until it is shut down: no thread left behind)."""

    def __init__(self) -> None:
        self._shut = threading.Event()

    def export(self, spans: Any) -> SpanExportResult:
        self._shut.wait()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self._shut.set()


async def test_a_dead_collector_does_not_hold_agents_up(store: Store) -> None:
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    processor = BatchSpanProcessor(
        _Hanging(), max_queue_size=64, max_export_batch_size=16, schedule_delay_millis=10
    )
    telemetry = Telemetry.from_env("none-but-tests", env={}, span_processors=(processor,))
    await apply(store, agent_doc("echo", "tests.fixture_agents:Echo", triggers=[{"inbox": {}}]))
    client = Client(store)
    async with running_daemon(store, telemetry=telemetry):
        ids = [await client.send("echo", f"m{i}") for i in range(200)]  # far more than the queue
        with anyio.fail_after(20):
            for msg_id in ids:
                await client.wait_task("echo", f"m-{msg_id}", timeout_s=20, poll_s=0.01)


async def test_usage_matches_the_engines_token_counts_exactly(store: Store) -> None:
    engine = SimEngine()
    (batch,) = parse_text(
        "apiVersion: agentos/v1\nkind: QuotaPolicy\nmetadata: {name: p}\n"
        "spec: {classes: {batch: {tokensPerMinute: 100000}}}\n"
    )
    await apply(
        store,
        batch,
        agent_doc("scout", RESEARCHER, triggers=[{"inbox": {}}], quotaClass="batch"),
    )
    client = Client(store)
    async with running_daemon(store, engine):
        for i in range(3):
            msg_id = await client.send("scout", f"question {i}")
            await client.wait_task("scout", f"m-{msg_id}", timeout_s=10)
    # The engine's own counts: every prompt token prefilled and every token decoded.
    rows = await client.usage(
        by="class", prices=Prices(per_1k_input_tokens=1.0, per_agent_hour=3.6)
    )
    (row,) = rows
    assert row.key == "batch"
    assert row.tokens_in == engine.stats.prefill_tokens
    assert row.tokens_out == engine.stats.decode_tokens
    assert row.tasks_succeeded == 3
    assert row.agent_hours > 0
    assert row.cost == pytest.approx(row.tokens_in / 1000 + row.agent_hours * 3.6)
    assert row.cost_per_task == pytest.approx(row.cost / 3)
    st = await store.agents.status("scout")
    assert int(st["tokens_in"]) == row.tokens_in


@pytest.mark.e2e
async def test_the_daemon_exports_spans_and_metrics_by_otlp(
    redis_url: str,
    namespace: str,
    store: Store,
    tmp_path: Path,
    collector: tuple[int, dict[str, list[bytes]]],
) -> None:
    port, received = collector
    await apply(store, agent_doc("scout", RESEARCHER, triggers=[{"inbox": {}}]))
    env = {
        **base_env(tmp_path / "home"),
        "AGENTOS_REDIS_URL": redis_url,
        "AGENTOS_NAMESPACE": namespace,
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_SERVICE_NAME": "agentos-test",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_METRIC_EXPORT_INTERVAL": "300",
    }
    with spawn(env, tmp_path / "d.log", "daemon", "--grace", "1s", "--lease-ttl", "2s") as proc:
        sent = await cli(env, "send", "scout", "hello", "--wait")
        assert sent.returncode == 0, sent.stderr

        def names() -> set[str]:
            out: set[str] = set()
            for body in received["traces"]:
                req = ExportTraceServiceRequest.FromString(body)
                for rs in req.resource_spans:
                    for ss in rs.scope_spans:
                        out.update(s.name for s in ss.spans)
            return out

        def metric_names() -> set[str]:
            out: set[str] = set()
            for body in list(received["metrics"]):
                for rm in ExportMetricsServiceRequest.FromString(body).resource_metrics:
                    for sm in rm.scope_metrics:
                        out.update(x.name for x in sm.metrics)
            return out

        async def arrived() -> bool:
            # The token metric, not any metrics: an export may come before the inference.
            return "invoke_agent scout" in names() and (
                "gen_ai.client.token.usage" in metric_names()
            )

        await wait_until(arrived, within=20, what="spans and metrics at the collector")
        proc.terminate()
    assert {"observe", "plan", "act", "learn", "chat sim-1", "execute_tool search"} <= names()
    req = ExportTraceServiceRequest.FromString(received["traces"][0])
    service = {a.key: a.value.string_value for a in req.resource_spans[0].resource.attributes}
    assert service["service.name"] == "agentos-test"
    metric_names = set()
    for body in received["metrics"]:
        m = ExportMetricsServiceRequest.FromString(body)
        for rm in m.resource_metrics:
            for sm in rm.scope_metrics:
                metric_names.update(x.name for x in sm.metrics)
    assert "gen_ai.client.token.usage" in metric_names
