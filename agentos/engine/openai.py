"""The ``openai`` engine: any OpenAI-compatible server (vLLM, SGLang, llama-server, Ollama, APIs).

A session is a conversation held here, in the daemon: the text so far (``completions``
API) or the messages (``chat`` API). Every call sends the whole conversation and only
ever appends to it, and the agent's calls stay on one replica, so a server with a
prefix cache (vLLM's, SGLang's radix cache, llama-server's slots) reprocesses only the
new part; ``usage.prompt_tokens_details.cached_tokens`` (or llama.cpp's
``timings.cache_n``) reports how much it reused.

Such a server gives no call to export one conversation's KV, so hibernation keeps the
conversation only: :meth:`OpenAIEngine.export_kv` returns no bytes and the history as
the snapshot's "tokens" (its characters' code points: there is no local tokenizer, and
the store keeps integers), and waking resends it. Connection failures, 5xx and garbage
answers are retried on other replicas and then raised as
:class:`agentos.engine.EngineUnavailable`, never as an agent's own error.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agentos.engine.base import (
    Completion,
    EngineError,
    KVSnapshot,
    SessionInfo,
    StreamChunk,
)
from agentos.engine.remote import RemoteClient, Replica, ThrottleBoard

__all__ = ["OpenAIEngine"]

_CHARS_PER_TOKEN = 4  # an estimate for admission when the server's tokenizer is not at hand
_SESSIONS = 100_000  # conversations are memory here, not server slots


@dataclass(slots=True)
class _Conversation:
    text: str = ""  # completions API
    messages: list[dict[str, str]] = field(default_factory=list)  # chat API

    @property
    def size(self) -> int:
        return len(self.text) + sum(len(m["content"]) for m in self.messages)


def _encode(conv: _Conversation) -> tuple[int, ...]:
    raw = json.dumps({"text": conv.text, "messages": conv.messages}, ensure_ascii=False)
    return tuple(ord(c) for c in raw)


def _decode(tokens: Sequence[int]) -> _Conversation:
    try:
        data = json.loads("".join(chr(t) for t in tokens))
        return _Conversation(str(data["text"]), [dict(m) for m in data["messages"]])
    except (ValueError, KeyError, TypeError) as e:
        raise EngineError(f"stored conversation does not decode: {e}") from e


def _usage(body: Mapping[str, Any]) -> tuple[int, int, int]:
    """(prompt tokens, of which cached, output tokens) from an OpenAI ``usage`` object."""
    usage = body.get("usage") or {}
    prompt = int(usage.get("prompt_tokens") or 0)
    details = usage.get("prompt_tokens_details") or {}
    cached = int(details.get("cached_tokens") or 0)
    timings = body.get("timings") or {}
    if not cached and timings.get("cache_n"):  # llama.cpp's own counter
        cached = int(timings["cache_n"])
    return prompt, min(cached, prompt), int(usage.get("completion_tokens") or 0)


class OpenAIEngine:
    """An OpenAI-compatible model behind one or more replicas (see the module docstring)."""

    def __init__(
        self,
        *,
        model: str,
        endpoints: Sequence[Mapping[str, Any]] | Sequence[str],
        served_model: str | None = None,
        api: str = "chat",
        api_key: str | None = None,
        context_length: int | None = None,
        connect_timeout_s: float = 5.0,
        request_timeout_s: float = 120.0,
        throttle_wait_s: float = 10.0,
        attempts: int = 3,
        throttle_board: ThrottleBoard | None = None,
    ) -> None:
        if api not in ("chat", "completions"):
            raise ValueError(f"api must be chat or completions, got {api!r}")
        replicas = [
            Replica(e)
            if isinstance(e, str)
            else Replica(str(e["url"]), int(e.get("max_concurrent", 4)))
            for e in endpoints
        ]
        self._model = model
        self.served_model = served_model or model
        self.api = api
        self.context_length = context_length
        self.client = RemoteClient(
            model,
            replicas,
            api_key=api_key,
            connect_timeout_s=connect_timeout_s,
            request_timeout_s=request_timeout_s,
            throttle_wait_s=throttle_wait_s,
            attempts=attempts,
            board=throttle_board,
        )
        self._sessions: dict[str, _Conversation] = {}

    # ------------------------------------------------------------------ identity

    @property
    def name(self) -> str:
        return "openai"

    @property
    def model(self) -> str:
        return self.served_model

    @property
    def slots(self) -> int:
        return _SESSIONS

    @property
    def parallel(self) -> int:
        return sum(r.max_concurrent for r in self.client.replicas)

    def fingerprint(self) -> str:
        return f"openai/{self.api}/{self.served_model}"

    def count_tokens(self, text: str) -> int:
        return max(1, len(text) // _CHARS_PER_TOKEN)

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self.client.aclose()

    # ------------------------------------------------------------------ sessions

    def _conv(self, session_id: str) -> _Conversation:
        conv = self._sessions.get(session_id)
        if conv is None:
            raise EngineError(f"no open session {session_id!r}")
        return conv

    def open_session(self, session_id: str) -> None:
        if session_id in self._sessions:
            raise EngineError(f"session {session_id!r} is already open")
        self._sessions[session_id] = _Conversation()

    def close_session(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def has_session(self, session_id: str) -> bool:
        return session_id in self._sessions

    def session_info(self, session_id: str) -> SessionInfo:
        return SessionInfo(session_id, self._conv(session_id).size, 0)

    async def reset_session(self, session_id: str) -> None:
        self._conv(session_id)
        self._sessions[session_id] = _Conversation()

    async def export_kv(self, session_id: str) -> KVSnapshot:
        return KVSnapshot(self.fingerprint(), _encode(self._conv(session_id)), None)

    async def import_kv(self, session_id: str, snapshot: KVSnapshot) -> bool:
        self._conv(session_id)
        return False  # no KV bytes on this engine: the runtime resends the history

    async def prefill(self, session_id: str, tokens: Sequence[int]) -> float:
        self._conv(session_id)
        self._sessions[session_id] = _decode(tokens)
        return 0.0  # nothing is computed until the next call resends the conversation

    # ------------------------------------------------------------------ calls

    def _body(
        self,
        session: str,
        conv: _Conversation,
        prompt: str,
        *,
        max_tokens: int,
        stop: Sequence[str],
        temperature: float,
        json_schema: Mapping[str, Any] | None,
        stream: bool,
    ) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {
            "model": self.served_model,
            "user": session,  # the agent: providers key abuse checks and caches on it
            "max_tokens": max_tokens,
            "temperature": temperature,
        }
        if stop:
            body["stop"] = list(stop)
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        if self.api == "chat":
            body["messages"] = [*conv.messages, {"role": "user", "content": prompt}]
            if json_schema is not None:
                body["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": "answer", "schema": dict(json_schema)},
                }
            return "/chat/completions", body
        body["prompt"] = conv.text + prompt
        if json_schema is not None:
            body["response_format"] = {"type": "json_object", "schema": dict(json_schema)}
        return "/completions", body

    def _append(self, conv: _Conversation, prompt: str, text: str) -> None:
        if self.api == "chat":
            conv.messages.append({"role": "user", "content": prompt})
            conv.messages.append({"role": "assistant", "content": text})
        else:
            conv.text += prompt + text

    def _check(self, prompt: str, grammar: str | None) -> None:
        if not prompt:
            raise EngineError("prompt must not be empty")
        if grammar is not None:
            raise EngineError("the openai engine takes json_schema, not a GBNF grammar")

    async def generate(
        self,
        session_id: str,
        prompt: str,
        *,
        max_tokens: int = 256,
        stop: Sequence[str] = (),
        temperature: float = 0.0,
        grammar: str | None = None,
        json_schema: Mapping[str, Any] | None = None,
    ) -> Completion:
        conv = self._conv(session_id)
        self._check(prompt, grammar)
        path, body = self._body(
            session_id,
            conv,
            prompt,
            max_tokens=max_tokens,
            stop=stop,
            temperature=temperature,
            json_schema=json_schema,
            stream=False,
        )
        started = time.perf_counter()
        async with self.client.call(session_id, "POST", path, body) as (replica, response):
            data = response.json()
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"] if self.api == "chat" else choice["text"]
            text = str(text or "")
        except (KeyError, IndexError, TypeError) as e:
            raise self.client.garbage(replica, f"no choices[0] text: {e}") from e
        prompt_tokens, cached, output = _usage(data)
        replica.stats.prompt_tokens += prompt_tokens
        replica.stats.cached_tokens += cached
        replica.stats.output_tokens += output
        self._append(conv, prompt, text)
        elapsed = time.perf_counter() - started
        return Completion(
            text=text,
            input_tokens=prompt_tokens - cached,
            output_tokens=output,
            finish_reason="length" if choice.get("finish_reason") == "length" else "stop",
            time_to_first_token_s=elapsed,
            duration_s=elapsed,
            cached_tokens=cached,
        )

    async def stream(
        self,
        session_id: str,
        prompt: str,
        *,
        max_tokens: int = 256,
        stop: Sequence[str] = (),
        temperature: float = 0.0,
        grammar: str | None = None,
        json_schema: Mapping[str, Any] | None = None,
    ) -> AsyncIterator[StreamChunk]:
        conv = self._conv(session_id)
        self._check(prompt, grammar)
        path, body = self._body(
            session_id,
            conv,
            prompt,
            max_tokens=max_tokens,
            stop=stop,
            temperature=temperature,
            json_schema=json_schema,
            stream=True,
        )
        parts: list[str] = []
        finish: str | None = None
        usage: Mapping[str, Any] = {}
        async with self.client.call(session_id, "POST", path, body, stream=True) as (
            replica,
            response,
        ):
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                try:
                    event = json.loads(payload)
                except ValueError as e:
                    raise self.client.garbage(replica, "a stream event is not JSON") from e
                if event.get("usage"):
                    usage = event
                for choice in event.get("choices") or []:
                    delta = choice.get("delta", {}).get("content") if self.api == "chat" else None
                    piece = str(delta if self.api == "chat" else choice.get("text") or "")
                    if piece:
                        parts.append(piece)
                        yield StreamChunk(piece, ())
                    finish = choice.get("finish_reason") or finish
        prompt_tokens, cached, output = _usage(usage)
        replica.stats.prompt_tokens += prompt_tokens
        replica.stats.cached_tokens += cached
        replica.stats.output_tokens += output
        self._append(conv, prompt, "".join(parts))
        yield StreamChunk("", (), True, "length" if finish == "length" else "stop")

    # ------------------------------------------------------------------ status

    def describe(self) -> dict[str, Any]:
        """Replicas, health, calls in flight and counters, for ``describe model``."""
        return {
            "engine": self.name,
            "servedModel": self.served_model,
            "api": self.api,
            "hibernation": "history",
            "throttledUntil": self.client.throttled_until or None,
            "replicas": [
                {
                    "url": r.url,
                    "healthy": r.healthy,
                    "inFlight": r.in_flight,
                    "maxConcurrent": r.max_concurrent,
                    "lastError": r.last_error,
                    **r.stats.to_dict(),
                }
                for r in self.client.replicas
            ],
        }
