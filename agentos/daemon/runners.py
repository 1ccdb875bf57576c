"""Supervising the runners of the agents one daemon holds.

A runner is built and started by the activation (:mod:`agentos.runtime.activation_start`);
here it runs under a supervisor, in a cancel scope of its own (a stop past the grace
period cancels it). The supervisor finishes a release that was cut short, backs off a
runner that failed (a runtime bug, not the agent's), and says why on an agent whose lease
was lost; then it forgets the runner and makes room for the next agent. A blocked event
loop is charged here to the agent whose code blocked it. Stopping runners
is in :mod:`agentos.daemon.stopping`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio

from agentos.core.lifecycle import StopReason, backoff_delay
from agentos.daemon.faults import Faults
from agentos.daemon.state import DaemonState
from agentos.runtime.activation import Activator
from agentos.runtime.activation_start import RUNNER_ERROR_BACKOFF, clean
from agentos.runtime.agentlog import attributed
from agentos.runtime.runner import AgentRunner
from agentos.runtime.watchdog import Stall
from agentos.settings import DaemonSettings
from agentos.store import Store, StoreError
from agentos.store.keeper import LeaseKeeper

__all__ = ["RUNNER_ERROR_BACKOFF", "Supervisor", "clean"]

log = logging.getLogger("agentos.daemon")


class Supervisor:
    """Runs each runner of one daemon to its end (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        *,
        daemon_id: str,
        settings: DaemonSettings,
        clock: Callable[[], float],
        state: DaemonState,
        keeper: LeaseKeeper,
        activator: Activator,
        faults: Faults,
    ) -> None:
        self.store = store
        self.id = daemon_id
        self.settings = settings
        self.clock = clock
        self.state = state
        self.keeper = keeper
        self.activator = activator
        self.faults = faults

    def adopt(self, runner: AgentRunner) -> None:
        """Hold ``runner`` (just built by the activation) and start it under supervision."""
        self.state.runners[runner.name] = runner
        self.state.spawn(self.supervise(runner))

    async def supervise(self, runner: AgentRunner) -> None:
        """Run ``runner`` to its end, then finish what it left: a crash's backoff, a lost
        lease's event; forget it and make room for the next agent."""
        scope = anyio.CancelScope()
        self.state.scopes[runner.name] = scope
        crashed: BaseException | None = None
        try:
            with scope, attributed(runner.name):  # its lines go to its log
                await runner.run()
        except Exception as e:  # the runner's own last resort failed: back off all the same
            crashed = e
            log.exception("%s: supervisor crashed; the agent is activated again later", runner.name)
        finally:
            name = runner.name
            failed = crashed is not None or runner.error is not None
            if failed:
                errors = self.state.runner_errors[name] = self.state.runner_errors.get(name, 0) + 1
            else:
                self.state.runner_errors.pop(name, None)
            if crashed is not None and not runner.released:
                # Not released by the runner (which finishes a cut-short release itself):
                # due after a backoff, as for a crash (not at once: a runner that fails
                # as it starts would be a hot loop).
                at = self.clock() + backoff_delay(errors, *RUNNER_ERROR_BACKOFF)
                await self.faults.until_done(
                    lambda: self.store.leases.release(name, runner.lease_value), "release"
                )
                await self.faults.until_done(
                    lambda: self.store.waits.due_release(
                        name, self.id, at, now=self.clock(), look=False
                    ),
                    "release",
                )
            elif runner.stop_reason is StopReason.LEASE_LOST:
                await self._lease_lost(runner)
            if self.state.drop(name, runner):
                # At once, not at the next publish: a released lease renewed again would
                # be a command per agent for nothing (and a lost-lease report).
                self.keeper.forget(name, runner.lease_value)
            if runner.stop_reason is StopReason.REBALANCE or self.state.draining:
                self.state.released.set()  # its lease is free: the others may take it now
            self.state.kick.set()
            self.activator.nudge()  # room for one more

    def on_stall(self, stall: Stall) -> None:
        """The event loop ran again after a block: charge it to the agent whose code
        blocked it (its runner records the BlockedLoop event and counts the crash)."""
        runner = self.state.runners.get(stall.agent) if stall.agent else None
        if runner is not None:
            runner.note_blocked(stall)
            return
        message = (
            f"the event loop of daemon {self.id} was blocked for {stall.seconds:.1f}s at "
            f"{stall.where} (not by agent code)"
        )
        log.warning("%s", message)
        self.state.spawn(self._fleet_event(stall.agent or "", "BlockedLoop", stall.where, message))

    async def _fleet_event(self, agent: str, type_: str, reason: str, message: str) -> None:
        try:
            await self.store.events.record_fleet_event(agent, type_, reason, message, self.id)
        except StoreError as e:
            self.faults.store_failed(f"{type_} event", e)

    async def _lease_loss_reason(self, runner: AgentRunner) -> str:
        """What happened to a lease this daemon lost (for its LeaseLost event)."""
        if runner.lost_why:
            return runner.lost_why
        try:
            info = (await self.store.leases.read([runner.name])).get(runner.name)
        except StoreError:
            return "it is no longer ours"
        if info is None:
            return (
                f"it expired: not renewed within {self.settings.lease_ttl_s:g}s "
                "(Redis unreachable or too slow for that long)"
            )
        if info.owner == self.id:
            return "this daemon holds it again under a newer token"
        return f"daemon {info.owner} holds it now: it took the agent over after the lease expired"

    async def _lease_lost(self, runner: AgentRunner) -> None:
        """A runner stopped because its lease was lost: say why on the agent, and make
        the agent due at once (our own lease, if we still have it, comes back to
        whichever of our passes claims it)."""
        name = runner.name
        why = await self._lease_loss_reason(runner)
        message = f"daemon {self.id} lost the agent's lease: {why}; the agent is activated again"
        log.warning("%s: %s", name, message)
        with anyio.CancelScope(shield=True):
            try:
                await self.store.events.record_agent_event(
                    name, "LeaseLost", "lease", message, self.id
                )
            except StoreError as e:
                self.faults.store_failed("LeaseLost event", e)
        await self.faults.until_done(
            lambda: self.store.waits.due_now([name], now=self.clock()), "release"
        )
        await self.faults.until_done(
            lambda: self.store.waits.held_remove(self.id, [name]), "release"
        )
