"""The sessions of one llama.cpp context: slots, the one lock, and what a decode step does.

A session owns one sequence (slot) of the shared context. Every llama.cpp call runs in
a worker thread holding one lock (:meth:`Sessions.run`), so the event loop stays
responsive during a multi-second prefill; calls of different sessions interleave token
by token, each decode holding one session's tokens only. A slot freed while a decode
runs is cleared by the next locked call, so closing never blocks the event loop.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import anyio.to_thread
import numpy as np

from agentos.engine.base import ContextOverflow, EngineError, NoFreeSlot
from agentos.engine.llama.native import LlamaContext
from agentos.engine.llama.sampling import Generation, Sampler, check_sampling, compile_grammar
from agentos.engine.llama.state import LlamaStats, Session

__all__ = ["EOG", "Sessions"]

_T = TypeVar("_T")

EOG = -1  # what a generation step returns when the model ended the text
_PREFILL_RATE_MIN_TOKENS = 32  # shorter prefills are dominated by the output layer
_PREFILL_RATE_ALPHA = 0.3


class Sessions:
    """Open sessions on ``native``'s sequences, and the locked steps that change them."""

    def __init__(
        self,
        native: LlamaContext,
        sampler: Sampler,
        stats: LlamaStats,
        *,
        slots: int,
        n_ctx: int,
        seed: int,
    ) -> None:
        self._native = native
        self._sampler = sampler
        self._stats = stats
        self._slots = slots
        self._n_ctx = n_ctx
        self._seed = seed
        self.lock = threading.Lock()  # every call into the context holds it
        self._open: dict[str, Session] = {}
        self._free: deque[int] = deque(range(slots))
        # Slots closed while the context was busy; cleared before the next use.
        self._dirty: set[int] = set()

    def get(self, session_id: str) -> Session:
        try:
            return self._open[session_id]
        except KeyError:
            raise EngineError(f"unknown session {session_id!r}") from None

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._open

    def open(self, session_id: str) -> None:
        self._native.require()
        if session_id in self._open:
            raise EngineError(f"session {session_id!r} is already open")
        if not self._free:
            raise NoFreeSlot(
                f"all {self._slots} slots are held; cannot open session {session_id!r}"
            )
        # The least recently freed slot: spreads use, and a slot freed while the
        # context was busy gets time to be cleared before it is handed out again.
        self._open[session_id] = Session(session_id, self._free.popleft())

    def close(self, session_id: str) -> None:
        session = self._open.pop(session_id, None)
        if session is None:
            return
        self._dirty.add(session.seq)
        self._free.append(session.seq)
        # Clear the sequence now if no decode runs; otherwise the next locked call does
        # it, since this method must not block the event loop behind a prefill.
        if self.lock.acquire(blocking=False):
            try:
                self._flush_dirty()
            finally:
                self.lock.release()

    def clear(self) -> None:
        """Forget every session (the engine is closing; the caller holds the lock)."""
        self._open.clear()

    # -- locked plumbing (worker threads) ---------------------------------------------

    async def run(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn`` in a worker thread holding the context lock."""

        def locked() -> _T:
            with self.lock:
                self._native.require()
                self._flush_dirty()
                return fn(*args)

        return await anyio.to_thread.run_sync(locked)

    def _flush_dirty(self) -> None:
        if self._native.ctx is None:
            self._dirty.clear()
            return
        while self._dirty:
            self._native.seq_clear(self._dirty.pop())

    def live(self, session: Session) -> None:
        """Raise :class:`EngineError` when ``session`` was closed under its call."""
        if self._open.get(session.session_id) is not session:
            raise EngineError(f"session {session.session_id!r} was closed")

    def reset_locked(self, session: Session) -> None:
        self.live(session)
        self._native.seq_clear(session.seq)
        session.tokens.clear()
        session.n_kv = 0
        session.kv_bytes = 0

    def prefill_locked(self, session: Session, ids: list[int]) -> None:
        self.live(session)
        if len(session.tokens) + len(ids) > self._n_ctx:
            raise self.overflow(session, len(ids))
        keep = len(session.tokens)
        session.tokens.extend(ids)
        self._feed(session, logits=False, keep_on_failure=keep)

    def _feed(self, session: Session, *, logits: bool, keep_on_failure: int) -> None:
        """Decode the session's tokens that are not in the KV cache yet.

        On failure the sequence is rebuilt from the history it had before (a partial
        prefill cannot be rolled back once it went past the sliding window), the history
        is cut to ``keep_on_failure`` tokens and :class:`EngineError` is raised.
        """
        native = self._native
        start = session.n_kv
        feed = session.tokens[start:]
        if not feed:
            return
        t0 = time.perf_counter()
        rc = native.decode(session.seq, feed, start, logits)
        elapsed = time.perf_counter() - t0
        if rc != 0:
            del session.tokens[keep_on_failure:]
            native.seq_clear(session.seq)
            session.n_kv = 0
            if native.decode(session.seq, session.tokens[:start], 0, False) == 0:
                session.n_kv = start
            else:
                native.seq_clear(session.seq)
                session.tokens.clear()
            session.kv_bytes = native.seq_size(session.seq)
            lost = "" if session.tokens else "; its context was lost"
            raise EngineError(
                f"llama_decode failed with {rc} for session {session.session_id!r}{lost}"
            )
        session.n_kv = len(session.tokens)
        session.kv_bytes = native.seq_size(session.seq)
        if len(feed) >= _PREFILL_RATE_MIN_TOKENS and elapsed > 0:
            rate = len(feed) / elapsed
            old = self._stats.prefill_tokens_per_s
            self._stats.prefill_tokens_per_s = (
                rate if old is None else old + _PREFILL_RATE_ALPHA * (rate - old)
            )

    def overflow(self, session: Session, extra: int, held: int | None = None) -> ContextOverflow:
        held = len(session.tokens) if held is None else held
        return ContextOverflow(
            f"context overflow in session {session.session_id!r}: {held} "
            f"tokens held + {extra} needed > n_ctx {self._n_ctx}; compact the history "
            "and re-prefill, or use a larger n_ctx"
        )

    # -- generation -------------------------------------------------------------------

    def prepare(
        self,
        session_id: str,
        prompt: str,
        max_tokens: int,
        temperature: float,
        grammar: str | None,
        json_schema: Mapping[str, Any] | None,
    ) -> Generation:
        """A text generation of ``prompt`` on the session; bad arguments, an invalid
        grammar and context overflow raise here, before anything changes."""
        session = self.get(session_id)
        self._native.require()
        check_sampling(max_tokens, temperature)
        if not prompt:
            # A restored sequence has no logits: every call must decode a new token.
            raise EngineError("prompt must not be empty")
        if grammar is not None and json_schema is not None:
            raise EngineError("pass either grammar or json_schema, not both")
        ids = self._native.tokenize(prompt)
        if not ids:
            raise EngineError("prompt encodes to no tokens")
        return self.generation(
            session, ids, max_tokens, temperature, grammar, json_schema, len(session.tokens)
        )

    def generation(
        self,
        session: Session,
        ids: list[int],
        max_tokens: int,
        temperature: float,
        grammar: str | None,
        json_schema: Mapping[str, Any] | None,
        held: int,
    ) -> Generation:
        """A generation of ``ids`` on a session that will hold ``held`` tokens when it
        starts (0: it is reset first); raises ContextOverflow before anything changes."""
        if held == 0 and self._native.bos is not None:
            ids.insert(0, self._native.bos)
        need = len(ids) + (1 if max_tokens > 0 else 0)
        if held + need > self._n_ctx:
            raise self.overflow(session, need, held)
        compiled = compile_grammar(self._native.vocab, grammar, json_schema)
        rng = np.random.default_rng(self._seed) if temperature > 0 else None
        return Generation(session, ids, max_tokens, temperature, compiled, rng, held)

    def advance(self, gen: Generation) -> int | None:
        """Decode what the session has not decoded yet (the prompt on the first call,
        then the token sampled last) and sample the next token.

        Decode and sample share one locked section: the logits belong to the context,
        and the next session's decode overwrites them. Returns the token, :data:`EOG`,
        or None when ``max_tokens`` is 0 (prompt only).
        """
        session = gen.session
        self.live(session)
        keep = len(session.tokens)
        if not gen.fed:
            if len(session.tokens) + len(gen.prompt) > self._n_ctx:
                raise self.overflow(session, len(gen.prompt))
            session.tokens.extend(gen.prompt)
            gen.fed = True
        self._feed(session, logits=gen.max_tokens > 0, keep_on_failure=keep)
        if gen.max_tokens == 0:
            return None
        token = self._sampler.sample(self._native.logits(), gen)
        if self._native.is_eog(token):
            return EOG
        session.tokens.append(token)
        return token
