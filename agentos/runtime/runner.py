"""The supervisor of one agent inside a daemon: its loop, its restarts, its sleep and wake.

A runner owns an agent while its daemon holds the agent's lease. It turns wake-ups
(the start, inbox messages, heartbeats, schedules, an operator's `wake`) into tasks,
runs each task's observe/plan/act/learn loop, saves the agent's state after every
iteration that changed it, restarts the agent with exponential backoff when its code
raises, and gives up (``Failed``) after ``crashLoopAfter`` failures in a row. An idle
agent is hibernated after ``idleAfter``: its engine KV goes to Redis and its slot is
freed; the next task restores it.

Every write goes through the store's fenced script with the runner's lease value, so a
runner whose daemon lost the lease cannot overwrite the agent's new owner.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import anyio

from agentos.core.fairness import QuotaExceeded, Waiter, pick
from agentos.core.hibernation import CostMeter, SlotHolder, choose_victim, decide_keep_kv
from agentos.core.lifecycle import Phase, PhaseEvent, StopReason, on_failure, transition
from agentos.core.spec import AgentResource
from agentos.core.triggers import TriggerClock
from agentos.engine.base import Completion, Engine, EngineError, NoFreeSlot
from agentos.governor.admission import Governor, Ticket
from agentos.runtime.loop import (
    AgentCodeError,
    EntrypointError,
    TaskResult,
    load_agent_class,
    no_span,
    run_task,
)
from agentos.sdk import (
    LLM,
    Agent,
    Context,
    Message,
    StateCodec,
    TaskInfo,
    agent_logger,
    freeze_config,
)
from agentos.store import InboxMessage, LoadedSnapshot, Store, StoreUnavailable, TaskWrite
from agentos.telemetry import Telemetry

__all__ = ["AgentRunner", "LeaseLost", "SlotArbiter"]

log = logging.getLogger("agentos.runner")
_T = TypeVar("_T")
_ACTIVE = {Phase.RUNNING, Phase.IDLE, Phase.WAKING, Phase.HIBERNATING}


class LeaseLost(Exception):
    """The agent's lease is no longer ours; stop touching it."""


class SlotArbiter:
    """Hands out engine slots fairly, hibernating idle agents when a runner needs one.

    Runners waiting for a slot are served in the governor's fair order (strict
    priority, then least attained service, then longest waiting). The victim is an idle
    agent holding a session: lowest priority, most attained service, least recently
    active first; never one in the middle of a task.
    """

    def __init__(self, engine: Engine, governor: Governor | None = None) -> None:
        self.engine = engine
        self.governor = governor
        self.runners: dict[str, AgentRunner] = {}
        self.meter = CostMeter()  # store bandwidth and prefill speed, measured as we go
        self.waiting: dict[str, Waiter] = {}

    def attained(self, name: str) -> float:
        """Recent service of ``name`` as the governor measured it (0 without one)."""
        return 0.0 if self.governor is None else self.governor.attained.value(name, time.time())

    async def open(self, requester: AgentRunner, *, timeout_s: float = 30.0) -> None:
        """Open ``requester``'s session, hibernating others to make room if needed.

        Raises :class:`NoFreeSlot` when no slot frees up within ``timeout_s``.
        """
        me = Waiter(
            requester.name, requester.priority, self.attained(requester.name), time.monotonic()
        )
        self.waiting[requester.name] = me
        try:
            with anyio.move_on_after(timeout_s):
                while True:
                    if pick(list(self.waiting.values())) is me:
                        try:
                            self.engine.open_session(requester.name)
                            return
                        except NoFreeSlot:
                            pass
                        victim = self._choose(requester)
                        if victim is not None:
                            victim.request_hibernate("slot needed by " + requester.name)
                    await anyio.sleep(0.02)
        finally:
            if self.waiting.get(requester.name) is me:
                del self.waiting[requester.name]
        raise NoFreeSlot(f"no engine slot became free within {timeout_s:g}s for {requester.name}")

    def _choose(self, requester: AgentRunner) -> AgentRunner | None:
        holders = [
            SlotHolder(
                r.name,
                r.priority,
                r.last_activity,
                idle=r.phase is Phase.IDLE and not r.hibernate_requested,
                attained=self.attained(r.name),
            )
            for r in self.runners.values()
            if self.engine.has_session(r.name)
        ]
        victim = choose_victim(holders, exclude=requester.name)
        return None if victim is None else self.runners[victim]


@dataclass(slots=True)
class _Work:
    """A wake-up waiting to run; ``id`` is its task record's id."""

    trigger: str
    message: InboxMessage | None = None
    attempt: int = 1
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    scheduled_at: float | None = None
    index: int | None = None  # the time trigger that fired, if any
    recorded: bool = False  # a task record exists already (queued)
    queued_at: float | None = None


def _inbox_work(message: InboxMessage) -> _Work:
    # The message id is the task id: a redelivered message is the same task, retried.
    return _Work("inbox", message, id=f"m-{message.id}")


def _short(value: Any, limit: int = 200) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


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
        daemon_id: str,
        clock: Callable[[], float] = time.time,
        retry_max_s: float = 5.0,
        task_retention: tuple[int, float] = (1000, 7 * 86400.0),
        telemetry: Telemetry | None = None,
        governor: Governor | None = None,
    ) -> None:
        self.resource = resource
        self.governor = governor
        self.name = resource.metadata.name
        self.spec_hash = spec_hash
        self.lease_value = lease_value
        self.store = store
        self.engine = engine
        self.arbiter = arbiter
        self.daemon_id = daemon_id
        self.clock = clock
        self.retry_max_s = retry_max_s
        self.task_retention = task_retention
        self.telemetry = telemetry or Telemetry.disabled()
        # Metering: amounts not yet written to the agent's daily usage hash.
        self._usage: dict[str, float] = {}
        self._phase_since = clock()
        self._metered_at = clock()
        self._kv_stored = 0  # bytes of the committed snapshot in Redis
        spec = resource.spec
        self.priority = spec.priority
        self.phase = Phase.PENDING
        self.stop_reason: StopReason | None = None
        self.hibernate_requested: str | None = None
        self.failed = False
        self.busy = False
        self.last_activity = clock()
        self.done = anyio.Event()
        self._nudged = anyio.Event()
        self._queue: deque[_Work] = deque()
        self._cmds: set[str] = set()
        self._triggers = TriggerClock(spec.triggers, now=clock())
        # counters flushed to the status hash by the daemon
        self.steps = 0
        self.tasks_succeeded = 0
        self.tasks_failed = 0
        self.restarts = 0
        self.consecutive_failures = 0
        self.tokens_in = 0
        self.tokens_out = 0
        self.dirty = False
        self._saved_state: bytes | None = None
        self.agent: Agent | None = None
        self.ctx: Context | None = None
        self.codec: StateCodec | None = None
        self._agent_cls: type[Agent] | None = None
        self._unacked: str | None = None
        self._unacked_key: str | None = None
        self._span: Any = None
        self._phase_path: list[str] = []
        self._task_tokens = (0, 0)
        self._completed = 0
        self._interrupted = False  # cancelled in the middle of an iteration
        self._snapshot_tokens = -1  # context length covered by the stored snapshot

    # ------------------------------------------------------------------ control

    def nudge(self, cmd: str) -> None:
        """Tell the runner something happened: ``message``, ``wake`` or ``hibernate``."""
        if cmd == "hibernate":
            self.request_hibernate("requested by operator")
        else:
            self._cmds.add(cmd)
        self._nudged.set()

    def request_hibernate(self, why: str) -> None:
        """Hibernate as soon as the agent is idle."""
        self.hibernate_requested = why
        self._nudged.set()

    def request_stop(self, reason: StopReason) -> None:
        """Stop at the next loop boundary; the agent sees ``reason`` as ``ctx.stopping``."""
        if self.stop_reason is None:
            self.stop_reason = reason
            if self.ctx is not None:
                self.ctx.stopping = reason
        self._nudged.set()

    @property
    def next_fire_at(self) -> float | None:
        """When the next time trigger fires (epoch seconds), if any."""
        return self._triggers.next_at

    @property
    def quiet(self) -> bool:
        """Nothing running, nothing queued: what `up --until-idle` waits for."""
        if self.failed:
            return True
        return (
            not self.busy and not self._queue and not self._cmds and self.phase is not Phase.PENDING
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
        """Usage since the last call, for the daily usage hash (UTC day), and reset it.

        Active time is wall time not hibernated (nor stopped, failed or pending); KV
        byte-seconds accrue for the committed snapshot while it is stored.
        """
        now = self.clock()
        if self.phase in _ACTIVE:
            self._usage["active_s"] = self._usage.get("active_s", 0.0) + now - self._phase_since
        self._phase_since = now
        self.usage_flush_kv()
        delta, self._usage = self._usage, {}
        if delta.get("active_s"):
            self.telemetry.active_seconds.add(delta["active_s"], {"gen_ai.agent.name": self.name})
        return time.strftime("%Y-%m-%d", time.gmtime(now)), delta

    def usage_flush_kv(self) -> None:
        """Accrue KV byte-seconds for the stored size up to now (before it changes)."""
        now = self.clock()
        self._usage["kv_byte_s"] = self._usage.get("kv_byte_s", 0.0) + self._kv_stored * (
            now - self._metered_at
        )
        self._metered_at = now

    def restore_usage(self, amounts: dict[str, float]) -> None:
        """Put back usage a failed flush could not write."""
        for k, v in amounts.items():
            self._usage[k] = self._usage.get(k, 0.0) + v

    def _meter(self, **amounts: float) -> None:
        for k, v in amounts.items():
            self._usage[k] = self._usage.get(k, 0.0) + v
        self.dirty = True

    def task_counters(self) -> dict[str, object]:
        """Task outcome fields, written with the phase change that produced them."""
        return {
            "tasks_succeeded": self.tasks_succeeded,
            "tasks_failed": self.tasks_failed,
            "restarts": self.restarts,
            "consecutive_failures": self.consecutive_failures,
        }

    # ------------------------------------------------------------------ main

    async def run(self) -> None:
        """Supervise the agent until it is asked to stop (or cancelled after a grace period).

        Agent faults never escape; the agent's status says what happened.
        """
        try:
            try:
                await self._start()
                await self._loop()
            except LeaseLost:
                self.stop_reason = StopReason.LEASE_LOST
            finally:
                # Runs on cancellation too: a daemon past its grace period still
                # records the stop and releases the lease.
                with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                    try:
                        await self._finish()
                    except LeaseLost:
                        log.warning("%s: lease lost while stopping", self.name)
                    except StoreUnavailable as e:
                        log.warning("%s: could not record the stop: %s", self.name, e)
        finally:
            self.done.set()

    async def _start(self) -> None:
        snapshot = await self._retry(lambda: self.store.open_agent(self.name, self.daemon_id))
        prior = snapshot.status
        self.restarts = int(prior.get("restarts", 0) or 0)
        self.tasks_succeeded = int(prior.get("tasks_succeeded", 0) or 0)
        self.tasks_failed = int(prior.get("tasks_failed", 0) or 0)
        self.steps = int(prior.get("steps", 0) or 0)
        self.tokens_in = int(prior.get("tokens_in", 0) or 0)
        self.tokens_out = int(prior.get("tokens_out", 0) or 0)
        previous_owner = prior.get("owner", "")
        self._kv_stored = int(prior.get("kv_bytes") or 0)
        was_hibernated = prior.get("phase") == Phase.HIBERNATED.value
        try:
            self._agent_cls = load_agent_class(self.resource.spec.entrypoint)
            self.codec = StateCodec(self._agent_cls.State)
        except (EntrypointError, TypeError) as e:
            await self._fail("EntrypointError", str(e), "")
            return
        if not await self._instantiate(snapshot.state):
            return
        claimed, pending = snapshot.claimed, snapshot.pending
        for msg in pending:
            self._queue.append(_inbox_work(msg))
        self._triggers = TriggerClock(
            self.resource.spec.triggers, now=self.clock(), stored=snapshot.schedule
        )
        await self._resume_unfinished(snapshot.unfinished, {m.id for m in pending})
        self.phase = Phase.HIBERNATED if was_hibernated else Phase.PENDING
        self.phase = transition(self.phase, PhaseEvent.START)
        adopted = bool(previous_owner) and previous_owner != self.daemon_id
        message = f"started by {self.daemon_id}"
        if adopted:
            message = f"adopted from {previous_owner} by {self.daemon_id}"
        if claimed:
            message += f"; {claimed} unacknowledged message(s) taken over"
        await self._write(
            status={
                "phase": self.phase.value,
                "owner": self.daemon_id,
                "spec_hash": self.spec_hash,
                "started_at": repr(self.clock()),
                "reason": "Adopted" if adopted else "Started",
                "message": message,
            },
            clear=("last_error", "last_traceback") if prior.get("phase") != "Failed" else (),
            event=self._event("Adopted" if adopted else "Started", "", message),
        )
        await self._catch_up()
        if not was_hibernated and not self._queue:
            self._queue.append(_Work("start"))
        # Messages that arrived while no daemon ran the agent.
        self._cmds.add("message")
        self._nudged.set()

    async def _resume_unfinished(self, records: list[dict[str, str]], pending: set[str]) -> None:
        """Deal with tasks a dead owner left queued or running: run them again, or close them."""
        for record in records:
            task_id, trigger = record.get("id", ""), record.get("trigger", "")
            if trigger == "inbox":
                if record.get("message_id") in pending:
                    continue  # the message is pending: it runs again as the same task
                # Its message was acknowledged with the state it produced: the work is done;
                # only the record's last write was lost with the old owner.
                await self._write(
                    task=TaskWrite(
                        task_id,
                        {
                            "status": "succeeded",
                            "finished_at": repr(self.clock()),
                            "result": "completed; its owner died before recording the end",
                        },
                    )
                )
                continue
            attempt = int(record.get("attempt") or 0) + 1
            index = record.get("trigger_index")
            scheduled = record.get("scheduled_at")
            self._queue.append(
                _Work(
                    trigger,
                    attempt=attempt,
                    id=task_id,
                    index=int(index) if index else None,
                    scheduled_at=float(scheduled) if scheduled else None,
                    recorded=True,
                )
            )

    async def _catch_up(self) -> None:
        """Fires that passed while no daemon ran the agent, per each trigger's catchUp."""
        clock = self._triggers
        for missed in clock.missed:
            verdict = {
                "skip": "none run",
                "one": "the latest runs",
                "all": f"{missed.run} run",
            }[missed.policy]
            await self._write(
                event=self._event(
                    "MissedFires",
                    f"catchUp: {missed.policy}",
                    f"{missed.count} fire(s) of {missed.kind} trigger #{missed.index} passed "
                    f"while no daemon ran the agent; {verdict}",
                )
            )
        works = [_Work(f.kind, scheduled_at=f.at, index=f.index) for f in clock.catch_up]
        await self._enqueue(works, persist_schedule=True)

    async def _enqueue(self, works: list[_Work], *, persist_schedule: bool = False) -> None:
        """Record each wake-up as a queued task before it runs, then queue it.

        With ``persist_schedule`` the triggers' next fire times are stored in the same
        write, so a fire is never both lost and moved past.
        """
        schedule = self._triggers.persisted() if persist_schedule else None
        for i, work in enumerate(works):
            await self._write(
                task=self._queued_record(work), schedule=schedule if i == len(works) - 1 else None
            )
            work.recorded = True
            work.queued_at = self.clock()
            self._queue.append(work)
        if not works and schedule:
            await self._write(schedule=schedule)

    def _queued_record(self, work: _Work) -> TaskWrite:
        now = self.clock()
        fields: dict[str, object] = {
            "id": work.id,
            "agent": self.name,
            "trigger": work.trigger,
            "status": "queued",
            "created_at": repr(now),
            "attempt": work.attempt - 1,
        }
        if work.message is not None:
            fields |= {
                "message_id": work.message.id,
                "payload": _short(work.message.body),
                "key": work.message.key or "",
            }
        if work.scheduled_at is not None:
            fields["scheduled_at"] = repr(work.scheduled_at)
        if work.index is not None:
            fields["trigger_index"] = work.index
        return TaskWrite(work.id, fields, created_at=now)

    async def _instantiate(self, raw: bytes | None = None) -> bool:
        """Create a fresh agent instance with its saved state (given, or read from Redis)."""
        assert self._agent_cls is not None
        assert self.codec is not None
        if raw is None:
            raw = await self._retry(lambda: self.store.load_state(self.name))
        try:
            state = self.codec.decode(raw) if raw is not None else self.codec.new()
        except Exception as e:
            await self._fail(
                "StateError",
                f"stored state does not fit {self._agent_cls.__name__}.State: {e}",
                "",
            )
            return False
        try:
            self.agent = self._agent_cls()
        except Exception as e:
            err = AgentCodeError("__init__", e)
            await self._fail("AgentError", str(err), err.tb)
            return False
        self._saved_state = raw
        spec = self.resource.spec
        llm = LLM(
            self.engine,
            self.name,
            ensure_session=self._ensure_session,
            on_usage=self._on_usage,
            telemetry=self.telemetry,
            admit=self._admit if self.governor is not None else None,
        )
        self.ctx = Context(
            name=self.name,
            llm=llm,
            state=state,
            config=freeze_config(spec.config),
            task=TaskInfo(id="", trigger="start"),
            log=agent_logger(self.name),
            stopping=self.stop_reason,
            _sender=self._send,
            _telemetry=self.telemetry,
        )
        return True

    async def _loop(self) -> None:
        while self.stop_reason is None:
            if self.failed:
                await self._wait(None)
                if "wake" in self._cmds:
                    self._cmds.discard("wake")
                    await self._recover()
                continue
            work = self._queue.popleft() if self._queue else None
            if work is not None:
                await self._run_work(work)
                continue
            if self.hibernate_requested and self.phase is Phase.IDLE:
                await self._hibernate(self.hibernate_requested)
                continue
            self.hibernate_requested = (
                None if self.phase is Phase.HIBERNATED else self.hibernate_requested
            )
            now = self.clock()
            deadline = self._triggers.next_at
            idle_after = self.resource.spec.hibernation.idle_after
            if self.phase is Phase.IDLE:
                idle_deadline = self.last_activity + idle_after
                if idle_deadline <= now:
                    await self._hibernate(f"idle for {idle_after:g}s")
                    continue
                deadline = idle_deadline if deadline is None else min(deadline, idle_deadline)
            await self._wait(None if deadline is None else max(0.0, deadline - now))
            await self._collect()

    async def _wait(self, timeout_s: float | None) -> None:
        if self._nudged.is_set():
            self._nudged = anyio.Event()
            return
        with anyio.move_on_after(math.inf if timeout_s is None else timeout_s):
            await self._nudged.wait()
        self._nudged = anyio.Event()

    async def _collect(self) -> None:
        """Turn commands and due triggers into queued work."""
        if "message" in self._cmds:
            self._cmds.discard("message")
            new = await self._retry(
                lambda: self.store.read_inbox(self.name, self.daemon_id, count=100)
            )
            await self._enqueue([_inbox_work(m) for m in new])
            if len(new) == 100:
                self._cmds.add("message")
                self._nudged.set()
        if "wake" in self._cmds:
            self._cmds.discard("wake")
            await self._enqueue([_Work("wake")])
        fires = self._triggers.due_fires(self.clock())
        if fires:
            # Heartbeats only ask observe: they get a record if it finds work.
            self._queue.extend(_Work("heartbeat") for f in fires if f.kind == "heartbeat")
            timed = [
                _Work(f.kind, scheduled_at=f.at, index=f.index)
                for f in fires
                if f.kind != "heartbeat"
            ]
            await self._enqueue(timed, persist_schedule=True)

    # ------------------------------------------------------------------ tasks

    async def _run_work(self, work: _Work) -> None:
        assert self.agent is not None
        assert self.ctx is not None
        message = None
        if work.message is not None:
            m = work.message
            message = Message(m.id, m.body, m.key, m.sent_at, m.traceparent)
            key = m.key or ""
            done = bool(key) and await self._retry(
                lambda: self.store.idempotency_done(self.name, key)
            )
            if done:
                await self._write(
                    ack_id=m.id,
                    task=TaskWrite(
                        work.id,
                        {
                            "status": "skipped",
                            "finished_at": repr(self.clock()),
                            "result": f"duplicate: idempotency key {m.key!r} already completed",
                        },
                        created_at=None if work.recorded else self.clock(),
                    ),
                )
                return
        task = TaskInfo(
            id=work.id,
            trigger=work.trigger,
            attempt=work.attempt,
            message=message,
            started_at=self.clock(),
        )
        self.ctx.begin(task)
        first_observation: Any = None
        if work.trigger in ("heartbeat", "start"):
            # A heartbeat (or a start) only asks; an agent with nothing to do stays as it
            # is, asleep or idle, and costs nothing: no task, no record, no model call.
            try:
                first_observation = await self.agent.observe(self.ctx)
            except Exception as e:
                await self._crashed(AgentCodeError("observe", e), work)
                return
            if first_observation is None:
                return
        self._phase_path = [self.phase.value]
        if self.phase is Phase.HIBERNATED:
            await self._wake(work.trigger)
        traceparent = work.message.traceparent if work.message is not None else None
        with self.telemetry.task(
            agent=self.name,
            agent_id=self.resource.metadata.name,
            task_id=work.id,
            trigger=work.trigger,
            attempt=work.attempt,
            daemon_id=self.daemon_id,
            provider=self.engine.name,
            traceparent=traceparent,
        ) as span:
            self._span = span
            self.busy = True
            self._task_tokens = (self.tokens_in, self.tokens_out)
            started = self.clock()
            if work.queued_at is not None:
                self.telemetry.queue_wait.record(
                    started - work.queued_at, {"gen_ai.agent.name": self.name}
                )
            record: dict[str, object] = {
                "status": "running",
                "started_at": repr(started),
                "attempt": work.attempt,
            }
            if not work.recorded:
                record = {**self._queued_record(work).fields, **record}
            try:
                await self._set_phase(
                    PhaseEvent.TASK,
                    status={"task": task.id, "trigger": task.trigger},
                    task=TaskWrite(work.id, record, created_at=None if work.recorded else started),
                )
                work.recorded = True
                self._unacked = work.message.id if work.message is not None else None
                self._unacked_key = work.message.key if work.message is not None else None
                scope = anyio.CancelScope()
                result: TaskResult | None = None
                failure: AgentCodeError | None = None
                agent, ctx = self.agent, self.ctx

                async def body(tg: anyio.abc.TaskGroup) -> None:
                    nonlocal result, failure
                    with scope:
                        try:
                            result = await run_task(
                                agent,
                                ctx,
                                after_step=self._after_step,
                                first_observation=first_observation,
                                # Disabled telemetry must cost nothing per loop step.
                                phase_span=self.telemetry.span
                                if self.telemetry.enabled
                                else no_span,
                            )
                        except AgentCodeError as e:
                            failure = e
                    tg.cancel_scope.cancel()

                try:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(self._watch_overlaps, work, scope)
                        await body(tg)
                except anyio.get_cancelled_exc_class():
                    self._interrupted = True
                    raise
                if failure is not None:
                    Telemetry.fail(span, failure.error)
                    span.set_attribute("agentos.task.phase", failure.phase)
                    if isinstance(failure.error, QuotaExceeded):
                        await self._throttled(failure.error, work)
                    else:
                        await self._crashed(failure, work)
                    return
                if result is None:  # cancelled by a newer fire of the same trigger
                    await self._finish_task(
                        work, "cancelled", "cancelled by a newer fire (overlap)"
                    )
                    return
                if result.stopped and result.steps == 0:
                    # Stopped before doing anything: the task stays queued for the next owner.
                    self._unacked = None
                    self._queue.appendleft(work)
                    self.phase = transition(self.phase, PhaseEvent.IDLE)
                    await self._write(task=TaskWrite(work.id, {"status": "queued"}))
                    return
                self.consecutive_failures = 0
                if result.steps:
                    # A wake-up whose first observe found nothing to do is not a task.
                    self.tasks_succeeded += 1
                    self._meter(tasks_succeeded=1)
                span.set_attribute("agentos.task.steps", result.steps)
                self.last_activity = self.clock()
                summary = _short(result.outcome) if result.steps else "nothing to do"
                await self._finish_task(work, "succeeded", summary, steps=result.steps)
                self._completed += 1
                if self._completed % 50 == 0:
                    keep, age = self.task_retention
                    await self._retry(
                        lambda: self.store.trim_tasks(self.name, keep=keep, max_age_s=age)
                    )
            finally:
                self.busy = False
                span.set_attribute("agentos.phase_path", " > ".join(self._phase_path))

    async def _finish_task(self, work: _Work, status: str, result: str, *, steps: int = 0) -> None:
        """Back to Idle, with the task's outcome, its state and its ack in one write."""
        self.telemetry.tasks.add(1, {"agentos.task.status": status, "gen_ai.agent.name": self.name})
        state = self._encode_state()
        tokens_in = self.tokens_in - self._task_tokens[0]
        tokens_out = self.tokens_out - self._task_tokens[1]
        await self._set_phase(
            PhaseEvent.IDLE,
            status=self.task_counters(),
            state=state,
            ack_id=self._unacked,
            task=TaskWrite(
                work.id,
                {
                    "status": status,
                    "finished_at": repr(self.clock()),
                    "steps": steps,
                    "tokens_in": tokens_in,
                    "tokens_out": tokens_out,
                    "result": result,
                    "error": "",
                },
                idempotency_key=self._unacked_key if self._unacked else None,
            ),
        )
        self._unacked = None
        self._unacked_key = None
        if state is not None:
            self._saved_state = state

    async def _watch_overlaps(self, current: _Work, scope: anyio.CancelScope) -> None:
        """While a task runs, apply each time trigger's overlap policy to its fires."""
        while True:
            next_at = self._triggers.next_at
            await anyio.sleep(60.0 if next_at is None else max(0.0, next_at - self.clock()))
            fires = [f for f in self._triggers.due_fires(self.clock()) if f.kind != "heartbeat"]
            if not fires:
                continue
            schedule = self._triggers.persisted()
            for fire in fires:
                trigger = self._triggers.triggers[fire.index]
                work = _Work(fire.kind, scheduled_at=fire.at, index=fire.index)
                record = self._queued_record(work)
                if trigger.overlap == "skip":
                    skipped = {
                        "status": "skipped",
                        "result": "previous run still going (overlap: skip)",
                    }
                    await self._write(
                        task=TaskWrite(
                            work.id, {**record.fields, **skipped}, created_at=record.created_at
                        ),
                        schedule=schedule,
                        event=self._event(
                            "FireSkipped",
                            "overlap: skip",
                            f"{fire.kind} trigger #{fire.index} fired while a task ran",
                        ),
                    )
                    continue
                await self._write(task=record, schedule=schedule)
                work.recorded = True
                if trigger.overlap == "cancelPrevious":
                    self._queue.appendleft(work)
                    if current.index == fire.index:
                        scope.cancel()
                else:
                    self._queue.append(work)

    async def _after_step(self, step: int, outcome: Any) -> None:
        self.steps += 1
        self.last_activity = self.clock()
        self.dirty = True
        state = self._encode_state()
        # The message that started the task is acknowledged in the same atomic write
        # as the first state it produced: a crash can never keep one without the other.
        ack = self._unacked if self.ctx is not None and self.ctx.message_taken else None
        if state is not None or ack is not None:
            task = None
            if ack is not None and self.ctx is not None:
                # Completing the key with the ack: a redelivered duplicate is skipped.
                task = TaskWrite(
                    self.ctx.task.id,
                    {"acked_at": repr(self.clock())},
                    idempotency_key=self._unacked_key,
                )
            await self._write(state=state, ack_id=ack, task=task)
            if ack is not None:
                self._unacked = None
            if state is not None:
                self._saved_state = state

    def _encode_state(self) -> bytes | None:
        """The state's bytes if they differ from what Redis holds, else None."""
        assert self.codec is not None
        assert self.ctx is not None
        data = self.codec.encode(self.ctx.state)
        return None if data == self._saved_state else data

    async def _throttled(self, error: QuotaExceeded, work: _Work) -> None:
        """A quota refused a call the agent did not handle: not a crash. The task is
        retried (same message, attempt + 1) once the quota allows it again."""
        delay = max(error.retry_after_s, 1.0)
        await self._set_phase(
            PhaseEvent.IDLE,
            status={"reason": "QuotaExceeded", "message": f"{error}; retrying in {delay:.0f}s"},
            task=TaskWrite(
                work.id,
                {
                    "status": "retrying",
                    "error": _short(str(error), 500),
                    "finished_at": repr(self.clock()),
                },
            ),
            event=self._event("QuotaExceeded", error.kind, f"{error}; task {work.id} retried"),
        )
        self._unacked = None
        self._unacked_key = None
        with anyio.move_on_after(delay):
            while self.stop_reason is None:
                await self._wait(None)
        self._queue.appendleft(replace(work, attempt=work.attempt + 1, recorded=True))

    def _admit(
        self, estimate: Callable[[], int], timeout_s: float | None
    ) -> AbstractAsyncContextManager[Ticket]:
        assert self.governor is not None
        return self.governor.call(
            agent=self.name,
            quota_class=self.resource.spec.quota_class,
            priority=self.priority,
            estimate=estimate,
            timeout_s=timeout_s,
        )

    async def _crashed(self, error: AgentCodeError, work: _Work) -> None:
        spec = self.resource.spec.restart_policy
        decision = on_failure(
            self.consecutive_failures,
            crash_loop_after=spec.crash_loop_after,
            initial_s=spec.backoff.initial,
            max_s=spec.backoff.max,
        )
        self.consecutive_failures = decision.consecutive_failures
        self.tasks_failed += 1
        self.restarts += 1
        log.warning("agent %s: %s", self.name, error)
        if decision.failed:
            self._meter(tasks_failed=1)
        self.telemetry.tasks.add(
            1,
            {
                "agentos.task.status": "failed" if decision.failed else "retrying",
                "gen_ai.agent.name": self.name,
            },
        )
        outcome = {
            "status": "failed" if decision.failed else "retrying",
            "error": _short(str(error), 500),
            "finished_at": repr(self.clock()),
        }
        await self._write(task=TaskWrite(work.id, outcome))
        if decision.failed:
            # The message stays unacknowledged: it is retried when an operator wakes the agent.
            self._queue.appendleft(replace(work, attempt=work.attempt + 1, recorded=True))
            await self._fail(
                "CrashLoop",
                f"{error} ({decision.consecutive_failures} failures in a row)",
                error.tb,
            )
            return
        await self._set_phase(
            PhaseEvent.CRASH,
            status={
                **self.task_counters(),
                "consecutive_failures": self.consecutive_failures,
                "last_error": str(error),
                "last_traceback": error.tb,
                "last_error_at": repr(self.clock()),
                "reason": "BackOff",
                "message": f"restarting in {decision.delay_s:g}s after: {error}",
            },
            event=self._event("BackOff", error.phase, f"{error}; restart in {decision.delay_s:g}s"),
        )
        with anyio.move_on_after(decision.delay_s):
            while self.stop_reason is None:
                await self._wait(None)
        if self.stop_reason is not None:
            return
        if await self._instantiate():
            self.phase = transition(self.phase, PhaseEvent.START)
            await self._write(status={"phase": self.phase.value, "reason": "Restarted"})
            self._queue.appendleft(replace(work, attempt=work.attempt + 1, recorded=True))

    async def _fail(self, reason: str, message: str, tb: str) -> None:
        self.failed = True
        self.phase = transition(self.phase, PhaseEvent.FAIL)
        await self._write(
            status={
                **self.task_counters(),
                "phase": self.phase.value,
                "owner": self.daemon_id,
                "reason": reason,
                "message": message,
                "last_error": message,
                "last_traceback": tb,
                "last_error_at": repr(self.clock()),
                "consecutive_failures": self.consecutive_failures,
            },
            event=self._event("Failed", reason, message),
        )

    async def _recover(self) -> None:
        """An operator woke a Failed agent: start over with a clean failure count."""
        self.failed = False
        self.consecutive_failures = 0
        if self._agent_cls is None:
            try:
                self._agent_cls = load_agent_class(self.resource.spec.entrypoint)
                self.codec = StateCodec(self._agent_cls.State)
            except (EntrypointError, TypeError) as e:
                await self._fail("EntrypointError", str(e), "")
                return
        if not await self._instantiate():
            return
        self.phase = transition(self.phase, PhaseEvent.START)
        await self._write(
            status={"phase": self.phase.value, "reason": "Recovered", "consecutive_failures": 0},
            event=self._event("Recovered", "wake", "woken by operator after failure"),
        )
        if not self._queue:
            self._queue.append(_Work("wake"))

    # ------------------------------------------------------------------ hibernation

    async def _ensure_session(self) -> None:
        if self.phase is Phase.HIBERNATED:
            await self._wake("llm")
        if not self.engine.has_session(self.name):
            await self.arbiter.open(self)

    def _on_usage(self, completion: Completion) -> None:
        self.tokens_in += completion.input_tokens
        self.tokens_out += completion.output_tokens
        self._meter(tokens_in=completion.input_tokens, tokens_out=completion.output_tokens)

    async def _hibernate(self, why: str) -> None:
        with self.telemetry.span("agentos.hibernate", **{"gen_ai.agent.name": self.name}) as span:
            await self._hibernate_traced(why, span)

    async def _hibernate_traced(self, why: str, span: Any) -> None:
        started = time.perf_counter()
        self.hibernate_requested = None
        await self._set_phase(
            PhaseEvent.HIBERNATE, status={"reason": "Hibernating", "message": why}
        )
        status: dict[str, object] = {}
        detail = "no engine session"
        if self.engine.has_session(self.name):
            info = self.engine.session_info(self.name)
            if info.n_tokens == self._snapshot_tokens:
                # Nothing was added since the last snapshot (woken, but the model unused).
                detail = f"snapshot unchanged ({info.n_tokens} tokens)"
            else:
                status, detail = await self._save_snapshot()
            self.engine.close_session(self.name)
        took_ms = (time.perf_counter() - started) * 1000
        span.set_attribute("agentos.kv.bytes", self._kv_stored)
        span.set_attribute("agentos.hibernate.detail", detail)
        self.telemetry.hibernations.add(1, {"gen_ai.agent.name": self.name})
        self.telemetry.hibernate_latency.record(took_ms / 1000, {"gen_ai.agent.name": self.name})
        await self._set_phase(
            PhaseEvent.HIBERNATED,
            status={
                "reason": "Hibernated",
                "message": why,
                "hibernated_at": repr(self.clock()),
                "hibernate_ms": f"{took_ms:.1f}",
                **status,
                **self.task_counters(),
            },
            event=self._event("Hibernated", why, f"{detail}; {took_ms:.1f} ms"),
        )

    async def _save_snapshot(self) -> tuple[dict[str, object], str]:
        snapshot = await self.engine.export_kv(self.name)
        nbytes, n_tokens = len(snapshot.data or b""), len(snapshot.tokens)
        meter = self.arbiter.meter
        decision = decide_keep_kv(
            self.resource.spec.hibernation.keep_kv,
            nbytes,
            n_tokens,
            read_bps=meter.read_bps,
            prefill_tps=meter.prefill_tps,
        )
        saved = await self._retry(
            lambda: self.store.save_snapshot(
                self.name,
                self.lease_value,
                snapshot,
                keep_kv=decision.keep,
                reason=decision.reason,
            )
        )
        if saved is None:
            raise LeaseLost(self.name)
        meter.observe_write(saved.manifest.total_bytes, saved.seconds)
        self.telemetry.kv_bytes.add(saved.manifest.total_bytes - self._kv_stored)
        self.usage_flush_kv()  # the old size accrues up to now
        self._kv_stored = saved.manifest.total_bytes
        self._snapshot_tokens = n_tokens
        stored = saved.manifest.total_bytes
        detail = (
            f"{stored} KV bytes, {n_tokens} tokens, {decision.reason}"
            if decision.keep
            else f"token history only ({n_tokens} tokens), {decision.reason}"
        )
        status: dict[str, object] = {
            "kv_bytes": stored,
            "kv_tokens": n_tokens,
            "kv_kept": int(decision.keep),
            "snapshot_at": repr(saved.manifest.created_at),
        }
        return status, detail

    async def _wake(self, trigger: str) -> None:
        with self.telemetry.span("agentos.wake", **{"gen_ai.agent.name": self.name}) as span:
            await self._wake_traced(trigger, span)

    async def _wake_traced(self, trigger: str, span: Any) -> None:
        started = time.perf_counter()
        await self._set_phase(
            PhaseEvent.WAKE, status={"reason": "Waking", "message": f"woken by {trigger}"}
        )
        loaded = await self._retry(lambda: self.store.load_snapshot(self.name))
        path, why = "empty", loaded.reason
        if loaded.manifest is not None:
            if not self.engine.has_session(self.name):
                await self.arbiter.open(self)
            path, why = await self._restore(loaded)
        took_s = time.perf_counter() - started
        span.set_attribute("agentos.wake.path", path)
        span.set_attribute("agentos.wake.reason", why)
        span.set_attribute("agentos.kv.bytes", loaded.nbytes)
        attrs = {"gen_ai.agent.name": self.name, "agentos.wake.path": path}
        self.telemetry.wakes.add(1, attrs)
        self.telemetry.wake_latency.record(took_s, attrs)
        if path == "restore" and self.ctx is not None:
            self.ctx.llm.kv_restored = True
        await self._set_phase(
            PhaseEvent.WOKE,
            status={
                "reason": "Woke",
                "message": why,
                "wake_path": path,
                "wake_ms": f"{took_s * 1000:.1f}",
                "woke_at": repr(self.clock()),
            },
            event=self._event("Woke", path, f"{why} in {took_s * 1000:.1f} ms (trigger {trigger})"),
        )

    async def _restore(self, loaded: LoadedSnapshot) -> tuple[str, str]:
        """Restore the KV if it is valid for this engine, else re-prefill; never raises."""
        meter = self.arbiter.meter
        snapshot = loaded.snapshot
        why = loaded.reason
        if snapshot is not None:
            if snapshot.fingerprint != self.engine.fingerprint():
                why = "snapshot from another engine build or configuration"
            else:
                try:
                    ok = await self.engine.import_kv(self.name, snapshot)
                except EngineError as e:
                    ok, why = False, f"engine refused the KV: {e}"
                else:
                    why = "KV restored" if ok else "KV rejected by the engine"
                if ok:
                    meter.observe_read(loaded.nbytes, loaded.seconds)
                    self._snapshot_tokens = len(snapshot.tokens)
                    return (
                        "restore",
                        f"{why} ({loaded.nbytes} bytes, {len(snapshot.tokens)} tokens)",
                    )
        if not loaded.tokens:
            return "empty", f"{why}; context starts empty"
        try:
            seconds = await self.engine.prefill(self.name, loaded.tokens)
        except EngineError as e:
            self.engine.close_session(self.name)
            return "empty", f"{why}; re-prefill failed ({e}); context starts empty"
        meter.observe_prefill(len(loaded.tokens), seconds)
        self._snapshot_tokens = len(loaded.tokens)
        return "recompute", f"{why}; re-prefilled {len(loaded.tokens)} tokens"

    # ------------------------------------------------------------------ stopping

    async def _finish(self) -> None:
        reason = self.stop_reason or StopReason.SHUTDOWN
        if reason is StopReason.LEASE_LOST:
            log.warning("%s: lease lost; another daemon owns it now", self.name)
            return
        # Cut off mid-iteration (grace period over): the half-done iteration's state is
        # not saved; the state of the last complete iteration already is.
        if self.agent is not None and self.ctx is not None and not self._interrupted:
            self.ctx.stopping = reason
            try:
                with anyio.move_on_after(5):
                    await self.agent.on_stop(self.ctx, reason)
            except Exception as e:
                log.warning("%s: on_stop raised %s: %s", self.name, type(e).__name__, e)
            state = self._encode_state()
            if state is not None:
                await self._write(state=state)
        if reason is StopReason.SHUTDOWN and self.engine.has_session(self.name):
            # Hand the next owner a KV snapshot, so it can wake without re-prefill. A task
            # cut short by the grace period is abandoned; its message is redelivered.
            if self.phase is Phase.RUNNING:
                self.phase = Phase.IDLE
            if self.phase is Phase.IDLE:
                await self._hibernate("daemon shutting down")
        if reason is StopReason.DELETE:
            self.engine.close_session(self.name)
            await self.store.release_lease(self.name, self.lease_value)
            await self.store.purge_agent(self.name)
            return
        if reason is StopReason.RESPEC:
            # The session stays open: the restarted runner continues the same context.
            await self.store.release_lease(self.name, self.lease_value)
            return
        self.engine.close_session(self.name)
        # The flush loop skips stopping runners: this write carries every counter.
        status: dict[str, object] = {**self.counters(), **self.task_counters(), "owner": ""}
        if self.phase is not Phase.HIBERNATED and self.phase is not Phase.FAILED:
            self.phase = transition(self.phase, PhaseEvent.STOP)
            status.update(
                phase=self.phase.value, reason="Stopped", message=f"stopped: {reason.value}"
            )
        await self._write(
            status=status,
            event=self._event(
                "Stopped", reason.value, f"daemon {self.daemon_id} let go of the agent"
            ),
            usage=self.usage_delta(),
            release=True,
        )

    # ------------------------------------------------------------------ I/O helpers

    async def _set_phase(
        self,
        edge: PhaseEvent,
        *,
        status: dict[str, object] | None = None,
        state: bytes | None = None,
        ack_id: str | None = None,
        event: dict[str, str] | None = None,
        task: TaskWrite | None = None,
    ) -> None:
        now = self.clock()
        if self.phase in _ACTIVE:
            self._usage["active_s"] = self._usage.get("active_s", 0.0) + now - self._phase_since
        self._phase_since = now
        self.phase = transition(self.phase, edge)
        self._phase_path.append(self.phase.value)
        fields: dict[str, object] = {"phase": self.phase.value, "updated_at": repr(now)}
        if status:
            fields.update(status)
        await self._write(status=fields, state=state, ack_id=ack_id, event=event, task=task)

    async def _write(
        self,
        *,
        status: dict[str, object] | None = None,
        clear: tuple[str, ...] = (),
        event: dict[str, str] | None = None,
        state: bytes | None = None,
        ack_id: str | None = None,
        task: TaskWrite | None = None,
        schedule: dict[str, float] | None = None,
        usage: tuple[str, dict[str, float]] | None = None,
        release: bool = False,
    ) -> None:
        ok = await self._retry(
            lambda: self.store.fenced_write(
                self.name,
                self.lease_value,
                status=status,
                clear=clear,
                event=event,
                state=state,
                ack_id=ack_id,
                task=task,
                schedule=schedule,
                usage=usage,
                release=release,
            )
        )
        if not ok:
            raise LeaseLost(self.name)

    async def _retry(self, op: Callable[[], Awaitable[_T]]) -> _T:
        """Run a store operation until Redis answers; a Redis outage must not lose state."""
        delay = 0.1
        while True:
            try:
                return await op()
            except StoreUnavailable as e:
                log.warning("%s: %s; retrying in %.1fs", self.name, e, delay)
                await anyio.sleep(delay)
                delay = min(delay * 2, self.retry_max_s)

    def _event(self, type_: str, reason: str, message: str) -> dict[str, str]:
        return {
            "time": repr(self.clock()),
            "type": type_,
            "reason": reason,
            "message": message,
            "daemon": self.daemon_id,
        }

    async def _send(self, agent: str, body: str) -> str:
        return await self._retry(lambda: self.store.send(agent, body))
