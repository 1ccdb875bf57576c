"""The llama engine's limits, kept by the ``sim`` engine when asked (``parallel=N``,
``overflow="raise"``), so tests see what users of the real engine hit.

With ``parallel=N`` at most N calls do engine work at a time, each step (prefill, a
token, export, import, reset) taking its turn like llama.cpp's calls on its lock, and
one session runs one call at a time. With ``overflow="raise"`` a context that would
exceed ``n_ctx`` raises :class:`ContextOverflow` instead of sliding.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Literal

import anyio

from agentos.engine.base import ContextOverflow, EngineError
from agentos.engine.sim.state import SimSession

__all__ = ["Overflow", "SimTurns"]

Overflow = Literal["slide", "raise"]


class SimTurns:
    """Turns on the engine (``parallel``) and room in a session (``overflow``)."""

    def __init__(
        self,
        sessions: Mapping[str, SimSession],
        *,
        parallel: int | None,
        overflow: Overflow,
        n_ctx: int,
    ) -> None:
        self._sessions = sessions  # the engine's open sessions, to see one closed under a call
        self._overflow = overflow
        self._n_ctx = n_ctx
        # Only with parallel=N: calls take turns here like llama.cpp's calls on its lock.
        self._gate = anyio.CapacityLimiter(parallel) if parallel is not None else None

    def check_idle(self, session: SimSession, what: str) -> None:
        """Raise :class:`EngineError` when another call is in flight on ``session``."""
        if self._gate is not None and session.busy is not None:
            raise EngineError(
                f"{what} on session {session.session_id!r} while its {session.busy} is in "
                "flight: one call at a time per session (llama.cpp would mix both into "
                "one context)"
            )

    @asynccontextmanager
    async def call(self, session: SimSession, what: str) -> AsyncIterator[None]:
        """Hold ``session`` for one whole call (a stream: until it finishes or closes)."""
        if self._gate is None:
            yield
            return
        self.check_idle(session, what)
        session.busy = what
        try:
            yield
        finally:
            session.busy = None

    @asynccontextmanager
    async def step(self, session: SimSession) -> AsyncIterator[None]:
        """One locked section, as llama.cpp holds its context lock per decode or export."""
        if self._gate is None:
            yield
            return
        async with self._gate:
            if self._sessions.get(session.session_id) is not session:
                raise EngineError(f"session {session.session_id!r} was closed")
            yield

    def check_fits(self, session: SimSession, extra: int, held: int | None = None) -> None:
        """Raise :class:`ContextOverflow` (``overflow="raise"``) when ``extra`` tokens
        do not fit after ``held`` (default: the session's)."""
        held = len(session.tokens) if held is None else held
        if self._overflow == "raise" and held + extra > self._n_ctx:
            raise ContextOverflow(
                f"context overflow in session {session.session_id!r}: {held} "
                f"tokens held + {extra} needed > n_ctx {self._n_ctx}; compact the history "
                "and re-prefill, or use a larger n_ctx"
            )
