"""What every part of an agent's runner shares: its fields, its controls, its I/O helpers.

:class:`RunnerBase` holds the runner's state (phase, queue, counters, session, writer)
and the small operations every job of the runner uses: phase changes written through
the fenced writer, waits that a stop request interrupts, state encoding, giving the
engine slot back. The jobs themselves are in :mod:`.tasking` (running a task),
:mod:`.faults` (what happens when one fails) and :mod:`.runner` (the loop, start,
hibernation and stop).
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, TypeVar

import anyio

from agentos.core.errors import DEFAULT_MAX_MESSAGE_BYTES, MessageTooLarge, NotFound
from agentos.core.fairness import QuotaExceeded
from agentos.core.lifecycle import Phase, PhaseEvent, StopReason, transition
from agentos.core.limits import TaskLimitExceeded, over_tokens
from agentos.core.modelspec import ModelPrices
from agentos.core.modelusage import call_cost, model_usage
from agentos.core.spec import AgentResource
from agentos.core.supervisor import RestartPolicy
from agentos.core.tasks import (
    Work,
    queued_record,
)
from agentos.core.triggers import TriggerClock
from agentos.core.waits import WaitRequested
from agentos.engine.base import (
    Completion,
    Engine,
    EngineError,
    EngineUnavailable,
    NoFreeSlot,
    Reply,
)
from agentos.governor.admission import Governor, Ticket
from agentos.runtime.hibernator import Hibernator
from agentos.runtime.loop import (
    AgentCodeError,
    EntrypointError,
    load_agent_class,
)
from agentos.runtime.routes import RouteEngine
from agentos.runtime.session import AgentSession
from agentos.runtime.slots import SlotArbiter
from agentos.runtime.spend import ClassSpend
from agentos.runtime.toolcalls import LedgerWriter
from agentos.runtime.usage import UsageMeter
from agentos.runtime.watchdog import Mark, Stall
from agentos.runtime.writer import Writer
from agentos.sdk import (
    Agent,
    Context,
    StateCodec,
)
from agentos.store import (
    AgentSnapshot,
    Duplicate,
    SendRefused,
    Store,
    StoreError,
    TaskWrite,
    Write,
)
from agentos.store.retry import new_op_id
from agentos.telemetry import Telemetry
from agentos.tools import ToolServerUnavailable

if TYPE_CHECKING:  # the mcp package is imported when a daemon starts, not by every CLI call
    from agentos.tools.mcp import ToolServerPool

__all__ = ["RunnerBase"]

log = logging.getLogger("agentos.runner")
_T = TypeVar("_T")
# Errors raised under agent code that are the infrastructure's, never the agent's.
INFRA_ERRORS = (NoFreeSlot, EngineUnavailable, StoreError, ToolServerUnavailable)


class RunnerBase:
    """The state and helpers of one agent's runner (see the module docstring)."""

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
        self.resource = resource
        # The daemon's MCP sessions, for the agent's spec.tools.servers (None: no servers).
        self.tool_servers = tool_servers
        self.ledger: LedgerWriter | None = None  # set with the agent's Context
        # What the daemon already read for this runner (batched with other agents'),
        # or None: the runner reads it as it starts.
        self.opened = opened
        self.governor = governor
        self.name = resource.metadata.name
        self.spec_hash = spec_hash
        self.lease_value = lease_value
        self.store = store
        self.engine = engine
        self.arbiter = arbiter
        self.daemon_id = daemon_id
        self.clock = clock
        self.telemetry = telemetry or Telemetry.disabled()
        self.writer = Writer(
            store, self.name, lease_value, daemon_id=daemon_id, clock=clock, retry_max_s=retry_max_s
        )
        self.session = AgentSession(
            self,
            engine=engine,
            arbiter=arbiter,
            hibernator=hibernator,
            writer=self.writer,
            keep_kv=resource.spec.hibernation.keep_kv,
            on_slow=self._slot_slow,
        )
        self.usage = UsageMeter(self.name, clock, self.telemetry)
        spec = resource.spec
        self.priority = spec.priority
        self._policy = RestartPolicy(
            spec.restart_policy.crash_loop_after,
            spec.restart_policy.backoff.initial,
            spec.restart_policy.backoff.max,
        )
        self.phase = Phase.PENDING
        self.stop_reason: StopReason | None = None
        self.hibernate_requested: str | None = None
        # Set while the agent is being released into the due index (its due time); the
        # daemon finishes the job if this runner is cancelled in between.
        self.release_due: float | None = None
        self.releasing = False
        self._evicting = False  # the slot arbiter asked for our slot
        # Slot lending (agentos.runtime.tasking.TaskMixin.away): while agent code runs
        # tools for lend_after_s or longer, the slot may go to an agent waiting for one.
        self.lend_after_s = lend_after_s
        self.lendable = False
        self.lent = 0  # how many times the slot was lent mid-task
        self._lend_asked = anyio.Event()
        self.failed = False
        self.busy = False
        self.task_over = anyio.Event()  # set (and renewed) each time a task ends
        self.last_activity = clock()
        self.done = anyio.Event()
        self._nudged = anyio.Event()
        self._queue: deque[Work] = deque()
        # The task running now and its cancel scope (`agentos tasks cancel` cuts it).
        self._running: tuple[Work, anyio.CancelScope] | None = None
        # Tasks cancelled while not running here (queued, starting, backing off, or
        # noted on their records): id -> (who, recorded already); each ends as it comes up.
        self._cancels: dict[str, tuple[str, bool]] = {}
        self._cmds: set[str] = set()
        self._triggers = TriggerClock(spec.triggers, now=clock())
        self._stop_scopes: set[anyio.CancelScope] = set()
        self._slow_slot = False
        self._uses_model = False  # has called the model (or has a stored context)
        # counters flushed to the status hash by the daemon
        self.steps = 0
        self.tasks_succeeded = 0
        self.tasks_failed = 0
        self.restarts = 0
        self.consecutive_failures = 0
        # Messages moved to the dead letters since the last task that succeeded.
        self.dead_letters_in_row = 0
        self.tokens_in = 0
        self.tokens_out = 0
        # What the running task has cost so far (its calls priced with each Model's
        # prices, the same prices `agentos usage` uses); reset when a task starts.
        self.task_cost = 0.0
        # Prices of a model by name (set by the daemon from its model pool).
        self.price_of: Callable[[str], ModelPrices] = lambda _model: ModelPrices()
        # The quota classes' money per day (set by the daemon; None: not enforced).
        self.spend: ClassSpend | None = None
        # The model that holds the agent's session: spec.model, or the route's home.
        self.home_model = spec.model
        if isinstance(engine, RouteEngine):
            self.home_model = engine.home
            engine.events = self._route_event
            engine.spent = lambda: self.task_cost
            engine.task_id = lambda: self.ctx.task.id if self.ctx is not None else ""
            engine.charge = self._on_usage
            engine.class_left = self._class_left
            engine.day_resets_in = lambda: (
                self.spend.resets_in(spec.quota_class) if self.spend is not None else 3600.0
            )
        self.dirty = False
        self._saved_state: bytes | None = None
        self.agent: Agent | None = None
        self.ctx: Context | None = None
        self.codec: StateCodec | None = None
        self._agent_cls: type[Agent] | None = None
        self._unacked: str | None = None
        self._unacked_key: str | None = None
        self._phase_path: list[str] = []
        self._task_tokens = (0, 0)
        self._over_tokens: str | None = None  # the task passed maxTokensPerTask
        self._interrupted = False  # cancelled in the middle of an iteration
        # Isolation: blocks of the event loop charged to this agent, not yet recorded
        # (agentos.runtime.watchdog), whether one happened during the current task, and
        # how many starts of each unfinished task were cut short before it ended.
        self._blocked: list[Stall] = []
        self._blocked_in_task = False
        self._mark: Mark | None = None
        self._interrupted_starts: dict[str, int] = {}
        self.lost_why = ""  # what the daemon found when the lease was lost
        # An unexpected error of the runner itself, and how long the agent then waits
        # before it is activated again (the daemon's backoff for this agent).
        self.error: BaseException | None = None
        self.error_delay_s = 1.0

    def nudge(self, cmd: str) -> None:
        """Tell the runner something happened: ``message``, ``wake`` or ``hibernate``."""
        if cmd == "hibernate":
            self.request_hibernate("requested by operator")
        else:
            self._cmds.add(cmd)
        self._nudged.set()

    def drop(self, task_id: str) -> None:
        """An operator dropped this task's message (``agentos tasks drop``): forget its
        queued work. A task already running it finishes (its record then says how)."""
        kept = [w for w in self._queue if w.id != task_id]
        if len(kept) != len(self._queue):
            self._queue = deque(kept)
            log.info("agent %s: task %s dropped before it ran", self.name, task_id)

    def cancel(self, task_id: str, by: str, *, dropped: bool = False) -> None:
        """An operator cancelled this task (``agentos tasks cancel``): cut it short if it
        runs now, or end it when its turn comes if it is queued here. Either way it ends
        ``cancelled`` with a ``TaskCancelled`` event, not retried and not a crash.
        ``dropped``: its message is gone and its record says so already (it only has to
        leave the queue)."""
        running = self._running
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
        while len(self._cancels) >= 1000:  # ids of tasks that ended meanwhile
            del self._cancels[next(iter(self._cancels))]
        self._cancels[task_id] = (by, dropped)
        self._nudged.set()

    def note_blocked(self, stall: Stall) -> None:
        """The watchdog found this agent's code blocking the event loop: recorded (and
        counted toward the crash loop) by the runner's own loop, between its writes."""
        self._blocked.append(stall)
        if self.busy:
            self._blocked_in_task = True
        self._nudged.set()

    @property
    def mark(self) -> Mark:
        """What the watchdog sees while this agent's code runs (one per agent class)."""
        module = self._agent_cls.__module__ if self._agent_cls is not None else ""
        if self._mark is None or self._mark.module != module:
            self._mark = Mark(self.name, module)
        return self._mark

    def request_hibernate(self, why: str) -> None:
        """Hibernate as soon as the agent is idle."""
        self.hibernate_requested = why
        self._nudged.set()

    def request_stop(self, reason: StopReason) -> None:
        """Stop at the next loop boundary; the agent sees ``reason`` as ``ctx.stopping``.

        A wait for a slot or a parked task's wait ends at once.
        """
        if self.stop_reason is None:
            self.stop_reason = reason
            if self.ctx is not None:
                self.ctx.stopping = reason
        for scope in self._stop_scopes:
            scope.cancel()
        self._nudged.set()

    def quota_changed(self) -> None:
        """The agent's class got new limits: tasks parked by a quota may be admitted now."""
        for work in self._queue:
            if work.parked_for in ("rate", "budget"):
                work.not_before = 0.0
        self._nudged.set()

    # The slot arbiter's view (agentos.runtime.slots.Holder).

    @property
    def evictable(self) -> bool:
        """Idle with nothing due, or running tools long enough to lend the slot: may be
        asked to give its slot back."""
        if self.stop_reason is not None or self.hibernate_requested is not None:
            return False
        if self.lendable:
            return True
        return self.phase is Phase.IDLE and not self.busy and self._next_due(pop=False) is None

    def evict(self, why: str) -> None:
        """The arbiter needs our slot: hibernate now (we are idle), or lend it (tools)."""
        self._evicting = True
        if self.lendable:
            self.hibernate_requested = why
            self._lend_asked.set()
            return
        self.request_hibernate(why)

    @property
    def next_fire_at(self) -> float | None:
        """When the next time trigger fires (epoch seconds), if any."""
        return self._triggers.next_at

    @property
    def ending(self) -> bool:
        """Asked to stop, or it released the agent: this runner is on its way out."""
        return self.stop_reason is not None

    @property
    def quiet(self) -> bool:
        """Nothing running, nothing due, nothing queued: what `up --until-idle` waits for."""
        if self.failed:
            return True
        return (
            not self.busy and not self._queue and not self._cmds and self.phase is not Phase.PENDING
        )

    @property
    def settled(self) -> bool:
        """Idle or hibernated between tasks with nothing queued: it can be handed to
        another daemon without cutting a task short (what a rebalance waits for)."""
        return (
            self.phase in (Phase.IDLE, Phase.HIBERNATED)
            and not self.busy
            and not self.failed
            and not self._queue
            and not self._cmds
            and self.stop_reason is None
            and self.hibernate_requested is None
            and not self.releasing
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

    def _queued_write(self, work: Work) -> TaskWrite:
        now = self.clock()
        return TaskWrite(work.id, queued_record(work, self.name, now), created_at=now)

    async def _wait(self, timeout_s: float | None) -> None:
        await self.writer.flush()  # nothing is held back across a wait
        if self._nudged.is_set():
            self._nudged = anyio.Event()
            return
        with anyio.move_on_after(math.inf if timeout_s is None else timeout_s):
            await self._nudged.wait()
        self._nudged = anyio.Event()

    async def _until_stopped(self, op: Callable[[], Awaitable[_T]]) -> tuple[bool, _T | None]:
        """Run ``op`` unless a stop is requested first (then it is cancelled): (done, result)."""
        if self.stop_reason is not None:
            return False, None
        with anyio.CancelScope() as scope:
            self._stop_scopes.add(scope)
            try:
                return True, await op()
            finally:
                self._stop_scopes.discard(scope)
        return False, None

    def _slot_slow(self) -> None:
        self._slow_slot = True
        log.info("%s: still waiting for an engine slot", self.name)

    def _encode_state(self) -> bytes | None:
        """The state's bytes if they differ from what Redis holds, else None."""
        assert self.codec is not None
        assert self.ctx is not None
        data = self.codec.encode(self.ctx.state)
        return None if data == self._saved_state else data

    @asynccontextmanager
    async def _admit(
        self, estimate: Callable[[], int], timeout_s: float | None
    ) -> AsyncIterator[Ticket]:
        """Admit one model call: the class's money for the day first (a routed call is
        checked by its route, which prices each candidate), then the governor."""
        assert self.governor is not None
        quota_class = self.resource.spec.quota_class
        if not isinstance(self.engine, RouteEngine):
            left = await self._class_left()
            if left is not None:
                prices = self.price_of(self.home_model)
                projected = estimate() * max(prices.input, prices.output) / 1000
                if projected > left:
                    assert self.spend is not None
                    raise QuotaExceeded(
                        kind="budget",
                        scope="class",
                        quota_class=quota_class,
                        limit="dailyCost",
                        retry_after_s=self.spend.resets_in(quota_class),
                        agent=self.name,
                    )
        async with self.governor.call(
            agent=self.name,
            quota_class=quota_class,
            priority=self.priority,
            estimate=estimate,
            timeout_s=timeout_s,
            model=self.home_model,
        ) as ticket:
            yield ticket

    async def _class_left(self) -> float | None:
        """What the agent's quota class may still spend today (None: no dailyCost)."""
        if self.spend is None:
            return None
        return await self.spend.left(self.resource.spec.quota_class)

    async def _route_event(self, type_: str, reason: str, message: str) -> None:
        """An event of the agent's route (Routed, Escalated, RouteExhausted)."""
        await self.writer.write(event=self.writer.event(type_, reason, message))

    def _on_usage(self, completion: Completion | Reply) -> None:
        self._uses_model = True
        self.tokens_in += completion.input_tokens
        self.tokens_out += completion.output_tokens
        if self.busy:  # in a task: its token limit (raised under agent code, after metering)
            used = self.tokens_in + self.tokens_out - sum(self._task_tokens)
            self._over_tokens = over_tokens(self.resource.spec.limits, used)
        self.usage.add(tokens_in=completion.input_tokens, tokens_out=completion.output_tokens)
        model = completion.served_by or self.home_model
        self.usage.add(
            **model_usage(
                model,
                tokens_in=completion.input_tokens,
                cached=completion.cached_tokens,
                tokens_out=completion.output_tokens,
            )
        )
        cost = call_cost(
            self.price_of(model),
            tokens_in=completion.input_tokens,
            cached=completion.cached_tokens,
            tokens_out=completion.output_tokens,
        )
        self.task_cost += cost
        if self.spend is not None:
            self.spend.add(self.resource.spec.quota_class, cost)
        self.dirty = True
        if self._over_tokens is not None:
            reason, self._over_tokens = self._over_tokens, None
            raise TaskLimitExceeded(reason)

    async def _release_slot(self) -> dict[str, object]:
        """Save the context (if it changed) and give the slot back; status fields to write.

        Whatever the reason, a slot the arbiter asked for is then given: its request ends.
        """
        try:
            if not self.session.open:
                return {}
            try:
                saved = await self.session.release()
            except EngineError as e:
                log.warning("%s: could not export the KV (%s); not saved", self.name, e)
                return {}
            if saved is None:
                return {}
            self.telemetry.kv_bytes.add(saved.stored_bytes - self.usage.kv_stored)
            self.usage.set_kv_stored(saved.stored_bytes)
            return saved.status
        finally:
            if self._evicting:
                self._evicting = False
                self.hibernate_requested = None
                self.arbiter.eviction_over(self.name)

    def _move(self, edge: PhaseEvent) -> None:
        """Change phase without a write; the phase that ends is metered."""
        self.usage.phase_ends(self.phase)
        self.phase = transition(self.phase, edge)

    async def _set_phase(
        self,
        edge: PhaseEvent,
        *,
        status: dict[str, object] | None = None,
        state: bytes | None = None,
        ack_id: str | None = None,
        event: dict[str, str] | None = None,
        task: TaskWrite | None = None,
        duplicate: Duplicate | None = None,
        hold: bool = False,
    ) -> bool:
        """Move to the next phase and record it (see :meth:`Writer.write` for the result);
        with ``hold`` the record rides with the runner's next write (:meth:`Writer.defer`)."""
        self._move(edge)
        self._phase_path.append(self.phase.value)
        # A new phase has its own reason and message, or none: never the last one's.
        fields: dict[str, object] = {
            "phase": self.phase.value,
            "updated_at": repr(self.clock()),
            "reason": "",
            "message": "",
        }
        if status:
            fields.update(status)
        if hold:
            tasks = (task,) if task is not None else ()
            part = Write(status=fields, event=event, state=state, ack_id=ack_id, tasks=tasks)
            self.writer.defer(part)  # refuses an event: held parts must be safe to repeat
            return True
        return await self.writer.write(
            status=fields, state=state, ack_id=ack_id, event=event, task=task, duplicate=duplicate
        )

    async def _send(self, agent: str, body: str) -> str:
        """``ctx.send``: checked like ``agentos send`` (the agent exists, the message fits
        its inbox, the inbox is not full), so a misspelled name leaves no orphan stream.
        Raises :class:`NotFound`, :class:`MessageTooLarge` or ``InboxFull`` to the agent."""
        # One send id for every retry: a send whose reply was lost is not sent twice.
        send_id = new_op_id()
        try:
            return await self.writer.call(
                lambda: self.store.send(
                    agent, body, send_id=send_id, check_limit=DEFAULT_MAX_MESSAGE_BYTES
                ),
                "send",
            )
        except SendRefused as e:
            if e.limit is None:
                raise NotFound(f'agent "{agent}" not found') from None
            raise MessageTooLarge(agent, len(body.encode()), e.limit) from None

    def _next_due(self, *, pop: bool) -> Work | None:
        """The first queued work not parked into the future (taken off the queue if ``pop``)."""
        now = self.clock()
        for i, work in enumerate(self._queue):
            if work.not_before <= now:
                if pop:
                    del self._queue[i]
                return work
        return None

    async def _load_class(self) -> bool:
        """Import the entrypoint's Agent class; ``Failed`` (not retried) when it is wrong."""
        spec = self.resource.spec
        try:
            self._agent_cls, reload_error = load_agent_class(
                spec.entrypoint, code_path=spec.code_path, code_hash=spec.code_hash
            )
            self.codec = StateCodec(self._agent_cls.State)
        except (EntrypointError, TypeError) as e:
            await self._fail("EntrypointError", str(e), "")
            return False
        if reload_error is not None:
            message = f"the new code did not load, the previous code keeps running: {reload_error}"
            log.warning("%s: %s", self.name, message)
            await self.writer.write(event=self.writer.event("CodeReloadFailed", "code", message))
        return True

    # Jobs of the other parts, called across them.

    async def _on_fault(self, failure: AgentCodeError, work: Work, *, infra: bool = False) -> None:
        raise NotImplementedError  # agentos.runtime.faults

    async def _fail(self, reason: str, message: str, tb: str) -> None:
        raise NotImplementedError  # agentos.runtime.faults

    async def _charge_blocked(self) -> None:
        raise NotImplementedError  # agentos.runtime.faults

    async def _abandon(self, work: Work, starts: int) -> None:
        raise NotImplementedError  # agentos.runtime.faults

    async def _instantiate(self, raw: bytes | None = None) -> bool:
        raise NotImplementedError  # agentos.runtime.runner

    def _begin_waits(self, work: Work) -> None:
        raise NotImplementedError  # agentos.runtime.waits

    async def _park_wait(self, work: Work, request: WaitRequested) -> None:
        raise NotImplementedError  # agentos.runtime.waits

    async def _park_budget(self, work: Work, error: QuotaExceeded, resume_at: float) -> None:
        raise NotImplementedError  # agentos.runtime.waits
