"""Tests for SimEngine.chat: scripted replies are how agent authors and the SDK's tests drive
an agent, so what a script yields, how usage is counted and what survives hibernation is
pinned here at the engine level."""

from __future__ import annotations

import json
from typing import Any, Literal

import pydantic
import pytest

from agentos.core.chat import (
    Reply,
    TokenUsage,
    ToolCall,
    ToolSpec,
    lower_messages,
    render,
)
from agentos.engine import SimEngine
from tests.sim_chat_support import (
    ADD,
    AGENT,
    SYSTEM,
    TOOLS,
    chat,
    opened,
    rendered_tokens,
    result,
    user,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# -- scripted replies ---------------------------------------------------------------------


async def test_scripted_text_is_the_reply_and_joins_the_conversation() -> None:
    engine = opened()
    engine.script(AGENT, "Hello, Zed.")
    assert engine.scripted_left(AGENT) == 1
    reply = await chat(engine, SYSTEM, user("My name is Zed."))
    assert (reply.content, reply.tool_calls, reply.finish_reason) == ("Hello, Zed.", (), "stop")
    assert engine.scripted_left(AGENT) == 0
    assert engine.conversation(AGENT) == [
        SYSTEM,
        user("My name is Zed."),
        {"role": "assistant", "content": "Hello, Zed."},
    ]
    assert engine.stats.chats == 1


async def test_scripted_tool_calls_get_deterministic_ids_and_keep_given_ones() -> None:
    engine = opened()
    engine.script(
        AGENT,
        ToolCall("", "add", {"a": 2, "b": 3}),
        [ToolCall("", "add", {"a": 1, "b": 1}), ToolCall("mine", "search", {"query": "x"})],
        "Done: 5 and 2.",
    )
    first = await chat(engine, user("Add 2 and 3."), tools=TOOLS)
    assert first.content is None
    assert first.finish_reason == "tool_calls"
    (call,) = first.tool_calls
    assert (call.id, call.name, dict(call.arguments)) == ("call_0", "add", {"a": 2, "b": 3})
    assert json.loads(call.raw_arguments) == {"a": 2, "b": 3}
    assert engine.conversation(AGENT)[-1] == first.message()

    parallel = await chat(engine, result(call, "5"), user("And 1+1, then search."), tools=TOOLS)
    assert parallel.finish_reason == "tool_calls"
    assert [(c.id, c.name) for c in parallel.tool_calls] == [("call_1", "add"), ("mine", "search")]
    assert [c["id"] for c in engine.conversation(AGENT)[-1]["tool_calls"]] == ["call_1", "mine"]

    last = await chat(engine, *(result(c, "ok") for c in parallel.tool_calls), tools=TOOLS)
    assert (last.content, last.finish_reason) == ("Done: 5 and 2.", "stop")
    assert engine.scripted_left(AGENT) == 0


async def test_a_reply_is_used_as_given_with_the_sims_usage() -> None:
    engine = opened()
    given = Reply("cut sho", (), "length", TokenUsage(99, 99, 99))
    engine.script(AGENT, given)
    reply = await chat(engine, user("Tell me a story."))
    assert (reply.content, reply.finish_reason) == ("cut sho", "length")
    assert reply.usage != given.usage
    assert reply.output_tokens == engine.count_tokens(" cut sho\n")


async def test_a_call_to_a_tool_not_offered_is_still_returned() -> None:
    engine = opened()
    engine.script(AGENT, Reply(None, (ToolCall("", "rm_rf", {"path": "/"}),), "tool_calls"))
    reply = await chat(engine, user("Clean up."), tools=TOOLS)
    assert [(c.id, c.name) for c in reply.tool_calls] == [("call_0", "rm_rf")]


async def test_a_malformed_scripted_call_comes_back_with_its_error() -> None:
    engine = opened()
    engine.script(AGENT, ToolCall.parse("", "add", '{"a": 2,'))
    reply = await chat(engine, user("Add."), tools=TOOLS)
    (call,) = reply.tool_calls
    assert call.error is not None
    assert call.raw_arguments == '{"a": 2,'


@pytest.mark.parametrize("bad", [42, [], ["text"], [ToolCall("", "add"), "x"], None])
def test_script_rejects_what_is_not_a_reply(bad: object) -> None:
    engine = SimEngine()
    with pytest.raises(TypeError, match=r"script\('agent'\): reply 1 is"):
        engine.script(AGENT, "fine", bad)  # type: ignore[arg-type]
    assert engine.scripted_left(AGENT) == 0


# -- synthetic replies --------------------------------------------------------------------


async def test_synthetic_text_is_what_generate_would_say() -> None:
    engine = opened()
    reply = await chat(engine, user("Summarise the day."))
    assert reply.tool_calls == ()
    assert reply.content
    assert reply.finish_reason == ("stop" if reply.content.endswith(".") else "length")
    # The same words as generate() gives after the same prompt, cut after the first period.
    other = opened()
    prompt = render("plain", [user("Summarise the day.")])
    text = (await other.generate(AGENT, prompt, stop=(".",))).text
    assert reply.content == (text + ".").strip()
    # Deterministic: another engine with the same seed says the same, another seed not.
    assert (await chat(opened(), user("Summarise the day."))).content == reply.content
    assert (await chat(opened(seed=1), user("Summarise the day."))).content != reply.content


async def test_synthetic_text_stops_at_max_tokens() -> None:
    engine = opened()
    reply = await chat(engine, user("Summarise the day."), max_tokens=0)
    assert (reply.content, reply.finish_reason) == ("", "length")


async def test_synthetic_reply_under_auto_is_text_even_with_tools() -> None:
    reply = await chat(opened(), user("Hi."), tools=TOOLS)
    assert reply.tool_calls == ()
    assert reply.content


@pytest.mark.parametrize(
    ("tool_choice", "name", "arguments"),
    [("required", "add", {"a": 0, "b": 0}), ("search", "search", {"query": ""})],
)
async def test_synthetic_forced_call_has_schema_defaults(
    tool_choice: str, name: str, arguments: dict[str, Any]
) -> None:
    engine = opened()
    reply = await chat(engine, user("Do it."), tools=TOOLS, tool_choice=tool_choice)
    assert reply.finish_reason == "tool_calls"
    assert reply.content is None
    (call,) = reply.tool_calls
    assert (call.id, call.name, dict(call.arguments)) == ("call_0", name, arguments)
    assert engine.conversation(AGENT)[-1] == reply.message()


class Point(pydantic.BaseModel):
    x: int
    y: float


class Job(pydantic.BaseModel):
    title: str
    urgent: bool
    tags: list[str]
    meta: dict[str, int]
    where: Point
    mode: Literal["fast", "slow"]
    note: str | None = None
    limit: int = 5


PLAIN_SCHEMAS: list[tuple[dict[str, Any], dict[str, Any]]] = [
    (
        {
            "type": "object",
            "properties": {
                "n": {"type": "integer"},
                "x": {"type": "number"},
                "s": {"type": "string"},
                "b": {"type": "boolean"},
                "l": {"type": "array", "items": {"type": "string"}},
                "o": {"type": "object"},
                "nullable": {"type": ["string", "null"]},
                "k": {"const": "fixed"},
                "optional": {"type": "string"},
            },
            "required": ["n", "x", "s", "b", "l", "o", "nullable", "k"],
        },
        {"n": 0, "x": 0, "s": "", "b": False, "l": [], "o": {}, "nullable": "", "k": "fixed"},
    ),
    ({"type": "object", "properties": {}}, {}),
]


@pytest.mark.parametrize(("schema", "arguments"), PLAIN_SCHEMAS)
async def test_synthetic_arguments_follow_the_required_properties(
    schema: dict[str, Any], arguments: dict[str, Any]
) -> None:
    tool = ToolSpec("t", "", schema)
    reply = await chat(opened(), user("Go."), tools=[tool], tool_choice="required")
    assert dict(reply.tool_calls[0].arguments) == arguments


async def test_synthetic_arguments_validate_against_a_pydantic_schema() -> None:
    tool = ToolSpec("plan", "Plan a job.", Job.model_json_schema())
    reply = await chat(opened(), user("Plan."), tools=[tool], tool_choice="plan")
    job = Job.model_validate(reply.tool_calls[0].arguments)
    assert (job.where, job.mode, job.limit) == (Point(x=0, y=0), "fast", 5)


# -- usage: append-only like llama.cpp ----------------------------------------------------


async def test_usage_counts_only_new_turns_and_the_context_is_the_rendered_chat() -> None:
    engine = opened()
    engine.script(AGENT, ToolCall("", "add", {"a": 2, "b": 3}), "It is 5.", "Bye.")
    first = await chat(engine, SYSTEM, user("Add 2 and 3."), tools=TOOLS)
    assert first.cached_tokens == 0
    lowered = lower_messages([SYSTEM, user("Add 2 and 3.")], TOOLS)
    assert first.input_tokens == engine.count_tokens(render("plain", lowered))
    assert first.output_tokens == engine.count_tokens(
        ' {"tool": "add", "arguments": {"a": 2, "b": 3}}\n'
    )
    held = first.input_tokens + first.output_tokens
    assert engine.session_info(AGENT).n_tokens == held

    second = await chat(engine, result(first.tool_calls[0], "5"), tools=TOOLS)
    assert second.cached_tokens == held
    tool_turn = "user: Result of tool call call_0:\n5\nassistant:"
    assert second.input_tokens == engine.count_tokens(tool_turn)
    assert second.output_tokens == engine.count_tokens(' {"answer": "It is 5."}\n')
    held += second.input_tokens + second.output_tokens

    third = await chat(engine, user("Thanks."), tools=TOOLS)
    assert third.cached_tokens == held
    assert third.input_tokens == engine.count_tokens("user: Thanks.\nassistant:")
    # What the session holds is the whole conversation rendered at once: nothing re-prefilled.
    assert engine.context_tokens(AGENT) == rendered_tokens(engine, TOOLS)
    replies = (first, second, third)
    assert engine.stats.prefill_tokens == sum(r.input_tokens for r in replies)
    assert engine.stats.decode_tokens == sum(r.output_tokens for r in replies)


async def test_new_tools_are_described_in_a_turn_of_their_own() -> None:
    engine = opened()
    engine.script(AGENT, "Hi.", "Sure.")
    await chat(engine, SYSTEM, user("Hi."))
    held = engine.session_info(AGENT).n_tokens
    reply = await chat(engine, user("Now with tools."), tools=[ADD])
    assert reply.cached_tokens == held
    described = lower_messages([user("Now with tools.")], [ADD], described=[])
    assert described[0]["role"] == "system"
    assert reply.input_tokens == engine.count_tokens(render("plain", described))


# -- scripts belong to the agent ----------------------------------------------------------


async def test_scripts_survive_close_and_open() -> None:
    engine = SimEngine(slots=1)
    engine.script(AGENT, "one", "two", "three")  # before the session is even open
    engine.open_session(AGENT)
    assert (await chat(engine, user("1"))).content == "one"
    engine.close_session(AGENT)
    assert engine.scripted_left(AGENT) == 2
    engine.open_session("other")  # the slot serves someone else meanwhile
    assert engine.scripted_left("other") == 0
    engine.close_session("other")
    engine.open_session(AGENT)
    assert (await chat(engine, user("2"))).content == "two"
    await engine.reset_session(AGENT)
    assert engine.conversation(AGENT) == []
    assert (await chat(engine, user("3"))).content == "three"
    assert engine.scripted_left(AGENT) == 0
