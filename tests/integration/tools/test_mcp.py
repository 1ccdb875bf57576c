"""MCP tool servers: the ToolServer spec, the daemon's pool of sessions, approvals and the
tool ledger in a toolbox. Every server here is a real child process over stdio
(``tests.mcp_fixture_server``); the daemon-level flows are in ``test_mcp_daemon``."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from agentos.core.chat import ToolCall
from agentos.core.fleet import toolserver_issues
from agentos.core.spec import SpecError, parse_text
from agentos.core.toolserver import model_tool_name
from agentos.core.waits import Resolution, WaitLog, WaitRequested, tool_key
from agentos.engine import SimEngine
from agentos.sdk import LLM
from agentos.telemetry import Telemetry
from agentos.tools import Ledger, Toolbox, ToolError, ToolServerUnavailable, tool
from agentos.tools.mcp import ToolServerPool, server_tool
from tests.helpers import wait_until

pytestmark = [pytest.mark.anyio]

ROOT = str(Path(__file__).resolve().parents[3])


def server_body(name: str, *args: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "agentos/v1",
        "kind": "ToolServer",
        "metadata": {"name": name},
        "spec": {
            "stdio": {"command": ["python", "-m", "tests.mcp_fixture_server", *args]},
            **spec,
        },
    }


def specs_of(*bodies: dict[str, Any]) -> Callable[[], Any]:
    table = {b["metadata"]["name"]: b for b in bodies}

    async def read() -> dict[str, dict[str, Any]]:
        return table

    return read


@pytest.fixture
async def pool(tmp_path: Path) -> AsyncIterator[ToolServerPool]:
    body = server_body("fx", str(tmp_path), timeouts={"call": "3s", "connect": "20s"})
    async with ToolServerPool(specs_of(body), cwd=ROOT) as p:
        yield p


def ran(tmp_path: Path) -> list[str]:
    log = tmp_path / "ran.log"
    return log.read_text().splitlines() if log.exists() else []


# ----------------------------------------------------------------------------- the spec


def issues_of(text: str) -> list[str]:
    try:
        parse_text(text, source="x.yaml")
    except SpecError as e:
        return [str(i) for i in e.issues]
    return []


@pytest.mark.parametrize(
    ("spec", "line", "expected"),
    [
        ("  tools: {}\n", 5, "needs exactly one of: stdio (a command) or url"),
        (
            "  stdio: {command: [a]}\n  url: http://x/mcp\n",
            5,
            "needs exactly one of: stdio (a command) or url",
        ),
        ("  url: http://me:pw@x/mcp\n", 6, "the URL carries a user or password"),
        (
            "  url: https://x/mcp\n  headers: {Authorization: Bearer abc}\n",
            6,
            "looks like a credential",
        ),
        ("  stdio: {command: [a], shell: true}\n", 6, "unknown field"),
        ("  stdio: {command: []}\n", 6, "spec.stdio.command"),
        ("  url: https://x/mcp\n  approval: {onTimeout: maybe}\n", 6, "spec.approval.onTimeout"),
    ],
)
def test_a_bad_toolserver_is_refused_with_file_line_and_path(
    spec: str, line: int, expected: str
) -> None:
    text = "apiVersion: agentos/v1\nkind: ToolServer\nmetadata:\n  name: ws\nspec:\n" + spec
    found = issues_of(text)
    assert any(expected in i and i.startswith("x.yaml:") for i in found), found


def test_a_header_secret_by_reference_and_literal_env_are_accepted() -> None:
    text = (
        "apiVersion: agentos/v1\nkind: ToolServer\nmetadata:\n  name: ws\nspec:\n"
        "  url: https://x/mcp\n"
        "  headers: {Authorization: {env: WS_TOKEN}, X-Team: blue}\n"
        "  approval: {required: [run, write_*], timeout: 10m, onTimeout: approve}\n"
    )
    (doc,) = parse_text(text, source="x.yaml")
    assert doc.canonical()["spec"]["headers"] == {
        "Authorization": {"env": "WS_TOKEN"},
        "X-Team": "blue",
    }
    assert doc.canonical()["spec"]["approval"]["timeout"] == "10m"


def test_an_agent_naming_a_missing_server_or_a_denied_tool_is_refused_at_its_line() -> None:
    server = (
        "apiVersion: agentos/v1\nkind: ToolServer\nmetadata:\n  name: ws\nspec:\n"
        "  stdio: {command: [python, -m, x]}\n  tools: {deny: [run]}\n"
    )
    agent = (
        "apiVersion: agentos/v1\nkind: Agent\nmetadata:\n  name: op\nspec:\n"
        "  entrypoint: m:A\n  tools:\n    servers: [ws, nope]\n"
        "    approval: {required: [ws.run, ws.write_file]}\n"
    )
    docs = [*parse_text(server, source="s.yaml"), *parse_text(agent, source="a.yaml")]
    found = [str(i) for i in toolserver_issues(docs, {})]
    assert any(i.startswith("a.yaml:8: spec.tools.servers[1]") and "nope" in i for i in found)
    assert any(
        i.startswith("a.yaml:9: spec.tools.approval.required[0]") and "'run'" in i for i in found
    ), found
    assert not any("write_file" in i for i in found)


def test_model_names_of_server_tools_fit_function_name_rules() -> None:
    assert model_tool_name("ws", "read_file") == "ws__read_file"
    assert model_tool_name("ws", "files/read.v2") == "ws__files_read_v2"
    long = model_tool_name("a-server", "x" * 100)
    assert len(long) == 64
    assert long.startswith("a-server__x")


# ----------------------------------------------------------------------------- the pool


async def test_the_pool_lists_and_calls_tools_and_reads_errors(pool: ToolServerPool) -> None:
    tools = await pool.tools(["fx"])
    names = {t.name for t in tools}
    assert {"echo", "add", "count", "hang", "crash", "fail"} <= names
    assert await pool.call("fx", "add", {"a": 2, "b": 3}) == "5"
    with pytest.raises(ToolError):
        await pool.call("fx", "fail", {"why": "no"})
    assert pool.open_sessions() == ["fx"]
    assert pool.started == 1
    await pool.tools(["fx"])  # cached: still one session
    assert pool.started == 1


async def test_a_server_that_hangs_or_dies_mid_call_is_infrastructure_and_reopens(
    pool: ToolServerPool, tmp_path: Path
) -> None:
    await pool.tools(["fx"])
    with pytest.raises(ToolServerUnavailable, match=r"'fx'.*hang") as hung:
        await pool.call("fx", "hang", {})
    assert hung.value.server == "fx"
    with pytest.raises(ToolServerUnavailable, match=r"'fx'.*crash.*connection lost"):
        await pool.call("fx", "crash", {"name": "a"})
    assert await pool.call("fx", "echo", {"text": "back"}) == "back"
    assert pool.started == 3  # one per fault: the session is opened again
    assert ran(tmp_path) == ["hang", "crash a"]


@pytest.mark.parametrize(
    ("args", "why"),
    [(("--garbage",), "could not start|did not start"), (("--exit-at-start",), "could not start")],
)
async def test_a_server_that_does_not_start_or_answers_garbage_is_named(
    tmp_path: Path, args: tuple[str, ...], why: str
) -> None:
    body = server_body("bad", str(tmp_path), *args, timeouts={"connect": "3s"})
    async with ToolServerPool(specs_of(body), cwd=ROOT) as p:
        with pytest.raises(ToolServerUnavailable, match=f"tool server 'bad': ({why})"):
            await p.tools(["bad"])
        assert p.open_sessions() == []


async def test_a_missing_command_is_named(tmp_path: Path) -> None:
    body = server_body("gone", timeouts={"connect": "3s"})
    body["spec"]["stdio"]["command"] = ["/nonexistent/server"]
    async with ToolServerPool(specs_of(body)) as p:
        with pytest.raises(ToolServerUnavailable, match="tool server 'gone': could not start"):
            await p.tools(["gone"])


async def test_the_tool_list_is_read_again_when_the_server_says_it_changed(
    pool: ToolServerPool,
) -> None:
    assert "extra" not in {t.name for t in await pool.tools(["fx"])}
    assert await pool.call("fx", "grow", {}) == "grown"

    async def grown() -> bool:
        return "extra" in {t.name for t in await pool.tools(["fx"])}

    await wait_until(grown, within=10, what="the new tool")
    assert pool.started == 1


async def test_allow_deny_and_idempotent_filters(tmp_path: Path) -> None:
    body = server_body(
        "fx",
        str(tmp_path),
        tools={"allow": ["e*", "add", "count"], "deny": ["count"], "idempotent": ["echo"]},
        approval={"required": ["add"], "timeout": "5m"},
    )
    async with ToolServerPool(specs_of(body), cwd=ROOT) as p:
        tools = {t.name: t for t in await p.tools(["fx"])}
        assert set(tools) == {"echo", "add"}
        assert tools["echo"].idempotent
        assert not tools["add"].idempotent
        assert tools["add"].approval
        assert tools["add"].approval_timeout_s == 300
        assert not tools["echo"].approval


async def test_an_idle_server_is_stopped_and_started_again_on_use(tmp_path: Path) -> None:
    body = server_body("fx", str(tmp_path))
    async with ToolServerPool(specs_of(body), cwd=ROOT, idle_s=0.3) as p:
        await p.tools(["fx"])
        assert p.open_sessions() == ["fx"]

        async def closed() -> bool:
            return not p.open_sessions()

        await wait_until(closed, within=10, what="the idle server to stop")
        assert await p.call("fx", "echo", {"text": "again"}) == "again"
        assert p.started == 2


# ----------------------------------------------------------------------------- toolbox


async def toolbox_for(pool: ToolServerPool, log: WaitLog) -> Toolbox:
    box = Toolbox(ledger=Ledger(log))
    box.set_group("fx", [server_tool(t, pool) for t in await pool.tools(["fx"])])
    return box


async def test_server_tools_join_a_toolbox_by_both_names_and_check_arguments_first(
    pool: ToolServerPool, tmp_path: Path
) -> None:
    log = WaitLog(clock=lambda: 0.0)
    log.begin()
    box = await toolbox_for(pool, log)
    assert "fx__add" in box.names
    assert "fx.add" in box
    assert box["fx.add"].name == "fx__add"
    out = await box.run(ToolCall("c1", "fx.add", {"a": 1, "b": 2}))
    assert (out.outcome, out.message["content"]) == ("ok", "3")
    bad = await box.run(ToolCall("c2", "fx__count", {"name": 7}))
    assert bad.outcome == "bad_arguments"
    assert "name" in bad.message["content"]
    assert ran(tmp_path) == []  # never sent to the server
    failed = await box.run(ToolCall("c3", "fx__fail", {"why": "x"}))
    assert failed.outcome == "error"
    with pytest.raises(ToolServerUnavailable):
        await box.run(ToolCall("c4", "fx__crash", {"name": "b"}))


async def test_the_ledger_replays_a_done_call_and_never_reruns_an_interrupted_one(
    pool: ToolServerPool, tmp_path: Path
) -> None:
    log = WaitLog(clock=lambda: 0.0)
    log.begin()
    box = await toolbox_for(pool, log)
    first = await box.run(ToolCall("c1", "fx__count", {"name": "n"}))
    assert first.message["content"] == "1"
    with pytest.raises(ToolServerUnavailable):
        await box.run(ToolCall("c2", "fx__crash", {"name": "z"}))
    recorded = dict(log.tools)
    assert sorted(e["state"] for e in recorded.values()) == ["done", "started"]
    # The task runs again with what was recorded: nothing runs a second time.
    log.begin(tools=recorded)
    again = await box.run(ToolCall("c1", "fx__count", {"name": "n"}))
    assert (again.message["content"], again.replayed) == ("1", True)
    cut = await box.run(ToolCall("c2", "fx__crash", {"name": "z"}))
    assert cut.outcome == "interrupted"
    assert "outcome unknown" in cut.message["content"]
    assert ran(tmp_path) == ["count n", "crash z"]
    # An idempotent tool cut short runs again.
    echo = next(t for t in box if t.name == "fx__echo")
    idem = Toolbox([], ledger=Ledger(log))
    idem.add(dataclasses.replace(echo, idempotent=True))
    key_call = ToolCall("c9", "fx__echo", {"text": "x"})
    log.tool_started(tool_key("c9", "fx__echo", key_call.raw_arguments), "fx.echo")
    assert (await idem.run(key_call)).message["content"] == "x"


async def test_an_approval_parks_and_its_answer_decides(tmp_path: Path) -> None:
    calls: list[str] = []

    @tool(approval=True)
    def deploy(env: str) -> str:
        """Deploy to env."""
        calls.append(env)
        return f"deployed {env}"

    log = WaitLog(clock=lambda: 100.0)
    log.begin()
    box = Toolbox([deploy], ledger=Ledger(log))
    call = ToolCall("d1", "deploy", {"env": "prod"})
    with pytest.raises(WaitRequested) as parked:
        await box.call_all([call])
    spec = parked.value.spec
    assert (spec.tool, json.loads(spec.arguments), spec.choices) == (
        "deploy",
        {"env": "prod"},
        ("yes", "no"),
    )
    assert spec.deadline == 3700.0
    assert spec.default == "no"
    assert calls == []
    log.begin([Resolution("answered", "no", "alice", reason="not on a Friday")])
    (refused,) = await box.call_all([call])
    assert refused["content"].startswith("refused: deploy was not approved, by alice")
    assert "not on a Friday" in refused["content"]
    assert calls == []
    log.begin([Resolution("answered", "yes", "bob")])
    (done,) = await box.call_all([call])
    assert done["content"] == "deployed prod"
    assert calls == ["prod"]
    log.begin([Resolution("timeout", None, "deadline")])
    (late,) = await box.call_all([call])
    assert "nobody answered in time (onTimeout: deny)" in late["content"]
    assert calls == ["prod"]


def test_the_pool_is_infrastructure_for_the_runtime() -> None:
    from agentos.runtime.base import INFRA_ERRORS

    assert issubclass(ToolServerUnavailable, INFRA_ERRORS)


async def test_an_mcp_call_is_one_execute_tool_span_and_metered(
    pool: ToolServerPool, tmp_path: Path
) -> None:
    spans, metrics = InMemorySpanExporter(), InMemoryMetricReader()
    telemetry = Telemetry.from_env(
        "none-but-tests",
        env={},
        span_processors=(SimpleSpanProcessor(spans),),
        metric_readers=(metrics,),
    )
    log = WaitLog(clock=lambda: 0.0)
    log.begin([Resolution("answered", "no", "dana")])
    box = await toolbox_for(pool, log)
    box.telemetry = telemetry
    box.set_group("fx", [dataclasses.replace(t, approval=t.name == "fx__count") for t in box])
    await box.call(ToolCall("c1", "fx__add", {"a": 1, "b": 2}))
    await box.call(ToolCall("c2", "fx__count", {"name": "d"}))
    telemetry.shutdown()
    (span,) = [s for s in spans.get_finished_spans() if s.name == "execute_tool fx.add"]
    attrs = span.attributes or {}
    assert span.kind is SpanKind.INTERNAL
    assert attrs["gen_ai.tool.name"] == "fx.add"
    assert attrs["gen_ai.tool.call.id"] == "c1"
    assert attrs["mcp.method.name"] == "tools/call"
    assert attrs["agentos.tool.server"] == "fx"
    points = {
        (p.attributes["gen_ai.tool.name"], p.attributes["agentos.tool.outcome"]): p.value
        for rm in metrics.get_metrics_data().resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == "agentos.tool.calls"
        for p in m.data.data_points
    }
    assert points == {("fx.add", "ok"): 1, ("fx.count", "denied"): 1}
    assert ran(tmp_path) == []


async def test_a_task_run_again_on_an_older_context_replays_its_chats_and_sends_their_turns() -> (
    None
):
    @tool
    def add(a: int, b: int) -> int:
        """Add."""
        return a + b

    question = [{"role": "user", "content": "2 + 3?"}]
    first = SimEngine()
    first.script("a", ToolCall("c1", "add", {"a": 2, "b": 3}), "5")
    llm = LLM(first, "a")
    log = WaitLog(clock=lambda: 0.0)
    log.begin()
    llm.replay = log
    reply = await llm.chat(question, tools=[add])
    assert [c.id for c in reply.tool_calls] == ["c1"]
    recorded = list(log.made)
    # The daemon died; another one runs the task again on a context without its turns.
    second = SimEngine()
    second.script("a", "five")
    again = LLM(second, "a")
    log.begin((), recorded)
    again.replay = log
    replayed = await again.chat(question, tools=[add])
    assert [c.id for c in replayed.tool_calls] == ["c1"]
    answer = await again.chat(
        [{"role": "tool", "tool_call_id": "c1", "name": "add", "content": "5"}], tools=[add]
    )
    assert answer.content == "five"
    assert [m["role"] for m in again.messages] == ["user", "assistant", "tool", "assistant"]
