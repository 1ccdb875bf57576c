"""The one gateway through which a runner writes an agent's keys: fenced, retried, applied once.

Every write a runner makes (status, state, inbox ack, task record, schedule, usage,
events) goes through :class:`Writer.write`: one Lua script that first checks the
runner still holds the agent's lease. Each logical write gets one op id, reused by
every retry of it, so a write whose reply was lost is not applied a second time when
it is sent again. Retries follow the store's single retry policy
(:func:`agentos.store.retry.retry`); a write refused by the fence raises
:class:`LeaseLost`, after which the runner must not touch the agent again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TypeVar

from agentos.store import Store, TaskWrite
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

    async def write(
        self,
        *,
        status: Mapping[str, object] | None = None,
        clear: Sequence[str] = (),
        event: Mapping[str, str] | None = None,
        state: bytes | None = None,
        ack_id: str | None = None,
        task: TaskWrite | None = None,
        schedule: Mapping[str, float] | None = None,
        usage: tuple[str, Mapping[str, float]] | None = None,
        release: bool = False,
    ) -> None:
        """Apply one write atomically, once; retried until Redis answers.

        Raises :class:`LeaseLost` when the lease is not ours (nothing was written).
        """
        op_id = new_op_id()
        ok = await self.call(
            lambda: self.store.fenced_write(
                self.name,
                self.lease_value,
                status=status,
                clear=clear,
                event=event,
                state=state,
                ack_id=ack_id,
                task=task,
                schedule=schedule,
                usage=usage,
                release=release,
                op_id=op_id,
            ),
            "write",
        )
        if not ok:
            raise LeaseLost(self.name)

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
