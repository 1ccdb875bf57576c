"""A model with a fallback: calls go to another model while this one cannot serve.

When the primary model is down (every replica failed) or throttled longer than the call
may wait, an agent that allows it (``spec.modelFallback``, default true) has the call
answered by the Model's ``fallback`` instead of having its task retried later. The
fallback does not hold the agent's session: it gets one short-lived session with the
conversation this daemon has seen since the agent's session opened (prompts and
answers, as text, since the two models' tokens differ) and the new prompt. The
completion names the model that served it (``served_by``), so metering charges the
model that did the work. Everything else (sessions, KV export and import) is the
primary's.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from agentos.core.chat import Reply, ToolSpec
from agentos.engine.base import (
    Completion,
    Engine,
    EngineError,
    EngineUnavailable,
    KVSnapshot,
    SessionInfo,
    StreamChunk,
)

__all__ = ["FallbackEngine"]

log = logging.getLogger("agentos.engine.fallback")


class FallbackEngine:
    """``primary``, with calls moved to the model ``resolve()`` returns when it fails."""

    def __init__(
        self,
        primary: Engine,
        *,
        fallback_name: str,
        resolve: Callable[[], Awaitable[Engine]],
    ) -> None:
        self.primary = primary
        self.fallback_name = fallback_name
        self._resolve = resolve
        self.allowed: dict[str, bool] = {}  # agent -> may its calls fall back
        self._transcripts: dict[str, list[str]] = {}
        # Chat turns the fallback answered, not yet sent to the primary (module docstring).
        self._unsent: dict[str, list[dict[str, Any]]] = {}
        self.fallback_calls = 0

    # Identity and sessions are the primary's.

    @property
    def name(self) -> str:
        return self.primary.name

    @property
    def model(self) -> str:
        return self.primary.model

    @property
    def slots(self) -> int:
        return self.primary.slots

    @property
    def parallel(self) -> int:
        return self.primary.parallel

    def fingerprint(self) -> str:
        return self.primary.fingerprint()

    def count_tokens(self, text: str) -> int:
        return self.primary.count_tokens(text)

    def open_session(self, session_id: str) -> None:
        self.primary.open_session(session_id)
        self._transcripts[session_id] = []
        self._unsent.pop(session_id, None)

    def close_session(self, session_id: str) -> None:
        self.primary.close_session(session_id)
        self._transcripts.pop(session_id, None)
        self._unsent.pop(session_id, None)

    def has_session(self, session_id: str) -> bool:
        return self.primary.has_session(session_id)

    def session_info(self, session_id: str) -> SessionInfo:
        return self.primary.session_info(session_id)

    async def reset_session(self, session_id: str) -> None:
        await self.primary.reset_session(session_id)
        self._transcripts[session_id] = []
        self._unsent.pop(session_id, None)

    async def export_kv(self, session_id: str) -> KVSnapshot:
        return await self.primary.export_kv(session_id)

    async def import_kv(self, session_id: str, snapshot: KVSnapshot) -> bool:
        return await self.primary.import_kv(session_id, snapshot)

    async def prefill(
        self, session_id: str, tokens: Sequence[int], conversation: bytes = b""
    ) -> float:
        seconds = await self.primary.prefill(session_id, tokens, conversation)
        self._unsent.pop(session_id, None)
        return seconds

    def conversation(self, session_id: str) -> list[dict[str, Any]]:
        """The primary's messages and the turns a fallback answered since."""
        unsent = self._unsent.get(session_id, [])
        return [*self.primary.conversation(session_id), *(dict(m) for m in unsent)]

    def describe(self) -> dict[str, Any]:
        """The primary's description, with the fallback and how often it served."""
        inner = getattr(self.primary, "describe", None)
        info: dict[str, Any] = dict(inner()) if callable(inner) else {}
        return {**info, "fallback": self.fallback_name, "fallbackCalls": self.fallback_calls}

    async def aclose(self) -> None:
        """Close the primary (the fallback belongs to the pool)."""
        closer = getattr(self.primary, "aclose", None)
        if closer is not None:
            await closer()
        elif callable(getattr(self.primary, "close", None)):
            self.primary.close()  # type: ignore[attr-defined]

    # Calls.

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
        options: dict[str, Any] = {
            "max_tokens": max_tokens,
            "stop": stop,
            "temperature": temperature,
            "grammar": grammar,
            "json_schema": json_schema,
        }
        try:
            completion = await self.primary.generate(session_id, prompt, **options)
        except EngineUnavailable as e:
            if not self.allowed.get(session_id, True):
                raise
            completion = await self._fall_back(session_id, prompt, options, e)
        self._transcripts.setdefault(session_id, []).extend((prompt, completion.text))
        return completion

    async def _fall_back(
        self, session_id: str, prompt: str, options: dict[str, Any], error: EngineUnavailable
    ) -> Completion:
        try:
            engine = await self._resolve()
        except EngineError as e:
            log.warning("%s: fallback %s cannot serve: %s", session_id, self.fallback_name, e)
            raise error from e
        ephemeral = f"{session_id}.fallback"
        try:
            engine.open_session(ephemeral)
        except EngineError as e:  # no free slot there either
            raise error from e
        try:
            text = "".join(self._transcripts.get(session_id, [])) + prompt
            completion = await engine.generate(ephemeral, text, **options)
        finally:
            engine.close_session(ephemeral)
        self.fallback_calls += 1
        log.warning(
            "%s: %s could not serve (%s); answered by fallback %s",
            session_id,
            self.primary.model,
            error,
            self.fallback_name,
        )
        return replace(completion, served_by=self.fallback_name)

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
        # Streams are not moved mid-way; a stream that cannot start falls back whole.
        parts: list[str] = []
        started = False
        try:
            async for chunk in self.primary.stream(
                session_id,
                prompt,
                max_tokens=max_tokens,
                stop=stop,
                temperature=temperature,
                grammar=grammar,
                json_schema=json_schema,
            ):
                started = True
                parts.append(chunk.text)
                yield chunk
        except EngineUnavailable as e:
            if started or not self.allowed.get(session_id, True):
                raise
            options = {
                "max_tokens": max_tokens,
                "stop": stop,
                "temperature": temperature,
                "grammar": grammar,
                "json_schema": json_schema,
            }
            completion = await self._fall_back(session_id, prompt, options, e)
            parts = [completion.text]
            yield StreamChunk(completion.text, ())
            yield StreamChunk("", (), True, completion.finish_reason)
        self._transcripts.setdefault(session_id, []).extend((prompt, "".join(parts)))

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
        options: dict[str, Any] = {
            "tools": tools,
            "tool_choice": tool_choice,
            "parallel_tool_calls": parallel_tool_calls,
            "response_format": response_format,
            "max_tokens": max_tokens,
            "stop": stop,
            "temperature": temperature,
        }
        unsent = self._unsent.get(session_id, [])
        turns = [*unsent, *(dict(m) for m in messages)]
        try:
            reply = await self.primary.chat(session_id, turns, **options)
        except EngineUnavailable as e:
            if not self.allowed.get(session_id, True):
                raise
            history = [*self.primary.conversation(session_id), *turns]
            reply = await self._fall_back_chat(session_id, history, options, e)
            self._unsent[session_id] = [*turns, reply.message()]
        else:
            self._unsent.pop(session_id, None)
        return reply

    async def _fall_back_chat(
        self,
        session_id: str,
        history: list[dict[str, Any]],
        options: dict[str, Any],
        error: EngineUnavailable,
    ) -> Reply:
        try:
            engine = await self._resolve()
        except EngineError as e:
            log.warning("%s: fallback %s cannot serve: %s", session_id, self.fallback_name, e)
            raise error from e
        ephemeral = f"{session_id}.fallback"
        try:
            engine.open_session(ephemeral)
        except EngineError as e:  # no free slot there either
            raise error from e
        try:
            reply = await engine.chat(ephemeral, history, **options)
        finally:
            engine.close_session(ephemeral)
        self.fallback_calls += 1
        log.warning(
            "%s: %s could not serve (%s); chat answered by fallback %s",
            session_id,
            self.primary.model,
            error,
            self.fallback_name,
        )
        return replace(reply, served_by=self.fallback_name)
