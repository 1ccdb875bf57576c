"""``OpenAIEngine``: the :class:`~agentos.engine.base.Engine` calls on an OpenAI-compatible server.

What a session is and how calls are metered is in :mod:`agentos.engine.openai`; the
wire format the calls read, and the errors servers word in their own ways, in
:mod:`.wire`.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from agentos.core.chat import Reply, TokenUsage, ToolSpec
from agentos.engine.base import (
    Completion,
    EngineError,
    KVSnapshot,
    SessionInfo,
    StreamChunk,
)
from agentos.engine.openai.wire import (
    Conversation,
    Reading,
    decode_conversation,
    finish_reason_of,
    read_answer,
    refused,
    tool_choice_body,
)
from agentos.engine.remote import RemoteClient, Replica, RequestRefused, ThrottleBoard

__all__ = ["OpenAIEngine"]

log = logging.getLogger("agentos.engine.openai")

_CHARS_PER_TOKEN = 4  # an estimate for admission when the server's tokenizer is not at hand
_SESSIONS = 100_000  # conversations are memory here, not server slots


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
        self._sessions: dict[str, Conversation] = {}

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
        """An estimate (characters / 4), for admission before a call: the server's
        tokenizer is not at hand. Calls are metered with the server's own counts."""
        return max(1, len(text) // _CHARS_PER_TOKEN)

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self.client.aclose()

    # ------------------------------------------------------------------ sessions

    def _conv(self, session_id: str) -> Conversation:
        conv = self._sessions.get(session_id)
        if conv is None:
            raise EngineError(f"no open session {session_id!r}")
        return conv

    def open_session(self, session_id: str) -> None:
        if session_id in self._sessions:
            raise EngineError(f"session {session_id!r} is already open")
        self._sessions[session_id] = Conversation()

    def close_session(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def has_session(self, session_id: str) -> bool:
        return session_id in self._sessions

    def session_info(self, session_id: str) -> SessionInfo:
        """``n_tokens`` is the last call's prompt + output tokens as the server counted
        them (0 before the first call of a session, a woken one included)."""
        return SessionInfo(session_id, self._conv(session_id).n_tokens, 0)

    def conversation(self, session_id: str) -> list[dict[str, Any]]:
        return copy.deepcopy(self._conv(session_id).messages)

    async def reset_session(self, session_id: str) -> None:
        self._conv(session_id)
        self._sessions[session_id] = Conversation()

    async def export_kv(self, session_id: str) -> KVSnapshot:
        return KVSnapshot(
            self.fingerprint(), (), None, conversation=self._conv(session_id).encode()
        )

    async def import_kv(self, session_id: str, snapshot: KVSnapshot) -> bool:
        self._conv(session_id)
        return False  # no KV bytes on this engine: prefill takes the conversation back

    async def prefill(
        self, session_id: str, tokens: Sequence[int], conversation: bytes = b""
    ) -> float:
        """Take the conversation back from a snapshot (nothing is computed until the next
        call resends it). ``tokens`` is read only for a snapshot of an earlier version,
        which kept the conversation's JSON as code points there."""
        self._conv(session_id)
        self._sessions[session_id] = decode_conversation(conversation, tokens)
        return 0.0

    # ------------------------------------------------------------------ calls

    def _base_body(
        self,
        session: str,
        *,
        max_tokens: int,
        stop: Sequence[str],
        temperature: float,
        stream: bool,
    ) -> dict[str, Any]:
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
        return body

    def _text_body(
        self,
        session: str,
        conv: Conversation,
        prompt: str,
        *,
        max_tokens: int,
        stop: Sequence[str],
        temperature: float,
        json_schema: Mapping[str, Any] | None,
        stream: bool,
    ) -> tuple[str, dict[str, Any]]:
        body = self._base_body(
            session, max_tokens=max_tokens, stop=stop, temperature=temperature, stream=stream
        )
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

    def _append_text(self, conv: Conversation, prompt: str, text: str) -> None:
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

    def _metered(
        self,
        conv: Conversation,
        replica: Replica,
        reading: Reading,
        sent: Mapping[str, Any],
    ) -> TokenUsage:
        """The call's usage, counted on the replica and kept as the session's size."""
        usage = reading.usage
        if usage is None:
            # The server sent no usage (one that ignores stream_options, or an old one):
            # estimate from characters as admission does, the only count at hand. A
            # server that reports usage is always metered with its own numbers.
            log.debug("%s sent no usage; metering an estimate", replica.url)
            sent_text = json.dumps(sent.get("messages") or sent.get("prompt") or "")
            out_text = reading.text + "".join("".join(c.arguments) for c in reading.calls.values())
            usage = TokenUsage(self.count_tokens(sent_text), 0, self.count_tokens(out_text))
        replica.stats.prompt_tokens += usage.input_tokens + usage.cached_tokens
        replica.stats.cached_tokens += usage.cached_tokens
        replica.stats.output_tokens += usage.output_tokens
        conv.n_tokens = usage.total_tokens
        return usage

    async def chat(
        self,
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
    ) -> Reply:
        """Send the conversation and ``messages`` to ``/chat/completions`` (streamed) and
        return the reply; both are appended to the session only when the call succeeds.

        Raises :class:`EngineError` for a model served with ``api: completions`` (a text
        prompt has no messages, and the server's template is unknown here), for a 4xx
        (saying so when the request carried tools), :class:`ContextOverflow` when the
        server says the conversation does not fit, :class:`EngineUnavailable` when no
        replica could serve.
        """
        conv = self._conv(session_id)
        if self.api != "chat":
            raise EngineError(
                f"model {self._model!r} is served with api: completions, which takes one text "
                "prompt; chat with messages and tools needs api: chat"
            )
        new = [dict(m) for m in messages]
        if not conv.messages and not new:
            raise EngineError("chat needs at least one message")
        body = self._base_body(
            session_id, max_tokens=max_tokens, stop=stop, temperature=temperature, stream=True
        )
        body["messages"] = [*conv.messages, *new]
        if tools:
            body["tools"] = [t.openai() for t in tools]
            body["tool_choice"] = tool_choice_body(tool_choice)
            body["parallel_tool_calls"] = parallel_tool_calls
        if response_format is not None:
            body["response_format"] = dict(response_format)
        reading = Reading(chat=True)
        started = time.perf_counter()
        try:
            async with self.client.call(
                session_id, "POST", "/chat/completions", body, stream=True
            ) as (replica, response):
                async for _ in read_answer(response, reading, replica=replica, client=self.client):
                    pass
        except RequestRefused as e:
            why = refused(e, model=self._model, tools=tools)
            if why is None:
                raise
            raise why from e
        duration = time.perf_counter() - started
        calls_so_far = sum(len(m.get("tool_calls") or ()) for m in body["messages"])
        calls = reading.tool_calls(calls_so_far)
        text = reading.text
        usage = self._metered(conv, replica, reading, body)
        reply = Reply(
            content=text if text or not calls else None,
            tool_calls=calls,
            finish_reason=finish_reason_of(reading.finish, bool(calls)),
            usage=usage,
            time_to_first_token_s=(
                reading.first_token_at - started if reading.first_token_at else duration
            ),
            duration_s=duration,
            served_at=urlsplit(replica.url).hostname or "",
        )
        conv.messages.extend(new)
        conv.messages.append(reply.message())
        return reply

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
        path, body = self._text_body(
            session_id,
            conv,
            prompt,
            max_tokens=max_tokens,
            stop=stop,
            temperature=temperature,
            json_schema=json_schema,
            stream=False,
        )
        reading = Reading(chat=self.api == "chat")
        started = time.perf_counter()
        try:
            async with self.client.call(session_id, "POST", path, body) as (replica, response):
                data = response.json()
        except RequestRefused as e:
            why = refused(e, model=self._model)
            if why is None:
                raise
            raise why from e
        if not isinstance(data.get("choices"), list) or not data["choices"]:
            raise self.client.garbage(replica, "no choices in the answer")
        reading.take(data, whole=True)
        usage = self._metered(conv, replica, reading, body)
        text = reading.text
        self._append_text(conv, prompt, text)
        elapsed = time.perf_counter() - started
        return Completion(
            text=text,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            finish_reason="length" if reading.finish == "length" else "stop",
            time_to_first_token_s=elapsed,  # not streamed: the whole answer came at once
            duration_s=elapsed,
            cached_tokens=usage.cached_tokens,
            served_at=urlsplit(replica.url).hostname or "",
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
        """Stream text; the last chunk carries the server's usage."""
        conv = self._conv(session_id)
        self._check(prompt, grammar)
        path, body = self._text_body(
            session_id,
            conv,
            prompt,
            max_tokens=max_tokens,
            stop=stop,
            temperature=temperature,
            json_schema=json_schema,
            stream=True,
        )
        reading = Reading(chat=self.api == "chat")
        try:
            async with self.client.call(session_id, "POST", path, body, stream=True) as (
                replica,
                response,
            ):
                async for piece in read_answer(
                    response, reading, replica=replica, client=self.client
                ):
                    yield StreamChunk(piece, ())
        except RequestRefused as e:
            why = refused(e, model=self._model)
            if why is None:
                raise
            raise why from e
        usage = self._metered(conv, replica, reading, body)
        self._append_text(conv, prompt, reading.text)
        reason = "length" if reading.finish == "length" else "stop"
        yield StreamChunk("", (), True, reason, usage=usage)

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
