"""OpenTelemetry in tests: a real OTLP/HTTP receiver and fresh global providers.

Shared by the telemetry and tracing tests (whichever tier they sit in), so that no test
module imports another for its fixtures.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.metrics import _internal as metrics_internal
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.util._once import Once
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.helpers import free_port


@pytest.fixture
def collector() -> Iterator[tuple[int, dict[str, list[bytes]]]]:
    """An OTLP/HTTP receiver on loopback that keeps the raw protobuf bodies."""
    import uvicorn

    received: dict[str, list[bytes]] = {"traces": [], "metrics": []}

    async def traces(request: Request) -> Response:
        received["traces"].append(await request.body())
        return Response(b"", media_type="application/x-protobuf")

    async def metrics(request: Request) -> Response:
        received["metrics"].append(await request.body())
        return Response(b"", media_type="application/x-protobuf")

    app = Starlette(
        routes=[
            Route("/v1/traces", traces, methods=["POST"]),
            Route("/v1/metrics", metrics, methods=["POST"]),
        ]
    )

    class Server(uvicorn.Server):
        """Says when it listens."""

        up = threading.Event()

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            self.up.set()

    port = free_port()
    server = Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert server.up.wait(timeout=10), "the collector did not start"
    try:
        yield port, received
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def reset_globals() -> None:
    """Forget the global providers (what opentelemetry-test-utils does between tests)."""
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None
    trace._PROXY_TRACER_PROVIDER = trace.ProxyTracerProvider()
    metrics_internal._METER_PROVIDER_SET_ONCE = Once()
    metrics_internal._METER_PROVIDER = None
    metrics_internal._PROXY_METER_PROVIDER = metrics_internal._ProxyMeterProvider()


@pytest.fixture
def fresh_globals() -> Iterator[None]:
    reset_globals()
    try:
        yield
    finally:
        reset_globals()


def spans_of(bodies: list[bytes]) -> list[Any]:
    """Every span in the OTLP trace export bodies ``bodies``."""
    return [
        s
        for body in bodies
        for rs in ExportTraceServiceRequest.FromString(body).resource_spans
        for ss in rs.scope_spans
        for s in ss.spans
    ]
