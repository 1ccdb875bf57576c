"""The openai engine's chat: real messages and tools against an OpenAI-compatible server.

The server is the loopback one of tests/openai_server.py, which records every request
body and streams the way llama.cpp and vLLM do (null deltas first and last, usage in a
last event with no choices, tool-call arguments in fragments). So these tests check what
goes over the wire and how the answer is read back, not a mock of the engine's API.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from agentos.core.chat import TokenUsage, ToolSpec
from agentos.engine import ContextOverflow, EngineError, EngineUnavailable
from agentos.engine.base import Engine
from agentos.engine.fallback import FallbackEngine
from agentos.engine.openai import OpenAIEngine
from tests.openai_server import openai_server

pytestmark = pytest.mark.anyio

ADD = ToolSpec(
    "add",
    "Add two integers.",
    {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"],
    },
)
WEATHER = ToolSpec(
    "weather",
    "The weather in a city.",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)
SYSTEM = {"role": "system", "content": "You are terse."}


def _engine(url: str, **options: Any) -> OpenAIEngine:
    return OpenAIEngine(model="big", endpoints=[url], **options)


def _expected_usage(body: dict[str, Any], previous: dict[str, Any] | None) -> TokenUsage:
    """What the loopback server reports for ``body`` (see tests/openai_server.py)."""

    def text(b: dict[str, Any]) -> str:
        return "".join(
            f"{m['role']}:{m.get('content') or ''}"
            + (json.dumps(m["tool_calls"]) if m.get("tool_calls") else "")
            + "\n"
            for m in b["messages"]
        )

    now, before = text(body), text(previous) if previous else ""
    shared = 0
    while shared < min(len(now), len(before)) and now[shared] == before[shared]:
        shared += 1
    prompt, cached = len(now) // 4, shared // 4
    return TokenUsage(prompt - cached, cached, 3)


async def test_messages_go_separately_with_system_as_system_and_options_pass_through() -> None:
    with openai_server() as server:
        engine = _engine(server.url)
        engine.open_session("a")
        schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
        reply = await engine.chat(
            "a",
            [SYSTEM, {"role": "user", "content": "Add 1 and 2."}],
            tools=[ADD, WEATHER],
            tool_choice="required",
            parallel_tool_calls=False,
            response_format=schema,
            max_tokens=7,
            stop=["\n\n"],
        )
        await engine.chat(
            "a", [{"role": "user", "content": "Again."}], tools=[ADD], tool_choice="add"
        )
        await engine.chat("a", [{"role": "user", "content": "No tools now."}])
        await engine.aclose()
    first, second, third = server.behaviour.requests
    assert first["messages"] == [SYSTEM, {"role": "user", "content": "Add 1 and 2."}]
    assert first["tools"] == [ADD.openai(), WEATHER.openai()]
    assert first["tool_choice"] == "required"
    assert first["parallel_tool_calls"] is False
    assert first["response_format"] == schema
    assert first["max_tokens"] == 7
    assert first["stop"] == ["\n\n"]
    assert first["stream"] is True
    assert first["stream_options"] == {"include_usage": True}
    assert second["tool_choice"] == {"type": "function", "function": {"name": "add"}}
    assert second["messages"][:3] == [*first["messages"], reply.message()]
    assert reply.message() == {"role": "assistant", "content": " reply 1"}
    assert "tools" not in third
    assert "tool_choice" not in third
    assert "parallel_tool_calls" not in third
    assert "response_format" not in third


async def test_streamed_tool_calls_are_assembled_and_their_results_sent_back() -> None:
    with openai_server() as server:
        server.behaviour.fragment = 3  # arguments arrive in 3-character pieces, interleaved
        server.behaviour.tool_calls = [
            {"id": "call_a1", "name": "add", "arguments": '{"a": 12, "b": 30}'},
            {"id": "call_w2", "name": "weather", "arguments": '{"city": "Zürich, \\"CH\\""}'},
        ]
        engine = _engine(server.url)
        engine.open_session("a")
        question = [SYSTEM, {"role": "user", "content": "Sum, and the weather?"}]
        reply = await engine.chat("a", question, tools=[ADD, WEATHER])
        assert reply.content is None
        assert reply.finish_reason == "tool_calls"
        add, weather = reply.tool_calls
        assert (add.id, add.name, dict(add.arguments)) == ("call_a1", "add", {"a": 12, "b": 30})
        assert add.raw_arguments == '{"a": 12, "b": 30}'
        assert add.error is None
        assert (weather.id, weather.name) == ("call_w2", "weather")
        assert dict(weather.arguments) == {"city": 'Zürich, "CH"'}
        assert engine.conversation("a")[-1] == reply.message()
        results = [
            {"role": "tool", "tool_call_id": "call_a1", "content": "42"},
            {"role": "tool", "tool_call_id": "call_w2", "content": "sunny"},
        ]
        final = await engine.chat("a", results, tools=[ADD, WEATHER])
        assert final.content == " reply 2"
        assert final.finish_reason == "stop"
        await engine.aclose()
    sent = server.behaviour.requests[-1]["messages"]
    assert sent == [*question, reply.message(), *results]
    assert sent[2]["content"] is None
    assert sent[2]["tool_calls"][1]["function"]["arguments"] == '{"city": "Zürich, \\"CH\\""}'


async def test_malformed_arguments_give_a_call_with_an_error_not_an_exception() -> None:
    with openai_server() as server:
        server.behaviour.tool_calls = [
            {"id": "c1", "name": "add", "arguments": '{"a": 1, "b": '},  # cut off
            {"id": "c2", "name": "add", "arguments": "[1, 2]"},  # not an object
        ]
        engine = _engine(server.url)
        engine.open_session("a")
        reply = await engine.chat("a", [{"role": "user", "content": "add"}], tools=[ADD])
        await engine.aclose()
    cut, listed = reply.tool_calls
    assert cut.error is not None
    assert "not valid JSON" in cut.error
    assert cut.raw_arguments == '{"a": 1, "b": '
    assert listed.error == "arguments are not a JSON object"
    assert reply.finish_reason == "tool_calls"


async def test_a_server_that_ignores_stream_answers_whole() -> None:
    with openai_server() as server:
        server.behaviour.ignore_stream = True
        server.behaviour.tool_calls = [{"id": "w1", "name": "add", "arguments": '{"a":2,"b":3}'}]
        engine = _engine(server.url)
        engine.open_session("a")
        reply = await engine.chat("a", [{"role": "user", "content": "2+3"}], tools=[ADD])
        text = [c.text async for c in engine.stream("a", "and now?", max_tokens=3)]
        await engine.aclose()
    assert reply.tool_calls[0].id == "w1"
    assert dict(reply.tool_calls[0].arguments) == {"a": 2, "b": 3}
    assert reply.usage.output_tokens == 3
    assert "".join(text) == " reply 2"


async def test_null_deltas_never_become_text() -> None:
    with openai_server() as server:
        engine = _engine(server.url)
        engine.open_session("a")
        reply = await engine.chat("a", [{"role": "user", "content": "hi"}])
        chunks = [c async for c in engine.stream("a", "and again", max_tokens=4)]
        await engine.aclose()
    assert reply.content == " reply 1"
    text = "".join(c.text for c in chunks)
    assert text == " reply 2"
    assert "None" not in json.dumps(engine.conversation("a"))


async def test_calls_are_metered_with_the_servers_usage_not_characters() -> None:
    with openai_server() as server:
        engine = _engine(server.url)
        engine.open_session("a")
        assert engine.session_info("a").n_tokens == 0
        first = await engine.chat("a", [SYSTEM, {"role": "user", "content": "A long question?"}])
        second = await engine.chat("a", [{"role": "user", "content": "And another one?"}])
        chunks = [c async for c in engine.stream("a", "Streamed now, please.", max_tokens=4)]
        await engine.aclose()
    one, two, three = server.behaviour.requests
    assert first.usage == _expected_usage(one, None)
    assert second.usage == _expected_usage(two, one)
    assert second.usage.cached_tokens > 0  # the shared prefix is not input
    last = chunks[-1]
    assert last.usage is not None
    assert last.finished
    assert last.usage == _expected_usage(three, two)
    assert engine.session_info("a").n_tokens == last.usage.total_tokens
    assert first.time_to_first_token_s <= first.duration_s
    replica = engine.client.replicas[0].stats
    assert replica.output_tokens == 9
    assert replica.prompt_tokens == sum(
        u.input_tokens + u.cached_tokens for u in (first.usage, second.usage, last.usage)
    )


async def test_a_server_without_usage_in_the_stream_is_metered_by_estimate() -> None:
    with openai_server() as server:
        server.behaviour.stream_usage = False
        engine = _engine(server.url)
        engine.open_session("a")
        reply = await engine.chat("a", [{"role": "user", "content": "x" * 400}])
        await engine.aclose()
    assert reply.usage.input_tokens >= 100  # characters / 4, the admission estimate
    assert reply.usage.output_tokens == engine.count_tokens(" reply 1")


async def test_export_and_prefill_keep_the_conversation() -> None:
    with openai_server() as server:
        engine = _engine(server.url)
        engine.open_session("a")
        assert (await engine.export_kv("a")).conversation == b""  # nothing to keep yet
        server.behaviour.tool_calls = [{"id": "k1", "name": "add", "arguments": '{"a":1,"b":2}'}]
        await engine.chat("a", [SYSTEM, {"role": "user", "content": "1+2?"}], tools=[ADD])
        await engine.chat("a", [{"role": "tool", "tool_call_id": "k1", "content": "3"}])
        snapshot = await engine.export_kv("a")
        assert snapshot.tokens == ()
        assert snapshot.data is None
        assert json.loads(snapshot.conversation)["messages"] == engine.conversation("a")
        woken = _engine(server.url)  # another daemon
        woken.open_session("a")
        assert await woken.import_kv("a", snapshot) is False
        await woken.prefill("a", snapshot.tokens, snapshot.conversation)
        assert woken.conversation("a") == engine.conversation("a")
        assert woken.session_info("a").n_tokens == 0  # no call since the wake
        await woken.chat("a", [{"role": "user", "content": "Thanks."}])
        assert server.behaviour.requests[-1]["messages"][:-1] == engine.conversation("a")
        await engine.aclose()
        await woken.aclose()


async def test_a_snapshot_of_the_previous_version_still_wakes() -> None:
    old = json.dumps({"text": "", "messages": [{"role": "user", "content": "héllo"}]})
    with openai_server() as server:
        engine = _engine(server.url)
        engine.open_session("a")
        await engine.prefill("a", tuple(ord(c) for c in old))  # code points, no conversation
        assert engine.conversation("a") == [{"role": "user", "content": "héllo"}]
        with pytest.raises(EngineError, match="does not decode"):
            await engine.prefill("a", (), b"{not json")
        with pytest.raises(EngineError, match="messages"):
            await engine.prefill("a", (), b'{"messages": {"role": "user"}}')
        await engine.aclose()


async def test_a_model_that_refuses_tools_is_a_clear_error() -> None:
    with openai_server() as server:
        server.behaviour.refuse_tools = True
        engine = _engine(server.url, api_key="sk-very-secret")
        engine.open_session("a")
        with pytest.raises(EngineError) as caught:
            await engine.chat("a", [{"role": "user", "content": "add"}], tools=[ADD])
        assert not isinstance(caught.value, EngineUnavailable)  # the request's fault
        message = str(caught.value)
        assert "refused the request with 1 tool" in message
        assert "HTTP 400" in message
        assert "tools are not supported by this model" in message  # the server's words
        assert "sk-very-secret" not in message
        assert len(server.behaviour.requests) == 1  # not retried
        assert engine.conversation("a") == []  # the session is unchanged
        reply = await engine.chat("a", [{"role": "user", "content": "no tools then"}])
        assert reply.content
        await engine.aclose()


async def test_a_conversation_too_long_for_the_server_is_a_context_overflow() -> None:
    with openai_server() as server:
        engine = _engine(server.url)
        engine.open_session("a")
        server.behaviour.mode = "overflow"
        with pytest.raises(ContextOverflow, match="does not fit"):
            await engine.chat("a", [{"role": "user", "content": "long"}], tools=[ADD])
        with pytest.raises(ContextOverflow):
            await engine.generate("a", "long")
        assert engine.conversation("a") == []
        await engine.aclose()


async def test_chat_on_a_completions_model_says_it_needs_the_chat_api() -> None:
    with openai_server() as server:
        engine = _engine(server.url, api="completions")
        engine.open_session("a")
        with pytest.raises(EngineError, match="needs api: chat"):
            await engine.chat("a", [{"role": "user", "content": "hi"}])
        await engine.aclose()
    assert server.behaviour.requests == []


async def test_a_fallback_answers_chat_and_its_turn_reaches_the_primary_later() -> None:
    with openai_server() as main, openai_server() as spare:
        primary = _engine(main.url, attempts=1)
        backup = _engine(spare.url)

        async def resolve() -> Engine:
            return backup

        engine = FallbackEngine(primary, fallback_name="spare", resolve=resolve)
        engine.open_session("a")
        await engine.chat("a", [SYSTEM, {"role": "user", "content": "first"}])
        main.behaviour.mode = "error"
        spare.behaviour.tool_calls = [{"id": "f1", "name": "add", "arguments": '{"a":1,"b":1}'}]
        asked = {"role": "user", "content": "1+1?"}
        reply = await engine.chat("a", [asked], tools=[ADD])
        assert reply.served_by == "spare"
        assert reply.tool_calls[0].id == "f1"
        assert spare.behaviour.requests[-1]["messages"] == [*primary.conversation("a"), asked]
        assert engine.conversation("a")[-1] == reply.message()
        main.behaviour.mode = "ok"
        result = {"role": "tool", "tool_call_id": "f1", "content": "2"}
        after = await engine.chat("a", [result])
        assert after.served_by == ""
        assert main.behaviour.requests[-1]["messages"][-3:] == [asked, reply.message(), result]
        assert engine.conversation("a") == primary.conversation("a")
        await primary.aclose()
        await backup.aclose()


async def test_a_stream_without_usage_is_still_a_metered_chunk() -> None:
    with openai_server() as server:
        server.behaviour.stream_usage = False
        engine = _engine(server.url, api="completions")
        engine.open_session("a")
        chunks = [c async for c in engine.stream("a", "Q: two?\nA:", max_tokens=3)]
        await engine.aclose()
    last = chunks[-1]
    assert last.usage is not None
    assert last.usage.output_tokens == engine.count_tokens(" reply 1")
    assert "".join(c.text for c in chunks) == " reply 1"
