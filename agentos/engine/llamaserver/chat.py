"""Chat on a ``llamaserver`` session: ``/v1/chat/completions`` with the whole conversation.

llama.cpp ignores ``tools`` for a template that knows none, so every conversation is
*lowered* (:func:`agentos.core.chat.lower_messages`) and the reply constrained to
:func:`~agentos.core.chat.tool_call_schema` and parsed back into tool calls. The
session's :class:`~.state.ChatState` keeps both the OpenAI-shaped messages the agent
sees and the plain turns the server was sent (the assistant turns in the model's own
text, so the rendered prompt is the slot's cache plus the new turns).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from agentos.core.chat import (
    Reply,
    TokenUsage,
    ToolCall,
    ToolSpec,
    lower_messages,
    parse_constrained,
    template_stops,
    tool_call_schema,
)
from agentos.engine.base import ContextOverflow, EngineError
from agentos.engine.llamaserver.slots import Conn
from agentos.engine.llamaserver.state import ChatState, Session, count_usage
from agentos.engine.remote import RequestRefused

__all__ = ["COMPACT_JSON", "chat", "constraint", "rendered_tokens"]

# llama.cpp builds its JSON grammars with llguidance, whose default lets the model
# pretty-print: the 270M model wrote a 30-token call as '{\n  "tool": ...}' where the
# compact form is 14 tokens. Decoding dominates a tool loop on a CPU, so tool calls are
# constrained compact (the option is ignored by servers built without llguidance).
COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}


def constraint(
    tools: Sequence[ToolSpec], tool_choice: str, response_format: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    """The JSON Schema the reply is constrained to, or None for free text.

    With tools, the tool-call schema (answer-only under ``none``, so the reply keeps the
    form the lowered conversation taught the model); without, the caller's
    ``response_format``.
    """
    if tools:
        return {**tool_call_schema(tools, tool_choice), "x-guidance": COMPACT_JSON}
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        if not isinstance(schema, Mapping):
            raise EngineError("response_format json_schema needs {json_schema: {schema: {...}}}")
        return dict(schema)
    if kind == "json_object":
        return {"type": "object"}
    if kind in (None, "text"):
        return None
    raise EngineError(f"response_format type {kind!r} is not text, json_object or json_schema")


async def chat(
    conn: Conn,
    session_id: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[ToolSpec] = (),
    tool_choice: str = "auto",
    parallel_tool_calls: bool = True,
    response_format: Mapping[str, Any] | None = None,
    max_tokens: int = 256,
    stop: Sequence[str] = (),
    temperature: float = 0.0,
    template: str | None,
    banned: Sequence[int],
) -> Reply:
    """Send the conversation with ``messages`` appended to ``/v1/chat/completions``
    on the session's slot; the reply is appended too (see the module docstring).

    With ``tools`` the reply is constrained to one call (``call_{n}``, ``n`` counting
    the conversation's calls) or, unless ``tool_choice`` is ``required`` or names a
    tool, an answer: a local base model makes one call per reply, so
    ``parallel_tool_calls`` changes nothing. Without tools ``response_format``
    (``json_schema``, ``json_object``) constrains the text. Usage is the server's:
    input = ``timings.prompt_n``, cached = ``timings.cache_n``, output =
    ``timings.predicted_n``. Raises :class:`ContextOverflow` when the conversation no
    longer fits the slot and :class:`EngineError` as :meth:`generate` does; on any
    failure the conversation is left as it was.
    """
    started = time.perf_counter()
    s = conn.slots.get(session_id)
    if s.tokens and s.chat is None:
        raise EngineError(
            f"session {session_id!r} holds a text context (generate, stream); chat needs "
            "a reset session"
        )
    schema = constraint(tools, tool_choice, response_format)
    chat = s.chat or ChatState()
    new = [dict(m) for m in messages]
    turns = lower_messages(new, tools, described=chat.described)
    body: dict[str, Any] = {
        "messages": [*chat.lowered, *turns],
        "id_slot": s.slot,
        "cache_prompt": True,
        "max_tokens": max_tokens,
        "temperature": temperature,
    }
    stops = [*stop, *(template_stops(template) if template else ())]
    if stops:
        body["stop"] = stops
    if schema is not None:
        body["json_schema"] = schema
    if banned:
        body["logit_bias"] = [[t, False] for t in banned]
    await conn.slots.clean(session_id, s)
    try:
        async with conn.call(
            session_id, "POST", "/v1/chat/completions", body, pinned=s.replica
        ) as (replica, response):
            data = response.json()
    except RequestRefused as e:
        if e.status == 400 and "exceed_context_size" in e.detail:
            raise ContextOverflow(
                f"session {session_id!r}: the conversation and {max_tokens} new tokens "
                f"exceed the slot's context ({e.detail})"
            ) from e
        raise
    try:
        choice = data["choices"][0]
        text = choice["message"].get("content") or ""
        ended = str(choice.get("finish_reason") or "stop")
        timings = data.get("timings") or {}
        prompt_n = int(timings.get("prompt_n") or 0)
        cache_n = int(timings.get("cache_n") or 0)
        output_n = int(
            timings.get("predicted_n") or (data.get("usage") or {}).get("completion_tokens") or 0
        )
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
        raise conn.client.garbage(replica, f"/v1/chat/completions without a choice: {e}") from e
    if not isinstance(text, str):
        raise conn.client.garbage(replica, "/v1/chat/completions content is not text")
    calls: tuple[ToolCall, ...] = ()
    content: str | None = text
    if tools:
        content, calls = parse_constrained(text, f"call_{chat.calls_so_far(new)}")
    reason = "tool_calls" if calls else "length" if ended == "length" else "stop"
    reply = Reply(
        content,
        calls,
        reason,
        TokenUsage(prompt_n, cache_n, output_n),
        time_to_first_token_s=float(timings.get("prompt_ms") or 0.0) / 1000,
        duration_s=time.perf_counter() - started,
    )
    chat.messages.extend(new)
    chat.messages.append(reply.message())
    # The model's own text, not a re-lowering of the reply: the slot holds its tokens.
    chat.lowered.extend(turns)
    chat.lowered.append({"role": "assistant", "content": text})
    if tools:
        chat.described = list(tools)
    elif chat.described is None:
        chat.described = []
    chat.n_tokens = prompt_n + cache_n + output_n
    s.chat = chat
    count_usage(conn.stats, s, prompt_n, cache_n, output_n)
    return reply


async def rendered_tokens(
    conn: Conn, session_id: str, s: Session, lowered: Sequence[Mapping[str, str]]
) -> list[int]:
    """The conversation as the server renders and tokenizes it (for a re-prefill)."""
    if not lowered:
        return []
    body: dict[str, Any] = {"messages": list(lowered)}
    async with conn.call(session_id, "POST", "/apply-template", body, pinned=s.replica) as (
        replica,
        response,
    ):
        prompt = response.json().get("prompt")
    if not isinstance(prompt, str):
        raise conn.client.garbage(replica, "/apply-template without a prompt")
    body = {"content": prompt, "add_special": True, "parse_special": True}
    async with conn.call(session_id, "POST", "/tokenize", body, pinned=s.replica) as (
        replica,
        response,
    ):
        try:
            return [int(t) for t in response.json()["tokens"]]
        except (KeyError, TypeError, ValueError) as e:
            raise conn.client.garbage(replica, "/tokenize without tokens") from e
