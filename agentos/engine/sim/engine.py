"""``SimEngine``: the :class:`~agentos.engine.base.Engine` calls on simulated sessions.

What it promises is in :mod:`agentos.engine.sim`; this module holds the calls, with
the tokenizer and the draw in :mod:`.vocab`, llama's limits in :mod:`.turns` and chat
in :mod:`.chat`.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel

from agentos.core.chat import Reply, ToolSpec
from agentos.engine.base import (
    Completion,
    Engine,
    EngineError,
    KVSnapshot,
    NoFreeSlot,
    SessionInfo,
    StreamChunk,
)
from agentos.engine.sim.chat import Scripted, SimChat, chat_state, read_chat_state
from agentos.engine.sim.state import (
    MIN_KV_BYTES_PER_TOKEN,
    SimSession,
    SimStats,
    fingerprint,
    kv_blob,
    reject_reason,
)
from agentos.engine.sim.turns import Overflow, SimTurns
from agentos.engine.sim.vocab import SimVocab
from agentos.engine.text import collect, stop_prefix_len

__all__ = ["SimEngine"]


class SimEngine:
    """A model-free engine whose output is a deterministic function of seed and context."""

    def __init__(
        self,
        *,
        seed: int = 0,
        slots: int = 64,
        n_ctx: int = 8192,
        kv_bytes_per_token: int = 2048,
        prefill_s_per_token: float = 0.0,
        decode_s_per_token: float = 0.0,
        model: str = "sim-1",
        vocab_size: int = 32000,
        parallel: int | None = None,
        overflow: Overflow = "slide",
        export_latency_s: float = 0.0,
        import_latency_s: float = 0.0,
    ) -> None:
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        if n_ctx < 1:
            raise ValueError(f"n_ctx must be >= 1, got {n_ctx}")
        if kv_bytes_per_token < MIN_KV_BYTES_PER_TOKEN:
            raise ValueError(
                f"kv_bytes_per_token must be >= {MIN_KV_BYTES_PER_TOKEN} (the snapshot "
                f"header lives in the first token's bytes), got {kv_bytes_per_token}"
            )
        if prefill_s_per_token < 0 or decode_s_per_token < 0:
            raise ValueError("per-token costs must be >= 0")
        if not 1 <= vocab_size <= 2**32:
            raise ValueError(f"vocab_size must be in [1, 2**32], got {vocab_size}")
        if parallel is not None and not 1 <= parallel <= slots:
            raise ValueError(f"parallel must be None or in [1, slots={slots}], got {parallel}")
        if overflow not in ("slide", "raise"):
            raise ValueError(f"overflow must be 'slide' or 'raise', got {overflow!r}")
        for what, latency in (("export", export_latency_s), ("import", import_latency_s)):
            if not (math.isfinite(latency) and latency >= 0):
                raise ValueError(f"{what}_latency_s must be a finite number >= 0, got {latency}")
        self._seed = seed
        self._slots = slots
        self._n_ctx = n_ctx
        self._kv_bytes_per_token = kv_bytes_per_token
        self._prefill_s = prefill_s_per_token
        self._decode_s = decode_s_per_token
        self._model = model
        self._vocab_size = vocab_size
        self._parallel = parallel
        self._overflow = overflow
        self._export_s = export_latency_s
        self._import_s = import_latency_s
        self._sessions: dict[str, SimSession] = {}
        self.stats = SimStats()

        self._fingerprint = fingerprint(
            model=model,
            seed=seed,
            n_ctx=n_ctx,
            kv_bytes_per_token=kv_bytes_per_token,
            vocab_size=vocab_size,
        )
        self._fingerprint_digest = hashlib.blake2b(
            self._fingerprint.encode(), digest_size=16
        ).digest()
        self._vocab = SimVocab(seed=seed, vocab_size=vocab_size)
        self._turns = SimTurns(self._sessions, parallel=parallel, overflow=overflow, n_ctx=n_ctx)
        self._chat = SimChat(
            vocab=self._vocab,
            turns=self._turns,
            stats=self.stats,
            n_ctx=n_ctx,
            prefill_s=prefill_s_per_token,
            decode_s=decode_s_per_token,
        )

    @classmethod
    def like_llama(cls, **overrides: Any) -> SimEngine:
        """A sim engine with the llama engine's constraints, for tests that must see them.

        One call at a time (``parallel=1``), overflow raises, 0.1 s per KV export and
        import, 8 slots of 2,048 tokens; ``overrides`` are passed on to the constructor
        (e.g. ``n_ctx=256`` or ``decode_s_per_token=0.02`` for llama's CPU speed).
        """
        options: dict[str, Any] = {
            "slots": 8,
            "n_ctx": 2048,
            "parallel": 1,
            "overflow": "raise",
            "export_latency_s": 0.1,
            "import_latency_s": 0.1,
        }
        options.update(overrides)
        return cls(**options)

    # -- identity ---------------------------------------------------------------------

    @property
    def name(self) -> str:
        return "sim"

    @property
    def model(self) -> str:
        return self._model

    @property
    def slots(self) -> int:
        return self._slots

    @property
    def parallel(self) -> int:
        # Without a limit, simulated calls only sleep: every session may run at once.
        return self._slots if self._parallel is None else self._parallel

    @property
    def overflow(self) -> Overflow:
        return self._overflow

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    @property
    def kv_bytes_per_token(self) -> int:
        return self._kv_bytes_per_token

    def fingerprint(self) -> str:
        return self._fingerprint

    # -- tokenizer --------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; pieces are remembered so :meth:`decode` can map them back."""
        return self._vocab.encode(text)

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids``; an id this engine never saw decodes as ``<tok:ID>``."""
        return self._vocab.decode(token_ids)

    def count_tokens(self, text: str) -> int:
        return self._vocab.count(text)

    # -- sessions ---------------------------------------------------------------------

    def _session(self, session_id: str) -> SimSession:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise EngineError(f"unknown session {session_id!r}") from None

    def open_session(self, session_id: str) -> None:
        if session_id in self._sessions:
            raise EngineError(f"session {session_id!r} is already open")
        if len(self._sessions) >= self._slots:
            raise NoFreeSlot(
                f"all {self._slots} slots are held; cannot open session {session_id!r}"
            )
        self._sessions[session_id] = SimSession(session_id)

    def close_session(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def has_session(self, session_id: str) -> bool:
        return session_id in self._sessions

    def session_info(self, session_id: str) -> SessionInfo:
        n = len(self._session(session_id).tokens)
        return SessionInfo(session_id, n, n * self._kv_bytes_per_token)

    def context_tokens(self, session_id: str) -> tuple[int, ...]:
        """The session's current context (a sim-only window into its state, for tests)."""
        return tuple(self._session(session_id).tokens)

    async def reset_session(self, session_id: str) -> None:
        session = self._session(session_id)
        async with self._turns.call(session, "reset_session"), self._turns.step(session):
            session.clear()
            await anyio.lowlevel.checkpoint()

    # -- generation -------------------------------------------------------------------

    def _next_token(self, session: SimSession) -> tuple[int, str]:
        after_newline = not session.tokens or session.tokens[-1] == self._vocab.newline
        return self._vocab.draw(session.digest(), after_newline)

    def stream(
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
        """Prefill ``prompt`` and stream a continuation; ``temperature`` and ``grammar`` are
        ignored (see the module docstring). Bad arguments, a busy session (``parallel=N``)
        and context overflow (``overflow="raise"``) raise here, not on first ``anext``.
        """
        session = self._session(session_id)
        if max_tokens < 0:
            raise EngineError(f"max_tokens must be >= 0, got {max_tokens}")
        self._turns.check_idle(session, "stream")
        self._turns.check_fits(session, self.count_tokens(prompt) + (1 if max_tokens > 0 else 0))
        return self._stream(session, prompt, max_tokens, tuple(s for s in stop if s))

    async def _stream(
        self, session: SimSession, prompt: str, max_tokens: int, stops: tuple[str, ...]
    ) -> AsyncGenerator[StreamChunk, None]:
        generation = self._generation(session, prompt, max_tokens, stops)
        async with self._turns.call(session, "stream"), aclosing(generation):
            async for chunk in generation:
                yield chunk

    async def _generation(
        self, session: SimSession, prompt: str, max_tokens: int, stops: tuple[str, ...]
    ) -> AsyncGenerator[StreamChunk, None]:
        self.stats.generations += 1
        prompt_ids = self.encode(prompt)
        async with self._turns.step(session):
            # Again: without parallel=N another call may have grown the context since.
            self._turns.check_fits(session, len(prompt_ids) + (1 if max_tokens > 0 else 0))
            session.extend(prompt_ids, self._n_ctx)
            self.stats.prefill_tokens += len(prompt_ids)
            await anyio.lowlevel.checkpoint()
            if self._prefill_s > 0 and prompt_ids:
                await anyio.sleep(self._prefill_s * len(prompt_ids))

        out = ""  # everything sampled this call
        sent = 0  # how much of ``out`` has been yielded
        pending: list[int] = []  # sampled ids not yet reported in a chunk
        for i in range(max_tokens):
            async with self._turns.step(session):
                if self._decode_s > 0:
                    await anyio.sleep(self._decode_s)
                token, piece = self._next_token(session)
                session.extend((token,), self._n_ctx)
            self.stats.decode_tokens += 1
            pending.append(token)
            out += piece

            # A stop string can only start in unsent text: anything that could begin one
            # was held back below.
            hits = [at for s in stops if (at := out.find(s, sent)) >= 0]
            if hits:
                yield StreamChunk(out[sent : min(hits)], tuple(pending), True, "stop")
                return
            full = self._overflow == "raise" and len(session.tokens) >= self._n_ctx
            if i == max_tokens - 1 or full:
                break
            safe = len(out) - stop_prefix_len(out, stops)
            if safe > sent:
                yield StreamChunk(out[sent:safe], tuple(pending))
                sent, pending = safe, []
        yield StreamChunk(out[sent:], tuple(pending), True, "length")

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
        start = time.perf_counter()
        # Counted up front: other sessions may move the shared stats while this one streams.
        n_in = self.count_tokens(prompt)
        chunks = self.stream(
            session_id,
            prompt,
            max_tokens=max_tokens,
            stop=stop,
            temperature=temperature,
            grammar=grammar,
            json_schema=json_schema,
        )
        return await collect(chunks, start=start, input_tokens=n_in)

    # -- chat -------------------------------------------------------------------------

    def script(self, session_id: str, *replies: Scripted) -> None:
        """Queue ``replies`` for the session's next chat calls, in order (see
        :meth:`SimChat.script`)."""
        self._chat.script(session_id, *replies)

    def scripted_left(self, session_id: str) -> int:
        """How many scripted replies the session has not been given yet."""
        return self._chat.scripted_left(session_id)

    def conversation(self, session_id: str) -> list[dict[str, Any]]:
        """The session's chat messages so far, OpenAI-shaped (a copy)."""
        return copy.deepcopy(self._session(session_id).messages)

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
        """Append ``messages`` and answer with the next scripted reply, or a synthetic
        one (see :meth:`SimChat.chat`)."""
        return await self._chat.chat(
            self._session(session_id),
            messages,
            tools=tools,
            tool_choice=tool_choice,
            parallel_tool_calls=parallel_tool_calls,
            response_format=response_format,
            max_tokens=max_tokens,
            stop=stop,
            temperature=temperature,
        )

    # -- KV ---------------------------------------------------------------------------

    async def export_kv(self, session_id: str) -> KVSnapshot:
        session = self._session(session_id)
        async with self._turns.call(session, "export_kv"), self._turns.step(session):
            await anyio.lowlevel.checkpoint()
            if self._export_s > 0:
                await anyio.sleep(self._export_s)
            tokens = tuple(session.tokens)
            conversation = chat_state(session)
        self.stats.exports += 1
        return KVSnapshot(
            self._fingerprint,
            tokens,
            kv_blob(tokens, self._kv_bytes_per_token, self._fingerprint_digest),
            conversation=conversation,
        )

    async def import_kv(self, session_id: str, snapshot: KVSnapshot) -> bool:
        session = self._session(session_id)
        if session.tokens:
            raise EngineError(f"session {session_id!r} is not empty; reset it before import_kv")
        async with self._turns.call(session, "import_kv"), self._turns.step(session):
            await anyio.lowlevel.checkpoint()
            if self._import_s > 0:
                await anyio.sleep(self._import_s)
            reason = reject_reason(
                snapshot,
                fingerprint=self._fingerprint,
                n_ctx=self._n_ctx,
                vocab_size=self._vocab_size,
                kv_bytes_per_token=self._kv_bytes_per_token,
                key=self._fingerprint_digest,
            )
            if reason is None:
                try:
                    messages, described = read_chat_state(snapshot.conversation)
                except ValueError as e:
                    reason = str(e)
            if reason is None:
                session.extend(snapshot.tokens, self._n_ctx)
                session.messages, session.described = messages, described
        if reason is not None:
            self.stats.imports_rejected += 1
            self.stats.last_reject_reason = reason
            return False
        self.stats.imports_accepted += 1
        return True

    async def prefill(
        self, session_id: str, tokens: Sequence[int], conversation: bytes = b""
    ) -> float:
        """Append ``tokens`` to the context (on an empty session: rebuild it), paying
        ``prefill_s_per_token`` each; returns the seconds taken. A non-empty
        ``conversation`` (``KVSnapshot.conversation``) replaces the session's chat state;
        EngineError if it is not one this engine wrote."""
        session = self._session(session_id)
        bad = [t for t in tokens if not 0 <= t < self._vocab_size]
        if bad:
            raise EngineError(f"token ids out of vocabulary for session {session_id!r}: {bad[:5]}")
        try:
            chat = read_chat_state(conversation) if conversation else None
        except ValueError as e:
            raise EngineError(f"prefill of session {session_id!r}: {e}") from None
        self._turns.check_fits(session, len(tokens))
        start = time.perf_counter()
        async with self._turns.call(session, "prefill"), self._turns.step(session):
            await anyio.lowlevel.checkpoint()
            if self._prefill_s > 0 and tokens:
                await anyio.sleep(self._prefill_s * len(tokens))
            self._turns.check_fits(session, len(tokens))
            session.extend(tokens, self._n_ctx)
            if chat is not None:
                session.messages, session.described = chat
        self.stats.prefill_tokens += len(tokens)
        return time.perf_counter() - start


if TYPE_CHECKING:
    _protocol_check: Engine = SimEngine()
