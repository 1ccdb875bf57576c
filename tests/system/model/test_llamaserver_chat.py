"""Chat and tool calls on the llamaserver engine, against a real llama.cpp server (xllamacpp).

One embedded server for the module (two slots, one thread, a small context), set up the
way the engine sets up its own: the default Gemma 3 270M base model has no chat template,
so it gets the built-in ``gemma``. Assertions are on the server's own counters
(``timings``, ``/metrics``) and on the structure of the replies, never on free text.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

pytest.importorskip("xllamacpp")

import itertools

from agentos.core.chat import Reply, ToolCall, ToolSpec, validate_messages
from agentos.engine import KVSnapshot
from agentos.engine.base import ContextOverflow, EngineError, ModelMisconfigured
from agentos.engine.gguf import default_model_path
from agentos.engine.llamaserver import (
    EmbeddedServer,
    LlamaServerEngine,
    ServerTemplate,
    gguf_has_chat_template,
    server_template,
)

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

N_CTX = 2048  # two slots of 1,024 tokens
ADD = ToolSpec(
    "add",
    "Add two integers and return their sum.",
    {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"],
    },
)
SYSTEM = {"role": "system", "content": "You are a calculator. Use the tools to compute."}


@pytest.fixture(scope="module")
def server(llama_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    path = default_model_path(llama_home)
    template = server_template(None, gguf_has_chat_template(path))
    s = EmbeddedServer(
        model_path=path,
        slot_dir=tmp_path_factory.mktemp("llamaserver-chat") / "slots",
        n_ctx=N_CTX,
        n_parallel=2,
        n_threads=1,
        chat_template=template.chat_template,
        use_jinja=template.use_jinja,
    )
    yield s
    s.stop()


def _remote(server: EmbeddedServer, **options: Any) -> LlamaServerEngine:
    endpoint = {"url": server.url, "max_concurrent": 2, "slot_dir": str(server.slot_dir)}
    return LlamaServerEngine(endpoints=[endpoint], **options)


def _metrics(url: str, headers: dict[str, str] | None = None) -> dict[str, float]:
    text = httpx.get(url + "/metrics", headers=headers, timeout=10).text
    out = {}
    for line in text.splitlines():
        if line.startswith("llamacpp:"):
            name, _, value = line.partition(" ")
            out[name.removeprefix("llamacpp:")] = float(value)
    return out


def _result_of(call: ToolCall) -> dict[str, Any]:
    """Run the ``add`` call: the tool message that answers it."""
    total = sum(call.arguments.values())
    return {"role": "tool", "tool_call_id": call.id, "content": str(total)}


def _valid_add_arguments(arguments: Any) -> bool:
    return (
        isinstance(arguments, dict)
        and set(arguments) == {"a", "b"}
        and all(type(v) is int for v in arguments.values())
    )


def _new_turns(
    engine: LlamaServerEngine, session: str, turns: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """What the SDK hands the engine: new turns checked against the conversation."""
    return validate_messages(turns, engine.conversation(session))


def test_a_model_without_a_template_gets_the_builtin_gemma(
    llama_home: Path, tmp_path: Path
) -> None:
    assert not gguf_has_chat_template(default_model_path(llama_home))
    assert server_template(None, False) == ServerTemplate("gemma", False, "gemma")
    assert server_template(None, True) == ServerTemplate("", True, None)
    assert server_template("chatml", True) == ServerTemplate("chatml", False, "chatml")
    plain = server_template("plain", False)
    assert plain.use_jinja
    assert plain.builtin == "plain"
    assert "assistant:" in plain.chat_template
    jinja = tmp_path / "mine.jinja"
    jinja.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert server_template(str(jinja), False) == ServerTemplate(jinja.read_text(), True, None)
    with pytest.raises(EngineError, match=r"missing\.jinja"):
        server_template(str(tmp_path / "missing.jinja"), False)


async def test_three_turns_prefill_only_each_new_turn(server: EmbeddedServer) -> None:
    engine = _remote(server)
    before = _metrics(server.url)
    try:
        assert engine._template == "gemma"  # learned from the server's /props
        engine.open_session("a")
        replies: list[Reply] = []
        for text in ("My name is Zed.", "I live in Paris.", "What is my name?"):
            turns = [{"role": "user", "content": text}]
            new = _new_turns(engine, "a", [SYSTEM, *turns] if not replies else turns)
            replies.append(await engine.chat("a", new, max_tokens=6))
        for previous, reply in itertools.pairwise(replies):
            held = previous.input_tokens + previous.cached_tokens + previous.output_tokens
            # The slot held the whole previous conversation, the model's reply included...
            assert held - 2 <= reply.cached_tokens <= held, (previous, reply)
            # ...so only the new user turn and its turn markers were prefilled.
            assert 0 < reply.input_tokens <= 20, reply
        assert replies[0].cached_tokens <= 1
        assert engine.session_info("a").n_tokens == (
            replies[-1].input_tokens + replies[-1].cached_tokens + replies[-1].output_tokens
        )
        messages = engine.conversation("a")
        assert [m["role"] for m in messages] == [
            "system",
            "user",
            "assistant",
            "user",
            "assistant",
            "user",
            "assistant",
        ]
        after = _metrics(server.url)
        processed = after["prompt_tokens_total"] - before["prompt_tokens_total"]
        reused = after["prompt_tokens_cached_total"] - before["prompt_tokens_cached_total"]
        assert processed == sum(r.input_tokens for r in replies)
        assert reused == sum(r.cached_tokens for r in replies)
        with pytest.raises(EngineError, match="chat conversation"):
            await engine.generate("a", "text on a chat session")
    finally:
        await engine.aclose()


async def test_a_tool_loop_on_the_base_model_makes_calls_that_validate(
    server: EmbeddedServer,
) -> None:
    engine = _remote(server)
    try:
        engine.open_session("calc")
        pending = [SYSTEM, {"role": "user", "content": "What is 17 plus 25?"}]
        reply = await engine.chat(
            "calc", _new_turns(engine, "calc", pending), tools=[ADD], tool_choice="required"
        )
        assert reply.finish_reason == "tool_calls", reply
        (call,) = reply.tool_calls
        assert call.id == "call_0"
        assert call.name == "add"
        assert call.error is None
        assert _valid_add_arguments(call.arguments), call
        assert json.loads(call.raw_arguments) == call.arguments
        # Constrained compact: '{"tool":"add","arguments":{"a":2,"b":3}}' is under 20 tokens;
        # llama.cpp's default (pretty-printed) took 36-40.
        assert reply.output_tokens <= 24, reply
        result = _result_of(call)
        held = reply.input_tokens + reply.cached_tokens + reply.output_tokens

        final = await engine.chat(
            "calc",
            _new_turns(engine, "calc", [result]),
            tools=[ADD],
            tool_choice="none",
            max_tokens=32,
        )
        assert final.tool_calls == ()
        assert final.finish_reason in ("stop", "length")
        assert isinstance(final.content, str)
        # The reply's own text was resent: at most its tokens (re-split by the tokenizer)
        # and the tool result were prefilled.
        assert final.cached_tokens >= held - reply.output_tokens - 2, (reply, final)
        assert [m["role"] for m in engine.conversation("calc")] == [
            "system",
            "user",
            "assistant",
            "tool",
            "assistant",
        ]
        assert engine.conversation("calc")[2]["tool_calls"][0]["id"] == "call_0"
    finally:
        await engine.aclose()


async def test_hibernate_and_wake_in_the_middle_of_a_tool_loop(server: EmbeddedServer) -> None:
    first = _remote(server)
    try:
        first.open_session("calc")
        pending = [SYSTEM, {"role": "user", "content": "Please add 100 and 23."}]
        reply = await first.chat(
            "calc", _new_turns(first, "calc", pending), tools=[ADD], tool_choice="required"
        )
        (call,) = reply.tool_calls
        assert _valid_add_arguments(call.arguments), call
        snapshot = await first.export_kv("calc")
        conversation = first.conversation("calc")
        slot = first._sessions["calc"].slot
        first.close_session("calc")
    finally:
        await first.aclose()
    assert snapshot.data is not None
    assert snapshot.n_kv is not None
    assert json.loads(snapshot.conversation)["messages"] == conversation
    assert len(snapshot.tokens) >= snapshot.n_kv  # the rendered conversation, to re-prefill

    second = _remote(server)  # another daemon: the agent wakes in the other slot
    try:
        second.open_session("squatter")
        second.open_session("calc")
        assert second._sessions["calc"].slot != slot
        assert await second.import_kv("calc", snapshot)
        assert second.conversation("calc") == conversation
        result = _result_of(call)
        final = await second.chat(
            "calc",
            _new_turns(second, "calc", [result]),
            tools=[ADD],
            tool_choice="auto",
            max_tokens=32,
        )
        # No re-prefill: the restored slot served the whole conversation so far.
        assert snapshot.n_kv - 2 <= final.cached_tokens <= snapshot.n_kv, (snapshot.n_kv, final)
        assert final.input_tokens <= 30, final
        assert second.stats.last_restore_check == (snapshot.n_kv, final.cached_tokens)
        if final.tool_calls:
            assert final.tool_calls[0].id == "call_1"
            assert _valid_add_arguments(final.tool_calls[0].arguments)
        assert len(second.conversation("calc")) == len(conversation) + 2
    finally:
        await second.aclose()


async def test_a_refused_restore_re_prefills_the_rendered_conversation(
    server: EmbeddedServer,
) -> None:
    engine = _remote(server)
    try:
        engine.open_session("a")
        pending = [SYSTEM, {"role": "user", "content": "What is 2 plus 3?"}]
        await engine.chat(
            "a", _new_turns(engine, "a", pending), tools=[ADD], tool_choice="required"
        )
        good = await engine.export_kv("a")
        await engine.reset_session("a")
        assert engine.conversation("a") == []
        foreign = KVSnapshot(
            "llamaserver/other", good.tokens, good.data, good.n_kv, good.conversation
        )
        assert await engine.import_kv("a", foreign) is False
        await engine.prefill("a", good.tokens, good.conversation)  # what the hibernator does
        assert engine.session_info("a").n_tokens == len(good.tokens)
        (call,) = [c for m in engine.conversation("a") for c in m.get("tool_calls") or ()]
        result = {"role": "tool", "tool_call_id": call["id"], "content": "5"}
        final = await engine.chat(
            "a", _new_turns(engine, "a", [result]), tools=[ADD], tool_choice="none", max_tokens=32
        )
        assert final.cached_tokens >= len(good.tokens) - 2, (len(good.tokens), final)
    finally:
        await engine.aclose()


async def test_response_format_and_overflow(server: EmbeddedServer) -> None:
    engine = _remote(server)
    try:
        engine.open_session("a")
        schema = {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}},
            "required": ["city"],
            "additionalProperties": False,
        }
        new = _new_turns(
            engine, "a", [{"role": "user", "content": "The capital of France, as JSON."}]
        )
        reply = await engine.chat(
            "a",
            new,
            response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
            max_tokens=48,
        )
        assert reply.finish_reason == "stop", reply
        assert set(json.loads(reply.text)) == {"city"}
        before = engine.conversation("a")
        huge = _new_turns(engine, "a", [{"role": "user", "content": "word " * 1500}])
        with pytest.raises(ContextOverflow, match="context"):
            await engine.chat("a", huge, max_tokens=8)
        assert engine.conversation("a") == before
    finally:
        await engine.aclose()


async def test_a_key_protected_server_needs_the_models_key(
    llama_home: Path, tmp_path: Path
) -> None:
    key = "sk-test-4f1c"
    embedded = LlamaServerEngine(
        home=tmp_path,
        model_path=default_model_path(llama_home),
        slots=1,
        n_ctx=512,
        n_threads=1,
        api_key=key,
    )
    try:
        assert embedded.server is not None
        url = embedded.server.url
        bearer = {"Authorization": f"Bearer {key}"}
        text = "hello " * 40
        async with httpx.AsyncClient(timeout=10) as http:
            for path in ("/props", "/slots", "/metrics"):  # the server does require it
                assert (await http.get(url + path)).status_code == 401
            response = await http.post(url + "/tokenize", json={"content": text}, headers=bearer)
            exact = len(response.json()["tokens"])
        assert key not in str(embedded.server.process.args)  # not on the command line
        before = _metrics(url, bearer)
        endpoint = {"url": url, "max_concurrent": 1, "slot_dir": str(embedded.server.slot_dir)}
        remote = LlamaServerEngine(endpoints=[endpoint], api_key=key)  # /props
        try:
            assert remote.count_tokens(text) == 60  # on the loop: an estimate, no HTTP
            assert await anyio.to_thread.run_sync(remote.count_tokens, text) == exact
            assert remote.count_tokens(text) == exact  # remembered
            remote.open_session("a")
            new = _new_turns(remote, "a", [{"role": "user", "content": "Hi."}])
            reply = await remote.chat("a", new, max_tokens=4)
            snapshot = await remote.export_kv("a")  # /apply-template, /tokenize, /slots
            assert snapshot.data is not None
            assert remote.stats.saves == 1
        finally:
            await remote.aclose()
        after = _metrics(url, bearer)
        assert after["prompt_tokens_total"] - before["prompt_tokens_total"] == reply.input_tokens
        with pytest.raises(EngineError, match="credentials") as refused:
            LlamaServerEngine(endpoints=[endpoint], api_key="sk-wrong-key")
        # The Model's fault, not the server's: its agents park until the key is fixed.
        assert isinstance(refused.value, ModelMisconfigured)
        assert "sk-wrong-key" not in str(refused.value)
        with pytest.raises(EngineError, match="401"):
            LlamaServerEngine(endpoints=[endpoint])
    finally:
        await embedded.aclose()


def _children() -> set[int]:
    me = os.getpid()
    found: set[int] = set()
    for task in Path(f"/proc/{me}/task").iterdir():
        text = (task / "children").read_text().split()
        found.update(int(pid) for pid in text)
    return found


def test_an_engine_whose_start_fails_leaves_no_server_behind(
    llama_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import agentos.engine.llamaserver as llamaserver

    def broken(path: Path) -> str:
        raise OSError("disk read error")

    monkeypatch.setattr(llamaserver, "model_sha256", broken)
    before = _children()
    with pytest.raises(OSError, match="disk read error"):
        LlamaServerEngine(
            home=tmp_path,
            model_path=default_model_path(llama_home),
            slots=1,
            n_ctx=512,
            n_threads=1,
        )
    assert _children() <= before  # the server child it started was stopped
