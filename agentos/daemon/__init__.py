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

A daemon has labels (``--labels``, in its heartbeat) and hosts only the agents they
allow (``spec.placement``, a local Model's site): it activates no other
(:class:`~agentos.runtime.activation.Placer`), and lets go of one it holds once a new
spec or a changed Model rules it out, so that a daemon that matches takes it. Agents
only some daemons may host are pinned: never handed over for the fair share, which
balances the rest.

The loops that keep Redis current (flushes, leases and heartbeats, quotas, sweeps,
retention, fault reports) are in :mod:`agentos.daemon.upkeep`, the view of the other
daemons in :mod:`agentos.daemon.peers`, starting, supervising and stopping runners in
:mod:`agentos.daemon.runners`. Everything runs in anyio task groups; nothing
outlives :meth:`Daemon.run`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

from agentos.core.lifecycle import StopReason, backoff_delay
from agentos.core.reconcile import Desired, Local, Restart, Stop, reconcile
from agentos.daemon.peers import Peers
from agentos.daemon.runners import Runners, clean
from agentos.daemon.upkeep import Upkeep
from agentos.engine.base import Engine
from agentos.engine.remote import propagate_traces
from agentos.governor.admission import Governor
from agentos.governor.evaluator import Evaluator
from agentos.runtime.activation import Activator, Placer
from agentos.runtime.agentlog import LogShipper
from agentos.runtime.hibernator import Hibernator
from agentos.runtime.models import DEFAULT_MODEL, ModelEntry, ModelPool
from agentos.runtime.runner import AgentRunner
from agentos.runtime.slots import SlotArbiter
from agentos.runtime.watchdog import LoopWatchdog, Stall
from agentos.settings import DaemonSettings
from agentos.store import Retention, Store, StoreError, StoreUnavailable
from agentos.telemetry import Telemetry, settle_heap

__all__ = ["Daemon", "DaemonIdInUse"]

log = logging.getLogger("agentos.daemon")
_T = TypeVar("_T")
LOOP_BACKOFF = (0.5, 30.0)  # a daemon loop that failed starts again after this


class DaemonIdInUse(StoreUnavailable):
    """Another live daemon runs with this daemon's id: this one does not start."""


class Daemon(Peers, Upkeep, Runners):
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
        # Model calls carry the trace context of the span they are made in.
        propagate_traces(self.telemetry.inject if self.telemetry.enabled else None)
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
            daemon_id=self.id,
        )
        # Which local models with a site this daemon serves (a route's candidates too).
        self.models.labels = dict(self.settings.labels)
        # MCP sessions, one per ToolServer its agents use, shared by them (the mcp
        # package is imported here, not by every CLI command that imports the daemon).
        from agentos.tools.mcp import ToolServerPool

        self.tool_servers = ToolServerPool(
            store.toolservers,
            idle_s=self.settings.tool_server_idle_s,
            # A tool call carries its task's trace context (``_meta``, HTTP headers).
            trace_headers=self.telemetry.trace_headers if self.telemetry.enabled else None,
        )
        # Agents' log lines, buffered here and shipped to their logs in Redis.
        self.logs = LogShipper(store, self.id)
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
        # Released agents: no runner anywhere; activated from the due index in Redis, the
        # ones this daemon may host only.
        self.placer = Placer(store, self.settings.labels)
        self.activator = Activator(
            store,
            clock=clock,
            poll_s=self.settings.lease_ttl_s / 3,
            claim_s=self.settings.lease_ttl_s,
            room=self._room,
            running=self.runners,
            start=self._start_many,
            placer=self.placer,
        )
        self._live: set[str] = {self.id}  # daemons whose heartbeat is fresh, as last read
        # Redis at maxmemory: when writes were first and last refused (None: they are not).
        self._full_since: float | None = None
        self._full_last = 0.0
        self._down_since: float | None = None  # Redis (or a cluster node) unreachable
        self._down_last = 0.0
        # Isolation: this process's nonce (two daemons with one id are refused), the
        # thread that renews our leases and heartbeat, the loop's watchdog, and the
        # backoff of agents whose runner failed.
        self.instance = uuid.uuid4().hex
        self.keeper = store.lease_keeper(
            self.id,
            instance=self.instance,
            ttl_ms=int(self.settings.lease_ttl_s * 1000),
            every_s=self.settings.lease_ttl_s / 3,
            forget_after_s=self.settings.daemon_forget_after_s,
        )
        self.watchdog = LoopWatchdog(
            threshold_s=self.settings.blocked_loop_s, beat_s=self.settings.loop_beat_s
        )
        self._runner_errors: dict[str, int] = {}
        self._reported: dict[str, str] = {}  # what each failing path reported last

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
        # Started: the heap's long-lived part is here; full collections skip it from now.
        settle_heap()
        await self._claim_id()
        self.keeper.start()
        self.logs.install()
        try:
            async with self.tool_servers, anyio.create_task_group() as shipping:
                # Sessions and the log shipper outlive every agent's task.
                shipping.start_soon(self.logs.run)
                await self._run(until_idle, duration_s)
                shipping.cancel_scope.cancel()
        finally:
            self.logs.uninstall()
            # Our leases are released by now (or they are left to expire): no more
            # renewals, and no heartbeat written after it is removed below. Shielded: a
            # run cancelled from outside (its task group failed) must not leave the
            # thread beating for a daemon that is gone, which would keep the others from
            # ever adopting its agents.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.keeper.stop)
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

    async def _run(self, until_idle: bool, duration_s: float | None) -> None:
        # Counted by the others before our first reconcile takes anything: three daemons
        # started together split the fleet instead of the first one taking it all.
        await self._announce("joined")
        async with anyio.create_task_group() as agents:
            self._agents_tg = agents
            async with anyio.create_task_group() as control:
                # Each loop is guarded: what it cannot handle is reported once and the
                # loop starts again after a backoff; only the shutdown ends the daemon.
                guard = control.start_soon
                guard(self._guarded, "handover", self._handover_loop)
                for group in self.store.signal_groups():
                    guard(self._guarded, "signals", functools.partial(self._signals_loop, group))
                guard(
                    self._guarded, "reconcile", functools.partial(self._reconcile_loop, until_idle)
                )
                guard(self._guarded, "status flush", self._flush_loop)
                guard(self._guarded, "leases", self._lease_loop)
                guard(self._guarded, "quotas", self._quota_loop)
                guard(self._guarded, "retention", self._retention_loop)
                guard(self._guarded, "quota evaluator", self.evaluator.run)
                guard(self._guarded, "activation", self.activator.run)
                guard(
                    self._guarded, "watchdog", functools.partial(self.watchdog.run, self._on_stall)
                )
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

    async def _claim_id(self) -> None:
        """Write our first heartbeat, refused while a live daemon of another process has
        our id (its heartbeat younger than a lease). One that stopped beating (it died
        just before we started with its id) is waited out; one that still beats makes
        us raise :class:`DaemonIdInUse`."""
        fresh_s = self.settings.lease_ttl_s
        deadline = time.monotonic() + 2 * fresh_s
        first: object = None
        while True:
            try:
                if await self.store.heartbeat(
                    self.id,
                    self._info(),
                    forget_after_s=self.settings.daemon_forget_after_s,
                    instance=self.instance,
                    fresh_s=fresh_s,
                ):
                    return
                other = (await self.store.daemons()).get(self.id, {})
            except StoreError as e:  # Redis away at the start: wait for it, like every loop
                self._store_failed("daemon id", e, 1.0)
                await anyio.sleep(1.0)
                continue
            seen = other.get("seen_at")
            if first is None:
                first = seen
            elif seen != first or time.monotonic() > deadline:
                host, pid = clean(str(other.get("host", "?"))), other.get("pid", "?")
                raise DaemonIdInUse(
                    f"daemon id {self.id!r} is in use by a live daemon (host {host}, pid "
                    f"{pid}); stop it or start this one with another --id"
                )
            await anyio.sleep(min(0.5, fresh_s / 6))

    async def _guarded(self, what: str, loop: Callable[[], Awaitable[None]]) -> None:
        """Run one of the daemon's loops until the shutdown cancels it. What it cannot
        handle is logged once (again only if it changes) and the loop starts again after
        a backoff, so no error other than the shutdown ends :meth:`run`."""
        failures = 0
        while True:
            started = time.monotonic()
            try:
                await loop()
                return
            except Exception as e:
                if time.monotonic() - started > 60:  # it ran well for a while
                    failures = 0
                failures += 1
                delay = backoff_delay(failures, *LOOP_BACKOFF)
                self._report(
                    what,
                    f"{type(e).__name__}: {e}",
                    f"the daemon's {what} loop failed (%s); it starts again in {delay:.1f}s",
                    exc=e,
                )
                await anyio.sleep(delay)

    def _report(
        self, where: str, text: str, template: str, *, exc: BaseException | None = None
    ) -> None:
        """Log a failure of ``where`` once: the same text again is only a debug line."""
        text = clean(text)
        if self._reported.get(where) == text:
            log.debug(template, text)
            return
        self._reported[where] = text
        log.error(template, text, exc_info=exc)

    async def _until_done(self, op: Callable[[], Awaitable[_T]], what: str) -> _T:
        """Run a store operation that is safe to repeat until it succeeds, shielded
        from cancellation: what it records must not be lost (an agent in no due index,
        with no lease and no runner, would never run again)."""
        delay = 0.1
        with anyio.CancelScope(shield=True):
            while True:
                try:
                    return await op()
                except StoreError as e:
                    self._store_failed(what, e, delay)
                    await anyio.sleep(delay)
                    delay = min(delay * 2, max(self.settings.redis_retry_max_s, 30.0))
        raise AssertionError("unreachable: a shielded scope is never cancelled")

    def _on_stall(self, stall: Stall) -> None:
        """The event loop ran again after a block: charge it to the agent whose code
        blocked it (its runner records the BlockedLoop event and counts the crash)."""
        runner = self.runners.get(stall.agent) if stall.agent else None
        if runner is not None:
            runner.note_blocked(stall)
            return
        message = (
            f"the event loop of daemon {self.id} was blocked for {stall.seconds:.1f}s at "
            f"{stall.where} (not by agent code)"
        )
        log.warning("%s", message)
        self._spawn(self._fleet_event(stall.agent or "", "BlockedLoop", stall.where, message))

    async def _fleet_event(self, agent: str, type_: str, reason: str, message: str) -> None:
        try:
            await self.store.record_fleet_event(agent, type_, reason, message, self.id)
        except StoreError as e:
            self._store_failed(f"{type_} event", e)

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
            except Exception as e:
                self._report(
                    "reconcile", f"{type(e).__name__}: {e}", "reconcile pass failed: %s", exc=e
                )
                await anyio.sleep(delay)
                delay = min(delay * 2, self.settings.redis_retry_max_s)
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
            await self.placer.refresh(generation)
            self._let_go_of_unhostable()
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
        # Pinned agents (some live daemon may not host them) are never handed over: they
        # are outside the fair share (see agentos.runtime.activation), held as "busy".
        pinned = self._pinned_held() & local.keys()
        for n in pinned:
            local[n] = dataclasses.replace(local[n], busy=True)
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
            capacity=None if self.limit is None else self.limit + len(pinned),
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
                elif runner is not None and cmd == "drop":
                    runner.drop(fields.get("task", ""))
                elif runner is not None and cmd == "restart":
                    grace = fields.get("grace", "")
                    self._spawn(self._operator_restart(agent, float(grace) if grace else None))
                elif runner is not None and cmd == "cancel":
                    task, by = fields.get("task", ""), fields.get("by", "")
                    runner.cancel(task, by, dropped=fields.get("dropped") == "1")
                elif agent in self._opening and cmd in ("message", "wake"):
                    self._opening[agent].add(cmd)
                # Any other agent is held elsewhere, or released (due: a "due" signal).

    # ------------------------------------------------------------------ agents

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
