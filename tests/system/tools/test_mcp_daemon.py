"""Agents of a daemon use MCP tool servers: calls, approvals, and calls never run twice.

The servers are real child processes (``tests.mcp_fixture_server`` over stdio); the
daemons run in-process with the sim engine (scripted tool calls), or as ``agentos
daemon`` subprocesses where one is SIGKILLed mid-call.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from agentos.client import Client
from agentos.core.chat import ToolCall
from agentos.core.spec import Document, parse_text
from agentos.engine import SimEngine
from agentos.store import Store
from tests.cli_support import base_env, cli, show, spawn
from tests.helpers import agent_doc, apply, finished, running_daemon, wait_until, waiting

pytestmark = [pytest.mark.anyio]


def toolserver(name: str, root: Path, *args: str, **spec: Any) -> Document:
    body = {
        "apiVersion": "agentos/v1",
        "kind": "ToolServer",
        "metadata": {"name": name},
        "spec": {
            "stdio": {"command": ["python", "-m", "tests.mcp_fixture_server", str(root), *args]},
            "timeouts": {"call": "5s", "connect": "20s"},
            **spec,
        },
    }
    (doc,) = parse_text(json.dumps(body), source=f"<{name}>")
    return doc


def caller(name: str = "caller", **spec: Any) -> Document:
    return agent_doc(
        name,
        "tests.mcp_agents:ToolCaller",
        triggers=[{"inbox": {}}],
        tools={"servers": ["fx"], **spec},
    )


def ran(root: Path) -> list[str]:
    log = root / "ran.log"
    return log.read_text().splitlines() if log.exists() else []


async def test_the_model_calls_server_tools_through_ctx_llm_run(
    store: Store, tmp_path: Path
) -> None:
    engine = SimEngine()
    engine.script(
        "modeler",
        ToolCall("t1", "fx__add", {"a": 20, "b": 22}),
        [ToolCall("t2", "fx__count", {"name": "m"}), ToolCall("t3", "fx__echo", {"text": "hi"})],
        "the answer is 42",
    )
    doc = agent_doc(
        "modeler",
        "tests.mcp_agents:ModelToolUser",
        triggers=[{"inbox": {}}],
        tools={"servers": ["fx"]},
    )
    await apply(store, toolserver("fx", tmp_path), doc)
    async with running_daemon(store, engine):
        msg = await Client(store).send("modeler", "what is 20 + 22?")
        record = await finished(store, "modeler", f"m-{msg}")
        conversation = engine.conversation("modeler")
    assert record["status"] == "succeeded", record
    assert record["result"] == "the answer is 42"
    tool_messages = [m for m in conversation if m["role"] == "tool"]
    assert [m["content"] for m in tool_messages] == ["42", "1", "hi"]
    assert ran(tmp_path) == ["count m"]


async def test_an_approval_parks_shows_the_call_and_a_yes_runs_it_exactly_once(
    store: Store, tmp_path: Path
) -> None:
    await apply(store, toolserver("fx", tmp_path, approval={"required": ["count"]}), caller())
    client = Client(store)
    async with running_daemon(store):
        msg = await client.send("caller", 'fx.echo {"text": "a"}; fx.count {"name": "k"}')
        task = f"m-{msg}"
        await waiting(store, "caller", task)
        (pending,) = await client.pending("caller")
        shown = pending.to_dict()
        assert (shown["tool"], shown["arguments"], shown["choices"]) == (
            "fx.count",
            {"name": "k"},
            ["yes", "no"],
        )
        assert ran(tmp_path) == []  # nothing of the iteration ran twice, and count not yet
        await client.answer("caller", task, yes=True, by="alice")
        record = await finished(store, "caller", task)
        with pytest.raises(Exception, match="not waiting"):
            await client.answer("caller", task, yes=True, by="alice")
    assert record["status"] == "succeeded", record
    assert record["result"] == "a\n1"
    assert ran(tmp_path) == ["count k"]
    assert (tmp_path / "count-k").read_text() == "1"


async def test_a_no_gives_the_model_a_refusal_with_who_and_why(
    store: Store, tmp_path: Path
) -> None:
    await apply(store, toolserver("fx", tmp_path), caller(approval={"required": ["fx.count"]}))
    client = Client(store)
    async with running_daemon(store):
        msg = await client.send("caller", 'fx.count {"name": "k"}')
        task = f"m-{msg}"
        await waiting(store, "caller", task)
        await client.answer("caller", task, no=True, by="bob", reason="not on a Friday")
        record = await finished(store, "caller", task)
    assert record["status"] == "succeeded", record
    assert record["result"] == (
        "refused: fx.count was not approved, by bob: not on a Friday. It did not run."
    )
    assert ran(tmp_path) == []


async def test_an_approval_survives_a_daemon_restart(store: Store, tmp_path: Path) -> None:
    await apply(store, toolserver("fx", tmp_path, approval={"required": ["count"]}), caller())
    client = Client(store)
    async with running_daemon(store):
        msg = await client.send("caller", 'fx.count {"name": "r"}')
        task = f"m-{msg}"
        await waiting(store, "caller", task)
    assert [w.tool for w in await client.pending()] == ["fx.count"]
    await client.answer("caller", task, yes=True, by="carol")
    async with running_daemon(store):
        record = await finished(store, "caller", task)
    assert record["status"] == "succeeded", record
    assert record["result"] == "1"
    assert ran(tmp_path) == ["count r"]


async def test_a_server_killed_mid_call_retries_the_task_without_running_the_call_again(
    store: Store, tmp_path: Path
) -> None:
    await apply(store, toolserver("fx", tmp_path), caller())
    async with running_daemon(store):
        msg = await Client(store).send("caller", 'fx.crash {"name": "x"}; fx.add {"a": 1, "b": 1}')
        record = await finished(store, "caller", f"m-{msg}")
        status = await store.agents.status("caller")
    assert record["status"] == "succeeded", record
    assert record["result"].startswith("interrupted: outcome unknown (fx.crash was running")
    assert record["result"].endswith("\n2")
    assert ran(tmp_path) == ["crash x"]  # not run again by the retry
    events = [e for e in await store.events.read("caller") if e.type == "InfrastructureError"]
    assert events, "the retry says why"
    assert "tool server 'fx'" in events[0].message
    assert status.get("phase") != "Failed"
    assert int(status.get("restarts") or 0) == 0  # not the agent's fault


async def test_a_server_that_does_not_start_parks_the_task_with_an_event_naming_it(
    store: Store, tmp_path: Path
) -> None:
    bad = toolserver("fx", tmp_path, "--exit-at-start", timeouts={"connect": "3s"})
    await apply(store, bad, caller())
    async with running_daemon(store):
        msg = await Client(store).send("caller", 'fx.echo {"text": "a"}')

        async def parked() -> list[Any]:
            return [e for e in await store.events.read("caller") if e.type == "InfrastructureError"]

        (event, *_) = await wait_until(parked, within=30, what="an infrastructure event")
        record = await store.tasks.get("caller", f"m-{msg}")
        status = await store.agents.status("caller")
    assert "tool server 'fx'" in event.message
    assert "could not start" in event.message
    assert record["status"] == "retrying"
    assert status.get("phase") != "Failed"


async def test_a_sigkilled_daemon_never_runs_a_non_idempotent_call_twice(
    redis_url: str, namespace: str, store: Store, tmp_path: Path
) -> None:
    root = tmp_path / "ws"
    await apply(store, toolserver("fx", root, timeouts={"call": "60s"}), caller())
    env = {
        **base_env(tmp_path / "home"),
        "AGENTOS_REDIS_URL": redis_url,
        "AGENTOS_NAMESPACE": namespace,
    }
    fast = ("--lease-ttl", "1s", "--grace", "500ms")
    msg = await Client(store).send("caller", 'fx.slow_count {"name": "s", "seconds": 60}')
    task = f"m-{msg}"
    with spawn(env, tmp_path / "d0.log", "daemon", "--id", "d0", *fast) as d0:

        async def started() -> bool:
            return (root / "count-s").exists()

        await wait_until(started, within=40, what="the call to start")
        d0.send_signal(signal.SIGKILL)
        d0.wait(timeout=10)
    with spawn(env, tmp_path / "d1.log", "daemon", "--id", "d1", *fast) as d1:
        record = await finished(store, "caller", task)
        tasks = await cli(env, "tasks", "caller", "-o", "json")
        d1.send_signal(signal.SIGTERM)
        d1.wait(timeout=20)
    assert tasks.returncode == 0, show(tasks)
    assert record["status"] == "succeeded", record
    assert "interrupted: outcome unknown" in record["result"]
    assert (root / "count-s").read_text() == "1"
    assert ran(root) == ["count s"]


async def test_the_cli_lists_describes_and_answers_tool_approvals(
    redis_url: str, namespace: str, store: Store, tmp_path: Path
) -> None:
    server = toolserver("fx", tmp_path, approval={"required": ["count"], "timeout": "10m"})
    await apply(store, server, caller())
    env = {
        **base_env(tmp_path / "home"),
        "AGENTOS_REDIS_URL": redis_url,
        "AGENTOS_NAMESPACE": namespace,
    }
    listed = await cli(env, "get", "toolservers")
    assert listed.returncode == 0, show(listed)
    (row,) = [line for line in listed.stdout.splitlines() if line.strip().startswith("fx")]
    assert "stdio" in row
    assert "count" in row
    described = await cli(env, "describe", "toolserver", "fx", "-o", "json")
    assert described.returncode == 0, show(described)
    detail = json.loads(described.stdout)
    assert detail["agents"] == ["caller"]
    assert detail["spec"]["approval"]["timeout"] == "10m"
    agent = await cli(env, "describe", "agent", "caller")
    assert agent.returncode == 0, show(agent)
    assert "Tool servers:  fx" in agent.stdout
    missing = await cli(env, "describe", "toolserver", "nope")
    assert missing.returncode == 1
    assert "not found" in missing.stderr
    refused = await cli(env, "delete", "toolserver", "fx")
    assert refused.returncode == 1
    assert "used by agents: caller" in refused.stderr
    async with running_daemon(store):
        msg = await Client(store).send("caller", 'fx.count {"name": "q"}')
        task = f"m-{msg}"
        await waiting(store, "caller", task)
        table = await cli(env, "pending")
        assert table.returncode == 0, show(table)
        (line,) = [ln for ln in table.stdout.splitlines() if ln.startswith("caller")]
        assert line.split()[2:4] == ["approval", 'fx.count({"name":']
        (item,) = json.loads((await cli(env, "pending", "-o", "json")).stdout)
        assert (item["tool"], item["arguments"]) == ("fx.count", {"name": "q"})
        no = await cli(
            env, "answer", "caller", task, "--no", "--reason", "too risky", "--as", "eve"
        )
        assert no.returncode == 0, show(no)
        assert "(by eve: too risky)" in no.stdout
        record = await finished(store, "caller", task)
    assert (
        record["result"] == "refused: fx.count was not approved, by eve: too risky. It did not run."
    )
    assert ran(tmp_path) == []
