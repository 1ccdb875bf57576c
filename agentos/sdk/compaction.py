"""What a call does when the agent's context no longer fits the model (``onOverflow``).

With ``compact`` (the default) a chat drops its oldest turns, half at a time, keeping
the system message(s) and every tool call with its result; a text context, which has
no turns to tell apart, is emptied and the prompt sent alone. Either way the context
is put back when that does not help, and the overflow raised; with ``fail`` it is
raised at once. The conversation helpers here also keep it valid for servers that
refuse a tool call without its answer.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agentos.core.chat import Reply
from agentos.engine.base import Completion, ContextOverflow, Engine, EngineError, KVSnapshot

__all__ = [
    "Compaction",
    "answer_dangling",
    "chat_fitting",
    "compact_history",
    "context_tokens",
    "generate_fitting",
    "holds",
]

log = logging.getLogger("agentos.sdk")

Compacted = Callable[["Compaction"], Awaitable[None]]
"""Told of a compaction that worked (the LLM handle logs it and tells the runtime)."""


@dataclass(frozen=True, slots=True)
class Compaction:
    """A call's context did not fit the model and was compacted (``onOverflow: compact``).

    ``operation`` is ``chat`` (the oldest turns were dropped, the system message(s) and
    every tool call with its result kept) or ``text`` (a text context was emptied and
    the prompt sent alone). ``dropped_tokens`` is the context's size before, as the
    engine counted it (0 when it does not say).
    """

    operation: str
    dropped_messages: int
    kept_messages: int
    dropped_tokens: int = 0

    def describe(self) -> str:
        """One line for the agent's ``ContextCompacted`` event."""
        if self.operation == "text":
            return (
                f"the text context ({self.dropped_tokens} tokens) did not fit the model; "
                "it was emptied and the prompt sent alone"
            )
        return (
            f"the conversation did not fit the model: dropped its {self.dropped_messages} "
            f"oldest messages, kept {self.kept_messages} (system messages and tool "
            "results with their calls included) and sent them again"
        )


def context_tokens(engine: Engine, session_id: str) -> int:
    """Tokens in the session's context now (0 when it has no session)."""
    if not engine.has_session(session_id):
        return 0
    return engine.session_info(session_id).n_tokens


async def generate_fitting(
    prompt: str,
    *,
    engine: Engine,
    session_id: str,
    on_overflow: str,
    compacted: Compacted,
    options: Mapping[str, Any],
) -> Completion:
    """``engine.generate``; on overflow with ``compact``, the prompt alone once more.

    A text context has no turns to tell apart (no system message, no tool call to
    keep with its result): it is one stream of text, and cutting it anywhere but
    the start could split a token or a sentence the model then continues. So the
    context is emptied and the prompt, the call's own input, is sent alone; if even
    that does not fit, the context is put back and the overflow raised.
    """
    try:
        return await engine.generate(session_id, prompt, **options)
    except ContextOverflow:
        if on_overflow != "compact":
            raise
        before = context_tokens(engine, session_id)
        saved = await engine.export_kv(session_id)
        await engine.reset_session(session_id)
        try:
            completion = await engine.generate(session_id, prompt, **options)
        except ContextOverflow:
            await put_back(saved, engine=engine, session_id=session_id)
            raise
    await compacted(Compaction("text", 0, 0, before))
    return completion


async def chat_fitting(
    history: list[dict[str, Any]],
    new: list[dict[str, Any]],
    *,
    engine: Engine,
    session_id: str,
    on_overflow: str,
    compacted: Compacted,
    options: Mapping[str, Any],
) -> tuple[Reply, list[dict[str, Any]]]:
    """``engine.chat``; on overflow with ``compact``, the oldest turns are dropped
    (half of them each time, see :func:`compact_history`) and the session reset and
    sent the rest with the new turns, until it fits or nothing is left to drop (then
    the conversation is put back and the overflow raised). Returns the reply and the
    history it was answered with."""
    try:
        return await engine.chat(session_id, new, **options), history
    except ContextOverflow:
        if on_overflow != "compact":
            raise
        before = context_tokens(engine, session_id)
        saved = await engine.export_kv(session_id)
        kept = history
        while True:
            smaller = compact_history(kept, new)
            if smaller is None:
                await put_back(saved, engine=engine, session_id=session_id)
                raise
            kept = smaller
            await engine.reset_session(session_id)
            try:
                reply = await engine.chat(session_id, [*kept, *new], **options)
            except ContextOverflow:
                continue
            await compacted(Compaction("chat", len(history) - len(kept), len(kept), before))
            return reply, kept


async def put_back(saved: KVSnapshot, *, engine: Engine, session_id: str) -> None:
    """Restore the context exported before a compaction that did not help."""
    try:
        await engine.reset_session(session_id)
        imported = saved.data is not None and await engine.import_kv(session_id, saved)
        if not imported and (saved.tokens or saved.conversation):
            await engine.prefill(session_id, saved.tokens, saved.conversation)
    except EngineError as e:
        log.warning("%s: the context could not be put back: %s", session_id, e)


_SYSTEM_ROLES = ("system", "developer")


def compact_history(
    history: Sequence[Mapping[str, Any]], new: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]] | None:
    """``history`` with the oldest half of its turns dropped, to make room for ``new``;
    None when no turn is left to drop.

    The system message(s) are kept (first, in their order). A turn is a user or
    assistant message with the tool results that follow it, so a tool call is never
    kept without its result or the other way round; the turn whose calls ``new``
    answers (``new`` opens with tool results) is always kept. The kept part starts at
    a user message when one is left, as chat templates expect.
    """
    system = [dict(m) for m in history if m.get("role") in _SYSTEM_ROLES]
    turns: list[list[dict[str, Any]]] = []
    for m in history:
        if m.get("role") in _SYSTEM_ROLES:
            continue
        if m.get("role") == "tool" and turns:
            turns[-1].append(dict(m))
        else:
            turns.append([dict(m)])
    answered = 1 if new and new[0].get("role") == "tool" and turns else 0
    droppable = len(turns) - answered
    if droppable <= 0:
        return None
    cut = (droppable + 1) // 2
    while cut < droppable and turns[cut][0].get("role") != "user":
        cut += 1
    return system + [m for turn in turns[cut:] for m in turn]


def holds(history: Sequence[Mapping[str, Any]], reply: Mapping[str, Any]) -> bool:
    """Whether the conversation has the assistant turn ``reply`` (by its calls' ids, or
    its text when it made no call)."""
    ids = [c["id"] for c in reply.get("tool_calls") or ()]
    for m in reversed(history):
        if m.get("role") != "assistant":
            continue
        if ids and [c.get("id") for c in m.get("tool_calls") or ()] == ids:
            return True
        if not ids and not m.get("tool_calls") and m.get("content") == reply.get("content"):
            return True
    return False


def answer_dangling(
    history: Sequence[Mapping[str, Any]], new: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Tool messages for the calls of the conversation's last assistant turn that neither
    the history nor the new turns answer (a tool loop stopped at its step limit): every
    server refuses a conversation with an unanswered call."""
    last = next(
        (i for i in range(len(history) - 1, -1, -1) if history[i]["role"] == "assistant"), -1
    )
    if last < 0 or not history[last].get("tool_calls"):
        return []
    answered = {m.get("tool_call_id") for m in [*history[last + 1 :], *new] if m["role"] == "tool"}
    return [
        {
            "role": "tool",
            "tool_call_id": c["id"],
            "name": c["function"]["name"],
            "content": "error: this call was not run (the tool loop stopped first)",
        }
        for c in history[last]["tool_calls"]
        if c["id"] not in answered
    ]
