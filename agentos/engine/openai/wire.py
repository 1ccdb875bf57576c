"""How the ``openai`` engine reads an OpenAI-compatible server: answers whole or streamed
(text, tool-call deltas assembled by index, the finish reason, the server's own usage),
the errors it words in its own ways, and the conversation it keeps for a session, as
stored in a hibernation snapshot.

Apart from :mod:`.engine` so that the engine module holds the calls and the session
bookkeeping, and this one the wire format they read.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from agentos.core.chat import TokenUsage, ToolCall, ToolSpec
from agentos.engine.base import ContextOverflow, EngineError, EngineUnavailable
from agentos.engine.remote import RemoteClient, Replica, RequestRefused

__all__ = [
    "CallParts",
    "Conversation",
    "Reading",
    "conversation_of",
    "decode_conversation",
    "finish_reason_of",
    "read_answer",
    "refused",
    "stream_error",
    "tool_choice_body",
    "usage_of",
]

# How servers word "the prompt does not fit": OpenAI's error code, llama.cpp's error type
# and message, vLLM's message.
_OVERFLOW_MARKS = (
    "context_length_exceeded",
    "exceed_context_size",
    "exceeds the available context",
    "maximum context length",
)


@dataclass(slots=True)
class Conversation:
    text: str = ""  # completions API
    messages: list[dict[str, Any]] = field(default_factory=list)  # chat API
    n_tokens: int = 0  # the last call's prompt + output tokens, as the server counted them

    def encode(self) -> bytes:
        if not self.text and not self.messages:
            return b""  # nothing to restore: the hibernator then starts the context empty
        return json.dumps(
            {"messages": self.messages, "text": self.text}, ensure_ascii=False
        ).encode()


def conversation_of(data: Any) -> Conversation:
    """A conversation from its stored JSON; raises EngineError naming what is wrong."""
    if not isinstance(data, dict):
        raise EngineError("stored conversation is not a JSON object {messages, text}")
    text, messages = data.get("text", ""), data.get("messages", [])
    if not isinstance(text, str):
        raise EngineError("stored conversation: text is not a string")
    if not isinstance(messages, list):
        raise EngineError("stored conversation: messages is not a list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise EngineError(f"stored conversation: messages[{i}] has no role")
    return Conversation(text, [dict(m) for m in messages])


def decode_conversation(conversation: bytes, tokens: Sequence[int]) -> Conversation:
    """The conversation a snapshot holds: its ``conversation`` JSON, or for a snapshot
    written by an earlier version, the same JSON as code points in ``tokens``."""
    try:
        if conversation:
            return conversation_of(json.loads(conversation))
        if tokens:
            return conversation_of(json.loads("".join(chr(t) for t in tokens)))
    except (ValueError, TypeError, OverflowError) as e:
        raise EngineError(f"stored conversation does not decode: {e}") from e
    return Conversation()


def usage_of(event: Mapping[str, Any]) -> TokenUsage | None:
    """Usage from an answer (or a stream's last event); None when it carries none.

    ``prompt_tokens`` is the whole prompt; the cached part comes from
    ``prompt_tokens_details.cached_tokens`` (OpenAI, vLLM) or llama.cpp's
    ``timings.cache_n``, and is not counted as input.
    """
    usage = event.get("usage")
    if not isinstance(usage, Mapping):
        return None
    prompt = int(usage.get("prompt_tokens") or 0)
    details = usage.get("prompt_tokens_details") or {}
    cached = int(details.get("cached_tokens") or 0) if isinstance(details, Mapping) else 0
    timings = event.get("timings") or {}
    if not cached and isinstance(timings, Mapping) and timings.get("cache_n"):
        cached = int(timings["cache_n"])
    cached = min(cached, prompt)
    return TokenUsage(prompt - cached, cached, int(usage.get("completion_tokens") or 0))


def finish_reason_of(reason: str | None, has_calls: bool) -> str:
    if reason == "length":
        return "length"  # even with calls: their arguments may be cut off
    if has_calls or reason in ("tool_calls", "function_call"):
        return "tool_calls"
    return "stop"


def tool_choice_body(choice: str) -> str | dict[str, Any]:
    if choice in ("auto", "required", "none"):
        return choice
    return {"type": "function", "function": {"name": choice}}


@dataclass(slots=True)
class CallParts:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Reading:
    """What an answer (streamed in events, or whole) has said so far."""

    chat: bool
    parts: list[str] = field(default_factory=list)
    calls: dict[int, CallParts] = field(default_factory=dict)
    finish: str | None = None
    usage: TokenUsage | None = None
    first_token_at: float | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def take(self, event: Mapping[str, Any], *, whole: bool = False) -> str:
        """Read one event (``whole``: a non-streamed answer); returns its new text."""
        usage = usage_of(event)
        if usage is not None:
            self.usage = usage
        new: list[str] = []
        choices = event.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if not isinstance(choice, Mapping):
                continue
            if self.chat:
                delta = choice.get("message" if whole else "delta")
                if isinstance(delta, Mapping):
                    content = delta.get("content")
                    if isinstance(content, str) and content:  # null deltas carry nothing
                        new.append(content)
                    self._take_calls(delta.get("tool_calls"), positional=whole)
            else:
                text = choice.get("text")
                if isinstance(text, str) and text:
                    new.append(text)
            self.finish = choice.get("finish_reason") or self.finish
        piece = "".join(new)
        if piece:
            self.parts.append(piece)
        if (piece or self.calls) and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        return piece

    def _take_calls(self, deltas: Any, *, positional: bool) -> None:
        """Assemble tool-call deltas: the first names the call, later ones carry more of
        the arguments' text (in fragments), all keyed by ``index``."""
        if not isinstance(deltas, list):
            return
        for position, delta in enumerate(deltas):
            if not isinstance(delta, Mapping):
                continue
            index = delta.get("index")
            if positional or not isinstance(index, int):
                # A whole answer lists its calls in order; a server that omits the index
                # in a stream starts a call with an id and continues it without one.
                if positional:
                    index = position
                elif delta.get("id") and all(c.id != delta["id"] for c in self.calls.values()):
                    index = len(self.calls)
                else:
                    index = max(self.calls, default=0)
            parts = self.calls.setdefault(index, CallParts())
            if isinstance(delta.get("id"), str) and delta["id"] and not parts.id:
                parts.id = delta["id"]
            fn = delta.get("function")
            if isinstance(fn, Mapping):
                if isinstance(fn.get("name"), str):
                    parts.name += fn["name"]
                args = fn.get("arguments")
                if isinstance(args, str):
                    parts.arguments.append(args)
                elif isinstance(args, Mapping):  # some servers send an object, not its text
                    parts.arguments.append(json.dumps(dict(args), ensure_ascii=False))

    def tool_calls(self, calls_so_far: int) -> tuple[ToolCall, ...]:
        """The assembled calls; a call the server gave no id gets ``call_{n}``."""
        out = []
        for n, i in enumerate(sorted(self.calls)):
            parts = self.calls[i]
            call_id = parts.id or f"call_{calls_so_far + n}"
            out.append(ToolCall.parse(call_id, parts.name, "".join(parts.arguments)))
        return tuple(out)


async def read_answer(
    response: httpx.Response, reading: Reading, *, replica: Replica, client: RemoteClient
) -> AsyncIterator[str]:
    """The text pieces of an answer as they arrive, all of it read into ``reading``.

    Raises what :meth:`RemoteClient.garbage` makes of an answer that is not JSON, and
    :func:`stream_error`'s error for an error event in the stream.
    """
    if "json" in response.headers.get("content-type", ""):
        # A server that ignores ``stream``: the whole answer at once.
        try:
            data = json.loads(await response.aread())
        except ValueError as e:
            raise client.garbage(replica, "the answer is not JSON") from e
        if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
            raise client.garbage(replica, "an answer without choices")
        piece = reading.take(data, whole=True)
        if piece:
            yield piece
        return
    async for line in response.aiter_lines():
        field_name, _, payload = line.partition(":")
        payload = payload.strip()
        if field_name not in ("data", "error") or not payload:
            continue  # comments, blank lines, event names
        if payload == "[DONE]":
            break
        try:
            event = json.loads(payload)
        except ValueError as e:
            raise client.garbage(replica, "a stream event is not JSON") from e
        if not isinstance(event, dict):
            raise client.garbage(replica, "a stream event is not a JSON object")
        if field_name == "error" or ("error" in event and "choices" not in event):
            raise stream_error(event, model=client.model, scrub=client.scrub)
        piece = reading.take(event)
        if piece:
            yield piece


def stream_error(
    event: Mapping[str, Any], *, model: str, scrub: Callable[[str], str]
) -> EngineError:
    """The error an error event in a stream stands for: the prompt does not fit, or the
    server failed mid-answer (infrastructure)."""
    error = event.get("error", event)
    message = error.get("message") if isinstance(error, Mapping) else error
    detail = scrub(str(message if message is not None else error))
    if any(mark in json.dumps(event) for mark in _OVERFLOW_MARKS):
        return ContextOverflow(f"model {model!r}: the prompt does not fit: {detail}")
    return EngineUnavailable(f"model {model!r} failed mid-answer: {detail}")


def refused(e: RequestRefused, *, model: str, tools: Sequence[ToolSpec] = ()) -> EngineError | None:
    """What a 4xx means: a prompt too long, a model without tools, or (None) a bad
    request, which ``e`` says well enough."""
    if any(mark in e.detail for mark in _OVERFLOW_MARKS):
        return ContextOverflow(f"model {model!r}: the conversation does not fit: {e}")
    if tools:
        return EngineError(
            f"model {model!r} refused the request with {len(tools)} tool(s) "
            f"(HTTP {e.status}): it may not support tool calls; the server said: {e.detail}"
        )
    return None
