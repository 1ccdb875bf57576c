"""Chat messages and tool calls on the in-process llama engine, with the real Gemma 3 270M.

Agents chat for hours, so a chat turn must prefill only what it adds (the engine's
counters pin that), the base model must return tool calls whose arguments fit the tool's
schema (constrained output), and an agent hibernated in the middle of a tool loop must
go on from its KV without re-prefilling. The template tests at the top need no model.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from agentos.core.chat import ToolCall, ToolSpec, render, turn_end
from agentos.engine import ContextOverflow, EngineError
from agentos.engine.llama import LlamaEngine
from agentos.engine.llama_chat import ChatState, load_template, output_schema, plan_turn

pytestmark = pytest.mark.anyio

N_CTX = 1024

ADD = ToolSpec(
    "add",
    "Add two integers and return the sum.",
    {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"],
    },
)
WEATHER = ToolSpec(
    "weather",
    "The weather in a city today.",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)
TOOLS = (ADD, WEATHER)

# ChatML as a Jinja chat template, as GGUFs carry it (with the BOS text in front).
CHATML_JINJA = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
]


# -- templates and plans (no model) -------------------------------------------------------


def test_built_in_templates_render() -> None:
    chatml = load_template("chatml", None)
    assert chatml.key == "chatml"
    assert chatml.stops == ("<|im_end|>", "<|im_start|>")
    assert chatml.render(TURNS[:2]) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    plain = load_template(None, None)  # a model without a template gets "plain"
    assert plain.key == "plain"
    assert plain.render(TURNS) == (
        "system: Be brief.\nuser: Hi\nassistant: Hello!\nuser: Bye\nassistant:"
    )
    gemma = load_template("gemma", "{{ 'ignored: the option wins' }}")
    assert gemma.key == "gemma"
    assert gemma.render(TURNS[:2], add_generation_prompt=False) == (
        "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
    )


def test_jinja_template_file_renders(tmp_path: Path) -> None:
    path = tmp_path / "chatml.jinja"
    path.write_text(CHATML_JINJA, encoding="utf-8")
    jinja = load_template(str(path), None, bos="<bos>", eos="<eos>")
    assert jinja.is_jinja
    assert jinja.key.startswith("jinja:")
    assert str(path) in repr(jinja)
    # The BOS text is left to the engine (it adds the token); the rest is ChatML.
    assert jinja.render(TURNS) == render("chatml", TURNS)
    assert jinja.render(TURNS, add_generation_prompt=False) == render(
        "chatml", TURNS, add_generation_prompt=False
    )
    # What ends an assistant turn is found by rendering one.
    assert jinja.stops == ("<|im_end|>", "<eos>")
    # A GGUF's own template is used when no option is given.
    from_gguf = load_template(None, CHATML_JINJA, bos="<bos>", eos="<eos>")
    assert from_gguf.key == jinja.key
    assert from_gguf.origin == "tokenizer.chat_template"


def test_bad_templates_are_value_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="neither a built-in template"):
        load_template(str(tmp_path / "missing.jinja"), None)
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}", encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.jinja is not valid Jinja"):
        load_template(str(broken), None)
    strict = load_template(
        None,
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}",
    )
    with pytest.raises(ValueError, match="refused the conversation: no system"):
        strict.render(TURNS)


def test_plans_append_only_and_rebuild() -> None:
    plain = load_template("plain", None)
    first = plan_turn(plain, None, 0, TURNS[:2], ())
    assert first.reset  # an empty session: the whole (short) conversation
    assert first.prompt == "system: Be brief.\nuser: Hi\nassistant:"
    state = first.finish("plain", " Hello!\nuser:", " Hello!", 12, {"role": "assistant"})
    assert state.tail == "\nuser:"
    # The model's own stop string begins the next turn: only the rest is prefilled.
    second = plan_turn(plain, state, 12, [TURNS[3]], ())
    assert not second.reset
    assert second.prompt == " Bye\nassistant:"
    assert second.text == "system: Be brief.\nuser: Hi\nassistant: Hello!\nuser: Bye\nassistant:"
    # Tokens the chat does not know of (text generated in between): rebuild from turns.
    rebuilt = plan_turn(plain, state, 20, [TURNS[3]], ())
    assert rebuilt.reset
    assert rebuilt.prompt == second.text
    # Jinja: the delta after the text in the context, or a rebuild when it is no prefix.
    jinja = load_template(None, CHATML_JINJA)
    j1 = plan_turn(jinja, None, 0, TURNS[:2], ())
    j_state = j1.finish(jinja.key, "Hello!", "Hello!", 9, {"role": "assistant"})
    j2 = plan_turn(jinja, j_state, 9, [TURNS[3]], ())
    assert not j2.reset
    assert j2.prompt == "<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
    odd = dataclasses.replace(j_state, text=j_state.text + "?")
    assert plan_turn(jinja, odd, 9, [TURNS[3]], ()).reset
    # State survives JSON (a hibernation) unchanged, tools included.
    tooled = plan_turn(plain, None, 0, TURNS[:2], TOOLS).finish(
        "plain", "{}", "{}", 30, {"role": "assistant"}
    )
    assert tooled.described == list(TOOLS)
    assert ChatState.from_json(tooled.to_json()) == tooled
    with pytest.raises(ValueError, match="format"):
        ChatState.from_json(b'{"format": 99}')


def test_output_schema() -> None:
    assert output_schema((), "none", None) is None
    assert output_schema(TOOLS, "none", {"type": "text"}) is None
    assert output_schema((), "none", {"type": "json_object"}) == {"type": "object"}
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    assert output_schema((), "none", fmt) == schema
    assert "oneOf" in (output_schema(TOOLS, "required", fmt) or {})
    with pytest.raises(ValueError, match=r"json_schema\.schema"):
        output_schema((), "none", {"type": "json_schema"})


# -- the engine ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(llama_home: Path) -> Iterator[LlamaEngine]:
    eng = LlamaEngine(home=llama_home, slots=3, n_ctx=N_CTX, n_threads=1)
    try:
        yield eng
    finally:
        eng.close()


@pytest.fixture
def session(engine: LlamaEngine) -> Iterator[Callable[[str], str]]:
    opened: list[str] = []

    def open_(name: str) -> str:
        engine.open_session(name)
        opened.append(name)
        return name

    yield open_
    for name in opened:
        engine.close_session(name)


_JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
}


def arguments_fit(tool: ToolSpec, arguments: Mapping[str, Any]) -> bool:
    """The keys and types of the tool's (flat) parameter schema, checked by hand."""
    props = tool.parameters["properties"]
    return (
        set(arguments) <= set(props)
        and set(tool.parameters["required"]) <= set(arguments)
        and all(_JSON_TYPES[props[k]["type"]](v) for k, v in arguments.items())
    )


def execute(call: ToolCall) -> dict[str, Any]:
    """Run a call with the test's tools; the tool message the next chat call sends."""
    tool = next(t for t in TOOLS if t.name == call.name)
    assert call.error is None, call.raw_arguments
    assert arguments_fit(tool, call.arguments), call.raw_arguments
    if call.name == "add":
        result = str(call.arguments["a"] + call.arguments["b"])
    else:
        result = json.dumps({"city": call.arguments["city"], "sky": "clear", "celsius": 21})
    return {"role": "tool", "tool_call_id": call.id, "content": result}


def tail_of(text: str, content: str) -> str:
    """What the model generated after ``content`` (its stop string), at the end of ``text``."""
    return text[text.rindex(content) + len(content) :] if content else ""


async def test_three_turn_chat_prefills_only_each_new_turn(
    engine: LlamaEngine, session: Callable[[str], str]
) -> None:
    s = session("three")
    assert engine.chat_template.key == "plain"  # the base model's GGUF has no template
    turns = [
        [{"role": "system", "content": "You are a terse assistant."}],
        [{"role": "user", "content": "My name is Zed. Say hello."}],
        [{"role": "user", "content": "What is my name?"}],
        [{"role": "user", "content": "Say goodbye."}],
    ]
    turns = [turns[0] + turns[1], turns[2], turns[3]]
    before, previous = "", None
    for k, new in enumerate(turns):
        n_held = engine.session_info(s).n_tokens
        prefilled = engine.stats.prefill_tokens
        reply = await engine.chat(s, new, max_tokens=12)
        assert reply.tool_calls == ()
        assert reply.finish_reason in ("stop", "length")
        assert reply.usage.cached_tokens == n_held
        assert engine.stats.prefill_tokens - prefilled == reply.usage.input_tokens
        # Turn k's rendered delta: close the previous assistant turn, render the new one.
        lowered = [{"role": m["role"], "content": m["content"]} for m in new]
        if previous is None:
            delta = render("plain", lowered)
            expected = engine.count_tokens(delta) + 1  # BOS opens the session
        else:
            delta = turn_end("plain") + render("plain", lowered)
            tail = tail_of(before, previous.text)
            if tail and delta.startswith(tail):
                delta = delta[len(tail) :]
            expected = engine.count_tokens(delta)
        assert reply.usage.input_tokens == expected, (k, delta)
        after = engine.chat_text(s)
        assert after.startswith(before + delta)
        assert engine.session_info(s).n_tokens == n_held + expected + reply.usage.output_tokens
        before, previous = after, reply
    # The last turn cost its own few tokens, not the conversation's.
    assert previous is not None
    assert previous.usage.input_tokens * 4 < engine.count_tokens(before)
    conversation = engine.conversation(s)
    assert [m["role"] for m in conversation] == [
        "system", "user", "assistant", "user", "assistant", "user", "assistant",
    ]  # fmt: skip
    assert conversation[-1] == previous.message()
    await engine.reset_session(s)
    assert engine.conversation(s) == []
    assert engine.chat_text(s) == ""


async def test_tool_loop_with_required_tool_choice(
    engine: LlamaEngine, session: Callable[[str], str]
) -> None:
    s = session("loop")
    new: list[dict[str, Any]] = [
        {"role": "system", "content": "You are a careful calculator agent."},
        {"role": "user", "content": "What is 2 + 3? Use the add tool."},
    ]
    calls: list[ToolCall] = []
    for step in range(2):
        reply = await engine.chat(s, new, tools=TOOLS, tool_choice="required", max_tokens=48)
        assert reply.finish_reason == "tool_calls", reply
        assert reply.content is None
        assert len(reply.tool_calls) == 1
        call = reply.tool_calls[0]
        assert call.id == f"call_{step}"  # deterministic: counts the conversation's calls
        calls.append(call)
        new = [execute(call)]  # validates the arguments against the tool's schema
    final = await engine.chat(s, new, tools=TOOLS, tool_choice="none", max_tokens=16)
    assert final.tool_calls == ()
    assert final.finish_reason in ("stop", "length")
    assert isinstance(final.content, str)
    conversation = engine.conversation(s)
    assert [m["role"] for m in conversation] == [
        "system", "user", "assistant", "tool", "assistant", "tool", "assistant",
    ]  # fmt: skip
    assert [m["tool_calls"][0]["id"] for m in conversation if m.get("tool_calls")] == [
        "call_0",
        "call_1",
    ]
    # The model's own JSON is the assistant turn in the context, not a re-dump.
    text = engine.chat_text(s)
    assert all(c.raw_arguments.replace(" ", "") in text.replace(" ", "") for c in calls)
    assert "- add: Add two integers" in text
    assert "- weather:" in text


async def test_named_tool_choice_and_json_response_format(
    engine: LlamaEngine, session: Callable[[str], str]
) -> None:
    s = session("named")
    user = {"role": "user", "content": "Is it sunny in Paris?"}
    reply = await engine.chat(s, [user], tools=TOOLS, tool_choice="weather", max_tokens=32)
    assert [c.name for c in reply.tool_calls] == ["weather"]
    assert arguments_fit(WEATHER, reply.tool_calls[0].arguments)
    schema = {
        "type": "object",
        "properties": {"sunny": {"type": "boolean"}},
        "required": ["sunny"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    answer = await engine.chat(s, [execute(reply.tool_calls[0])], response_format=fmt)
    assert answer.finish_reason == "stop"
    assert isinstance(json.loads(answer.text)["sunny"], bool)


async def test_hibernate_and_wake_in_a_tool_loop(
    engine: LlamaEngine, session: Callable[[str], str]
) -> None:
    # "awake" never sleeps: the woken session must answer exactly as it does.
    sleeper, awake = session("sleeper"), session("awake")
    new = [{"role": "user", "content": "Add 20 and 22 with the add tool."}]
    first = [
        await engine.chat(name, new, tools=TOOLS, tool_choice="required", max_tokens=48)
        for name in (sleeper, awake)
    ]
    assert first[0].tool_calls == first[1].tool_calls
    snapshot = await engine.export_kv(sleeper)
    assert json.loads(snapshot.conversation)["messages"] == engine.conversation(sleeper)
    engine.close_session(sleeper)
    engine.open_session(sleeper)
    assert engine.conversation(sleeper) == []
    assert await engine.import_kv(sleeper, snapshot)
    assert engine.conversation(sleeper) == engine.conversation(awake)
    result = [execute(first[0].tool_calls[0])]
    prefilled = engine.stats.prefill_tokens
    woken = await engine.chat(sleeper, result, tools=TOOLS, tool_choice="required", max_tokens=48)
    # No re-prefill: the call prefilled the tool result's turn only.
    assert woken.usage.cached_tokens == len(snapshot.tokens)
    assert engine.stats.prefill_tokens - prefilled == woken.usage.input_tokens < 40
    never_slept = await engine.chat(
        awake, result, tools=TOOLS, tool_choice="required", max_tokens=48
    )
    assert woken.usage.input_tokens == never_slept.usage.input_tokens
    assert woken.tool_calls == never_slept.tool_calls
    assert woken.tool_calls[0].id == "call_1"
    assert engine.chat_text(sleeper) == engine.chat_text(awake)


async def test_unusable_kv_re_prefills_with_the_conversation(
    engine: LlamaEngine, session: Callable[[str], str]
) -> None:
    s = session("replay")
    new = [{"role": "user", "content": "What is 1 + 1? Use the add tool."}]
    call = await engine.chat(s, new, tools=TOOLS, tool_choice="required", max_tokens=48)
    snapshot = await engine.export_kv(s)
    await engine.reset_session(s)
    assert not await engine.import_kv(s, dataclasses.replace(snapshot, fingerprint="other"))
    assert engine.conversation(s) == []
    await engine.prefill(s, snapshot.tokens, snapshot.conversation)
    assert engine.conversation(s) == json.loads(snapshot.conversation)["messages"]
    nxt = await engine.chat(s, [execute(call.tool_calls[0])], tools=TOOLS, max_tokens=48)
    assert nxt.usage.cached_tokens == len(snapshot.tokens)
    with pytest.raises(EngineError, match="chat state is not JSON"):
        await engine.prefill(s, [], b"{not json")


async def test_overflow_leaves_the_session_unchanged(
    engine: LlamaEngine, session: Callable[[str], str]
) -> None:
    s = session("full")
    await engine.chat(s, [{"role": "user", "content": "Hello."}], max_tokens=4)
    held = engine.session_info(s)
    conversation, text = engine.conversation(s), engine.chat_text(s)
    huge = {"role": "user", "content": "lorem ipsum " * (N_CTX // 2)}
    with pytest.raises(ContextOverflow):
        await engine.chat(s, [huge], max_tokens=4)
    assert engine.session_info(s) == held
    assert engine.conversation(s) == conversation
    assert engine.chat_text(s) == text
    with pytest.raises(EngineError, match="tool_choice"):
        await engine.chat(s, [{"role": "user", "content": "x"}], tool_choice="required")


async def test_jinja_template_on_the_engine(llama_home: Path, tmp_path: Path) -> None:
    path = tmp_path / "chatml.jinja"
    path.write_text(CHATML_JINJA, encoding="utf-8")
    eng = LlamaEngine(home=llama_home, slots=1, n_ctx=512, n_threads=1, chat_template=str(path))
    try:
        assert eng.chat_template.is_jinja
        assert eng.chat_template.stops == ("<|im_end|>", "<eos>")
        eng.open_session("j")
        one = await eng.chat("j", TURNS[:2], max_tokens=8)
        text = eng.chat_text("j")
        assert text.startswith(render("chatml", TURNS[:2]))  # no BOS text: the token is there
        two = await eng.chat("j", [TURNS[3]], max_tokens=8)
        # Rendered whole, prefilled as the delta after the text already in the context.
        assert two.usage.cached_tokens == one.usage.input_tokens + one.usage.output_tokens
        assert eng.chat_text("j").startswith(text)
        assert two.usage.input_tokens < one.usage.input_tokens
    finally:
        eng.close()
