"""A small MCP server for the tool-server tests, with faults on demand.

``python -m tests.mcp_fixture_server DIR [--garbage] [--exit-at-start]``: stdio, its side
effects counted in files under DIR (a call that ran leaves a line in ``DIR/ran.log``).
``--garbage`` writes non-JSON to stdout instead of serving; ``--exit-at-start`` exits at
once. Tools: ``echo``, ``add``, ``count`` (a side effect: not idempotent), ``slow_count``
(the same, answering after ``seconds``), ``crash``
(exits the process mid-call, after recording that it ran), ``hang`` (never answers),
``fail`` (an ``isError`` result), ``grow`` (adds a tool and says the list changed).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import anyio
from mcp.server.mcpserver import Context, MCPServer
from pydantic import Field


def main() -> None:
    root = Path(sys.argv[1])
    root.mkdir(parents=True, exist_ok=True)
    if "--exit-at-start" in sys.argv:
        sys.exit(3)
    if "--garbage" in sys.argv:
        sys.stdout.write("this is not JSON-RPC\n{broken\n")
        sys.stdout.flush()
        sys.stdin.read()
        return
    server = MCPServer("fixture")

    def ran(what: str) -> None:
        with open(root / "ran.log", "a") as f:
            f.write(what + "\n")

    @server.tool()
    def echo(text: str) -> str:
        """Return the text as it was given."""
        return text

    @server.tool()
    def add(a: int, b: Annotated[int, Field(description="the second number")]) -> int:
        """Add two integers."""
        return a + b

    @server.tool()
    def count(name: str) -> int:
        """Count one more of name (a side effect)."""
        path = root / f"count-{name}"
        value = int(path.read_text()) + 1 if path.exists() else 1
        path.write_text(str(value))
        ran(f"count {name}")
        return value

    @server.tool()
    async def slow_count(name: str, seconds: float) -> int:
        """Count one more of name (a side effect), then take its time to answer."""
        value = count(name)
        await anyio.sleep(seconds)  # the slow tool under test: its answer takes this long
        return value

    @server.tool()
    async def crash(name: str) -> str:
        """Record that it ran, then exit the server in the middle of the call."""
        ran(f"crash {name}")
        os._exit(1)

    @server.tool()
    async def hang() -> str:
        """Never answer."""
        ran("hang")
        await anyio.sleep_forever()
        return "never"

    @server.tool()
    def fail(why: str) -> str:
        """Fail with the reason given."""
        raise ValueError(f"failed: {why}")

    @server.tool()
    async def grow(ctx: Context) -> str:
        """Add a tool called extra and tell the client the list changed."""

        def extra() -> str:
            """A tool that was not there at first."""
            return "extra!"

        server.add_tool(extra)
        await ctx.session.send_tool_list_changed()
        return "grown"

    server.run("stdio")


if __name__ == "__main__":
    main()
