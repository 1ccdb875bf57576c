"""The operator example end to end: its MCP server as a real subprocess (stdio, and
Streamable HTTP on loopback), its ToolServer and agent applied from the example's YAML,
scripted tool calls on the sim engine (the default model of these tests), approvals
given through the client as `agentos answer` gives them."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agentos.client import Client
from agentos.core.chat import ToolCall
from agentos.core.spec import Document, load_paths, parse_text
from agentos.engine import SimEngine
from agentos.store import Store
from tests.helpers import agent_doc, apply, finished, running_daemon, wait_until, waiting

pytestmark = [pytest.mark.anyio]

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "examples" / "operator" / "operator.yaml"


def example_docs(workspace: Path) -> list[Document]:
    """The example's documents, its workspace moved to ``workspace``."""
    docs = []
    for doc in load_paths([EXAMPLE]):
        body = doc.canonical()
        if body["kind"] == "ToolServer":
            command = body["spec"]["stdio"]["command"]
            command[command.index("--workspace") + 1] = str(workspace)
        (again,) = parse_text(json.dumps(body), source=doc.source)
        docs.append(again)
    return docs


async def test_the_operator_lists_writes_with_approval_and_reports(
    store: Store, tmp_path: Path
) -> None:
    workspace = tmp_path / "ws"
    engine = SimEngine()
    engine.script(
        "operator",
        ToolCall("c1", "workspace__list_files", {"path": "."}),
        ToolCall("c2", "workspace__write_file", {"path": "notes/status.md", "content": "green"}),
        ToolCall("c3", "workspace__run", {"command": ["rm", "-rf", "notes"]}),
        "I listed the workspace, wrote notes/status.md; running rm was refused.",
    )
    await apply(store, *example_docs(workspace))
    client = Client(store)
    async with running_daemon(store, engine):
        msg = await client.send("operator", "Write a status note saying the build is green")
        task = f"m-{msg}"
        await waiting(store, "operator", task)
        (first,) = [w.to_dict() for w in await client.pending("operator")]
        assert first["tool"] == "workspace.write_file"
        assert first["arguments"] == {"path": "notes/status.md", "content": "green"}
        assert not (workspace / "notes").exists()
        await client.answer("operator", task, yes=True, by="alice")

        async def asks_again() -> bool:
            pending = await client.pending("operator")
            return bool(pending) and pending[0].tool == "workspace.run"

        await wait_until(asks_again, within=40, what="the run approval")
        await client.answer("operator", task, no=True, by="bob", reason="no deletes")
        record = await finished(store, "operator", task)
    assert record["status"] == "succeeded", record
    result = json.loads(record["result"])
    assert result["answer"].startswith("I listed the workspace")
    tools = [a["tool"] for a in result["actions"]]
    assert tools == ["workspace__list_files", "workspace__write_file", "workspace__run"]
    assert result["actions"][1]["result"].startswith("wrote")
    assert result["actions"][2]["result"] == (
        "refused: workspace.run was not approved, by bob: no deletes. It did not run."
    )
    assert (workspace / "notes" / "status.md").read_text() == "green"
    audit = (workspace / ".operator-audit.log").read_text().splitlines()
    assert audit == ["write_file notes/status.md"]  # once, although the task ran 3 times


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    workspace = tmp_path / "http-ws"
    port = free_port()
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "examples.operator.server",
            "--workspace",
            str(workspace),
            "--http",
            str(port),
        ],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield f"http://127.0.0.1:{port}/mcp", workspace
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


async def test_an_agent_uses_the_example_server_over_streamable_http(
    store: Store, http_server: tuple[str, Path]
) -> None:
    url, workspace = http_server
    (server,) = parse_text(
        json.dumps(
            {
                "apiVersion": "agentos/v1",
                "kind": "ToolServer",
                "metadata": {"name": "ws"},
                "spec": {"url": url, "timeouts": {"connect": "5s", "call": "10s"}},
            }
        ),
        source="<ws>",
    )
    agent = agent_doc(
        "http-caller",
        "tests.mcp_agents:ToolCaller",
        triggers=[{"inbox": {}}],
        tools={"servers": ["ws"]},
    )
    await apply(store, server, agent)

    def accepting() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", int(url.rsplit(":", 1)[1].split("/")[0]))) == 0

    async def up() -> bool:
        return accepting()

    await wait_until(up, within=30, what="the HTTP server to listen")
    body = 'ws.write_file {"path": "a.txt", "content": "hello"}; ws.list_files {"path": "."}'
    async with running_daemon(store):
        msg = await Client(store).send("http-caller", body)
        record: dict[str, Any] = await finished(store, "http-caller", f"m-{msg}")
    assert record["status"] == "succeeded", record
    wrote, listed = record["result"].split("\n", 1)
    assert wrote.startswith("wrote")
    assert "a.txt" in listed
    assert (workspace / "a.txt").read_text() == "hello"
