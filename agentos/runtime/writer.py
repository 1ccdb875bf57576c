"""The one gateway through which a runner writes an agent's keys: fenced, retried, applied once.

Every write a runner makes (status, state, inbox ack, task record, schedule, usage,
events) goes through :class:`Writer.write`: one Lua script that first checks the
runner still holds the agent's lease. Each logical write gets one op id, reused by
every retry of it, so a write whose reply was lost is not applied a second time when
it is sent again. Retries follow the store's single retry policy
(:func:`agentos.store.retry.retry`); a write refused by the fence raises
:class:`LeaseLost`, after which the runner must not touch the agent again.

A write may be held back (:meth:`Writer.defer`) when the runner knows its next write
follows at once, with no agent code and no wait in between (a task's close, when the
next task is already queued): both then go in one atomic step, one round trip.
:meth:`Writer.flush` sends a held-back write on its own; every path that could wait
calls it first.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TypeVar

from agentos.store import DUPLICATE, Duplicate, Store, TaskWrite, Write
from agentos.store.retry import new_op_id, retry

__all__ = ["LeaseLost", "Writer"]

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
        self._held: list[Write] = []

    def defer(self, part: Write) -> None:
        """Hold ``part`` back: it is applied, first and in the same step, with the next
        :meth:`write` (or by :meth:`flush`).

        Only parts that are safe to apply twice (a write whose reply was lost and that
        failed for good is held again): no events, no usage increments.
        """
        if part.event is not None or part.usage is not None:
            raise ValueError("a held-back write carries no event and no usage")
        self._held.append(part)

    @property
    def holding(self) -> bool:
        """Whether a write is held back."""
        return bool(self._held)

    async def flush(self) -> None:
        """Apply a held-back write now, if there is one (raises :class:`LeaseLost`)."""
        if self._held:
            await self.write()

    async def write(
        self,
        *,
        status: Mapping[str, object] | None = None,
        clear: Sequence[str] = (),
        event: Mapping[str, str] | None = None,
        state: bytes | None = None,
        ack_id: str | None = None,
        task: TaskWrite | None = None,
        tasks: Sequence[TaskWrite] = (),
        schedule: Mapping[str, float] | None = None,
        usage: tuple[str, Mapping[str, float]] | None = None,
        release: bool = False,
        duplicate: Duplicate | None = None,
    ) -> bool:
        """Apply one write (after any held-back one) atomically, once; retried until
        Redis answers. Returns False only when ``duplicate``'s branch was applied instead
        (the message's idempotency key had completed).

        Raises :class:`LeaseLost` when the lease is not ours (nothing was written).
        """
        op_id = new_op_id()
        # Taken out first: a write made meanwhile (an overlapping fire) must not send
        # the same parts again. Put back if this one fails.
        prior, self._held = tuple(self._held), []
        try:
            code = await self.call(
                lambda: self.store.fenced_write(
                    self.name,
                    self.lease_value,
                    status=status,
                    clear=clear,
                    event=event,
                    state=state,
                    ack_id=ack_id,
                    task=task,
                    tasks=tasks,
                    schedule=schedule,
                    usage=usage,
                    release=release,
                    op_id=op_id,
                    duplicate=duplicate,
                    prior=prior,
                ),
                "write",
            )
        except BaseException:
            self._held[:0] = prior
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
