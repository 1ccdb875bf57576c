"""Libraries an agent uses join its trace: the issue's "done when" for telemetry on the SDK.

An httpx call made in an agent's ``act``, traced by the standard httpx instrumentation
(which uses the global tracer provider), arrives at a real OTLP receiver as a child of
that task's ``act`` span, and the request carries its ``traceparent``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry import metrics, trace
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.sdk.trace import TracerProvider

from agentos.client import Client
from agentos.engine import SimEngine
from agentos.store import Store
from agentos.telemetry import Telemetry
from tests.helpers import agent_doc, apply, running_daemon
from tests.otel_support import (  # fixtures, and re-exported: modules import them from here
    collector as collector,
)
from tests.otel_support import fresh_globals as fresh_globals
from tests.otel_support import spans_of as _spans

pytestmark = pytest.mark.anyio


@pytest.fixture
def web() -> Iterator[tuple[str, list[str]]]:
    """A tiny HTTP server on loopback; keeps the ``traceparent`` of each request."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("traceparent", ""))
            body = b"ok"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/page", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


async def test_an_httpx_call_in_act_is_a_child_of_the_act_span(
    store: Store,
    fresh_globals: None,
    collector: tuple[int, dict[str, list[bytes]]],
    web: tuple[str, list[str]],
) -> None:
    port, received = collector
    url, seen = web
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }
    telemetry = Telemetry.from_env(env=env)
    assert trace.get_tracer_provider() is telemetry.tracer_provider  # libraries export with us
    assert metrics.get_meter_provider() is telemetry.meter_provider
    instrumentor = HTTPXClientInstrumentor()
    instrumentor.instrument()
    try:
        await apply(
            store, agent_doc("fetch", "tests.otel_agents:Fetcher", triggers=[{"inbox": {}}])
        )
        async with running_daemon(store, SimEngine(), telemetry=telemetry):
            msg_id = await Client(store).send("fetch", url)
            await Client(store).wait_task("fetch", f"m-{msg_id}", timeout_s=10)
    finally:
        instrumentor.uninstrument()
        telemetry.shutdown(timeout_s=20)
    spans = _spans(received["traces"])
    (act,) = [s for s in spans if s.name == "act"]
    (get,) = [s for s in spans if s.name == "GET"]
    (root,) = [s for s in spans if s.name == "invoke_agent fetch"]
    assert get.trace_id == act.trace_id == root.trace_id
    assert get.parent_span_id == act.span_id
    assert act.parent_span_id == root.span_id
    # The request carried the httpx span's context to the server.
    (traceparent,) = seen
    assert traceparent.split("-")[1:3] == [get.trace_id.hex(), get.span_id.hex()]


def test_a_provider_set_before_stays_the_global_one(fresh_globals: None) -> None:
    theirs = TracerProvider()
    trace.set_tracer_provider(theirs)
    t = Telemetry.from_env("console", env={})
    try:
        assert t.enabled
        assert trace.get_tracer_provider() is theirs
    finally:
        t.shutdown(timeout_s=1)
        theirs.shutdown()
