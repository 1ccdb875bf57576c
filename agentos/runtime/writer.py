"""The one gateway through which a runner writes an agent's keys: fenced, retried, applied once.

Every write a runner makes (status, state, inbox ack, task record, schedule, usage,
events: one :class:`~agentos.store.Write`) goes through :meth:`Writer.write`: one Lua
script that first checks the runner still holds the agent's lease. Each logical
write gets one op id, reused by every retry of it, so a write whose reply was lost
is not applied a second time when it is sent again. Retries follow the store's single
retry policy (:func:`agentos.store.retry.retry`); a write refused by the fence raises
:class:`LeaseLost`, after which the runner must not touch the agent again.

A write may be deferred (:meth:`Writer.defer`) when the runner knows its next write
follows at once, with no agent code and no wait in between (a task's close, when the
next task is already queued): both then go in one atomic step, one round trip.
:meth:`Writer.flush` sends a deferred write on its own; every path that could wait
calls it first.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from agentos.store import DUPLICATE, Duplicate, Store, Write
from agentos.store.retry import new_op_id, retry

__all__ = ["NOTHING", "LeaseLost", "Writer"]

NOTHING = Write()  # a write of nothing: sends what is deferred

_T = TypeVar("_T")


class LeaseLost(Exception):
    """The agent's lease is no longer ours; stop touching it."""


class Writer:
    """Fenced writes and retried reads for one agent, under one lease value."""

    def __init__(
        self,
        store: Store,
        name: str,
        lease_value: str,
        *,
        daemon_id: str,
        clock: Callable[[], float],
        retry_max_s: float = 5.0,
    ) -> None:
        self.store = store
        self.name = name
        self.lease_value = lease_value
        self.daemon_id = daemon_id
        self.clock = clock
        self.retry_max_s = retry_max_s
        self._deferred: list[Write] = []

    def defer(self, part: Write) -> None:
        """Defer ``part``: it is applied, first and in the same step, with the next
        :meth:`write` (or by :meth:`flush`).

        Only parts that are safe to apply twice (a write whose reply was lost and that
        failed for good is deferred again): no events, no usage increments.
        """
        if part.event is not None or part.usage is not None:
            raise ValueError("a deferred write carries no event and no usage")
        self._deferred.append(part)

    @property
    def deferring(self) -> bool:
        """Whether a write is deferred."""
        return bool(self._deferred)

    async def flush(self) -> None:
        """Apply a deferred write now, if there is one (raises :class:`LeaseLost`)."""
        if self._deferred:
            await self.write()

    async def write(
        self, part: Write = NOTHING, *, release: bool = False, duplicate: Duplicate | None = None
    ) -> bool:
        """Apply ``part`` (after any deferred one) atomically, once; retried until Redis
        answers. With ``release`` the lease is given up in the same step. Returns False
        only when ``duplicate``'s branch was applied instead (the message's idempotency
        key had completed).

        Raises :class:`LeaseLost` when the lease is not ours (nothing was written).
        """
        op_id = new_op_id()
        # Taken out first: a write made meanwhile (an overlapping fire) must not send
        # the same parts again. Put back if this one fails.
        prior, self._deferred = tuple(self._deferred), []
        try:
            code: int = await self.call(
                lambda: self.store.writes.fenced_write(
                    self.name,
                    self.lease_value,
                    part,
                    release=release,
                    op_id=op_id,
                    duplicate=duplicate,
                    prior=prior,
                ),
                "write",
            )
        except BaseException:
            self._deferred[:0] = prior
            raise
        if not code:
            raise LeaseLost(self.name)
        return code != DUPLICATE

    async def call(self, op: Callable[[], Awaitable[_T]], what: str) -> _T:
        """Run a store operation that is safe to repeat until Redis answers."""
        return await retry(op, what=f"{self.name}: {what}", max_delay_s=self.retry_max_s)

    def event(self, type_: str, reason: str, message: str) -> dict[str, str]:
        """An event for the agent's stream (and the fleet feed), stamped now."""
        return {
            "time": repr(self.clock()),
            "type": type_,
            "reason": reason,
            "message": message,
            "daemon": self.daemon_id,
        }
