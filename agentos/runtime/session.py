"""One agent's engine session: a slot from the arbiter, its context restored from or saved to Redis.

The runner secures the session before agent code runs (a task never waits for a
slot while holding an inference turn) and gives it back whenever the agent stops running:
hibernation, crash backoff, a parked task, a wait, failure, stop. Giving it back saves the
context first when it changed since the last snapshot, so the next owner of the
slot, or of the agent, continues where it was.

When agent code calls the model with no session open (a heartbeat's ``observe`` of a
hibernated agent), the model handle asks the runner's
:class:`agentos.runtime.securing.OnDemandSession`, which wakes the agent as a task
would and ends here.
"""

from __future__ import annotations

from collections.abc import Callable

from agentos.engine.base import Engine
from agentos.runtime.hibernator import Hibernator, Restored, Saved
from agentos.runtime.slots import Holder, SlotArbiter
from agentos.runtime.writer import Writer

__all__ = ["AgentSession"]


class AgentSession:
    """The engine session of one agent, owned by its runner."""

    def __init__(
        self,
        holder: Holder,
        *,
        engine: Engine,
        arbiter: SlotArbiter,
        hibernator: Hibernator,
        writer: Writer,
        keep_kv: str,
        on_slow: Callable[[], object] | None = None,
    ) -> None:
        self.holder = holder
        self.name = holder.name
        self.engine = engine
        self.arbiter = arbiter
        self.hibernator = hibernator
        self.writer = writer
        self.keep_kv = keep_kv
        self.on_slow = on_slow
        self.has_snapshot = False  # a committed snapshot in Redis holds the context
        self.snapshot_tokens = -1  # context length the snapshot covers (-1: unknown)
        # What the context was when last saved or restored (its length in tokens and in
        # chat messages): an unchanged context is not saved again.
        self._saved_mark: tuple[int, int] | None = None

    @property
    def open(self) -> bool:
        """Whether the agent holds an engine slot now."""
        return self.engine.has_session(self.name)

    @property
    def would_wait(self) -> bool:
        """Whether opening now would have to wait for a slot."""
        return not self.open and (
            bool(self.arbiter.waiting)
            or sum(1 for h in self.arbiter.holders if self.engine.has_session(h))
            >= self.engine.slots
        )

    async def ensure(self) -> Restored | None:
        """Hold a slot with the agent's context in it, waiting for a slot as needed.

        Returns how the context came back (None when the session was already open or
        there was nothing stored). Cancelling it leaves no session open.
        """
        if self.open:
            return None
        await self.arbiter.acquire(self.holder, on_slow=self.on_slow)
        if not self.has_snapshot:
            self.snapshot_tokens = 0
            self._saved_mark = self._mark()
            return None
        try:
            restored = await self.hibernator.restore(self.writer)
        except BaseException:
            self.drop()
            raise
        self.snapshot_tokens = restored.n_tokens
        self._saved_mark = self._mark()
        return restored

    def _mark(self) -> tuple[int, int]:
        return (
            self.engine.session_info(self.name).n_tokens,
            len(self.engine.conversation(self.name)),
        )

    async def save(self) -> Saved | None:
        """Commit the open session's context if it changed since the last snapshot."""
        if not self.open:
            return None
        mark = self._mark()
        if mark == self._saved_mark:
            return None
        saved = await self.hibernator.save(self.writer, self.keep_kv)
        self.has_snapshot = True
        self.snapshot_tokens = saved.n_tokens
        self._saved_mark = mark
        return saved

    async def give_back(self) -> Saved | None:
        """Save the context (if it changed) and give the slot back.

        Raises what :meth:`save` raises; the slot is given back in any case.
        """
        try:
            return await self.save()
        finally:
            self.drop()

    def drop(self) -> None:
        """Give the slot back without saving (the lease is gone, or the agent deleted)."""
        if self.engine.has_session(self.name):
            self.engine.close_session(self.name)
            self.arbiter.released()
