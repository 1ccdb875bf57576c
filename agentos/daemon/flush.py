"""The status flush: the counters and metered usage of a daemon's runners, in batches.

Status counters and metered usage are flushed in fenced batches with op ids (a batch
whose reply was lost is sent again unchanged and counted once); each update is fenced by
the lease of the runner that produced it, so a newer runner's status is not overwritten
by an old one's counters. The agent-seconds of each batch are charged to their quota
classes' budgets once, under an op id of their own. Kept apart from the other upkeep
loops (:mod:`agentos.daemon.upkeep`): this is the one that writes what runners measured.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import anyio

from agentos.daemon.faults import Faults
from agentos.daemon.state import DaemonState
from agentos.governor.admission import Governor
from agentos.settings import DaemonSettings
from agentos.store import StatusUpdate, Store, StoreError
from agentos.store.retry import new_op_id

__all__ = ["Flusher"]


@dataclass(slots=True)
class _Flush:
    """One status flush: fenced updates with op ids, then budget seconds to charge."""

    updates: list[StatusUpdate]
    seconds: dict[tuple[str, str], float]
    seconds_op: str = field(default_factory=new_op_id)  # the budget charge, applied once


class Flusher:
    """Flushes the runners' status of one daemon (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        *,
        settings: DaemonSettings,
        clock: Callable[[], float],
        state: DaemonState,
        governor: Governor,
        faults: Faults,
    ) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self.state = state
        self.governor = governor
        self.faults = faults

    async def run(self) -> None:
        """Until cancelled: flush what changed every ``status_flush_s``, everyone's
        metered time every ``metering_flush_s``; a failed batch is sent again first."""
        metered_at = self.clock()
        unsent: _Flush | None = None  # a batch that failed: it may have been applied
        every = self.settings.status_flush_s
        delay = every
        while True:
            await anyio.sleep(delay)
            if unsent is not None:
                # The same amounts with the same op ids: applied once, whatever the first
                # attempt did. New usage waits in the runners until this one is through.
                if not await self._send(unsent):
                    delay = min(max(every, delay * 2), max(every, self.settings.redis_retry_max_s))
                    continue
                unsent = None
                delay = every
            # Idle and hibernated agents accrue metered time too: flush everyone now and then.
            everyone = self.clock() - metered_at >= self.settings.metering_flush_s
            if everyone:
                metered_at = self.clock()
            batch = [
                r
                for r in self.state.runners.values()
                if (r.dirty or everyone) and r.stop_reason is None
            ]
            if not batch:
                continue
            for r in batch:
                r.dirty = False
            flush = _Flush(
                updates=[
                    (r.name, r.lease_value, r.counters(), r.usage_delta(), new_op_id())
                    for r in batch
                ],
                seconds={},
            )
            for r, (_, _, _, (_, usage), _) in zip(batch, flush.updates, strict=True):
                key = (r.name, r.resource.spec.quota_class)
                flush.seconds[key] = flush.seconds.get(key, 0.0) + usage.get("active_s", 0.0)
            if not await self._send(flush):
                unsent = flush
                delay = min(max(every, delay * 2), max(every, self.settings.redis_retry_max_s))

    async def _send(self, flush: _Flush) -> bool:
        """Write one flush batch; False (and the batch kept as it is) when Redis failed."""
        try:
            if flush.updates:
                # Each update is fenced by the lease of the runner that produced it (a
                # newer runner's status is not overwritten by an old one's counters);
                # one applied before is recognised by its op id.
                updates = flush.updates
                for k in range(0, len(updates), 1000):
                    await self.store.writes.fenced_status_batch(updates[k : k + 1000])
                flush.updates = []
            if flush.seconds:
                await self.governor.charge_seconds(flush.seconds, op_id=flush.seconds_op)
                flush.seconds = {}
            await self.faults.store_recovered()
        except StoreError as e:
            for name, *_ in flush.updates:
                runner = self.state.runners.get(name)
                if runner is not None:
                    runner.dirty = True
            self.faults.store_failed("status flush", e)
            return False
        return True
