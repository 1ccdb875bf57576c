"""A conversation that outgrows the model is compacted (oldest turns first, system messages
and tool calls with their results kept) and sent again, unless the agent says ``fail``."""

from __future__ import annotations

import json
from typing import Any

import pytest

from agentos.client import Client
from agentos.core.chat import ToolCall, validate_messages
from agentos.core.spec import SpecError, canonical, parse_text
from agentos.engine.base import ContextOverflow
from agentos.engine.sim import SimEngine
from agentos.sdk import LLM, Compaction, compact_history
from agentos.store import Store
from tests.helpers import agent_doc, apply, running_daemon

pytestmark = pytest.mark.anyio

SYSTEM = {"role": "system", "content": "You are terse."}


def _user(i: int) -> dict[str, Any]:
    return {"role": "user", "content": f"question number {i} about the weather today"}


def _answer(i: int) -> dict[str, Any]:
    return {"role": "assistant", "content": f"answer {i}"}


def _call(call_id: str) -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": "look", "arguments": "{}"}}
        ],
    }


def _result(call_id: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "name": "look", "content": "sunny"}


# ---------------------------------------------------------------------- the pure core


@pytest.mark.parametrize(
    ("history", "new", "kept"),
    [
        # Half the turns go, oldest first; the system message stays.
        (
            [SYSTEM, _user(1), _answer(1), _user(2), _answer(2)],
            [_user(3)],
            [SYSTEM, _user(2), _answer(2)],
        ),
        # A tool call and its result go together, and the kept part starts at a user turn.
        (
            [SYSTEM, _user(1), _call("c1"), _result("c1"), _answer(1), _user(2), _answer(2)],
            [_user(3)],
            [SYSTEM, _user(2), _answer(2)],
        ),
        # New tool results keep the call they answer, whatever else is dropped.
        (
            [SYSTEM, _user(1), _answer(1), _user(2), _call("c2")],
            [_result("c2")],
            [SYSTEM, _user(2), _call("c2")],
        ),
        # Nothing left to drop but the turn the new results answer.
        ([SYSTEM, _call("c1")], [_result("c1")], None),
        ([SYSTEM], [_user(1)], None),
    ],
)
def test_compact_history_drops_the_oldest_turns_and_keeps_the_conversation_valid(
    history: list[dict[str, Any]], new: list[dict[str, Any]], kept: list[dict[str, Any]] | None
) -> None:
    compacted = compact_history(history, new)
    assert compacted == kept
    if compacted is not None:
        validate_messages(new, compacted)  # raises for a result without its call


# ---------------------------------------------------------------------- the SDK


async def _fill(llm: LLM, turns: int) -> None:
    await llm.chat([SYSTEM], max_tokens=8)
    for i in range(turns):
        await llm.chat([_user(i)], max_tokens=8)


async def test_an_overflowing_chat_is_compacted_and_sent_again() -> None:
    engine = SimEngine(n_ctx=160, overflow="raise")
    compactions: list[Compaction] = []
    llm = LLM(engine, "a", on_compacted=compactions.append)
    await _fill(llm, 8)  # the context is full now
    before = llm.messages

    reply = await llm.chat([_user(99)], max_tokens=8)

    assert reply.content is not None
    (compaction,) = compactions
    assert compaction.operation == "chat"
    assert compaction.dropped_messages > 0
    assert compaction.dropped_tokens > 0
    after = llm.messages
    assert after == engine.conversation("a")
    assert after[0] == SYSTEM  # kept, first
    assert after[-2] == _user(99)
    assert after[1]["role"] == "user"
    assert len(after) < len(before) + 2
    assert after[1:-2] == before[-(len(after) - 3) :]  # the newest turns, in order
    assert "dropped its" in compaction.describe()


async def test_an_overflowing_tool_loop_keeps_each_call_with_its_result() -> None:
    engine = SimEngine(n_ctx=200, overflow="raise")
    compactions: list[Compaction] = []
    llm = LLM(engine, "a", on_compacted=compactions.append)
    await _fill(llm, 6)
    for i in range(6):
        engine.script("a", ToolCall(f"c{i}", "look", {}, "{}"))
        await llm.chat([_user(100 + i)], max_tokens=8)
        await llm.chat([_result(f"c{i}")], max_tokens=8)
    assert compactions  # the loop outgrew the context at least once
    conversation = llm.messages
    assert conversation[0] == SYSTEM
    for index, message in enumerate(conversation):
        if message["role"] == "tool":
            previous = conversation[index - 1]
            assert previous["role"] in ("assistant", "tool")
    validate_messages([], conversation)  # a valid conversation as a whole


async def test_on_overflow_fail_raises_and_leaves_the_conversation_as_it_was() -> None:
    engine = SimEngine(n_ctx=160, overflow="raise")
    llm = LLM(engine, "a", on_overflow="fail")
    await _fill(llm, 8)
    before = llm.messages
    with pytest.raises(ContextOverflow):
        await llm.chat([_user(99)], max_tokens=8)
    assert llm.messages == before


async def test_a_turn_too_large_even_alone_raises_and_puts_the_conversation_back() -> None:
    engine = SimEngine(n_ctx=160, overflow="raise")
    compactions: list[Compaction] = []
    llm = LLM(engine, "a", on_compacted=compactions.append)
    await _fill(llm, 3)
    before = llm.messages
    huge = {"role": "user", "content": " ".join(f"word{i}" for i in range(400))}
    with pytest.raises(ContextOverflow):
        await llm.chat([huge], max_tokens=8)
    assert compactions == []
    assert engine.conversation("a") == before
    await llm.chat([_user(5)], max_tokens=8)  # and it goes on from there


async def test_an_overflowing_text_call_is_sent_again_with_the_prompt_alone() -> None:
    engine = SimEngine(n_ctx=64, overflow="raise")
    compactions: list[Compaction] = []
    llm = LLM(engine, "a", on_compacted=compactions.append)
    for i in range(20):
        await llm.generate(f"line {i} of a long text", max_tokens=4)
        if compactions:
            break
    (compaction,) = compactions
    assert compaction.operation == "text"
    assert compaction.dropped_tokens > 0
    assert llm.context_tokens < compaction.dropped_tokens
    assert "prompt sent alone" in compaction.describe()

    strict = LLM(SimEngine(n_ctx=64, overflow="raise"), "b", on_overflow="fail")
    raised = None
    for i in range(20):
        try:
            await strict.generate(f"line {i} of a long text", max_tokens=4)
        except ContextOverflow as e:
            raised = e
            break
    assert raised is not None


# ---------------------------------------------------------------------- the spec


def _agent(**spec: Any) -> Any:
    body = {
        "apiVersion": "agentos/v1",
        "kind": "Agent",
        "metadata": {"name": "a"},
        "spec": {"entrypoint": "tests.fixture_agents:Echo", **spec},
    }
    (doc,) = parse_text(json.dumps(body), source="<a>")
    return doc.resource


def test_spec_context_on_overflow_defaults_to_compact_and_keeps_existing_hashes() -> None:
    plain = _agent()
    assert plain.spec.on_overflow == "compact"
    assert "context" not in canonical(plain)["spec"]  # an existing spec's hash is unchanged
    assert _agent(context={"onOverflow": "fail"}).spec.on_overflow == "fail"
    with pytest.raises(SpecError, match="onOverflow"):
        _agent(context={"onOverflow": "truncate"})


async def test_a_compaction_in_a_daemon_is_a_context_compacted_event(store: Store) -> None:
    engine = SimEngine.like_llama(n_ctx=160)
    long = "word " * 40
    for _ in range(4):
        engine.script("squeezed", "ok")
    await apply(
        store, agent_doc("squeezed", "tests.fixture_agents:Chatter", triggers=[{"inbox": {}}])
    )
    client = Client(store)
    async with running_daemon(store, engine):
        for i in range(4):
            sent = await client.send("squeezed", f"{i} {long}")
            done = await client.wait_task("squeezed", f"m-{sent}", timeout_s=20)
            assert done["status"] == "succeeded", done
    events = await client.events("squeezed", count=100)
    events = [e for e in events if e.type == "ContextCompacted"]
    assert events
    assert "dropped its" in events[0].message
