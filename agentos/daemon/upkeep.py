"""The daemon's upkeep: the loops that keep what Redis knows about its agents current.

Status counters and metered usage are flushed in fenced batches with op ids (a batch
whose reply was lost is sent again unchanged and counted once); leases are renewed and
the heartbeat (with the daemon's labels, which clients read) written every third of a
lease by a thread of their own (:mod:`agentos.store.keeper`: agent code that blocks the
event loop cannot cost the daemon its leases; on a cluster, a node that is out fails
only the leases it serves);
effective quotas are reloaded and this daemon's samples published; inboxes are swept for
messages whose signal was lost; task records are trimmed. None of these loops ends the
daemon when Redis is away or full: they log once, retry, and afterwards one
``RedisUnavailable`` or ``RedisFull`` fleet event says for how long. Announcements to
the other daemons (``joined``, ``draining``, ``released``, a ``Rebalancing`` event) are
here too. Kept apart from :mod:`agentos.daemon`, which decides what runs where.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio

from agentos.core.lifecycle import StopReason
from agentos.engine.base import Engine
from agentos.governor.admission import Governor
from agentos.runtime.activation import Activator, budgets_changed
from agentos.runtime.models import ModelPool
from agentos.runtime.runner import AgentRunner
from agentos.settings import DaemonSettings
from agentos.store import StatusUpdate, Store, StoreError, StoreFull, StoreUnavailable
from agentos.store.keeper import LeaseKeeper
from agentos.store.retry import new_op_id

if TYPE_CHECKING:  # the mcp package is imported when a daemon starts, not by every CLI call
    from agentos.tools.mcp import ToolServerPool

__all__ = ["Upkeep"]


def _libc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL("libc.so.6").malloc_trim
        return trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


_malloc_trim = _libc_trim()

log = logging.getLogger("agentos.daemon")


@dataclass(slots=True)
class _Flush:
    """One status flush: fenced updates with op ids, then budget seconds to charge."""

    updates: list[StatusUpdate]
    seconds: dict[tuple[str, str], float]
    seconds_op: str = field(default_factory=new_op_id)  # the budget charge, applied once


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class Upkeep:
    """The upkeep loops of :class:`agentos.daemon.Daemon` (mixed in; uses its store,
    runners, governor, activator and settings)."""

    id: str
    store: Store
    engine: Engine
    settings: DaemonSettings
    clock: Callable[[], float]
    runners: dict[str, AgentRunner]
    _held_peak = 0  # the most agents held since memory was last given back
    governor: Governor
    activator: Activator
    models: ModelPool
    tool_servers: ToolServerPool
    started_at: float
    limit: int | None
    _draining: bool
    _released: anyio.Event
    _peers: int
    _fleet_active: int
    _quota_kick: anyio.Event
    _full_since: float | None
    _full_last: float
    _down_since: float | None
    _down_last: float
    keeper: LeaseKeeper
    instance: str

    def _report(
        self, where: str, text: str, template: str, *, exc: BaseException | None = None
    ) -> None:
        raise NotImplementedError  # agentos.daemon.Daemon

    async def _flush_loop(self) -> None:
        metered_at = self.clock()
        unsent: _Flush | None = None  # a batch that failed: it may have been applied
        every = self.settings.status_flush_s
        delay = every
        while True:
            await anyio.sleep(delay)
            if unsent is not None:
                # The same amounts with the same op ids: applied once, whatever the first
                # attempt did. New usage waits in the runners until this one is through.
                if not await self._send_flush(unsent):
                    delay = min(max(every, delay * 2), max(every, self.settings.redis_retry_max_s))
                    continue
                unsent = None
                delay = every
            # Idle and hibernated agents accrue metered time too: flush everyone now and then.
            everyone = self.clock() - metered_at >= self.settings.metering_flush_s
            if everyone:
                metered_at = self.clock()
            batch = [
                r for r in self.runners.values() if (r.dirty or everyone) and r.stop_reason is None
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
            if not await self._send_flush(flush):
                unsent = flush
                delay = min(max(every, delay * 2), max(every, self.settings.redis_retry_max_s))

    async def _send_flush(self, flush: _Flush) -> bool:
        """Write one flush batch; False (and the batch kept as it is) when Redis failed."""
        try:
            if flush.updates:
                # Each update is fenced by the lease of the runner that produced it (a
                # newer runner's status is not overwritten by an old one's counters);
                # one applied before is recognised by its op id.
                updates = flush.updates
                for k in range(0, len(updates), 1000):
                    await self.store.fenced_status_batch(updates[k : k + 1000])
                flush.updates = []
            if flush.seconds:
                await self.governor.charge_seconds(flush.seconds, op_id=flush.seconds_op)
                flush.seconds = {}
            await self._store_recovered()
        except StoreError as e:
            for name, *_ in flush.updates:
                runner = self.runners.get(name)
                if runner is not None:
                    runner.dirty = True
            self._store_failed("status flush", e)
            return False
        return True

    async def _quota_loop(self) -> None:
        """Reload effective limits and publish this daemon's inference samples."""
        while True:
            try:
                before = dict(self.governor.quotas)
                changed = await self.governor.refresh()
                raised = budgets_changed(before, self.governor.quotas, changed)
                if raised:  # budget waits: no runner holds them
                    await self.activator.release_budgets(raised)
                for runner in self.runners.values():
                    if runner.resource.spec.quota_class in changed:
                        runner.quota_changed()
                await self.governor.renew()
                held = sum(1 for name in self.runners if self.engine.has_session(name))
                await self.store.quota_report(
                    self.id,
                    self.governor.sample(slots_held=held, slots_total=self.engine.slots),
                )
            except StoreError as e:
                self._store_failed("quota refresh", e)
            except Exception as e:  # a stored QuotaPolicy that no longer validates, say
                self._report(
                    "quota refresh",
                    f"{type(e).__name__}: {e}",
                    "quota refresh failed (%s); the last limits stay in force",
                    exc=e,
                )
            with anyio.move_on_after(self.settings.quota_refresh_s):
                await self._quota_kick.wait()
            self._quota_kick = anyio.Event()

    async def _lease_loop(self) -> None:
        """Publish the leases we hold (and our heartbeat's facts) to the lease keeper,
        whose thread renews them (a blocked loop cannot stop it); stop the runners whose
        lease it found lost; list our agents again if we were taken for dead."""
        swept_at = self.clock()
        checked_at = 0.0
        every = self.settings.lease_ttl_s / 3
        while True:
            if self.clock() - swept_at >= self.settings.inbox_sweep_s:
                # Signals are a fast path; a message whose signal was trimmed or lost
                # is still found here.
                swept_at = self.clock()
                await self._sweep_inboxes()
            held = self._publish_held()
            if time.monotonic() - checked_at >= every:
                checked_at = time.monotonic()
                try:
                    if held and not await self.store.is_holder(self.id):
                        # Taken for dead (a heartbeat that did not get through for too
                        # long) and recovered by another daemon: list what we hold again.
                        log.warning("listed as gone by another daemon; listing our agents again")
                        await self.store.held_add(self.id, list(held))
                    await self._store_recovered()
                except StoreError as e:
                    self._store_failed("lease check", e)
                self._give_memory_back()
            self._leases_lost(self.keeper.take_lost())
            # Twice per keeper pass: a lost lease stops its runner within a third of a lease.
            await anyio.sleep(every / 2)

    def _publish_held(self) -> dict[str, str]:
        """Hand the keeper what we hold now (not the runners that released their agent
        already: they are ending) and our heartbeat's facts."""
        held = {n: r.lease_value for n, r in self.runners.items() if not r.parked}
        self.keeper.publish(held, self._info())
        return held

    def _leases_lost(self, lost: dict[str, str]) -> None:
        for name, value in lost.items():
            runner = self.runners.get(name)
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
        held = len(self.runners)
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
            lengths = await self.store.inbox_lengths(list(self.runners))
        except StoreError as e:
            self._store_failed("inbox sweep", e)
            return
        for name, length in lengths.items():
            runner = self.runners.get(name)
            if length and runner is not None:
                runner.nudge("message")

    async def _retention_loop(self) -> None:
        """Trim the task records of the agents this daemon runs, on a timer."""
        while True:
            await anyio.sleep(self.settings.task_trim_interval_s)
            names = list(self.runners)
            if not names:
                continue
            try:
                await self.store.trim_tasks_many(
                    names,
                    keep=self.settings.task_retention_count,
                    max_age_s=self.settings.task_retention_s,
                )
            except StoreError as e:
                self._store_failed("task retention", e)

    # ------------------------------------------------------------------ Redis faults

    def _store_failed(self, where: str, e: StoreError, delay: float | None = None) -> None:
        """Log a failed store call once, clearly; remember when Redis started refusing writes."""
        then = "" if delay is None else f"; retrying in {delay:.1f}s"
        if not isinstance(e, StoreFull):
            if isinstance(e, StoreUnavailable):
                self._down_last = self.clock()
                if self._down_since is None:
                    self._down_since = self._down_last
            log.warning("%s: %s%s", where, e, then)
            return
        self._full_last = self.clock()
        if self._full_since is None:
            self._full_since = self._full_last
            log.error("%s; the daemon keeps running and retries (%s)", e, where)
        else:
            log.debug("%s: Redis still full%s", where, then)

    async def _store_recovered(self) -> None:
        """After a write went through: if Redis was unreachable or full, say in the fleet
        feed for how long (the event could not be written while it lasted)."""
        if self._down_since is not None:
            since, until = self._down_since, max(self._down_last, self._down_since)
            self._down_since = None
            await self.store.record_fleet_event(
                "",
                "RedisUnavailable",
                "unreachable",
                f"Redis at {self.store.display_url} could not be reached from {_utc(since)} "
                f"to {_utc(until)} ({until - since:.0f}s); the daemon retried with backoff",
                self.id,
            )
            log.warning("Redis reachable again (it was not for %.0fs)", until - since)
        if self._full_since is None:
            return
        since, until = self._full_since, max(self._full_last, self._full_since)
        await self.store.record_fleet_event(
            "",
            "RedisFull",
            "maxmemory",
            f"Redis refused writes from {_utc(since)} to {_utc(until)} "
            f"({until - since:.0f}s): it was at maxmemory",
            self.id,
        )
        self._full_since = None
        log.warning("Redis accepts writes again (it refused them for %.0fs)", until - since)

    # ------------------------------------------------------------------ peers

    async def _announce(self, cmd: str) -> None:
        """Write our heartbeat now (``draining`` once stopping) and signal ``cmd`` to the
        other daemons, which then count the daemons and look at the leases at once."""
        try:
            if cmd != "released":
                self._publish_held()  # the keeper's next heartbeat says the same
                await self.store.heartbeat(
                    self.id,
                    self._info(),
                    forget_after_s=self.settings.daemon_forget_after_s,
                    instance=self.instance,
                    fresh_s=self.settings.lease_ttl_s,
                )
            await self.store.signal(cmd, "", daemon=self.id)
        except StoreError as e:
            self._store_failed(f"{cmd} signal", e)

    async def _handover_loop(self) -> None:
        """Say "released" whenever agents we handed over (or let go of while draining)
        are free: one signal for the agents that stop within a few milliseconds."""
        while True:
            await self._released.wait()
            await anyio.sleep(0.05)
            self._released = anyio.Event()
            await self._announce("released")

    async def _handing_out(self, names: list[str], fleet: int) -> None:
        """Say why agents are being handed over (the log and the fleet's events)."""
        message = (
            f"{self.id} hands over {len(names)} agent(s): it holds {len(self.runners)}, more "
            f"than its fair share ({self.limit} of {fleet} agents on {self._peers} daemons: "
            f"{self._fleet_active} held by the others, {self.activator.backlog} due)"
        )
        log.info("%s", message)
        try:
            await self.store.record_fleet_event("", "Rebalancing", "fair share", message, self.id)
        except StoreError as e:
            self._store_failed("rebalance event", e)

    # ------------------------------------------------------------------ heartbeat

    def _info(self) -> dict[str, object]:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "engine": self.engine.name,
            "models": self.models.describe(),
            "toolServers": self.tool_servers.describe(),
            "agents": len(self.runners),
            "started_at": self.started_at,
            "share": self.limit,
            "draining": self._draining,
            # Which agents it may host; clients read them (ps: Unschedulable, get daemons).
            "labels": dict(self.settings.labels),
            "lease_ttl_s": self.settings.lease_ttl_s,  # how fresh a live one's heartbeat is
        }
