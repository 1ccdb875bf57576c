"""The daemon's upkeep: the loops that keep what Redis knows about its agents current.

Leases are renewed and the heartbeat (with the daemon's labels, which clients read)
written every third of a lease by a thread of their own (:mod:`agentos.store.keeper`:
agent code that blocks the event loop cannot cost the daemon its leases; on a cluster, a
node that is out fails only the leases it serves); here the lease loop hands it what to
renew and stops the runners whose lease it found lost. Effective quotas are reloaded and
this daemon's samples published; inboxes are swept for messages whose signal was lost;
task records are trimmed. None of these loops ends the daemon when Redis is away or full
(:mod:`agentos.daemon.faults`). The status flush is in :mod:`agentos.daemon.flush`.
Kept apart from :mod:`agentos.daemon`, which decides what runs where.
"""

from __future__ import annotations

import ctypes
import gc
import logging
from collections.abc import Callable

import anyio

from agentos.core.lifecycle import StopReason
from agentos.daemon.faults import Faults
from agentos.daemon.heartbeat import Heartbeat
from agentos.daemon.state import DaemonState
from agentos.engine.base import Engine
from agentos.governor.admission import Governor
from agentos.runtime.activation import Activator, budgets_changed
from agentos.settings import DaemonSettings
from agentos.store import Store, StoreError
from agentos.store.keeper import LeaseKeeper

__all__ = ["Upkeep"]


def _libc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL("libc.so.6").malloc_trim
        return trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


_malloc_trim = _libc_trim()

log = logging.getLogger("agentos.daemon")


class Upkeep:
    """The upkeep loops of one daemon (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        *,
        daemon_id: str,
        settings: DaemonSettings,
        clock: Callable[[], float],
        state: DaemonState,
        engine: Engine,
        governor: Governor,
        activator: Activator,
        keeper: LeaseKeeper,
        heartbeat: Heartbeat,
        faults: Faults,
    ) -> None:
        self.store = store
        self.id = daemon_id
        self.settings = settings
        self.clock = clock
        self.state = state
        self.engine = engine
        self.governor = governor
        self.activator = activator
        self.keeper = keeper
        self.heartbeat = heartbeat
        self.faults = faults
        self._held_peak = 0  # the most agents held since memory was last given back

    async def quota_loop(self) -> None:
        """Reload effective limits and publish this daemon's inference samples."""
        while True:
            try:
                before = dict(self.governor.quotas)
                changed = await self.governor.refresh()
                raised = budgets_changed(before, self.governor.quotas, changed)
                if raised:  # budget waits: no runner holds them
                    await self.activator.release_budgets(raised)
                for runner in self.state.runners.values():
                    if runner.resource.spec.quota_class in changed:
                        runner.quota_changed()
                await self.governor.renew()
                held = sum(1 for name in self.state.runners if self.engine.has_session(name))
                await self.store.quotas.report(
                    self.id,
                    self.governor.sample(slots_held=held, slots_total=self.engine.slots),
                )
            except StoreError as e:
                self.faults.store_failed("quota refresh", e)
            except Exception as e:  # a stored QuotaPolicy that no longer validates, say
                self.faults.report(
                    "quota refresh",
                    f"{type(e).__name__}: {e}",
                    "quota refresh failed (%s); the last limits stay in force",
                    exc=e,
                )
            with anyio.move_on_after(self.settings.quota_refresh_s):
                await self.state.quota_kick.wait()
            self.state.take_quota_kick()

    async def lease_loop(self) -> None:
        """Publish the leases we hold (and our heartbeat's facts) to the lease keeper,
        whose thread renews them (a blocked loop cannot stop it); stop the runners whose
        lease it found lost; list our agents again if we were taken for dead."""
        swept_at = self.clock()
        every = self.settings.lease_ttl_s / 3
        passes = 0
        while True:
            if self.clock() - swept_at >= self.settings.inbox_sweep_s:
                # Signals are a fast path; a message whose signal was trimmed or lost
                # is still found here.
                swept_at = self.clock()
                await self._sweep_inboxes()
            held = self.heartbeat.publish_held()
            # Once per keeper pass (every other pass of this loop): is our listing intact?
            if passes % 2 == 0:
                try:
                    if held and not await self.store.waits.is_holder(self.id):
                        # Taken for dead (a heartbeat that did not get through for too
                        # long) and recovered by another daemon: list what we hold again.
                        log.warning("listed as gone by another daemon; listing our agents again")
                        await self.store.waits.held_add(self.id, list(held))
                    await self.faults.store_recovered()
                except StoreError as e:
                    self.faults.store_failed("lease check", e)
                self._give_memory_back()
            self._leases_lost(self.keeper.take_lost())
            # Twice per keeper pass: a lost lease stops its runner within a third of a lease.
            await anyio.sleep(every / 2)
            passes += 1

    def _leases_lost(self, lost: dict[str, str]) -> None:
        for name, value in lost.items():
            runner = self.state.runners.get(name)
            if runner is None or runner.lease_value != value or runner.releasing or runner.ending:
                continue  # ...or it let go of the agent while this renewal ran
            # Expired (say, Redis was away longer than a lease). Another daemon may have
            # adopted, changed and released the agent meanwhile, so this runner's memory
            # is stale: never re-arm it with a new token. It stops and the agent is due
            # again: whoever claims it starts fresh (its LeaseLost event says why).
            runner.lost_why = (
                f"its lease was not renewed within {self.settings.lease_ttl_s:g}s "
                "(Redis unreachable or too slow for that long)"
            )
            log.warning("%s: lease expired; stopping it here", name)
            runner.request_stop(StopReason.LEASE_LOST)

    def _give_memory_back(self) -> None:
        """After a burst (thousands of agents activated, then released) hand the freed
        heap back to the OS: the allocator keeps it otherwise, and the daemon's RSS would
        stay at the burst's peak while it holds a few agents."""
        held = len(self.state.runners)
        self._held_peak = max(self._held_peak, held)
        if self._held_peak < 500 or held > self._held_peak // 4:
            return
        self._held_peak = held
        gc.collect()
        if _malloc_trim is not None:
            _malloc_trim(0)

    async def _sweep_inboxes(self) -> None:
        """Nudge the runners whose inbox holds anything: one read of every inbox's
        length, not one inbox read per agent (10,000 idle agents cost 10 pipelines)."""
        try:
            lengths = await self.store.inbox.lengths(list(self.state.runners))
        except StoreError as e:
            self.faults.store_failed("inbox sweep", e)
            return
        for name, length in lengths.items():
            runner = self.state.runners.get(name)
            if length and runner is not None:
                runner.nudge("message")

    async def retention_loop(self) -> None:
        """Trim the task records of the agents this daemon runs, on a timer."""
        while True:
            await anyio.sleep(self.settings.task_trim_interval_s)
            names = list(self.state.runners)
            if not names:
                continue
            try:
                await self.store.tasks.trim_many(
                    names,
                    keep=self.settings.task_retention_count,
                    max_age_s=self.settings.task_retention_s,
                )
            except StoreError as e:
                self.faults.store_failed("task retention", e)
