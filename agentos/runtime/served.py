"""What the agents of a Model hold: a :class:`ServedEngine`, never the engine itself.

The pool (:mod:`agentos.runtime.models`) can then rebuild the engine under them without
a daemon restart: before a call it notices (at most every few seconds) that the stored
Model changed (a re-apply), or that a misconfigured Model's credential file or variable
now resolves to another secret, or that an engine that failed to start may start now;
it builds the new engine off the loop and :meth:`ServedEngine.swap` moves every open
session (their conversations) across while calls wait. An engine that could not start
at all is stood in for by :class:`Unstarted`, whose every call raises why, so its agents
run and park instead of staying ``Pending``; a :class:`ModelMisconfigured` from any call
becomes the model's :class:`Condition`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio

from agentos.core.chat import Reply, ToolSpec
from agentos.engine.base import (
    Completion,
    Engine,
    EngineError,
    EngineUnavailable,
    KVSnapshot,
    ModelMisconfigured,
    NoFreeSlot,
    SessionInfo,
    StreamChunk,
)

__all__ = ["Condition", "ServedEngine", "Unstarted", "move_session"]

log = logging.getLogger("agentos.models")

_DRAIN_S = 30.0  # how long a rebuild waits for the calls in flight on the old engine
_CHARS_PER_TOKEN = 4


@dataclass(frozen=True, slots=True)
class Condition:
    """Why a model cannot serve (``describe model``): ``type`` is the error's class name
    (``ModelMisconfigured``, ``EngineUnavailable``), ``since`` epoch seconds."""

    type: str
    reason: str
    since: float

    @classmethod
    def of(cls, error: EngineUnavailable, now: float) -> Condition:
        """The condition ``error`` puts a model in."""
        return cls(type(error).__name__, str(error), now)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the daemon's heartbeat."""
        return {"type": self.type, "reason": self.reason, "since": self.since}


@dataclass(slots=True)
class _Kept:
    """A session held by an engine that never started: what to hand the real one."""

    snapshot: KVSnapshot
    messages: list[dict[str, Any]] = field(default_factory=list)


class Unstarted:
    """Stands in for an engine that could not start: sessions are bookkeeping (kept so
    the real engine gets the agents' conversations back), and every call raises why."""

    def __init__(
        self, model: str, error: EngineUnavailable, *, backend: str, slots: int, parallel: int
    ) -> None:
        self.error = error
        self._model = model
        self._backend = backend
        self._slots = slots
        self._parallel = parallel
        self._sessions: dict[str, _Kept] = {}

    @property
    def name(self) -> str:
        return self._backend

    @property
    def model(self) -> str:
        return self._model

    @property
    def slots(self) -> int:
        return self._slots

    @property
    def parallel(self) -> int:
        return self._parallel

    def fingerprint(self) -> str:
        return f"unstarted/{self._model}"

    def count_tokens(self, text: str) -> int:
        return max(1, len(text) // _CHARS_PER_TOKEN)

    def _raise(self) -> EngineUnavailable:
        # A fresh exception per call: one instance raised again and again would carry
        # every earlier traceback along.
        e = self.error
        if isinstance(e, ModelMisconfigured):
            return ModelMisconfigured(e.model, e.reason)
        return EngineUnavailable(str(e))

    def _kept(self, session_id: str) -> _Kept:
        kept = self._sessions.get(session_id)
        if kept is None:
            raise EngineError(f"unknown session {session_id!r}")
        return kept

    def open_session(self, session_id: str) -> None:
        if session_id in self._sessions:
            raise EngineError(f"session {session_id!r} is already open")
        if len(self._sessions) >= self._slots:
            raise NoFreeSlot(f"all {self._slots} slots of model {self._model} are held")
        self._sessions[session_id] = _Kept(KVSnapshot(self.fingerprint(), (), None))

    def close_session(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def has_session(self, session_id: str) -> bool:
        return session_id in self._sessions

    def session_info(self, session_id: str) -> SessionInfo:
        return SessionInfo(session_id, len(self._kept(session_id).snapshot.tokens), 0)

    def conversation(self, session_id: str) -> list[dict[str, Any]]:
        return [dict(m) for m in self._kept(session_id).messages]

    def keep(self, session_id: str, snapshot: KVSnapshot, messages: list[dict[str, Any]]) -> None:
        """Hold ``snapshot`` (and its messages) for the engine that replaces this one."""
        self._kept(session_id)
        self._sessions[session_id] = _Kept(snapshot, messages)

    async def reset_session(self, session_id: str) -> None:
        self._kept(session_id)
        self._sessions[session_id] = _Kept(KVSnapshot(self.fingerprint(), (), None))

    async def export_kv(self, session_id: str) -> KVSnapshot:
        return self._kept(session_id).snapshot

    async def import_kv(self, session_id: str, snapshot: KVSnapshot) -> bool:
        self.keep(session_id, snapshot, _messages_of(snapshot.conversation))
        return True  # kept as it is, for the real engine

    async def prefill(
        self, session_id: str, tokens: Sequence[int], conversation: bytes = b""
    ) -> float:
        snapshot = KVSnapshot(self.fingerprint(), tuple(tokens), None, conversation=conversation)
        self.keep(session_id, snapshot, _messages_of(conversation))
        return 0.0

    async def generate(self, session_id: str, prompt: str, **_: Any) -> Completion:
        self._kept(session_id)
        raise self._raise()

    async def stream(self, session_id: str, prompt: str, **_: Any) -> AsyncIterator[StreamChunk]:
        self._kept(session_id)
        raise self._raise()
        yield StreamChunk("", ())  # pragma: no cover - makes this an async generator

    async def chat(self, session_id: str, messages: Sequence[Mapping[str, Any]], **_: Any) -> Reply:
        self._kept(session_id)
        raise self._raise()

    def describe(self) -> dict[str, Any]:
        """What ``describe model`` shows for an engine that did not start."""
        return {"engine": self._backend, "started": False}


def _messages_of(conversation: bytes) -> list[dict[str, Any]]:
    """The chat messages a snapshot's conversation JSON holds, if it is the shape the
    remote engines write (``{"messages": [...]}``); else none (the bytes are kept)."""
    try:
        data = json.loads(conversation) if conversation else None
    except ValueError:
        return []
    messages = data.get("messages") if isinstance(data, dict) else None
    if not isinstance(messages, list):
        return []
    return [dict(m) for m in messages if isinstance(m, dict)]


class ServedEngine:
    """The engine of one Model as its agents hold it: the current engine behind it can
    be rebuilt (see the module docstring), and a :class:`ModelMisconfigured` from any
    call becomes the model's :attr:`condition`."""

    def __init__(
        self,
        inner: Engine,
        *,
        model_name: str,
        refresh: Callable[[], Awaitable[None]],
        condition: Condition | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.inner = inner
        self.model_name = model_name  # the Model resource's name
        self.condition = condition
        self._refresh = refresh
        self._clock = clock
        self._open: set[str] = set()  # sessions opened through us (moved on a rebuild)
        self._in_flight = 0
        self._drained: anyio.Event | None = None
        self._gate: anyio.Event | None = None  # set while the engine is being swapped

    @property
    def started(self) -> bool:
        """Whether a real engine serves (not a stand-in for one that failed to start)."""
        return not isinstance(self.inner, Unstarted)

    def failed(self, error: EngineUnavailable) -> None:
        """``error`` says the Model is wrong: record it as the model's condition."""
        if self.condition is None or self.condition.reason != str(error):
            self.condition = Condition.of(error, self._clock())

    # Identity and sessions are the current engine's.

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def model(self) -> str:
        return self.inner.model

    @property
    def slots(self) -> int:
        return self.inner.slots

    @property
    def parallel(self) -> int:
        return self.inner.parallel

    def fingerprint(self) -> str:
        return self.inner.fingerprint()

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)

    def open_session(self, session_id: str) -> None:
        self.inner.open_session(session_id)
        self._open.add(session_id)

    def close_session(self, session_id: str) -> None:
        self.inner.close_session(session_id)
        self._open.discard(session_id)

    def has_session(self, session_id: str) -> bool:
        return self.inner.has_session(session_id)

    def session_info(self, session_id: str) -> SessionInfo:
        return self.inner.session_info(session_id)

    def conversation(self, session_id: str) -> list[dict[str, Any]]:
        return self.inner.conversation(session_id)

    def describe(self) -> dict[str, Any]:
        """The current engine's description and the model's condition."""
        inner = getattr(self.inner, "describe", None)
        info: dict[str, Any] = dict(inner()) if callable(inner) else {}
        info["condition"] = None if self.condition is None else self.condition.to_dict()
        return info

    # Calls: wait while the engine is swapped; a call in flight holds a swap back.

    @asynccontextmanager
    async def _turn(self, *, call: bool) -> AsyncIterator[None]:
        if call:
            await self._refresh()
        while self._gate is not None:
            await self._gate.wait()
        self._in_flight += 1
        try:
            yield
        except ModelMisconfigured as e:
            if e.model != self.model_name:
                # The server knows the model by its served name; operators by the Model's.
                named = ModelMisconfigured(self.model_name, f"{e.reason} (served as {e.model})")
                self.failed(named)
                raise named from e
            self.failed(e)
            raise
        else:
            if call and self.condition is not None and self.started:
                self.condition = None  # it answered: whatever was wrong is fixed
        finally:
            self._in_flight -= 1
            if self._in_flight == 0 and self._drained is not None:
                self._drained.set()

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
        async with self._turn(call=True):
            return await self.inner.generate(
                session_id,
                prompt,
                max_tokens=max_tokens,
                stop=stop,
                temperature=temperature,
                grammar=grammar,
                json_schema=json_schema,
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
        async with self._turn(call=True):
            async for chunk in self.inner.stream(
                session_id,
                prompt,
                max_tokens=max_tokens,
                stop=stop,
                temperature=temperature,
                grammar=grammar,
                json_schema=json_schema,
            ):
                yield chunk

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
        async with self._turn(call=True):
            return await self.inner.chat(
                session_id,
                messages,
                tools=tools,
                tool_choice=tool_choice,
                parallel_tool_calls=parallel_tool_calls,
                response_format=response_format,
                max_tokens=max_tokens,
                stop=stop,
                temperature=temperature,
            )

    async def reset_session(self, session_id: str) -> None:
        async with self._turn(call=False):
            await self.inner.reset_session(session_id)

    async def export_kv(self, session_id: str) -> KVSnapshot:
        async with self._turn(call=False):
            return await self.inner.export_kv(session_id)

    async def import_kv(self, session_id: str, snapshot: KVSnapshot) -> bool:
        async with self._turn(call=False):
            return await self.inner.import_kv(session_id, snapshot)

    async def prefill(
        self, session_id: str, tokens: Sequence[int], conversation: bytes = b""
    ) -> float:
        async with self._turn(call=False):
            return await self.inner.prefill(session_id, tokens, conversation)

    # The swap.

    async def swap(self, new: Engine, condition: Condition | None) -> Engine:
        """Put ``new`` behind this engine, with every open session moved to it; returns
        the old engine (the caller closes it). Calls wait meanwhile; the calls in flight
        finish first (up to a bound: a call cannot hold a rebuild back for ever)."""
        gate = anyio.Event()
        self._gate = gate
        try:
            if self._in_flight:
                self._drained = anyio.Event()
                with anyio.move_on_after(_DRAIN_S):
                    await self._drained.wait()
                self._drained = None
            old = self.inner
            moved: set[str] = set()
            while pending := sorted(self._open - moved):
                for session_id in pending:
                    if await move_session(old, new, session_id):
                        moved.add(session_id)
                    else:
                        self._open.discard(session_id)
            for session_id in moved - self._open:  # closed on the old one meanwhile
                new.close_session(session_id)
            self.inner = new
            self.condition = condition
        finally:
            self._gate = None
            gate.set()
        return old


async def move_session(old: Engine, new: Engine, session_id: str) -> bool:
    """Open ``session_id`` on ``new`` with its context from ``old``; False when it could
    not be opened there (its holder opens it again with its next call)."""
    try:
        snapshot: KVSnapshot | None = await old.export_kv(session_id)
        messages = old.conversation(session_id)
    except EngineError as e:
        log.warning("%s: its context could not be exported for the new engine: %s", session_id, e)
        snapshot, messages = None, []
    try:
        new.open_session(session_id)
    except EngineError as e:
        log.warning("%s: no session on the rebuilt engine: %s", session_id, e)
        return False
    if snapshot is None:
        return True
    try:
        if isinstance(new, Unstarted):
            new.keep(session_id, snapshot, messages)
        elif snapshot.data is not None and await new.import_kv(session_id, snapshot):
            pass
        elif snapshot.tokens or snapshot.conversation:
            await new.prefill(session_id, snapshot.tokens, snapshot.conversation)
    except EngineError as e:
        log.warning("%s: its context did not carry over to the new engine: %s", session_id, e)
        await new.reset_session(session_id)
    return True
