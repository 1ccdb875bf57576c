"""The supervisor of one agent inside a daemon: its loop, its tasks, its sleep and wake.

A runner owns an agent while its daemon holds the agent's lease. It turns wake-ups
(the start, inbox messages, heartbeats, schedules, an operator's `wake`) into tasks
and runs each task's observe/plan/act/learn loop. Before agent code runs, a task
secures the agent's engine session (a slot, its context restored); whenever the agent
parks (hibernation, crash backoff, a quota or budget wait, failure, stop) the slot is
given back. What to do when a task does not succeed is decided by
:mod:`agentos.core.supervisor`: only the agent's own exceptions count toward its
crash loop; slots, Redis, engines and quotas delay the task instead.

The jobs around it live in their own modules: :mod:`.writer` (every fenced write,
retried and applied once), :mod:`.session` and :mod:`.slots` (the engine slot),
:mod:`.hibernator` (KV to Redis and back), :mod:`.usage` (metering), and the pure
cores :mod:`agentos.core.tasks` and :mod:`agentos.core.supervisor`.
"""

from __future__ import annotations

import logging
import math
import time

import anyio

from agentos.core.lifecycle import Phase, PhaseEvent, StopReason
from agentos.core.tasks import Close, Work, inbox_work, resume_plan
from agentos.core.triggers import TriggerClock
from agentos.runtime.endings import noted_cancels
from agentos.runtime.faults import FaultMixin
from agentos.runtime.loop import AgentCodeError
from agentos.runtime.tasking import OnDemandSession, TaskMixin
from agentos.runtime.toolcalls import LedgerWriter, approval_rule
from agentos.runtime.waits import WaitMixin
from agentos.runtime.watchdog import marked, running
from agentos.runtime.writer import LeaseLost
from agentos.sdk import (
    LLM,
    Agent,
    Compaction,
    Context,
    TaskInfo,
    agent_logger,
    freeze_config,
)
from agentos.store import StoreError, TaskWrite, Write
from agentos.store.inbox import OPEN_NEW_MESSAGES
from agentos.tools import Ledger

__all__ = ["AgentRunner", "LeaseLost"]

log = logging.getLogger("agentos.runner")


class AgentRunner(TaskMixin, FaultMixin, WaitMixin):
    """Runs one agent for as long as this daemon holds its lease."""

    async def run(self) -> None:
        """Supervise the agent until it is asked to stop (or cancelled after a grace period).

        Agent faults never escape; the agent's status says what happened. On every
        way out the engine session is closed and the slot given back.
        """
        self.arbiter.register(self)
        try:
            try:
                await self._start()
                await self._loop()
            except* LeaseLost:
                self.stop_reason = StopReason.LEASE_LOST
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
                with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                    try:
                        await self._finish()
                    except* LeaseLost:
                        log.warning("%s: lease lost while stopping", self.name)
                    except* StoreError as group:
                        log.warning(
                            "%s: could not record the stop: %s", self.name, group.exceptions[0]
                        )
        finally:
            self.session.drop()
            self.arbiter.unregister(self.name)
            self.done.set()

    async def _start(self) -> None:
        snapshot = self.opened
        self.opened = None
        if snapshot is None:
            snapshot = await self.writer.call(
                lambda: self.store.open_agent(self.name, self.daemon_id), "open"
            )
        prior = snapshot.status
        self.restarts = int(prior.get("restarts", 0) or 0)
        self.tasks_succeeded = int(prior.get("tasks_succeeded", 0) or 0)
        self.tasks_failed = int(prior.get("tasks_failed", 0) or 0)
        self.steps = int(prior.get("steps", 0) or 0)
        self.tokens_in = int(prior.get("tokens_in", 0) or 0)
        self.tokens_out = int(prior.get("tokens_out", 0) or 0)
        previous_owner = prior.get("owner", "")
        self.usage.kv_stored = int(prior.get("kv_bytes") or 0)
        self.session.has_snapshot = bool(prior.get("snapshot_at"))
        self._uses_model = self.session.has_snapshot or int(prior.get("tokens_in") or 0) > 0
        # A waiting agent gave its slot back like a hibernated one.
        was_hibernated = prior.get("phase") in (Phase.HIBERNATED.value, Phase.WAITING.value)
        if not await self._load_class() or not await self._instantiate(snapshot.state, read=True):
            return
        for msg in snapshot.pending:
            self._queue.append(inbox_work(msg))
        self._triggers = TriggerClock(
            self.resource.spec.triggers, now=self.clock(), stored=snapshot.schedule
        )
        for step in resume_plan(
            snapshot.unfinished, {m.id for m in snapshot.pending}, self.clock()
        ):
            if isinstance(step, Close):
                await self.writer.write(task=TaskWrite(step.task_id, step.fields))
            else:
                self._queue.append(step.work)
        self._count_starts(snapshot.unfinished)
        self._cancels.update(noted_cancels(snapshot.unfinished))
        if not await self._resume_wait(snapshot):
            return  # still waiting: released again
        self.phase = Phase.HIBERNATED if was_hibernated else Phase.PENDING
        self._move(PhaseEvent.START)
        adopted = bool(previous_owner) and previous_owner != self.daemon_id
        message = f"started by {self.daemon_id}"
        if adopted:
            message = f"adopted from {previous_owner} by {self.daemon_id}"
        if snapshot.claimed:
            message += f"; {snapshot.claimed} unacknowledged message(s) taken over"
        woken = bool(prior.get("woken"))
        clear = ("last_error", "last_traceback") if prior.get("phase") != "Failed" else ()
        await self.writer.write(
            status={
                "phase": self.phase.value,
                "owner": self.daemon_id,
                "spec_hash": self.spec_hash,
                "started_at": repr(self.clock()),
                "reason": "Adopted" if adopted else "Started",
                "message": message,
            },
            clear=(*clear, "woken") if woken else clear,
            event=self.writer.event("Adopted" if adopted else "Started", "", message),
        )
        await self._catch_up()
        if woken:  # `agentos wake` while no daemon held it: that is what activated it
            self._cmds.add("wake")
        elif not was_hibernated and not self._queue:
            self._queue.append(Work("start"))
        # Messages that arrived while no daemon ran the agent: the first ones came with
        # the open, recorded as they start (the inbox keeps them meanwhile).
        for msg in snapshot.new:
            self._queue.append(inbox_work(msg))
        if len(snapshot.new) >= OPEN_NEW_MESSAGES:
            self._cmds.add("message")
        self._nudged.set()

    def _count_starts(self, unfinished: list[dict[str, str]]) -> None:
        """Every start of a task counts an attempt: a queued task whose record says it
        ran before continues its count, and one left ``running`` (its start was cut
        short: the daemon stopped, died or lost the lease) adds to its interrupted
        starts, which end it at ``crashLoopAfter`` (:meth:`_abandon`)."""
        records = {r.get("id", ""): r for r in unfinished}
        for work in self._queue:
            record = records.get(work.id)
            if record is None:
                continue
            work.attempt = max(work.attempt, int(record.get("attempt") or 0) + 1)
            cut = int(record.get("interrupted") or 0) + (record.get("status") == "running")
            if cut:
                self._interrupted_starts[work.id] = cut

    async def _catch_up(self) -> None:
        """Fires that passed while no daemon ran the agent, per each trigger's catchUp."""
        clock = self._triggers
        for missed in clock.missed:
            verdict = {"skip": "none run", "one": "the latest runs", "all": f"{missed.run} run"}
            await self.writer.write(
                event=self.writer.event(
                    "MissedFires",
                    f"catchUp: {missed.policy}",
                    f"{missed.count} fire(s) of {missed.kind} trigger #{missed.index} passed "
                    f"while no daemon ran the agent; {verdict[missed.policy]}",
                )
            )
        works = [Work(f.kind, scheduled_at=f.at, index=f.index) for f in clock.catch_up]
        await self._enqueue(works, persist_schedule=True)

    async def _enqueue(
        self, works: list[Work], *, persist_schedule: bool = False, runs_now: bool = False
    ) -> None:
        """Record the wake-ups as queued tasks (one write for all), then queue them.

        With ``persist_schedule`` the triggers' next fire times are stored in the same
        write, so a fire is never both lost and moved past. With ``runs_now`` the first
        one runs next and is recorded by its start write; its message keeps it safe
        meanwhile.
        """
        schedule = self._triggers.persisted() if persist_schedule else None
        now = self.clock()
        later = works[1:] if runs_now else works
        if later or schedule:
            await self.writer.write(tasks=[self._queued_write(w) for w in later], schedule=schedule)
        for work in later:
            work.recorded = True
        for work in works:
            work.queued_at = now
            self._queue.append(work)

    async def _instantiate(self, raw: bytes | None = None, *, read: bool = False) -> bool:
        """Create a fresh agent instance with its saved state (given, or read from Redis
        unless ``read``: then ``raw`` is what Redis holds, None for no state)."""
        assert self._agent_cls is not None
        assert self.codec is not None
        if raw is None and not read:
            raw = await self.writer.call(lambda: self.store.load_state(self.name), "load state")
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
            with running(self.mark):
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
            session=OnDemandSession(self),
            on_usage=self._on_usage,
            telemetry=self.telemetry,
            admit=self._admit if self.governor is not None else None,
            on_overflow=spec.on_overflow,
            on_compacted=self._compacted,
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
        try:
            self.ctx.tools.extend(type(self.agent).tools)
        except (TypeError, ValueError) as e:
            await self._fail("AgentError", f"{self._agent_cls.__name__}.tools: {e}", "")
            return False
        ctx = self.ctx
        self.ledger = LedgerWriter(self.writer, ctx._waits, lambda: ctx.task.id)
        ctx.tools.ledger = Ledger(
            ctx._waits, self.ledger.persist, approval_rule(self.resource.spec.tools)
        )
        return True

    async def _compacted(self, compaction: Compaction) -> None:
        """The agent's context did not fit the model and was compacted: say so."""
        await self.writer.write(
            event=self.writer.event("ContextCompacted", compaction.operation, compaction.describe())
        )

    async def _loop(self) -> None:
        while self.stop_reason is None:
            if self._blocked:  # charged by the watchdog outside a task (observe, init)
                await self._charge_blocked()
                continue
            if self.failed:
                await self._wait(None)
                if "wake" in self._cmds:
                    self._cmds.discard("wake")
                    await self._recover()
                continue
            # A slot promised to a waiting agent goes first: we are idle, it is not.
            if self.hibernate_requested and self.phase is Phase.IDLE:
                # An operator's request releases the agent too; an eviction (another
                # agent needs the slot) only swaps it out until it is idle long enough.
                asked, why = not self._evicting, self.hibernate_requested
                self.releasing = (
                    asked
                    and not self.resource.spec.hibernation.never
                    and self._releasable(self.clock())
                )
                await self._hibernate(why, release=self.releasing)
                self.releasing = False
                continue
            if self._evicting:  # asked while not idle: let the arbiter ask someone else
                self._evicting = False
                self.arbiter.eviction_over(self.name)
            work = self._next_due(pop=True)
            if work is not None:
                await self._run_work(work)
                continue
            if self.phase is Phase.HIBERNATED:
                self.hibernate_requested = None
            now = self.clock()
            deadlines = [self._triggers.next_at] + [w.not_before for w in self._queue]
            hibernation = self.resource.spec.hibernation
            if self.phase in (Phase.IDLE, Phase.HIBERNATED) and not hibernation.never:
                idle_deadline = self.last_activity + hibernation.idle_after
                if idle_deadline <= now and self._releasable(now):
                    why = f"idle for {hibernation.idle_after:g}s"
                    self.releasing = True  # not to be handed over meanwhile
                    if self.phase is Phase.IDLE:
                        await self._hibernate(why, release=True)
                    else:
                        await self._release(why)
                    continue
                deadlines.append(idle_deadline)
            due = [d for d in deadlines if d is not None]
            await self._wait(max(0.0, min(due) - now) if due else None)
            await self._collect()

    def _releasable(self, now: float) -> bool:
        """Nothing to do before the next trigger: the agent may be let go until then."""
        next_at = self._triggers.next_at
        return (
            not self._queue
            and not self._cmds
            and not self.busy
            and self.stop_reason is None
            and (next_at is None or next_at > now + 0.05)
        )

    async def _release(
        self,
        why: str,
        fields: dict[str, object] | None = None,
        event: dict[str, str] | None = None,
    ) -> None:
        """Let go of a hibernated agent: no lease, no runner, no timer in any daemon.

        Its counters, usage and next fire times (heartbeats too) are written with the
        lease's release (with ``fields`` and ``event``: the hibernation's own record, one
        write for both); then it is due at its next fire (+inf: only a message, a wake
        or an answer activates it), or now if a message came meanwhile. This runner ends.
        """
        if self.phase is not Phase.HIBERNATED:
            self.releasing = False
            return
        at = self._triggers.next_at
        due_at = math.inf if at is None else at
        self.release_due = due_at  # from here on the agent must end up in the index
        await self.writer.write(
            status={
                **(fields or {}),
                **self.counters(),
                **self.task_counters(),
                "owner": "",
                "released_at": repr(self.clock()),
                "due_at": repr(due_at),
            },
            event=event,
            usage=self.usage_delta(),
            schedule=self._triggers.persisted(heartbeats=True),
            release=True,
        )
        self._released(f"hibernated ({why})")
        await self._into_index(due_at)

    async def _into_index(self, at: float, *, look: bool = True) -> None:
        """After the lease was given up: the agent is due at ``at`` (or sooner). Not cut
        short by a stop's grace period: a released agent outside the index would wait
        for the daemon's held set to be recovered."""
        with anyio.CancelScope(shield=True):
            # Until it succeeds (a Redis away for minutes included): given up, the agent
            # would be in no index, with no lease and no runner, its schedules stopped.
            delay = 0.1
            while True:
                try:
                    await self.writer.call(
                        lambda: self.store.due_release(
                            self.name, self.daemon_id, at, now=self.clock(), look=look
                        ),
                        "release",
                    )
                    break
                except StoreError as e:
                    log.warning(
                        "%s: release not recorded (%s); retrying in %.1fs", self.name, e, delay
                    )
                    await anyio.sleep(delay)
                    delay = min(delay * 2, 30.0)
            self.release_due = None

    async def _collect(self) -> None:
        """Turn commands and due triggers into queued work."""
        if "message" in self._cmds:
            self._cmds.discard("message")
            new = await self.writer.call(
                lambda: self.store.read_inbox(
                    self.name, self.daemon_id, count=100, lease=self.lease_value
                ),
                "read inbox",
            )
            # An idle agent's first message runs at once: its start write records it.
            await self._enqueue(
                [inbox_work(m) for m in new],
                runs_now=not self._queue and self.phase in (Phase.IDLE, Phase.HIBERNATED),
            )
            if len(new) == 100:
                self._cmds.add("message")
                self._nudged.set()
        if "wake" in self._cmds:
            self._cmds.discard("wake")
            await self.writer.write(clear=("woken",))
            await self._enqueue([Work("wake")])
        fires = self._triggers.due_fires(self.clock())
        if fires:
            # Heartbeats only ask observe: they get a record if it finds work.
            # At most one heartbeat queued per trigger: one whose observe is parked (a
            # spent budget, an engine down) must not pile up a copy per beat.
            waiting = {w.index for w in self._queue if w.trigger == "heartbeat"}
            for f in fires:
                if f.kind == "heartbeat" and f.index not in waiting:
                    waiting.add(f.index)
                    self._queue.append(Work("heartbeat", index=f.index))
            timed = [
                Work(f.kind, scheduled_at=f.at, index=f.index)
                for f in fires
                if f.kind != "heartbeat"
            ]
            await self._enqueue(timed, persist_schedule=True)

    async def _hibernate(self, why: str, *, release: bool = False) -> None:
        """Save the context and give the slot back; with ``release``, let go of the agent
        in the same write (see :meth:`_release`)."""
        with self.telemetry.span("agentos.hibernate", **{"gen_ai.agent.name": self.name}) as span:
            started = time.perf_counter()
            self.hibernate_requested = None
            # Without an engine session nothing slow comes before the next write: the
            # Hibernating phase rides with it.
            await self._set_phase(
                PhaseEvent.HIBERNATE,
                status={"reason": "Hibernating", "message": why},
                hold=not self.session.open,
            )
            had_session = self.session.open
            tokens = self.session.snapshot_tokens
            status = await self._release_slot()
            if not had_session:
                detail = "no engine session"
            elif not status:
                detail = f"snapshot unchanged ({tokens} tokens)"
            else:
                detail = (
                    f"{status.get('kv_bytes')} bytes, {status.get('kv_tokens')} tokens"
                    if status.get("kv_kept")
                    else f"token history only ({status.get('kv_tokens')} tokens)"
                )
            took_ms = (time.perf_counter() - started) * 1000
            span.set_attribute("agentos.kv.bytes", self.usage.kv_stored)
            span.set_attribute("agentos.hibernate.detail", detail)
            self.telemetry.hibernations.add(1, {"gen_ai.agent.name": self.name})
            self.telemetry.hibernate_latency.record(
                took_ms / 1000, {"gen_ai.agent.name": self.name}
            )
            fields: dict[str, object] = {
                "reason": "Hibernated",
                "message": why,
                "hibernated_at": repr(self.clock()),
                "hibernate_ms": f"{took_ms:.1f}",
                **status,
                **self.task_counters(),
            }
            event = self.writer.event("Hibernated", why, f"{detail}; {took_ms:.1f} ms")
            if not release:
                await self._set_phase(PhaseEvent.HIBERNATED, status=fields, event=event)
                return
            self._move(PhaseEvent.HIBERNATED)
            self._phase_path.append(self.phase.value)
            fields["phase"] = self.phase.value
            fields["updated_at"] = repr(self.clock())
            await self._release(why, fields, event)

    async def _finish(self) -> None:
        if self.parked:  # released with the park: nothing of the agent is ours any more
            return
        reason = self.stop_reason or StopReason.SHUTDOWN
        if reason is StopReason.LEASE_LOST:
            log.warning("%s: lease lost (%s); stopped here", self.name, self.lost_why or "not ours")
            self.session.drop()  # not ours to save: the new owner starts from Redis
            return
        await self.writer.flush()
        # Cut off mid-iteration (grace period over): the half-done iteration's state is
        # not saved; the state of the last complete iteration already is.
        if self.agent is not None and self.ctx is not None and not self._interrupted:
            self.ctx.stopping = reason
            if type(self.agent).on_stop is not Agent.on_stop:  # the default does nothing
                try:
                    with anyio.move_on_after(5):
                        await marked(self.mark, self.agent.on_stop(self.ctx, reason))
                except Exception as e:
                    log.warning("%s: on_stop raised %s: %s", self.name, type(e).__name__, e)
            state = self._encode_state()
            if state is not None:
                # Rides with the closing write below (or the hibernation's).
                self.writer.defer(Write(state=state))
        if reason is StopReason.DELETE:
            self.session.drop()
            await self.writer.call(
                lambda: self.store.release_lease(self.name, self.lease_value), "release"
            )
            await self.writer.call(lambda: self.store.purge_agent(self.name), "purge")
            await self.writer.call(
                lambda: self.store.held_remove(self.daemon_id, [self.name]), "release"
            )
            return
        # Hand the next owner (or the respecced runner) a KV snapshot, so it wakes
        # without re-prefill. A task cut short by the grace period is abandoned; its
        # message is redelivered. An idle agent is released hibernated, until its next
        # trigger, with or without an engine session.
        if self.session.open and self.phase is Phase.RUNNING:
            self._move(PhaseEvent.IDLE)
        never = self.resource.spec.hibernation.never
        if (
            self.phase is Phase.IDLE
            and reason not in (StopReason.RESPEC, StopReason.RESTART)
            and (self.session.open or not never)
        ):
            await self._hibernate(f"daemon stopping the agent ({reason.value})")
        elif self.session.open:
            await self.writer.write(status=await self._release_slot())
        # The flush loop skips stopping runners: this write carries every counter.
        status: dict[str, object] = {**self.counters(), **self.task_counters(), "owner": ""}
        if reason in (StopReason.RESPEC, StopReason.RESTART):
            # The restarted runner takes over at once: counters and usage, not a phase.
            await self.writer.write(status=status, usage=self.usage_delta(), release=True)
            return
        if self.phase is not Phase.HIBERNATED and self.phase is not Phase.FAILED:
            self._move(PhaseEvent.STOP)
            status.update(
                phase=self.phase.value, reason="Stopped", message=f"stopped: {reason.value}"
            )
        message = f"daemon {self.daemon_id} let go of the agent"
        if reason is StopReason.REBALANCE:
            message += ": it holds more than its fair share; another daemon takes the agent"
        event = self.writer.event("Stopped", reason.value, message)
        if self.error is not None:
            event = self.writer.event(
                "RunnerError",
                type(self.error).__name__,
                f"the runner of daemon {self.daemon_id} failed ({type(self.error).__name__}: "
                f"{self.error}); the agent is activated again in {self.error_delay_s:.0f}s",
            )
        await self.writer.write(
            status=status,
            event=event,
            usage=self.usage_delta(),
            schedule=self._triggers.persisted(heartbeats=True),
            release=True,
        )
        # Released: a hibernated agent until its next fire; any other (work queued,
        # `hibernation: never`, handed over, failed) at once, for whoever has room.
        now = self.clock()
        at: float = now
        if (
            self.phase is Phase.HIBERNATED
            and not self.resource.spec.hibernation.never
            and reason is not StopReason.REBALANCE
            and not self._queue
        ):
            next_at = self._triggers.next_at
            at = math.inf if next_at is None else next_at
        if self.error is not None:
            # Backs off like a crash: activated again after the delay (what its inbox
            # holds is not looked at: a message must not make it due at once).
            at = now + self.error_delay_s
        self.release_due = at
        await self._into_index(at, look=self.error is None)
