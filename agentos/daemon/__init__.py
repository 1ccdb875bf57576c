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

The daemon is a façade over small jobs that share one :class:`~agentos.daemon.state.DaemonState`
(what it holds) and take what else they need as arguments: reconcile
(:mod:`agentos.daemon.reconciler`), the signals (:mod:`agentos.daemon.signals`), the
view of the other daemons (:mod:`agentos.daemon.peers`), the heartbeat and announcements
(:mod:`agentos.daemon.heartbeat`), the loops that keep Redis current
(:mod:`agentos.daemon.upkeep`, :mod:`agentos.daemon.flush`), what to do when they fail
(:mod:`agentos.daemon.faults`), supervising and stopping runners
(:mod:`agentos.daemon.runners`, :mod:`agentos.daemon.stopping`). Starting an agent
(lease, spec, model, runner) is the runtime's (:mod:`agentos.runtime.activation_start`):
the daemon decides when. Every time it reads goes through its ``clock``. Everything runs
in anyio task groups; nothing outlives :meth:`Daemon.run`.
"""

from __future__ import annotations

import functools
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable

import anyio

from agentos.core.lifecycle import StopReason
from agentos.core.spec import AgentResource
from agentos.daemon.faults import LOOP_BACKOFF, Faults
from agentos.daemon.flush import Flusher
from agentos.daemon.heartbeat import DaemonIdInUse, Heartbeat
from agentos.daemon.peers import Peers
from agentos.daemon.reconciler import Reconciler
from agentos.daemon.runners import Supervisor
from agentos.daemon.signals import read_signals
from agentos.daemon.state import DaemonState
from agentos.daemon.stopping import Stopper
from agentos.daemon.upkeep import Upkeep
from agentos.engine.base import Engine
from agentos.engine.remote import propagate_traces
from agentos.governor.admission import Governor
from agentos.governor.evaluator import Evaluator
from agentos.runtime.activation import Activator, Placer, Room
from agentos.runtime.activation_start import Starter, build_runner
from agentos.runtime.agentlog import LogShipper
from agentos.runtime.hibernator import Hibernator
from agentos.runtime.models import DEFAULT_MODEL, ModelEntry, ModelPool
from agentos.runtime.runner import AgentRunner
from agentos.runtime.slots import SlotArbiter
from agentos.runtime.watchdog import LoopWatchdog
from agentos.settings import DaemonSettings
from agentos.store import Retention, Store, StoreError
from agentos.telemetry import Telemetry, settle_heap

__all__ = ["LOOP_BACKOFF", "Daemon", "DaemonIdInUse"]

log = logging.getLogger("agentos.daemon")


class Daemon:
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
        self.settings = settings = settings or DaemonSettings()
        if settings.grace_s >= settings.lease_ttl_s:
            raise ValueError("grace_s must be shorter than lease_ttl_s")
        # The daemon owns the retention of what its agents write (usage, task records).
        store.retention = Retention(
            usage_s=settings.usage_retention_days * 86_400.0,
            tasks_s=settings.task_retention_s,
        )
        self.id = daemon_id = settings.daemon_id
        self.clock = clock
        self.state = state = DaemonState(limit=settings.max_agents)
        self.runners: dict[str, AgentRunner] = state.runners
        self.telemetry = telemetry = telemetry or Telemetry.disabled()
        # Model calls carry the trace context of the span they are made in.
        propagate_traces(telemetry.inject if telemetry.enabled else None)
        self.faults = faults = Faults(
            store, daemon_id=daemon_id, clock=clock, retry_max_s=settings.redis_retry_max_s
        )
        self.governor = governor = Governor(
            store,
            daemon_id=daemon_id,
            parallel=engine.parallel,
            slot_lease_s=settings.quota_slot_lease_s,
            window_s=settings.quota_window_s,
            telemetry=telemetry,
            clock=clock,
        )
        self.evaluator = Evaluator(
            store,
            daemon_id=daemon_id,
            period_s=settings.quota_eval_s,
            window_s=settings.quota_window_s,
            lease_ttl_s=settings.lease_ttl_s,
            clock=clock,
        )

        def attained(name: str) -> float:
            return governor.attained.value(name, clock())

        self.arbiter = SlotArbiter(engine, attained=attained)
        self.hibernator = Hibernator(engine)
        # Every model the agents name (kind: Model), "default" being `engine` itself.
        self.models = models = ModelPool(
            store,
            ModelEntry(DEFAULT_MODEL, engine, self.arbiter, self.hibernator),
            attained=attained,
            on_new=lambda m: governor.add_model(m.name, m.engine.parallel),
            daemon_id=daemon_id,
            clock=clock,  # spend days and route cooldowns on the daemon's clock
        )
        # Which local models with a site this daemon serves (a route's candidates too).
        models.labels = dict(settings.labels)
        # MCP sessions, one per ToolServer its agents use, shared by them (the mcp
        # package is imported here, not by every CLI command that imports the daemon).
        from agentos.tools.mcp import ToolServerPool

        self.tool_servers = tool_servers = ToolServerPool(
            store.specs.toolservers,
            idle_s=settings.tool_server_idle_s,
            # A tool call carries its task's trace context (``_meta``, HTTP headers).
            trace_headers=telemetry.trace_headers if telemetry.enabled else None,
        )
        # Agents' log lines, buffered here and shipped to their logs in Redis.
        self.logs = LogShipper(store, daemon_id)
        self.started_at = clock()
        # Released agents: no runner anywhere; activated from the due index in Redis, the
        # ones this daemon may host only.
        self.placer = placer = Placer(store, settings.labels)
        self.activator = activator = Activator(
            store,
            clock=clock,
            poll_s=settings.lease_ttl_s / 3,
            claim_s=settings.lease_ttl_s,
            room=self._room,
            running=state.runners,
            start=self._start_many,
            placer=placer,
        )
        self.peers = peers = Peers(
            store,
            daemon_id=daemon_id,
            settings=settings,
            state=state,
            activator=activator,
            placer=placer,
        )
        # Isolation: this process's nonce (two daemons with one id are refused), the
        # thread that renews our leases and heartbeat, the loop's watchdog.
        self.instance = uuid.uuid4().hex
        self.keeper = keeper = store.leases.keeper(
            daemon_id,
            instance=self.instance,
            ttl_ms=int(settings.lease_ttl_s * 1000),
            every_s=settings.lease_ttl_s / 3,
            forget_after_s=settings.daemon_forget_after_s,
        )
        self.watchdog = LoopWatchdog(
            threshold_s=settings.blocked_loop_s, beat_s=settings.loop_beat_s
        )
        self.heartbeat = heartbeat = Heartbeat(
            store,
            daemon_id=daemon_id,
            instance=self.instance,
            settings=settings,
            engine=engine,
            models=models,
            tool_servers=tool_servers,
            state=state,
            peers=peers,
            activator=activator,
            keeper=keeper,
            faults=faults,
            started_at=self.started_at,
        )
        self.supervisor = supervisor = Supervisor(
            store,
            daemon_id=daemon_id,
            settings=settings,
            clock=clock,
            state=state,
            keeper=keeper,
            activator=activator,
            faults=faults,
        )
        self.starter = starter = Starter(
            store,
            daemon_id=daemon_id,
            settings=settings,
            clock=clock,
            models=models,
            placer=placer,
            faults=faults,
            build=functools.partial(
                build_runner,
                store=store,
                daemon_id=daemon_id,
                settings=settings,
                clock=clock,
                telemetry=telemetry,
                governor=governor,
                models=models,
                tool_servers=tool_servers,
            ),
            running=state.runners,
            desired=state.desired,
            errors=state.runner_errors,
            adopt=supervisor.adopt,
            publish=heartbeat.publish_held,
            live=lambda: peers.live,
            stopping=state.stop.is_set,
        )
        self.stopper = stopper = Stopper(
            store,
            daemon_id=daemon_id,
            settings=settings,
            clock=clock,
            state=state,
            faults=faults,
            # Through the daemon: what starts an agent again is the daemon's own start.
            start=lambda wanted: self._start_many(wanted),
        )
        self.flusher = Flusher(
            store, settings=settings, clock=clock, state=state, governor=governor, faults=faults
        )
        self.upkeep = Upkeep(
            store,
            daemon_id=daemon_id,
            settings=settings,
            clock=clock,
            state=state,
            engine=engine,
            governor=governor,
            activator=activator,
            keeper=keeper,
            heartbeat=heartbeat,
            faults=faults,
        )
        self.reconciler = Reconciler(
            store,
            daemon_id=daemon_id,
            settings=settings,
            clock=clock,
            state=state,
            peers=peers,
            activator=activator,
            placer=placer,
            starter=starter,
            stopper=stopper,
            heartbeat=heartbeat,
            faults=faults,
        )

    # ------------------------------------------------------------------ public

    @property
    def stopping(self) -> bool:
        """A graceful shutdown has begun (``/readyz`` answers 503 from then on)."""
        return self.state.stop.is_set()

    @property
    def ready(self) -> bool:
        """The first reconcile pass is done (``/readyz``)."""
        return self.reconciler.ready

    @property
    def limit(self) -> int | None:
        """The most agents this daemon may hold now (None: no limit)."""
        return self.state.limit

    def request_stop(self) -> None:
        """Begin a graceful shutdown (what SIGTERM and Ctrl-C do)."""
        self.state.stop.set()

    def force_stop(self) -> None:
        """Cancel every agent now, without waiting for the grace period (a second Ctrl-C).

        Each agent still records its stop and releases its lease.
        """
        self.state.stop.set()
        for scope in list(self.state.scopes.values()):
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
        await self.heartbeat.claim_id()
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
            if not await self.store.waits.still_held(self.id):
                await self.store.waits.leave_holders(self.id)
        except StoreError as e:
            log.warning("could not leave the holders: %s", e)
        await self.models.aclose()
        try:
            await self.store.heartbeats.forget(self.id)
        except StoreError as e:
            log.warning("could not remove the daemon's heartbeat: %s", e)
        log.info("daemon %s stopped", self.id)

    async def _run(self, until_idle: bool, duration_s: float | None) -> None:
        # Counted by the others before our first reconcile takes anything: three daemons
        # started together split the fleet instead of the first one taking it all.
        await self.heartbeat.announce("joined")
        async with anyio.create_task_group() as agents:
            self.state.agents_tg = agents
            async with anyio.create_task_group() as control:
                # Each loop is guarded: what it cannot handle is reported once and the
                # loop starts again after a backoff; only the shutdown ends the daemon.
                def guard(what: str, loop: Callable[[], Awaitable[None]]) -> None:
                    control.start_soon(self.faults.guarded, what, loop)

                guard("handover", self.heartbeat.handover_loop)
                for group in self.store.signals.groups():
                    guard("signals", functools.partial(self._signals_loop, group))
                guard("reconcile", functools.partial(self.reconciler.run, until_idle))
                guard("status flush", self.flusher.run)
                guard("leases", self.upkeep.lease_loop)
                guard("quotas", self.upkeep.quota_loop)
                guard("retention", self.upkeep.retention_loop)
                guard("quota evaluator", self.evaluator.run)
                guard("activation", self.activator.run)
                guard("watchdog", functools.partial(self.watchdog.run, self.supervisor.on_stall))
                with anyio.move_on_after(math.inf if duration_s is None else duration_s):
                    await self.state.stop.wait()
                self.state.stop.set()  # the end of a --for run: no more starts from here on
                self.state.draining = True
                # Draining: out of the others' count first, so their share grows to take
                # what we let go of ("released" signals as the agents stop).
                await self.heartbeat.announce("draining")
                await self.stopper.stop_all(StopReason.SHUTDOWN)
                control.cancel_scope.cancel()
        await self.heartbeat.announce("released")

    async def _signals_loop(self, group: tuple[str, ...]) -> None:
        await read_signals(
            group,
            store=self.store,
            daemon_id=self.id,
            retry_max_s=self.settings.redis_retry_max_s,
            state=self.state,
            activator=self.activator,
            evaluator=self.evaluator,
            starter=self.starter,
            stopper=self.stopper,
            faults=self.faults,
        )

    # ------------------------------------------------------------------ activation

    async def _start_many(
        self,
        wanted: list[tuple[str, str]],
        claims: dict[str, float] | None = None,
        resources: dict[str, AgentResource] | None = None,
    ) -> None:
        """Start ``wanted`` (name, spec hash): :meth:`Starter.start_many`."""
        await self.starter.start_many(wanted, claims, resources)

    async def _room(self, due: int) -> Room:
        return await self.peers.room(due)

    # ------------------------------------------------------------------ for tests
    # The tests look at these by their old names (reconcile passes, peers, Redis faults).

    async def _reconcile_once(self) -> None:
        await self.reconciler.once()

    @property
    def _full_since(self) -> float | None:
        return self.faults.full_since

    @property
    def _kick(self) -> anyio.Event:
        return self.state.kick

    @property
    def _kicked(self) -> bool:
        return self.state.kicked

    @_kicked.setter
    def _kicked(self, value: bool) -> None:
        self.state.kicked = value

    @property
    def _live(self) -> set[str]:
        return self.peers.live

    @property
    def _peers(self) -> int:
        return self.peers.count

    def _pinned_held(self) -> set[str]:
        return self.peers.pinned_held()
