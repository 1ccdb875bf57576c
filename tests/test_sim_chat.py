"""Tests for SimEngine.chat: scripted replies are how agent authors and the SDK's tests drive
an agent, so what a script yields, how usage is counted and what survives hibernation is
pinned here at the engine level."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import anyio
import pydantic
import pytest
from anyio import wait_all_tasks_blocked

from agentos.core.chat import (
    Reply,
    TokenUsage,
    ToolCall,
    ToolSpec,
    lower_messages,
    render,
    validate_messages,
)
from agentos.engine import ContextOverflow, EngineError, KVSnapshot, SimEngine

pytestmark = pytest.mark.anyio

AGENT = "agent"
HOUR = 3600.0  # a latency that keeps a call in the engine until it is cancelled

ADD = ToolSpec(
    "add",
    "Add two integers.",
    {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"],
    },
)
SEARCH = ToolSpec(
    "search",
    "Search the notes.",
    {
        "type": "object",
        "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
        "required": ["query"],
    },
)
TOOLS = (ADD, SEARCH)
SYSTEM = {"role": "system", "content": "You are a careful agent."}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def opened(**options: Any) -> SimEngine:
    engine = SimEngine(**options)
    engine.open_session(AGENT)
    return engine


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def result(call: ToolCall, content: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call.id, "content": content}


async def chat(
    engine: SimEngine, *messages: Mapping[str, Any], session: str = AGENT, **kw: Any
) -> Reply:
    """A chat as the SDK makes it: new turns validated against the conversation first."""
    new = validate_messages(messages, engine.conversation(session))
    return await engine.chat(session, new, **kw)


def rendered_tokens(engine: SimEngine, tools: Sequence[ToolSpec] = ()) -> tuple[int, ...]:
    """The whole conversation lowered and rendered at once, as tokens."""
    lowered = lower_messages(engine.conversation(AGENT), tools)
    return tuple(engine.encode(render("plain", lowered, add_generation_prompt=False)))


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


# -- hibernation ----------------------------------------------------------------------------


async def _mid_tool_loop(engine: SimEngine) -> ToolCall:
    engine.script(AGENT, ToolCall("", "search", {"query": "zed"}), "Found Zed.")
    reply = await chat(engine, SYSTEM, user("Who is Zed?"), tools=TOOLS)
    return reply.tool_calls[0]


async def _finish(engine: SimEngine, call: ToolCall) -> tuple[Reply, Reply]:
    answer = await chat(engine, result(call, "a friend"), tools=TOOLS)
    synthetic = await chat(engine, user("More?"), tools=TOOLS, tool_choice="required")
    return answer, synthetic


def _same(a: Reply, b: Reply) -> None:
    assert (a.content, a.tool_calls, a.finish_reason, a.usage) == (
        b.content,
        b.tool_calls,
        b.finish_reason,
        b.usage,
    )


@pytest.mark.parametrize("wake", ["import_kv", "prefill"])
async def test_a_chat_hibernated_mid_tool_loop_continues_like_one_that_never_slept(
    wake: str,
) -> None:
    awake = opened()
    expected = await _finish(awake, await _mid_tool_loop(awake))

    engine = opened()
    call = await _mid_tool_loop(engine)
    before = engine.conversation(AGENT)
    snapshot = await engine.export_kv(AGENT)
    assert json.loads(snapshot.conversation)["messages"] == before
    engine.close_session(AGENT)
    engine.open_session(AGENT)
    if wake == "import_kv":
        assert await engine.import_kv(AGENT, snapshot)
    else:
        await engine.prefill(AGENT, snapshot.tokens, snapshot.conversation)
    assert engine.conversation(AGENT) == before
    assert engine.context_tokens(AGENT) == snapshot.tokens

    got = await _finish(engine, call)
    for a, b in zip(got, expected, strict=True):
        _same(a, b)
    assert got[0].cached_tokens == len(snapshot.tokens)  # nothing re-rendered or re-prefilled
    assert got[1].tool_calls[0].id == "call_1"  # ids count the calls from before the sleep
    assert engine.context_tokens(AGENT) == awake.context_tokens(AGENT)


async def test_a_snapshot_moves_to_another_engine_with_its_conversation() -> None:
    engine = opened()
    await _mid_tool_loop(engine)
    snapshot = await engine.export_kv(AGENT)
    other = opened()
    assert await other.import_kv(AGENT, snapshot)
    assert other.conversation(AGENT) == engine.conversation(AGENT)


async def test_a_text_only_session_exports_no_conversation() -> None:
    engine = opened()
    await engine.generate(AGENT, "Once upon a time", max_tokens=5)
    snapshot = await engine.export_kv(AGENT)
    assert snapshot.conversation == b""


BAD_CONVERSATIONS = [
    b"{not json",
    b"\xff\xfe",
    b"[]",
    json.dumps({"format": "other/9", "messages": [], "tools": None}).encode(),
    json.dumps({"format": "agentos.sim.chat/1", "messages": [1], "tools": None}).encode(),
    json.dumps({"format": "agentos.sim.chat/1", "messages": [], "tools": [{"n": 1}]}).encode(),
]


@pytest.mark.parametrize("bad", BAD_CONVERSATIONS)
async def test_a_bad_conversation_is_rejected_and_the_session_left_empty(bad: bytes) -> None:
    engine = opened()
    await _mid_tool_loop(engine)
    snapshot = dataclasses.replace(await engine.export_kv(AGENT), conversation=bad)
    engine.close_session(AGENT)
    engine.open_session(AGENT)
    assert await engine.import_kv(AGENT, snapshot) is False
    assert "conversation" in (engine.stats.last_reject_reason or "")
    with pytest.raises(EngineError, match="prefill of session 'agent': conversation"):
        await engine.prefill(AGENT, snapshot.tokens, bad)
    assert engine.session_info(AGENT).n_tokens == 0
    assert engine.conversation(AGENT) == []


# -- llama's limits -------------------------------------------------------------------------


async def test_a_second_call_while_a_chat_is_in_flight_raises_and_cancel_undoes_it() -> None:
    engine = SimEngine.like_llama(prefill_s_per_token=HOUR)
    engine.open_session(AGENT)
    engine.script(AGENT, "never said")
    async with anyio.create_task_group() as tg:
        tg.start_soon(chat, engine, user("hi"))
        await wait_all_tasks_blocked()
        with pytest.raises(EngineError, match="chat on session 'agent' while its chat is in"):
            await chat(engine, user("again"))
        with pytest.raises(EngineError, match="while its chat is in flight"):
            await engine.generate(AGENT, "text")
        tg.cancel_scope.cancel()
    assert engine.session_info(AGENT).n_tokens == 0
    assert engine.conversation(AGENT) == []
    assert engine.scripted_left(AGENT) == 1


async def test_a_chat_while_an_export_is_in_flight_raises() -> None:
    engine = SimEngine.like_llama(export_latency_s=HOUR)
    engine.open_session(AGENT)
    engine.script(AGENT, "later")
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.export_kv, AGENT)
        await wait_all_tasks_blocked()
        with pytest.raises(EngineError, match="export_kv is in flight"):
            await chat(engine, user("hi"))
        tg.cancel_scope.cancel()
    assert engine.scripted_left(AGENT) == 1
    assert (await chat(engine, user("hi"))).content == "later"


async def test_two_sessions_chat_at_once_under_one_lock() -> None:
    engine = SimEngine.like_llama(decode_s_per_token=0.001)
    for name in ("a", "b"):
        engine.open_session(name)
        engine.script(name, "one two three four five six seven")

    async def go(name: str) -> None:
        await chat(engine, user("go"), session=name)

    async with anyio.create_task_group() as tg:
        for name in ("a", "b"):
            tg.start_soon(go, name)
    assert engine.conversation("a") == engine.conversation("b")
    assert engine.context_tokens("a") == engine.context_tokens("b")


OVERFLOWS = ["prompt", "scripted reply", "synthetic reply"]


@pytest.mark.parametrize("what", OVERFLOWS)
async def test_overflow_raises_and_leaves_the_session_unchanged(what: str) -> None:
    probe = opened()
    probe.script(AGENT, "Hi.")
    first = await chat(probe, user("Hi."))
    held = first.input_tokens + first.output_tokens
    prompt = probe.count_tokens("user: Next.\nassistant:")
    room = {"prompt": prompt - 1, "scripted reply": prompt + 2, "synthetic reply": prompt + 1}

    engine = SimEngine.like_llama(n_ctx=held + room[what])
    engine.open_session(AGENT)
    engine.script(AGENT, "Hi.")
    await chat(engine, user("Hi."))
    if what != "synthetic reply":
        engine.script(AGENT, "A reply of several tokens.")
    before = (engine.context_tokens(AGENT), engine.conversation(AGENT))
    left = engine.scripted_left(AGENT)
    with pytest.raises(ContextOverflow, match=r"context overflow in session 'agent': \d+ tokens"):
        await chat(engine, user("Next."))
    assert (engine.context_tokens(AGENT), engine.conversation(AGENT)) == before
    assert engine.scripted_left(AGENT) == left


async def test_a_sliding_session_keeps_its_whole_conversation() -> None:
    engine = opened(n_ctx=16)
    engine.script(AGENT, "one two three four five six", "seven")
    await chat(engine, user("Count."))
    reply = await chat(engine, user("Go on."))
    assert reply.content == "seven"
    assert engine.session_info(AGENT).n_tokens == 16
    assert len(engine.conversation(AGENT)) == 4


async def test_unknown_session_is_named_and_its_script_kept() -> None:
    engine = SimEngine()
    engine.script("ghost", "boo")
    with pytest.raises(EngineError, match="ghost"):
        await engine.chat("ghost", [user("hi")])
    with pytest.raises(EngineError, match="ghost"):
        engine.conversation("ghost")
    assert engine.scripted_left("ghost") == 1


def test_snapshot_default_has_no_conversation() -> None:
    assert KVSnapshot("sim:x", (), b"").conversation == b""
