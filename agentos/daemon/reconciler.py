"""Reconcile: which of the agents a daemon holds to stop, restart or hand over, and when.

The pure :func:`agentos.core.reconcile.reconcile` decides; this module feeds it (the
stored specs of the agents held here, read again when the fleet's generation moves;
the runners as they are; the fair share from :mod:`agentos.daemon.peers`) and acts on
what it returns: a stop or a restart of one agent, a handover said aloud. Only the
agents held here are reconciled: the rest of the fleet is the due index's business
(:mod:`agentos.runtime.activation`). It also tells ``--until-idle`` that the fleet is
idle, and lets go of the agents this daemon may no longer host.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from collections.abc import Callable

import anyio

from agentos.core.lifecycle import StopReason
from agentos.core.reconcile import Desired, Local, Restart, Stop, reconcile
from agentos.daemon.faults import Faults
from agentos.daemon.heartbeat import Heartbeat
from agentos.daemon.peers import Peers
from agentos.daemon.state import DaemonState
from agentos.daemon.stopping import Stopper
from agentos.runtime.activation import Activator, Placer
from agentos.runtime.activation_start import Starter, clean
from agentos.settings import DaemonSettings
from agentos.store import Store, StoreError

__all__ = ["Reconciler"]

log = logging.getLogger("agentos.daemon")


class Reconciler:
    """The reconcile loop of one daemon (see the module docstring); ``ready`` once its
    first pass is done (``/readyz``)."""

    def __init__(
        self,
        store: Store,
        *,
        daemon_id: str,
        settings: DaemonSettings,
        clock: Callable[[], float],
        state: DaemonState,
        peers: Peers,
        activator: Activator,
        placer: Placer,
        starter: Starter,
        stopper: Stopper,
        heartbeat: Heartbeat,
        faults: Faults,
    ) -> None:
        self.store = store
        self.id = daemon_id
        self.settings = settings
        self.clock = clock
        self.state = state
        self.peers = peers
        self.activator = activator
        self.placer = placer
        self.starter = starter
        self.stopper = stopper
        self.heartbeat = heartbeat
        self.faults = faults
        self.ready = False  # set after the first reconcile pass (for /readyz)
        self._generation = -1
        self._layout_checked = False
        self._leases_checked_at = 0.0
        self._fleet_counts: deque[tuple[float, int]] = deque()  # (when, agents shared)

    async def run(self, until_idle: bool) -> None:
        delay = 0.1
        quiet_passes = 0
        while True:
            try:
                await self.once()
                self.ready = True
                delay = 0.1
            except StoreError as e:
                self.faults.store_failed("reconcile", e, delay)
                await anyio.sleep(delay)
                delay = min(delay * 2, self.settings.redis_retry_max_s)
                continue
            except Exception as e:
                self.faults.report(
                    "reconcile", f"{type(e).__name__}: {e}", "reconcile pass failed: %s", exc=e
                )
                await anyio.sleep(delay)
                delay = min(delay * 2, self.settings.redis_retry_max_s)
            if until_idle:
                quiet_passes = quiet_passes + 1 if self._fleet_quiet() else 0
                if quiet_passes >= 3:
                    log.info("fleet idle; stopping (--until-idle)")
                    self.state.stop.set()
                    return
            interval = 0.05 if until_idle else self.settings.reconcile_interval_s
            with anyio.move_on_after(interval):
                await self.state.kick.wait()
            self.state.take_kick()

    async def once(self) -> None:
        if self.state.stop.is_set():  # stopping: nothing to start, the runners stop themselves
            return
        if not self._layout_checked:
            upgraded = await self.store.specs.upgrade_layout()
            if upgraded:
                log.info("upgraded the fleet's key layout (%d agents)", upgraded)
                self.activator.nudge()
            self._layout_checked = True
        # Only the agents held here are reconciled (with none there is nothing to read).
        generation = await self.store.specs.generation() if self.state.runners else self._generation
        if generation != self._generation:
            # Only the agents held here: the rest of the fleet is the due index's business.
            names = list(self.state.runners)
            fresh = await self.store.specs.index_of(names)
            for name in names:
                if name in fresh:
                    self.state.desired[name] = Desired(name, *fresh[name])
                else:
                    self.state.desired.pop(name, None)
            self._generation = generation
            await self.placer.refresh(generation)
            self._let_go_of_unhostable()
        now = self.clock()
        # Runners being stopped count as running: starting a second runner for an agent
        # whose first one is still saving its context would put two owners on one
        # engine session (a respec restarts the agent itself once the first is done).
        # Only a settled runner (idle or hibernated, nothing queued) may be handed over.
        local = {
            n: Local(n, r.spec_hash, busy=not r.settled, leaving=n in self.state.handing_over)
            for n, r in self.state.runners.items()
        }
        for n in self.state.stopping - local.keys():  # stopped, about to be restarted
            spec_hash = self.state.desired[n].spec_hash if n in self.state.desired else ""
            local[n] = Local(n, spec_hash, busy=True)
        if self.state.kicked or now - self._leases_checked_at >= self.settings.lease_ttl_s / 3:
            self.state.kicked = False
            self._leases_checked_at = now
            await self.peers.look(now)
        # Pinned agents (some live daemon may not host them) are never handed over: they
        # are outside the fair share (see agentos.runtime.activation), held as "busy".
        pinned = self.peers.pinned_held() & local.keys()
        for n in pinned:
            local[n] = dataclasses.replace(local[n], busy=True)
        desired = {n: d for n, d in self.state.desired.items() if n in local}
        # What is shared: the agents held anywhere, and those due for a daemon now
        # (agents being handed over among them, so a handover does not shrink the share).
        # Agents in flight (released by one daemon, claimed by one that does not list
        # them yet) count nowhere for a moment: take the largest count of the last lease.
        counted = self.peers.fleet_active + len(self.state.runners) + self.activator.backlog
        self._fleet_counts.append((now, counted))
        while self._fleet_counts[0][0] < now - self.settings.lease_ttl_s:
            self._fleet_counts.popleft()
        fleet = max(n for _, n in self._fleet_counts)
        self.state.limit = self.peers.share(fleet)
        actions = reconcile(
            desired,
            local,
            {},
            now,
            daemon_id=self.id,
            capacity=None if self.state.limit is None else self.state.limit + len(pinned),
            handover=self.settings.handover_batch,
        )
        handed = []
        for action in actions:
            if isinstance(action, Stop):
                if action.reason is StopReason.REBALANCE:
                    handed.append(action.name)
                    self.state.handing_over.add(action.name)
                self.state.spawn(self.stopper.stop_one(action.name, action.reason, None))
            elif isinstance(action, Restart):
                self.state.spawn(
                    self.stopper.stop_one(action.name, StopReason.RESPEC, action.spec_hash)
                )
        if handed:
            await self.heartbeat.handing_out(handed, fleet)

    def _let_go_of_unhostable(self) -> None:
        """After the fleet changed: restart the agents held here that this daemon may no
        longer host (a Model they use moved to another site); their start lets them go.
        A changed agent spec restarts its agent anyway (and the start checks it)."""
        for name, runner in self.state.runners.items():
            want = self.state.desired.get(name)
            if name in self.state.stopping or want is None or want.spec_hash != runner.spec_hash:
                continue
            why = self.placer.here(runner.resource.spec)
            if why:
                log.info(
                    "%s: may not be hosted here any more (%s); letting it go", clean(name), why
                )
                self.state.spawn(self.stopper.stop_one(name, StopReason.RESPEC, runner.spec_hash))

    def _fleet_quiet(self) -> bool:
        if not self.activator.loaded or self.starter.opening:
            return False
        horizon = self.clock() + 1.0
        if self.activator.next_due_at <= horizon:  # due now or soon (not held here)
            return False
        return all(
            r.quiet and (r.next_fire_at is None or r.next_fire_at > horizon)
            for r in self.state.runners.values()
        )
