"""Tests for SimEngine.chat across hibernation (a snapshot carries the conversation) and
under the llama engine's limits (one call per session, a lock, overflow)."""

from __future__ import annotations

import dataclasses
import json

import anyio
import pytest
from anyio import wait_all_tasks_blocked

from agentos.core.chat import (
    Reply,
    ToolCall,
)
from agentos.engine import ContextOverflow, EngineError, KVSnapshot, SimEngine
from tests.sim_chat_support import (
    AGENT,
    HOUR,
    SYSTEM,
    TOOLS,
    chat,
    opened,
    result,
    user,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


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
