"""Model calls carry the trace context: a request to an OpenAI-compatible server made in
a task arrives with a ``traceparent`` naming that task's inference span (so a server that
traces, like vLLM, continues the agent's trace), and none when telemetry is off."""

from __future__ import annotations

import pytest

from agentos.client import Client
from agentos.store import Store
from agentos.telemetry import Telemetry
from tests.helpers import agent_doc, apply, policy_doc, running_daemon
from tests.openai_server import openai_server
from tests.otel_support import collector, fresh_globals
from tests.otel_support import spans_of as _spans

__all__ = ["collector", "fresh_globals"]

pytestmark = pytest.mark.anyio


def _model(url: str) -> dict[str, object]:
    spec = {"engine": "openai", "endpoints": [{"url": url}]}
    return {
        "apiVersion": "agentos/v1",
        "kind": "Model",
        "metadata": {"name": "remote"},
        "spec": spec,
    }


async def _ask_once(store: Store, telemetry: Telemetry | None) -> list[str]:
    with openai_server() as server:
        await apply(
            store,
            policy_doc(_model(server.url)),
            agent_doc(
                "asker",
                "tests.fixture_agents:Echo",
                model="remote",
                config={"llm": True},
                triggers=[{"inbox": {}}],
            ),
        )
        async with running_daemon(store, telemetry=telemetry):
            sent = await Client(store).send("asker", "hello")
            await Client(store).wait_task("asker", f"m-{sent}", timeout_s=20)
        return list(server.behaviour.traceparents)


async def test_a_model_call_continues_the_tasks_trace_at_the_server(
    store: Store,
    fresh_globals: None,
    collector: tuple[int, dict[str, list[bytes]]],
) -> None:
    port, received = collector
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }
    telemetry = Telemetry.from_env(env=env)
    try:
        (traceparent,) = await _ask_once(store, telemetry)
    finally:
        telemetry.shutdown(timeout_s=20)
    spans = _spans(received["traces"])
    (call,) = [s for s in spans if s.name.endswith(" remote")]
    version, trace_id, span_id, _flags = traceparent.split("-")
    assert version == "00"
    assert (trace_id, span_id) == (call.trace_id.hex(), call.span_id.hex())


async def test_no_trace_context_leaves_with_telemetry_off(store: Store) -> None:
    assert await _ask_once(store, None) == [""]
