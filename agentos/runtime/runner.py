"""The supervisor of one agent inside a daemon: its state, its loop, its tasks, its sleep and wake.

A runner owns an agent while its daemon holds the agent's lease. It turns wake-ups
(the start, inbox messages, heartbeats, schedules, an operator's `wake`) into tasks
and runs each task's observe/plan/act/learn loop. Before agent code runs, a task
secures the agent's engine session (a slot, its context restored); whenever the agent
stops running (hibernation, crash backoff, a parked task, a wait, failure, stop) the
slot is given back. What to do when a task does not succeed is decided by
:mod:`agentos.core.supervisor`: only the agent's own exceptions count toward its
crash loop; slots, Redis, engines and quotas park the task instead.

:class:`AgentRunner` is one object with one state (:class:`.state.RunnerState`): every
change of its phase, its queue and its stop reason is made here, by the ``_apply_*``,
``move``/``set_phase`` and ``queue_*`` methods below. Its jobs are module functions
called with the runner: :mod:`.starting` (open, adopt, instantiate), :mod:`.idling`
(the loop between tasks), :mod:`.intake` (wake-ups into queued tasks), :mod:`.tasking`
(run one task), :mod:`.securing` (its engine session, slot lending), :mod:`.closing`
(its writes), :mod:`.faults` (what a failed task does next), :mod:`.waits` (durable
waits), :mod:`.releasing` (hibernate, release, stop, fail) and :mod:`.calls` (the
agent's model calls and sends), over :mod:`.writer` (every fenced write),
:mod:`.session` and :mod:`.slots` (the engine slot), :mod:`.hibernator` (KV to Redis
and back) and :mod:`.usage` (metering).
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, TypeVar

import anyio

from agentos.core.lifecycle import Phase, PhaseEvent, StopReason, transition
from agentos.core.modelspec import ModelPrices
from agentos.core.spec import AgentResource
from agentos.core.supervisor import RestartPolicy
from agentos.core.tasks import Task
from agentos.core.triggers import TriggerClock
from agentos.engine.base import Engine
from agentos.governor.admission import Governor
from agentos.runtime import idling, intake, releasing, securing, starting
from agentos.runtime.calls import wire_route
from agentos.runtime.hibernator import Hibernator
from agentos.runtime.session import AgentSession
from agentos.runtime.slots import SlotArbiter
from agentos.runtime.spend import ClassSpend
from agentos.runtime.state import RunnerState, View
from agentos.runtime.toolcalls import LedgerWriter
from agentos.runtime.usage import UsageMeter
from agentos.runtime.watchdog import Mark, Stall
from agentos.runtime.writer import NOTHING, LeaseLost, Writer
from agentos.sdk import Agent, Context, StateCodec
from agentos.store import AgentSnapshot, Duplicate, Store, Write
from agentos.telemetry import Telemetry

if TYPE_CHECKING:  # the mcp package is imported when a daemon starts, not by every CLI call
    from agentos.tools.mcp import ToolServerPool

__all__ = ["AgentRunner", "LeaseLost"]

log = logging.getLogger("agentos.runner")
_T = TypeVar("_T")


class AgentRunner:
    """Runs one agent for as long as this daemon holds its lease."""

    def __init__(
        self,
        *,
        resource: AgentResource,
        spec_hash: str,
        lease_value: str,
        store: Store,
        engine: Engine,
        arbiter: SlotArbiter,
        hibernator: Hibernator,
        daemon_id: str,
        clock: Callable[[], float] = time.time,
        retry_max_s: float = 5.0,
        telemetry: Telemetry | None = None,
        governor: Governor | None = None,
        opened: AgentSnapshot | None = None,
        lend_after_s: float = 0.5,
        tool_servers: ToolServerPool | None = None,
    ) -> None:
        spec = resource.spec
        self.resource = resource
        self.name = resource.metadata.name
        self.spec_hash = spec_hash
        self.lease_value = lease_value
        self.daemon_id = daemon_id
        self.store = store
        self.engine = engine
        self.arbiter = arbiter
        self.governor = governor
        self.clock = clock
        self.telemetry = telemetry or Telemetry.disabled()
        # The daemon's MCP sessions, for the agent's spec.tools.servers (None: no servers).
        self.tool_servers = tool_servers
        # What the daemon already read for this runner (batched with other agents'),
        # or None: the runner reads it as it starts.
        self.opened = opened
        self.state = RunnerState()
        self.writer = Writer(
            store, self.name, lease_value, daemon_id=daemon_id, clock=clock, retry_max_s=retry_max_s
        )
        self.session = AgentSession(
            self,
            engine=engine,
            arbiter=arbiter,
            hibernator=hibernator,
            writer=self.writer,
            keep_kv=spec.hibernation.keep_kv,
            on_slow=lambda: securing.slot_slow(self),
        )
        self.usage = UsageMeter(self.name, clock, self.telemetry)
        self.priority = spec.priority
        self.policy = RestartPolicy(
            spec.restart_policy.crash_loop_after,
            spec.restart_policy.backoff.initial,
            spec.restart_policy.backoff.max,
        )
        self.triggers = TriggerClock(spec.triggers, now=clock())
        # Slot lending (agentos.runtime.securing.away): while agent code runs tools for
        # lend_after_s or longer, the slot may go to an agent waiting for one.
        self.lend_after_s = lend_after_s
        self.lendable = False
        self.lent = 0  # how many times the slot was lent mid-task
        self.lend_asked = anyio.Event()
        self.task_over = anyio.Event()  # set (and renewed) each time a task ends
        self.done = anyio.Event()
        self.nudged = anyio.Event()
        self.stop_scopes: set[anyio.CancelScope] = set()
        self.last_activity = clock()
        # counters flushed to the status hash by the daemon
        self.steps = self.tasks_succeeded = self.tasks_failed = self.restarts = 0
        self.consecutive_failures = 0
        self.dead_letters_in_row = 0  # messages dead-lettered since the last success
        self.tokens_in = self.tokens_out = 0
        self.dirty = False
        # Prices of a model by name (set by the daemon from its model pool).
        self.price_of: Callable[[str], ModelPrices] = lambda _model: ModelPrices()
        # The quota classes' money per day (set by the daemon; None: not enforced).
        self.spend: ClassSpend | None = None
        # The model that holds the agent's session: spec.model, or the route's home.
        self.home_model = wire_route(self, engine) or spec.model
        self.agent: Agent | None = None
        self.ctx: Context | None = None
        self.codec: StateCodec | None = None
        self.agent_cls: type[Agent] | None = None
        self.ledger: LedgerWriter | None = None  # set with the agent's Context
        self._mark: Mark | None = None
        self.lost_why = ""  # what the daemon found when the lease was lost
        # An unexpected error of the runner itself, and how long the agent then waits
        # before it is activated again (the daemon's backoff for this agent).
        self.error: BaseException | None = None
        self.error_delay_s = 1.0

    # What the daemon and the tests read of the state.

    phase: View[Phase] = View("phase")
    stop_reason: View[StopReason | None] = View("stop_reason")
    hibernate_requested: View[str | None] = View("hibernate_requested")
    release_due: View[float | None] = View("release_due")
    releasing: View[bool] = View("releasing")
    released: View[bool] = View("released")  # the lease is given up (released or waiting)
    failed: View[bool] = View("failed")
    busy: View[bool] = View("busy")
    task_cost: View[float] = View("task_cost")
    _queue: View[deque[Task]] = View("queue")

    # The daemon's controls.

    def nudge(self, cmd: str) -> None:
        """Tell the runner something happened: ``message``, ``wake`` or ``hibernate``."""
        if cmd == "hibernate":
            self.request_hibernate("requested by operator")
        else:
            self.state.cmds.add(cmd)
        self.nudged.set()

    def drop(self, task_id: str) -> None:
        """An operator dropped this task's message (``agentos tasks drop``): forget its
        queued task. A task already running it finishes (its record then says how)."""
        kept = [w for w in self.state.queue if w.id != task_id]
        if len(kept) != len(self.state.queue):
            self.state.queue = deque(kept)
            log.info("agent %s: task %s dropped before it ran", self.name, task_id)

    def cancel(self, task_id: str, by: str, *, dropped: bool = False) -> None:
        """An operator cancelled this task (``agentos tasks cancel``): cut it short if it
        runs now, or end it when its turn comes if it is queued here. Either way it ends
        ``cancelled`` with a ``TaskCancelled`` event, not retried and not a crash.
        ``dropped``: its message is gone and its record says so already (it only has to
        leave the queue)."""
        running = self.state.running
        if running is not None and running[0].id == task_id:
            running[0].cancelled_by = by
            running[0].cancel_recorded = dropped
            running[1].cancel()
            log.info("agent %s: task %s cancelled by %s", self.name, task_id, by)
            return
        if dropped:  # its message is gone: out of the queue, if it is there
            self.drop(task_id)
        # Between the queue and running (a slot wait, a crash's backoff) or queued
        # without a message: it ends when it comes up.
        cancels = self.state.cancels
        while len(cancels) >= 1000:  # ids of tasks that ended meanwhile
            del cancels[next(iter(cancels))]
        cancels[task_id] = (by, dropped)
        self.nudged.set()

    def note_blocked(self, stall: Stall) -> None:
        """The watchdog found this agent's code blocking the event loop: recorded (and
        counted toward the crash loop) by the runner's own loop, between its writes."""
        self.state.blocked.append(stall)
        if self.state.busy:
            self.state.blocked_in_task = True
        self.nudged.set()

    @property
    def mark(self) -> Mark:
        """What the watchdog sees while this agent's code runs (one per agent class)."""
        module = self.agent_cls.__module__ if self.agent_cls is not None else ""
        if self._mark is None or self._mark.module != module:
            self._mark = Mark(self.name, module)
        return self._mark

    def request_hibernate(self, why: str) -> None:
        """Hibernate as soon as the agent is idle."""
        self.state.hibernate_requested = why
        self.nudged.set()

    def request_stop(self, reason: StopReason) -> None:
        """Stop at the next loop boundary; the agent sees ``reason`` as ``ctx.stopping``.

        A wait for a slot or a crash's backoff ends at once.
        """
        if self.state.stop_reason is None:
            self.state.stop_reason = reason
            if self.ctx is not None:
                self.ctx.stopping = reason
        for scope in self.stop_scopes:
            scope.cancel()
        self.nudged.set()

    def quota_changed(self) -> None:
        """The agent's class got new limits: tasks parked by a quota may be admitted now."""
        for task in self.state.queue:
            if task.parked_for in ("rate", "budget"):
                task.not_before = 0.0
        self.nudged.set()

    # The slot arbiter's view (agentos.runtime.slots.Holder).

    @property
    def evictable(self) -> bool:
        """Idle with nothing due, or running tools long enough to lend the slot: may be
        asked to give its slot back."""
        if self.state.stop_reason is not None or self.state.hibernate_requested is not None:
            return False
        if self.lendable:
            return True
        return self.phase is Phase.IDLE and not self.busy and self.next_due(pop=False) is None

    def evict(self, why: str) -> None:
        """The arbiter needs our slot: hibernate now (we are idle), or lend it (tools)."""
        self.state.evicting = True
        if self.lendable:
            self.state.hibernate_requested = why
            self.lend_asked.set()
            return
        self.request_hibernate(why)

    @property
    def next_fire_at(self) -> float | None:
        """When the next time trigger fires (epoch seconds), if any."""
        return self.triggers.next_at

    @property
    def ending(self) -> bool:
        """Asked to stop, or it released the agent: this runner is on its way out."""
        return self.state.stop_reason is not None

    @property
    def quiet(self) -> bool:
        """Nothing running, nothing due, nothing queued: what `up --until-idle` waits for."""
        s = self.state
        if s.failed:
            return True
        return not s.busy and not s.queue and not s.cmds and s.phase is not Phase.PENDING

    @property
    def settled(self) -> bool:
        """Idle or hibernated between tasks with nothing queued: it can be handed to
        another daemon without cutting a task short (what a rebalance waits for)."""
        s = self.state
        return (
            s.phase in (Phase.IDLE, Phase.HIBERNATED)
            and not (s.busy or s.failed or s.queue or s.cmds or s.releasing)
            and s.stop_reason is None
            and s.hibernate_requested is None
        )

    def counters(self) -> dict[str, object]:
        """Fast-moving status fields, written only by the daemon's periodic flush.

        Every status field has one writer: these from the flush, task counts and phase
        from the runner itself, so a flush in flight can never overwrite a newer value.
        """
        return {
            "steps": self.steps,
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "last_activity": repr(self.last_activity),
        }

    def usage_delta(self) -> tuple[str, dict[str, float]]:
        """Usage since the last call, for the daily usage hash (UTC day), and reset it."""
        return self.usage.delta(self.phase)

    def task_counters(self) -> dict[str, object]:
        """Task outcome fields, written with the phase change that produced them."""
        return {
            "tasks_succeeded": self.tasks_succeeded,
            "tasks_failed": self.tasks_failed,
            "restarts": self.restarts,
            "consecutive_failures": self.consecutive_failures,
        }

    # The only changes of phase, queue and stop reason.

    def _apply_phase(self, edge: PhaseEvent) -> None:
        """Change phase without a write; the phase that ends is metered."""
        self.usage.phase_ends(self.state.phase)
        self.state.phase = transition(self.state.phase, edge)

    def _apply_started(self, *, hibernated: bool) -> None:
        """A runner took the agent (hibernated or waiting before: asleep still)."""
        self.state.phase = Phase.HIBERNATED if hibernated else Phase.PENDING
        self._apply_phase(PhaseEvent.START)

    def _apply_released(self, why: str) -> None:
        """The lease is given up: this runner ends without touching the agent again."""
        self.state.released = True
        self.state.stop_reason = self.state.stop_reason or StopReason.SHUTDOWN
        log.info("%s: %s; released", self.name, why)

    def _apply_lease_lost(self) -> None:
        self.state.stop_reason = StopReason.LEASE_LOST

    def _apply_failed(self) -> None:
        """``Failed``: nothing runs until an operator wakes the agent (the phase follows,
        once the slot is given back)."""
        self.state.failed = True

    def _apply_recovered(self) -> None:
        self.state.failed = False

    def move(self, edge: PhaseEvent, *, path: bool = False) -> Phase:
        """Change phase without a write (``path``: on the task's span too); the new one."""
        self._apply_phase(edge)
        if path:
            self.state.phase_path.append(self.state.phase.value)
        return self.state.phase

    async def set_phase(
        self,
        edge: PhaseEvent,
        part: Write = NOTHING,
        *,
        duplicate: Duplicate | None = None,
        defer: bool = False,
    ) -> bool:
        """Move to the next phase and record it with ``part`` (see :meth:`Writer.write` for
        the result); with ``defer`` the record rides with the runner's next write."""
        self.move(edge, path=True)
        # A new phase has its own reason and message, or none: never the last one's.
        fields: dict[str, object] = {
            "phase": self.state.phase.value,
            "updated_at": repr(self.clock()),
            "reason": "",
            "message": "",
            **(part.status or {}),
        }
        part = replace(part, status=fields)
        if defer:
            self.writer.defer(part)  # refuses an event: deferred parts must be safe to repeat
            return True
        return await self.writer.write(part, duplicate=duplicate)

    def queue_next(self, task: Task) -> None:
        """``task`` runs next (a retry, a parked task, a task a stop left queued)."""
        self.state.queue.appendleft(task)

    def queue_last(self, task: Task) -> None:
        """``task`` runs after what is queued."""
        self.state.queue.append(task)

    def take_queued(self, task_id: str) -> list[Task]:
        """Take the queued tasks of id ``task_id`` off the queue."""
        taken = [w for w in self.state.queue if w.id == task_id]
        for w in taken:
            self.state.queue.remove(w)
        return taken

    def next_due(self, *, pop: bool) -> Task | None:
        """The first queued task not parked into the future (taken off the queue if ``pop``)."""
        now = self.clock()
        for i, task in enumerate(self.state.queue):
            if task.not_before <= now:
                if pop:
                    del self.state.queue[i]
                return task
        return None

    # The runner's own loop.

    async def run(self) -> None:
        """Supervise the agent until it is asked to stop (or cancelled after a grace period).

        Agent faults never escape; the agent's status says what happened. On every
        way out the engine session is closed and the slot given back.
        """
        self.arbiter.register(self)
        try:
            try:
                await starting.start(self)
                await idling.loop(self)
            except* LeaseLost:
                self._apply_lease_lost()
            except* Exception as group:
                # A bug of the runtime, not of the agent: the agent is let go and activated
                # again after a backoff (error_delay_s), never at once in a hot loop.
                self.error = group.exceptions[0]
                log.error(
                    "%s: the runner failed: %s: %s; the agent is activated again in %.0fs",
                    self.name,
                    type(self.error).__name__,
                    self.error,
                    self.error_delay_s,
                    exc_info=self.error,
                )
            finally:
                # Runs on cancellation too: a daemon past its grace period still
                # records the stop and releases the lease.
                await releasing.stop(self, self.state.stop_reason or StopReason.SHUTDOWN)
        finally:
            self.session.drop()
            self.arbiter.unregister(self.name)
            # Cut short while releasing the agent (cancelled past the grace period, or
            # the stop's own time limit): the release is finished here, shielded.
            try:
                await releasing.complete_release(self)
            finally:
                self.done.set()

    async def _catch_up(self) -> None:
        """Fires that passed while no daemon ran the agent, per each trigger's catchUp."""
        await intake.enqueue(self, await intake.missed_fires(self), persist_schedule=True)

    async def wait_nudge(self, timeout_s: float | None) -> None:
        """Wait until nudged (a command, a stop) or ``timeout_s``; nothing deferred meanwhile."""
        await self.writer.flush()  # nothing is deferred across a wait
        if self.nudged.is_set():
            self.nudged = anyio.Event()
            return
        with anyio.move_on_after(math.inf if timeout_s is None else timeout_s):
            await self.nudged.wait()
        self.nudged = anyio.Event()

    async def until_stopped(self, op: Callable[[], Awaitable[_T]]) -> tuple[bool, _T | None]:
        """Run ``op`` unless a stop is requested first (then it is cancelled): (done, result)."""
        if self.state.stop_reason is not None:
            return False, None
        with anyio.CancelScope() as scope:
            self.stop_scopes.add(scope)
            try:
                return True, await op()
            finally:
                self.stop_scopes.discard(scope)
        return False, None
