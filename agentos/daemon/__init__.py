"""The long-running process that runs the fleet's active agents.

Agents are virtual: an agent no daemon holds (hibernated, waiting, never started) costs
the daemons nothing; it is one entry of the due-time index in Redis
(:mod:`agentos.store.waits`). Each daemon's :class:`~agentos.runtime.activation.Activator`
claims what is due while the daemon has room, takes the agent's lease (with a fencing
token for every later write) and starts a runner; the runner releases the agent when it
has been idle for ``hibernation.idleAfter``. Reconcile and lease renewal touch only the
agents a daemon holds: a respec restarts one, a delete stops it, a daemon over its fair
share hands idle ones over.

All of its state is in Redis: it can be killed at any moment. Each daemon lists what it
holds in its held set; when its heartbeat is older than a lease, another daemon makes
those agents due again and they are activated elsewhere. A Redis that is away or full (at
``maxmemory``) delays that work, never ends the daemon; once writes go through again, one
``RedisFull`` fleet event says for how long they were refused.

Daemons that share a Redis share the active agents fairly (:mod:`agentos.core.placement`):
each counts the live daemons and their agents in the heartbeat hash and holds at most its
share plus a margin. One over it (another daemon joined) hands idle agents over with
reason ``rebalance`` (they are due at once, for another daemon); one that drains
(SIGTERM) marks its heartbeat ``draining`` first, so the others' share grows.

The loops that keep Redis current (flushes, leases and heartbeats, quotas, sweeps,
retention, fault reports) are in :mod:`agentos.daemon.upkeep`, the view of the other
daemons in :mod:`agentos.daemon.peers`. Everything runs in anyio task groups; nothing
outlives :meth:`Daemon.run`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import anyio

from agentos.core.lifecycle import StopReason
from agentos.core.reconcile import Desired, Local, Restart, Stop, reconcile
from agentos.core.spec import AgentResource, SpecError, parse_resource
from agentos.daemon.peers import Peers
from agentos.daemon.upkeep import Upkeep
from agentos.engine.base import Engine, EngineError
from agentos.governor.admission import Governor
from agentos.governor.evaluator import Evaluator
from agentos.runtime.activation import Activator
from agentos.runtime.hibernator import Hibernator
from agentos.runtime.models import DEFAULT_MODEL, ModelEntry, ModelPool
from agentos.runtime.runner import AgentRunner
from agentos.runtime.slots import SlotArbiter
from agentos.settings import DaemonSettings
from agentos.store import Retention, Store, StoreError
from agentos.telemetry import Telemetry

__all__ = ["Daemon"]

log = logging.getLogger("agentos.daemon")


class Daemon(Peers, Upkeep):
    """Supervises agents of one namespace; see the module docstring."""

    def __init__(
        self,
        store: Store,
        engine: Engine,
        settings: DaemonSettings | None = None,
        *,
        clock: Callable[[], float] = time.time,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.store = store
        self.engine = engine
        self.settings = settings or DaemonSettings()
        if self.settings.grace_s >= self.settings.lease_ttl_s:
            raise ValueError("grace_s must be shorter than lease_ttl_s")
        # The daemon owns the retention of what its agents write (usage, task records).
        store.retention = Retention(
            usage_s=self.settings.usage_retention_days * 86_400.0,
            tasks_s=self.settings.task_retention_s,
        )
        self.id = self.settings.daemon_id
        self.clock = clock
        self.runners: dict[str, AgentRunner] = {}
        self.telemetry = telemetry or Telemetry.disabled()
        self.governor = Governor(
            store,
            daemon_id=self.id,
            parallel=engine.parallel,
            slot_lease_s=self.settings.quota_slot_lease_s,
            window_s=self.settings.quota_window_s,
            telemetry=self.telemetry,
            clock=clock,
        )
        self.evaluator = Evaluator(
            store,
            daemon_id=self.id,
            period_s=self.settings.quota_eval_s,
            window_s=self.settings.quota_window_s,
            lease_ttl_s=self.settings.lease_ttl_s,
            clock=clock,
        )
        self.arbiter = SlotArbiter(
            engine, attained=lambda name: self.governor.attained.value(name, time.time())
        )
        self.hibernator = Hibernator(engine)
        # Every model the agents name (kind: Model), "default" being `engine` itself.
        self.models = ModelPool(
            store,
            ModelEntry(DEFAULT_MODEL, engine, self.arbiter, self.hibernator),
            attained=lambda name: self.governor.attained.value(name, time.time()),
            on_new=lambda m: self.governor.add_model(m.name, m.engine.parallel),
        )
        self._scopes: dict[str, anyio.CancelScope] = {}
        self._stopping: set[str] = set()
        self._stop = anyio.Event()
        self._kick = anyio.Event()
        self._desired: dict[str, Desired] = {}
        self._generation = -1
        self._agents_tg: anyio.abc.TaskGroup | None = None
        self._leases_checked_at = 0.0
        self._kicked = True  # look at the peers on the first pass
        self._fleet_active = 0  # agents the other live daemons hold (their held sets)
        self._fleet_counts: deque[tuple[float, int]] = deque()  # (when, agents shared)
        # Fair share: live daemons as last counted, the most agents we may hold (None: no
        # limit), agents being handed over now, and an event set when some were let go.
        self._peers = 1
        self.limit: int | None = self.settings.max_agents
        self._handing_over: set[str] = set()
        self._released = anyio.Event()
        self._draining = False
        # Agents being started, with the signals that came for them before their runner
        # existed: a message sent just after the open read the inbox is not left there.
        self._opening: dict[str, set[str]] = {}
        self.started_at = clock()
        self._quota_kick = anyio.Event()
        self.ready = False  # set after the first reconcile pass (for /readyz)
        self._layout_checked = False
        # Released agents: no runner anywhere; activated from the due index in Redis.
        self.activator = Activator(
            store,
            clock=clock,
            poll_s=self.settings.lease_ttl_s / 3,
            claim_s=self.settings.lease_ttl_s,
            room=self._room,
            running=self.runners,
            start=self._start_many,
        )
        self._live: set[str] = {self.id}  # daemons whose heartbeat is fresh, as last read
        # Redis at maxmemory: when writes were first and last refused (None: they are not).
        self._full_since: float | None = None
        self._full_last = 0.0
        self._down_since: float | None = None  # Redis (or a cluster node) unreachable
        self._down_last = 0.0

    # ------------------------------------------------------------------ public

    @property
    def stopping(self) -> bool:
        """A graceful shutdown has begun (``/readyz`` answers 503 from then on)."""
        return self._stop.is_set()

    def request_stop(self) -> None:
        """Begin a graceful shutdown (what SIGTERM and Ctrl-C do)."""
        self._stop.set()

    def force_stop(self) -> None:
        """Cancel every agent now, without waiting for the grace period (a second Ctrl-C).

        Each agent still records its stop and releases its lease.
        """
        self._stop.set()
        for scope in list(self._scopes.values()):
            scope.cancel()

    async def run(self, *, until_idle: bool = False, duration_s: float | None = None) -> None:
        """Run until :meth:`request_stop`, ``duration_s`` elapses, or (with ``until_idle``)
        no agent has anything queued or running and no trigger fires within a second.

        Then stops every agent with reason ``shutdown`` (grace period from settings),
        saves state, releases leases and returns.
        """
        log.info(
            "daemon %s starting (engine %s, namespace %s)",
            self.id,
            self.engine.name,
            self.store.keys.namespace,
        )
        # Counted by the others before our first reconcile takes anything: three daemons
        # started together split the fleet instead of the first one taking it all.
        await self._announce("joined")
        async with anyio.create_task_group() as agents:
            self._agents_tg = agents
            async with anyio.create_task_group() as control:
                control.start_soon(self._handover_loop)
                for group in self.store.signal_groups():
                    control.start_soon(self._signals_loop, group)
                control.start_soon(self._reconcile_loop, until_idle)
                control.start_soon(self._flush_loop)
                control.start_soon(self._lease_loop)
                control.start_soon(self._quota_loop)
                control.start_soon(self._retention_loop)
                control.start_soon(self.evaluator.run)
                control.start_soon(self.activator.run)
                with anyio.move_on_after(math.inf if duration_s is None else duration_s):
                    await self._stop.wait()
                self._stop.set()  # the end of a --for run: no more starts from here on
                self._draining = True
                # Draining: out of the others' count first, so their share grows to take
                # what we let go of ("released" signals as the agents stop).
                await self._announce("draining")
                await self._stop_all(StopReason.SHUTDOWN)
                control.cancel_scope.cancel()
        await self._announce("released")
        try:
            if not await self.store.still_held(self.id):
                await self.store.leave_holders(self.id)
        except StoreError as e:
            log.warning("could not leave the holders: %s", e)
        await self.models.aclose()
        try:
            await self.store.forget_daemon(self.id)
        except StoreError as e:
            log.warning("could not remove the daemon's heartbeat: %s", e)
        log.info("daemon %s stopped", self.id)

    # ------------------------------------------------------------------ loops

    async def _reconcile_loop(self, until_idle: bool) -> None:
        delay = 0.1
        quiet_passes = 0
        while True:
            try:
                await self._reconcile_once()
                self.ready = True
                delay = 0.1
            except StoreError as e:
                self._store_failed("reconcile", e, delay)
                await anyio.sleep(delay)
                delay = min(delay * 2, self.settings.redis_retry_max_s)
                continue
            except Exception:
                log.exception("reconcile pass failed")
            if until_idle:
                quiet_passes = quiet_passes + 1 if self._fleet_quiet() else 0
                if quiet_passes >= 3:
                    log.info("fleet idle; stopping (--until-idle)")
                    self._stop.set()
                    return
            interval = 0.05 if until_idle else self.settings.reconcile_interval_s
            with anyio.move_on_after(interval):
                await self._kick.wait()
            self._kick = anyio.Event()

    async def _reconcile_once(self) -> None:
        if self._stop.is_set():  # stopping: nothing to start, the runners stop themselves
            return
        if not self._layout_checked:
            upgraded = await self.store.upgrade_layout()
            if upgraded:
                log.info("upgraded the fleet's key layout (%d agents)", upgraded)
                self.activator.nudge()
            self._layout_checked = True
        # Only the agents held here are reconciled (with none there is nothing to read).
        generation = await self.store.generation() if self.runners else self._generation
        if generation != self._generation:
            # Only the agents held here: the rest of the fleet is the due index's business.
            names = list(self.runners)
            fresh = await self.store.index_of(names)
            for name in names:
                if name in fresh:
                    self._desired[name] = Desired(name, *fresh[name])
                else:
                    self._desired.pop(name, None)
            self._generation = generation
        now = self.clock()
        # Runners being stopped count as running: starting a second runner for an agent
        # whose first one is still saving its context would put two owners on one
        # engine session (a respec restarts the agent itself once the first is done).
        # Only a settled runner (idle or hibernated, nothing queued) may be handed over.
        local = {
            n: Local(n, r.spec_hash, busy=not r.settled, leaving=n in self._handing_over)
            for n, r in self.runners.items()
        }
        for n in self._stopping - local.keys():  # stopped, about to be restarted
            spec_hash = self._desired[n].spec_hash if n in self._desired else ""
            local[n] = Local(n, spec_hash, busy=True)
        if self._kicked or now - self._leases_checked_at >= self.settings.lease_ttl_s / 3:
            self._kicked = False
            self._leases_checked_at = now
            await self._look_at_peers(now)
        desired = {n: d for n, d in self._desired.items() if n in local}
        # What is shared: the agents held anywhere, and those due for a daemon now
        # (agents being handed over among them, so a handover does not shrink the share).
        # Agents in flight (released by one daemon, claimed by one that does not list
        # them yet) count nowhere for a moment: take the largest count of the last lease.
        counted = self._fleet_active + len(self.runners) + self.activator.backlog
        self._fleet_counts.append((now, counted))
        while self._fleet_counts[0][0] < now - self.settings.lease_ttl_s:
            self._fleet_counts.popleft()
        fleet = max(n for _, n in self._fleet_counts)
        self.limit = self._share(fleet)
        actions = reconcile(
            desired,
            local,
            {},
            now,
            daemon_id=self.id,
            capacity=self.limit,
            handover=self.settings.handover_batch,
        )
        handed = []
        for action in actions:
            if isinstance(action, Stop):
                if action.reason is StopReason.REBALANCE:
                    handed.append(action.name)
                    self._handing_over.add(action.name)
                self._spawn(self._stop_one(action.name, action.reason, None))
            elif isinstance(action, Restart):
                self._spawn(self._stop_one(action.name, StopReason.RESPEC, action.spec_hash))
        if handed:
            await self._handing_out(handed, fleet)

    async def _signals_loop(self, group: tuple[str, ...]) -> None:
        """Read one group of signal shards (all of them on one Redis; one on a cluster,
        where a blocking read covers a single slot) and act on each signal."""
        delay = 0.1
        last = None
        while True:
            try:
                if last is None:
                    last = await self.store.last_signal_id(group)
                batch = await self.store.read_signals(last, block_ms=1000, group=group)
                delay = 0.1
            except StoreError as e:
                self._store_failed("signals", e, delay)
                await anyio.sleep(delay)
                delay = min(delay * 2, self.settings.redis_retry_max_s)
                continue
            for entry_id, fields in batch:
                last = entry_id
                cmd, agent = fields.get("cmd", ""), fields.get("agent", "")
                runner = self.runners.get(agent)
                if cmd in ("applied", "deleted"):
                    self._kicked = True
                    self._kick.set()
                    self.activator.nudge()
                    self.evaluator.nudge()
                    self._quota_kick.set()
                elif cmd in ("joined", "draining", "released"):
                    # The fleet's daemons changed: count them (and their agents) now,
                    # not at the next look.
                    if fields.get("daemon") != self.id:
                        self._kicked = True
                        self._kick.set()
                elif cmd == "due":
                    self.activator.nudge()
                elif runner is not None and cmd in ("message", "wake", "hibernate"):
                    runner.nudge(cmd)
                elif agent in self._opening and cmd in ("message", "wake"):
                    self._opening[agent].add(cmd)
                # Any other agent is held elsewhere, or released (due: a "due" signal).

    # ------------------------------------------------------------------ agents

    def _spawn(self, coro: Any) -> None:
        assert self._agents_tg is not None
        self._agents_tg.start_soon(_run_coro, coro)

    async def _start_many(
        self, wanted: list[tuple[str, str]], claims: dict[str, float] | None = None
    ) -> None:
        """Take the leases of ``wanted`` (name, spec hash) and start their runners;
        ``claims``: the due-index claims they were activated with (dropped once held)."""
        ttl_ms = int(self.settings.lease_ttl_s * 1000)
        # Leases and specs in a few pipelines: starting 10,000 agents must not take
        # 20,000 sequential round trips.
        for i in range(0, len(wanted), 500):
            if self._stop.is_set():
                return
            chunk = dict(wanted[i : i + 500])
            try:
                await self._start_chunk(chunk, ttl_ms, claims or {})
            finally:
                for name in chunk:
                    self._opening.pop(name, None)

    async def _start_chunk(
        self, chunk: dict[str, str], ttl_ms: int, claims: dict[str, float]
    ) -> None:
        """Start one batch of ``_start_many``: name -> spec hash."""
        for name in chunk:
            self._opening.setdefault(name, set())
        tokens = await self.store.acquire_leases(list(chunk), self.id, ttl_ms)
        # Started meanwhile by another pass (the same daemon gets the same lease
        # back): one runner per agent.
        won = [n for n, t in tokens.items() if t and n not in self.runners]
        # Held before the claim goes: if we die now, our held set brings the agent back.
        await self.store.held_add(self.id, won)
        taken = [n for n, t in tokens.items() if not t]
        drop = {n: at for n, at in claims.items() if tokens.get(n)}
        if taken and claims:
            # Held by a live daemon (it makes the agent due when it lets go): the claim
            # goes. By a dead one: due again the moment that lease expires.
            owners = await self.store.leases(taken)
            live = {n for n in taken if n in owners and owners[n].owner in self._live}
            drop |= {n: claims[n] for n in live if n in claims}
            now = self.clock()
            await self.store.due_defer(
                {n: now + o.ttl_ms / 1000 + 0.05 for n, o in owners.items() if n not in live}
            )
        await self.store.due_unclaim(drop)
        bodies = await self.store.agent_specs_of(won)
        resources: dict[str, tuple[AgentResource, ModelEntry]] = {}
        for name in won:
            resource = self._parse(name, bodies.get(name))
            model = await self._model_of(name, resource)
            if resource is None or model is None:
                await self.store.release_lease(name, f"{self.id}|{tokens[name]}")
                if resource is not None:  # its model cannot serve: try again in a while
                    retry_at = self.clock() + self.settings.lease_ttl_s
                    await self.store.due_release(
                        name, self.id, retry_at, now=self.clock(), look=False
                    )
                else:
                    await self.store.held_remove(self.id, [name])
            else:
                resources[name] = (resource, model)
        try:
            opened = await self.store.open_agents(list(resources), self.id)
        except StoreError as e:  # each runner reads its own, with retries
            log.warning("could not read %d agents in one batch: %s", len(resources), e)
            opened = {}
        for name, (resource, model) in resources.items():
            if name in self.runners:
                continue
            lease_value = f"{self.id}|{tokens[name]}"
            if self._stop.is_set():
                # Asked to stop while these were being opened: the stop may have counted
                # the runners already, so let the agent go rather than start it unstopped.
                with contextlib.suppress(StoreError):
                    await self.store.release_lease(name, lease_value)
                    await self.store.due_release(name, self.id, self.clock(), now=self.clock())
                continue
            runner = AgentRunner(
                resource=resource,
                spec_hash=chunk[name],
                lease_value=lease_value,
                store=self.store,
                engine=model.engine,
                arbiter=model.arbiter,
                hibernator=model.hibernator,
                daemon_id=self.id,
                clock=self.clock,
                retry_max_s=self.settings.redis_retry_max_s,
                telemetry=self.telemetry,
                governor=self.governor,
                opened=opened.get(name),
                lend_after_s=self.settings.lend_slot_after_s,
            )
            self.runners[name] = runner
            self._desired[name] = Desired(name, chunk[name], resource.spec.priority)
            for cmd in self._opening.pop(name, ()):
                runner.nudge(cmd)
            self._spawn(self._supervise(runner))

    async def _model_of(self, name: str, resource: AgentResource | None) -> ModelEntry | None:
        """The model ``resource`` names, started on first use; None when it cannot serve."""
        if resource is None:
            return None
        try:
            return await self.models.for_agent(
                name, resource.spec.model, allow_fallback=resource.spec.model_fallback is not False
            )
        except EngineError as e:
            if not getattr(e, "repeated", False):
                log.error("%s: model %s cannot serve: %s", name, resource.spec.model, e)
                with contextlib.suppress(StoreError):
                    await self.store.record_fleet_event(
                        name,
                        "ModelUnavailable",
                        resource.spec.model,
                        f"model {resource.spec.model} cannot serve: {e}",
                        self.id,
                    )
            return None

    @staticmethod
    def _parse(name: str, body: dict[str, Any] | None) -> AgentResource | None:
        if body is None:  # deleted meanwhile
            return None
        try:
            resource = parse_resource(body)
        except SpecError as e:
            log.error("%s: stored spec no longer validates: %s", name, e)
            return None
        return resource if isinstance(resource, AgentResource) else None

    async def _supervise(self, runner: AgentRunner) -> None:
        scope = anyio.CancelScope()
        self._scopes[runner.name] = scope
        try:
            with scope:
                await runner.run()
        except Exception:
            log.exception("%s: supervisor crashed; the agent is activated again", runner.name)
            runner.stop_reason = StopReason.LEASE_LOST
        finally:
            if runner.release_due is not None:
                # Cut short while releasing the agent: finish the job (our lease goes
                # first, if the release did not get that far).
                with anyio.CancelScope(shield=True), contextlib.suppress(StoreError):
                    await self.store.release_lease(runner.name, runner.lease_value)
                    await self.store.due_release(
                        runner.name, self.id, runner.release_due, now=self.clock()
                    )
            if runner.stop_reason is StopReason.LEASE_LOST:
                # Not released by the runner: due again at once (our own lease, if we
                # still have it, comes back to whichever of our passes claims it).
                with anyio.CancelScope(shield=True), contextlib.suppress(StoreError):
                    await self.store.due_now([runner.name], now=self.clock())
                    await self.store.held_remove(self.id, [runner.name])
            if self.runners.get(runner.name) is runner:
                del self.runners[runner.name]
                self._scopes.pop(runner.name, None)
                if runner.name not in self._stopping:
                    self._desired.pop(runner.name, None)
            if runner.stop_reason is StopReason.REBALANCE or self._draining:
                self._released.set()  # its lease is free: the others may take it now
            self._kick.set()
            self.activator.nudge()  # room for one more

    async def _stop_one(self, name: str, reason: StopReason, restart_hash: str | None) -> None:
        runner = self.runners.get(name)
        if runner is None or name in self._stopping:
            self._handing_over.discard(name)
            return
        if reason is StopReason.REBALANCE and not runner.settled:
            # A task began since reconcile chose it: never cut one short to rebalance.
            self._handing_over.discard(name)
            return
        self._stopping.add(name)
        try:
            runner.request_stop(reason)
            with anyio.move_on_after(self.settings.grace_s):
                await runner.done.wait()
            if not runner.done.is_set():
                log.warning(
                    "%s: did not stop within %.0fs; cancelling it", name, self.settings.grace_s
                )
                self._scopes[name].cancel()
                await runner.done.wait()
            if restart_hash is not None and not self._stop.is_set():
                await self._start_many([(name, restart_hash)])
        finally:
            # Only now: until the restarted runner exists, reconcile must not start one.
            self._stopping.discard(name)
            self._handing_over.discard(name)

    async def _stop_all(self, reason: StopReason) -> None:
        asked: set[int] = set()
        # Again for runners that a start in flight added meanwhile, until none is left.
        while runners := [r for r in self.runners.values() if id(r) not in asked]:
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
                scope = self._scopes.get(r.name)
                if scope is not None:
                    scope.cancel()
        for r in runners:
            await r.done.wait()

    # ------------------------------------------------------------------ state

    def _fleet_quiet(self) -> bool:
        if not self.activator.loaded or self._opening:
            return False
        horizon = self.clock() + 1.0
        if self.activator.next_due_at <= horizon:  # due now or soon (not held here)
            return False
        return all(
            r.quiet and (r.next_fire_at is None or r.next_fire_at > horizon)
            for r in self.runners.values()
        )


async def _run_coro(coro: Any) -> None:
    await coro
