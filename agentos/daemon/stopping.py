"""Stopping the runners of one daemon: one agent, or all of them within the grace period.

One agent is stopped when reconcile says so (a respec restarts it, a delete stops it, a
daemon over its fair share hands it over), when an operator restarts it (``agentos
restart``: once it is between tasks) or when this daemon may no longer host it. Every
stop is graceful first (state saved, slot released, KV handed over) and cancels the
runner past ``grace_s``. A respecced agent is started again here, with a backoff while
Redis is away; one that cannot start is due for whoever has room.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable

import anyio

from agentos.core.lifecycle import StopReason, backoff_delay
from agentos.daemon.faults import Faults
from agentos.daemon.state import DaemonState
from agentos.runtime.activation_start import clean
from agentos.runtime.runner import AgentRunner
from agentos.settings import DaemonSettings
from agentos.store import Store, StoreError

__all__ = ["Stopper"]

log = logging.getLogger("agentos.daemon")


class Stopper:
    """Stops runners of one daemon (see the module docstring); ``start`` starts agents
    (name, spec hash) again after a respec or a restart."""

    def __init__(
        self,
        store: Store,
        *,
        daemon_id: str,
        settings: DaemonSettings,
        clock: Callable[[], float],
        state: DaemonState,
        faults: Faults,
        start: Callable[[list[tuple[str, str]]], Awaitable[None]],
    ) -> None:
        self.store = store
        self.id = daemon_id
        self.settings = settings
        self.clock = clock
        self.state = state
        self.faults = faults
        self._start = start

    async def stop_one(self, name: str, reason: StopReason, restart_hash: str | None) -> None:
        runner = self.state.runners.get(name)
        if runner is None or name in self.state.stopping:
            self.state.handing_over.discard(name)
            return
        if reason is StopReason.REBALANCE and not runner.settled:
            # A task began since reconcile chose it: never cut one short to rebalance.
            self.state.handing_over.discard(name)
            return
        self.state.stopping.add(name)
        try:
            runner.request_stop(reason)
            with anyio.move_on_after(self.settings.grace_s):
                await runner.done.wait()
            if not runner.done.is_set():
                log.warning(
                    "%s: did not stop within %.0fs; cancelling it", name, self.settings.grace_s
                )
                self.state.scopes[name].cancel()
                await runner.done.wait()
            if restart_hash is not None:
                await self._restart(name, restart_hash)
        finally:
            # Only now: until the restarted runner exists, reconcile must not start one.
            self.state.stopping.discard(name)
            self.state.handing_over.discard(name)

    async def operator_restart(self, name: str, grace_s: float | None) -> None:
        """``agentos restart``: once the agent is between tasks (or ``grace_s`` is up),
        stop it gracefully (state saved, slot released, KV handed over) and start it
        again here, its code loaded anew; a ``Restarted`` event says it is done."""
        runner = self.state.runners.get(name)
        if runner is None:
            return
        started = self.clock()
        # Never cut a task short for a restart: wait until it ends (or the grace is up).
        with anyio.move_on_after(math.inf if grace_s is None else grace_s):
            while runner.busy and not runner.done.is_set():
                await runner.task_over.wait()
        if self.state.runners.get(name) is not runner or name in self.state.stopping:
            # Restarted by a respec meanwhile, or let go of: either way its next runner
            # loads the code anew. Said, so that whoever waits for the restart knows.
            reason, message = "superseded", "restarted or released meanwhile by this daemon"
        else:
            # Started with the spec stored now (an apply may have landed while it waited).
            want = self.state.desired.get(name)
            await self.stop_one(
                name, StopReason.RESTART, want.spec_hash if want else runner.spec_hash
            )
            if name not in self.state.runners:
                return  # not started again (the daemon is stopping): due for another
            waited = self.clock() - started
            reason, message = "operator", f"restarted after {waited:.1f}s"
        log.info("%s: %s", name, message)
        try:
            await self.store.events.record_agent_event(
                name, "Restarted", reason, f"{message} (daemon {self.id})", self.id
            )
        except StoreError as e:
            self.faults.store_failed("Restarted event", e)

    async def _restart(self, name: str, spec_hash: str) -> None:
        """Start a respecced agent again; a Redis blip (or anything else) delays it, with
        a backoff, until it starts or the daemon stops: then it is due for whoever has
        room (its old runner released the lease, so it must not be left unlisted)."""
        failures = 0
        while not self.state.stop.is_set():
            try:
                await self._start([(name, spec_hash)])
                return
            except Exception as e:
                failures += 1
                delay = backoff_delay(failures, 0.1, self.settings.redis_retry_max_s)
                self.faults.report(
                    f"restart {name}",
                    f"{type(e).__name__}: {e}",
                    f"{clean(name)}: could not start again after a respec (%s); "
                    f"retrying in {delay:.1f}s",
                )
                await anyio.sleep(delay)
        if name not in self.state.runners:
            await self.faults.until_done(
                lambda: self.store.waits.due_now([name], now=self.clock()), "release"
            )

    async def stop_all(self, reason: StopReason) -> None:
        asked: set[int] = set()
        # Again for runners that a start in flight added meanwhile, until none is left.
        while runners := [r for r in self.state.runners.values() if id(r) not in asked]:
            asked.update(id(r) for r in runners)
            await self._stop_these(runners, reason)

    async def _stop_these(self, runners: list[AgentRunner], reason: StopReason) -> None:
        for r in runners:
            r.request_stop(reason)
        with anyio.move_on_after(self.settings.grace_s):
            for r in runners:
                await r.done.wait()
        for r in runners:
            if not r.done.is_set():
                log.warning("%s: did not stop within the grace period; cancelling it", r.name)
                scope = self.state.scopes.get(r.name)
                if scope is not None:
                    scope.cancel()
        for r in runners:
            await r.done.wait()
