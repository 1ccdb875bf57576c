"""Tools in the SDK: schemas from type hints, the toolbox, ``ctx.llm.chat`` and the tool loop.

The model's side is the sim engine with scripted replies (the real engines have their own
tests): each fault a model or a tool can make comes back to the model as an error result,
never as an agent crash.
"""

from __future__ import annotations

import threading
import time
from typing import Annotated, Any

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import Field

import agentos
from agentos import Reply, ToolCall, tool
from agentos.engine import SimEngine
from agentos.telemetry import Telemetry
from agentos.testing import AgentHarness
from tests.fixture_agents import work

pytestmark = pytest.mark.anyio

CALLS: list[tuple[str, Any]] = []


@tool
def add(a: int, b: int) -> int:
    """Add two integers.

    More text that is not the description.
    """
    CALLS.append(("add", (a, b)))
    return a + b


@tool(timeout="200ms")
async def slow(seconds: float) -> str:
    """Sleep, then say so."""
    await work(seconds)
    return "slept"


@tool
def explode(reason: str) -> str:
    """Always fails."""
    raise RuntimeError(f"boom: {reason}")


@tool(name="where-am-i")
def where() -> str:
    """The thread the tool runs in."""
    return threading.current_thread().name


@tool
async def lookup(
    city: Annotated[str, Field(description="A city name")], units: str = "metric"
) -> dict[str, Any]:
    """Weather for a city."""
    return {"city": city, "units": units, "temp": 21}


class Worker(agentos.Agent):
    tools = (add, slow, explode, where, lookup)

    async def act(self, ctx: agentos.Context, plan: Any) -> Any:
        reply = await ctx.llm.run(
            [
                {"role": "system", "content": "You use tools."},
                {"role": "user", "content": plan.body},
            ],
            max_steps=int(ctx.config.get("max_steps", 8)),
        )
        ctx.state["steps"] = sum(1 for m in ctx.llm.messages if m["role"] == "assistant")
        ctx.state["tool_results"] = [m["content"] for m in ctx.llm.messages if m["role"] == "tool"]
        ctx.state["left"] = [c.name for c in reply.tool_calls]
        return reply.content


def harness(**config: Any) -> AgentHarness:
    return AgentHarness(Worker, config=config, engine=SimEngine.like_llama())


# ---------------------------------------------------------------------- @tool


def test_schema_and_description_come_from_hints_and_docstring() -> None:
    assert add.name == "add"
    assert add.description == "Add two integers."
    assert add.parameters == {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"],
        "additionalProperties": False,
    }
    assert lookup.parameters["properties"]["city"]["description"] == "A city name"
    assert lookup.parameters["required"] == ["city"]
    assert where.name == "where-am-i"
    assert slow.timeout_s == pytest.approx(0.2)
    assert add(2, 3) == 5  # still callable as a function


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda: tool(name="9lives")(lambda: 1), "'9lives'"),
        (lambda: tool(name="has space")(lambda: 1), "not a valid function name"),
        (lambda: tool(name="splat")(lambda *args: 1), "*args"),
        (lambda: tool(_takes_a_lock), "cannot be described as JSON Schema"),
        (lambda: tool(name="t", timeout=0)(lambda: 1), "timeout must be positive"),
    ],
)
def test_bad_tools_are_refused_by_name(make: Any, says: str) -> None:
    with pytest.raises(ValueError, match=says.replace("*", r"\*")):
        make()


def _takes_a_lock(lock: threading.Lock) -> None:  # type: ignore[valid-type]
    """Not describable."""


def test_two_tools_with_one_name_are_refused() -> None:
    other = tool(name="add")(lambda a, b: a - b)
    box = agentos.Toolbox([add])
    with pytest.raises(ValueError, match="two tools are named 'add'"):
        box.extend([other])
    assert box.names == ["add"]  # nothing added


async def test_an_agent_whose_tools_clash_fails_to_start_clearly() -> None:
    class Clash(agentos.Agent):
        tools = (add, tool(name="add")(lambda: 0))

    with pytest.raises(ValueError, match="two tools are named 'add'"):
        AgentHarness(Clash)


# ---------------------------------------------------------------------- the toolbox


async def test_a_sync_tool_runs_in_a_worker_thread() -> None:
    box = agentos.Toolbox([where])
    result = await box.call(ToolCall(id="c1", name="where-am-i"))
    assert result["role"] == "tool"
    assert result["tool_call_id"] == "c1"
    assert result["content"] != threading.main_thread().name


async def test_every_fault_is_an_error_result_for_the_model() -> None:
    box = agentos.Toolbox([add, slow, explode])
    unknown = await box.run(ToolCall(id="u", name="nope", arguments={}))
    assert unknown.outcome == "unknown_tool"
    assert "unknown tool 'nope'" in unknown.message["content"]
    assert "add, slow, explode" in unknown.message["content"]
    bad = await box.run(ToolCall(id="b", name="add", arguments={"a": "x", "b": 2}))
    assert bad.outcome == "bad_arguments"
    assert "a: Input should be a valid integer" in bad.message["content"]
    extra = await box.run(ToolCall(id="e", name="add", arguments={"a": 1, "b": 2, "c": 3}))
    assert extra.outcome == "bad_arguments"
    assert "c: Extra inputs" in extra.message["content"]
    malformed = await box.run(ToolCall.parse("m", "add", '{"a": 1, "b": '))
    assert malformed.outcome == "bad_arguments"
    assert '{"a": 1, "b": ' in malformed.message["content"]
    raised = await box.run(ToolCall(id="r", name="explode", arguments={"reason": "x"}))
    assert raised.outcome == "error"
    assert raised.message["content"] == "error: explode raised RuntimeError: boom: x"
    started = time.monotonic()
    late = await box.run(ToolCall(id="t", name="slow", arguments={"seconds": 5}))
    assert late.outcome == "timeout"
    assert "timed out after 0.2 s" in late.message["content"]
    assert time.monotonic() - started < 2


async def test_tool_calls_are_spans_and_counted() -> None:
    spans, metrics = InMemorySpanExporter(), InMemoryMetricReader()
    telemetry = Telemetry.from_env(
        "none-but-tests",
        env={"OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": "true"},
        span_processors=(SimpleSpanProcessor(spans),),
        metric_readers=(metrics,),
    )
    box = agentos.Toolbox([add, explode], telemetry=telemetry)
    await box.call(ToolCall(id="c1", name="add", arguments={"a": 1, "b": 2}))
    await box.call(ToolCall(id="c2", name="explode", arguments={"reason": "r"}))
    telemetry.shutdown()
    by_name = {s.name: s for s in spans.get_finished_spans()}
    ok = by_name["execute_tool add"].attributes or {}
    assert ok["gen_ai.tool.name"] == "add"
    assert ok["gen_ai.tool.call.id"] == "c1"
    assert ok["gen_ai.tool.type"] == "function"
    if telemetry.capture_content:
        assert ok["gen_ai.tool.call.result"] == "3"
    failed = by_name["execute_tool explode"].attributes or {}
    assert failed["error.type"] == "error"
    points = {
        (p.attributes["gen_ai.tool.name"], p.attributes["agentos.tool.outcome"]): p.value
        for rm in metrics.get_metrics_data().resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == "agentos.tool.calls"
        for p in m.data.data_points
    }
    assert points == {("add", "ok"): 1, ("explode", "error"): 1}


# ---------------------------------------------------------------------- chat and the loop


async def test_bad_messages_are_refused_before_any_call() -> None:
    engine = SimEngine.like_llama()
    h = AgentHarness(Worker, engine=engine)
    llm = h.llm
    with pytest.raises(ValueError, match=r"messages\[1\]: unknown role 'robot'"):
        await llm.chat([{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match=r"messages\[0\].*answers no earlier assistant tool call"):
        await llm.chat([{"role": "tool", "tool_call_id": "c9", "content": "4"}])
    with pytest.raises(ValueError, match=r"tool_choice 'nope'"):
        await llm.chat([{"role": "user", "content": "hi"}], tools=[add], tool_choice="nope")
    assert engine.stats.generations == 0
    assert engine.stats.prefill_tokens == 0
    assert llm.messages == []


async def test_a_tool_loop_runs_the_calls_and_returns_the_answer() -> None:
    CALLS.clear()
    h = harness()
    h.script(ToolCall(id="c1", name="add", arguments={"a": 2, "b": 3}), "The sum is 5.")
    result = await h.message("what is 2+3?")
    assert result.outcome == "The sum is 5."
    assert CALLS == [("add", (2, 3))]
    assert h.state["tool_results"] == ["5"]
    roles = [m["role"] for m in h.llm.messages]
    assert roles == ["system", "user", "assistant", "tool", "assistant"]
    assert h.llm.messages[2]["tool_calls"][0]["function"] == {
        "name": "add",
        "arguments": '{"a": 2, "b": 3}',
    }


async def test_parallel_calls_run_concurrently_and_answer_in_order() -> None:
    h = harness()
    h.script(
        [
            ToolCall(id="p1", name="slow", arguments={"seconds": 0.15}),
            ToolCall(id="p2", name="lookup", arguments={"city": "Paris"}),
            ToolCall(id="p3", name="slow", arguments={"seconds": 0.15}),
        ],
        "done",
    )
    started = time.monotonic()
    result = await h.message("go")
    assert time.monotonic() - started < 1.0  # 2 x 0.15 s slept at once, not in a row
    assert result.outcome == "done"
    tools = [m for m in h.llm.messages if m["role"] == "tool"]
    assert [m["tool_call_id"] for m in tools] == ["p1", "p2", "p3"]
    assert tools[1]["content"] == '{"city":"Paris","units":"metric","temp":21}'


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (ToolCall(id="x", name="explode", arguments={"reason": "r"}), "error: explode raised"),
        (ToolCall(id="x", name="rm_rf", arguments={}), "error: unknown tool 'rm_rf'"),
        (ToolCall(id="x", name="add", arguments={"a": 1}), "error: invalid arguments for add"),
        (ToolCall(id="x", name="slow", arguments={"seconds": 3}), "error: slow timed out"),
    ],
    ids=["raises", "unknown", "bad-arguments", "timeout"],
)
async def test_a_faulty_call_is_an_error_result_not_a_crash(call: ToolCall, expected: str) -> None:
    h = harness()
    h.script(call, "recovered")
    result = await h.message("go")
    assert result.outcome == "recovered"
    assert h.state["tool_results"][0].startswith(expected)
    assert h.tasks[-1].outcome == "recovered"


async def test_max_steps_stops_the_loop_and_the_next_chat_stays_valid() -> None:
    CALLS.clear()
    h = harness(max_steps=2)
    h.script(
        ToolCall(id="s1", name="add", arguments={"a": 1, "b": 1}),
        ToolCall(id="s2", name="add", arguments={"a": 2, "b": 2}),
        "never reached",
    )
    await h.message("loop")
    assert h.state["steps"] == 2
    assert h.state["left"] == ["add"]  # the last reply's call was not run
    assert CALLS == [("add", (1, 1))]
    # The next chat answers the dangling call "not run" before its own turn.
    reply = await h.llm.chat([{"role": "user", "content": "and now?"}])
    assert reply.content == "never reached"
    dangling = [m for m in h.llm.messages if m.get("tool_call_id") == "s2"]
    assert dangling
    assert "not run" in dangling[0]["content"]


async def test_required_tool_choice_applies_to_the_first_step_only() -> None:
    engine = SimEngine.like_llama()
    h = AgentHarness(Worker, engine=engine)
    reply = await h.llm.run([{"role": "user", "content": "add"}], tools=[add], tool_choice="add")
    # The sim's own (unscripted) reply to a named choice is a call with typed defaults; the
    # loop then lets the model answer.
    calls = [m for m in h.llm.messages if m["role"] == "assistant" and m.get("tool_calls")]
    assert calls
    assert calls[0]["tool_calls"][0]["function"]["name"] == "add"
    assert not reply.tool_calls


async def test_chat_usage_is_counted_and_replies_have_the_public_shape() -> None:
    h = harness()
    h.script("hello there")
    reply = await h.llm.chat([{"role": "user", "content": "hi"}])
    assert isinstance(reply, Reply)
    assert reply.content == "hello there"
    assert reply.finish_reason == "stop"
    assert reply.usage.input_tokens > 0
    assert reply.usage.output_tokens > 0
    assert h.llm.usage.calls == 1
    h.script("again")
    second = await h.llm.chat([{"role": "user", "content": "more"}])
    assert second.usage.cached_tokens >= reply.usage.input_tokens  # append-only
