"""A tool call to an MCP server carries its task's trace context (issue 25, item 7).

Real servers (``tests.mcp_trace_server``, a child process over stdio or Streamable HTTP)
say what they received: the ``traceparent`` of the request's ``_meta`` (MCP's SEP-414)
and, over HTTP, of its headers. Both name the trace of the task that made the call.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agentos.client import Client
from agentos.core.spec import parse_text
from agentos.store import Store
from agentos.telemetry import Telemetry
from agentos.tools.mcp import ToolServerPool
from tests.helpers import agent_doc, apply, finished, running_daemon

pytestmark = [pytest.mark.anyio]

ROOT = Path(__file__).resolve().parents[3]
TIMEOUTS = {"call": "5s", "connect": "20s"}


@pytest.fixture
def http_server() -> Iterator[str]:
    """``tests.mcp_trace_server --http`` on a free loopback port: its MCP URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.mcp_trace_server", "--http"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("port "), line
        yield f"http://127.0.0.1:{int(line.split()[1])}/mcp"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def server_spec(transport: str, url: str) -> dict[str, Any]:
    if transport == "stdio":
        return {"stdio": {"command": ["python", "-m", "tests.mcp_trace_server"]}}
    return {"url": url}


def toolserver(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "agentos/v1",
        "kind": "ToolServer",
        "metadata": {"name": name},
        "spec": {**spec, "timeouts": TIMEOUTS},
    }


def trace_id(traceparent: str) -> str:
    version, trace, span, flags = traceparent.split("-")
    assert (version, len(trace), len(span)) == ("00", 32, 16), traceparent
    assert int(flags, 16) & 1, f"not sampled: {traceparent}"
    return trace


@pytest.mark.parametrize("transport", ["stdio", "http"])
async def test_a_pool_call_carries_the_callers_trace_context(
    transport: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("http_server") if transport == "http" else ""
    spans = InMemorySpanExporter()
    telemetry = Telemetry.from_env(
        "tests-only", env={}, span_processors=(SimpleSpanProcessor(spans),)
    )
    body = toolserver("tr", server_spec(transport, url))

    async def specs() -> dict[str, dict[str, Any]]:
        return {"tr": body}

    async with ToolServerPool(specs, cwd=str(ROOT), trace_headers=telemetry.trace_headers) as pool:
        await pool.tools(["tr"])
        with telemetry.tool("tr.trace") as span:
            got = await pool.call("tr", "trace", {})
        outside = await pool.call("tr", "trace", {})
    telemetry.shutdown()
    seen = got if isinstance(got, dict) else json.loads(got)
    want = f"{span.get_span_context().trace_id:032x}"
    assert trace_id(seen["meta"]) == want
    if transport == "http":
        assert seen["header"] == seen["meta"]
    else:
        assert seen["header"] == ""
    # Outside any span, nothing names a trace.
    blank = outside if isinstance(outside, dict) else json.loads(outside)
    assert blank == {"meta": "", "header": ""}


async def test_an_agents_mcp_call_is_in_its_tasks_trace(store: Store, http_server: str) -> None:
    spans = InMemorySpanExporter()
    telemetry = Telemetry.from_env(
        "tests-only", env={}, span_processors=(SimpleSpanProcessor(spans),)
    )
    (server,) = parse_text(json.dumps(toolserver("tr", server_spec("http", http_server))))
    caller = agent_doc(
        "caller", "tests.mcp_agents:ToolCaller", triggers=[{"inbox": {}}], tools={"servers": ["tr"]}
    )
    await apply(store, server, caller)
    async with running_daemon(store, telemetry=telemetry):
        msg = await Client(store).send("caller", "tr.trace {}")
        record = await finished(store, "caller", f"m-{msg}")
    telemetry.shutdown()
    assert record["status"] == "succeeded", record
    seen = json.loads(record["result"])
    (task,) = [s for s in spans.get_finished_spans() if s.name == "invoke_agent caller"]
    assert task.context is not None
    want = f"{task.context.trace_id:032x}"
    assert trace_id(seen["meta"]) == want
    assert seen["header"] == seen["meta"]
