"""An MCP server that says what trace context each call carried, for the telemetry tests.

``python -m tests.mcp_trace_server`` serves stdio; ``... --http`` serves Streamable HTTP
on a free loopback port and prints ``port N`` once it listens. Tool ``trace``: the
``traceparent`` of the request's ``_meta`` and of its HTTP headers (empty when absent).
"""

from __future__ import annotations

import asyncio
import sys

from mcp.server.mcpserver import Context, MCPServer


def build() -> MCPServer:
    server = MCPServer("trace")

    @server.tool()
    def trace(ctx: Context) -> dict[str, str]:
        """The trace context this call carried."""
        meta = ctx.request_context.meta or {}
        headers = ctx.headers or {}
        return {
            "meta": str(meta.get("traceparent", "")),
            "header": str(headers.get("traceparent", "")),
        }

    return server


def serve_http(server: MCPServer) -> None:
    import socket

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    print(f"port {sock.getsockname()[1]}", flush=True)  # listening: connections wait for us
    config = uvicorn.Config(server.streamable_http_app(), log_level="warning")
    asyncio.run(uvicorn.Server(config).serve(sockets=[sock]))


def main() -> None:
    server = build()
    if "--http" in sys.argv:
        serve_http(server)
    else:
        server.run()


if __name__ == "__main__":
    main()
