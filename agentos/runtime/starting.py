"""A runner's start: open the agent, adopt what a previous owner left, build the agent.

Opening reads the agent's status, state, schedules, unfinished task records and
pending messages (or takes what the daemon read for it, batched with other agents');
:func:`agentos.core.tasks.resume_plan` decides what to do with records a dead owner
left, a durable wait is resumed or the agent released again (:mod:`.waits`), and a
fresh agent instance is built with its saved state and a :class:`~agentos.sdk.Context`
whose model handle goes through the runner (:mod:`.calls`, :mod:`.securing`).
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING

from agentos.core.lifecycle import Phase
from agentos.core.tasks import Close, Task, TaskStatus, inbox_task, resume_plan
from agentos.core.triggers import TriggerClock
from agentos.runtime import calls, waits
from agentos.runtime.endings import noted_cancels
from agentos.runtime.loop import AgentCodeError, EntrypointError, load_agent_class
from agentos.runtime.releasing import fail
from agentos.runtime.securing import OnDemandSession
from agentos.runtime.toolcalls import LedgerWriter, approval_rule
from agentos.runtime.watchdog import running
from agentos.sdk import (
    LLM,
    Compaction,
    Context,
    StateCodec,
    TaskInfo,
    agent_logger,
    freeze_config,
)
from agentos.store import AgentSnapshot, TaskWrite, Write
from agentos.store.inbox import OPEN_NEW_MESSAGES
from agentos.tools import Ledger

if TYPE_CHECKING:
    from agentos.runtime.runner import AgentRunner

__all__ = ["instantiate", "load_class", "start"]

log = logging.getLogger("agentos.runner")


async def start(runner: AgentRunner) -> None:
    """Open the agent and record its start (``Started`` or ``Adopted``)."""
    snapshot = runner.opened or await _open(runner)
    runner.opened = None
    prior = snapshot.status
    runner.restarts = int(prior.get("restarts", 0) or 0)
    runner.tasks_succeeded = int(prior.get("tasks_succeeded", 0) or 0)
    runner.tasks_failed = int(prior.get("tasks_failed", 0) or 0)
    runner.steps = int(prior.get("steps", 0) or 0)
    runner.tokens_in = int(prior.get("tokens_in", 0) or 0)
    runner.tokens_out = int(prior.get("tokens_out", 0) or 0)
    previous_owner = prior.get("owner", "")
    runner.usage.kv_stored = int(prior.get("kv_bytes") or 0)
    runner.session.has_snapshot = bool(prior.get("snapshot_at"))
    runner.state.uses_model = runner.session.has_snapshot or int(prior.get("tokens_in") or 0) > 0
    # A waiting agent gave its slot back like a hibernated one.
    was_hibernated = prior.get("phase") in (Phase.HIBERNATED.value, Phase.WAITING.value)
    if not await load_class(runner) or not await instantiate(runner, snapshot.state, read=True):
        return
    for msg in snapshot.pending:
        runner.queue_last(inbox_task(msg))
    runner.triggers = TriggerClock(
        runner.resource.spec.triggers, now=runner.clock(), stored=snapshot.schedule
    )
    for step in resume_plan(snapshot.unfinished, {m.id for m in snapshot.pending}, runner.clock()):
        if isinstance(step, Close):
            await runner.writer.write(Write(tasks=(TaskWrite(step.task_id, step.fields),)))
        else:
            runner.queue_last(step.work)
    _count_starts(runner, snapshot.unfinished)
    runner.state.cancels.update(noted_cancels(snapshot.unfinished))
    if not await waits.resume_wait(runner, snapshot):
        return  # still waiting: released again
    runner._apply_started(hibernated=was_hibernated)
    adopted = bool(previous_owner) and previous_owner != runner.daemon_id
    message = f"started by {runner.daemon_id}"
    if adopted:
        message = f"adopted from {previous_owner} by {runner.daemon_id}"
    if snapshot.claimed:
        message += f"; {snapshot.claimed} unacknowledged message(s) taken over"
    woken = bool(prior.get("woken"))
    clear = ("last_error", "last_traceback") if prior.get("phase") != "Failed" else ()
    await runner.writer.write(
        Write(
            status={
                "phase": runner.phase.value,
                "owner": runner.daemon_id,
                "spec_hash": runner.spec_hash,
                "started_at": repr(runner.clock()),
                "reason": "Adopted" if adopted else "Started",
                "message": message,
            },
            clear=(*clear, "woken") if woken else clear,
            event=runner.writer.event("Adopted" if adopted else "Started", "", message),
        )
    )
    await runner._catch_up()
    if woken:  # `agentos wake` while no daemon held it: that is what activated it
        runner.state.cmds.add("wake")
    elif not was_hibernated and not runner.state.queue:
        runner.queue_last(Task("start"))
    # Messages that arrived while no daemon ran the agent: the first ones came with
    # the open, recorded as they start (the inbox keeps them meanwhile).
    for msg in snapshot.new:
        runner.queue_last(inbox_task(msg))
    if len(snapshot.new) >= OPEN_NEW_MESSAGES:
        runner.state.cmds.add("message")
    runner.nudged.set()


async def _open(runner: AgentRunner) -> AgentSnapshot:
    """What the daemon did not read for this runner: the agent, read now."""
    snapshot: AgentSnapshot = await runner.writer.call(
        lambda: runner.store.takeover.open_agent(runner.name, runner.daemon_id), "open"
    )
    return snapshot


def _count_starts(runner: AgentRunner, unfinished: list[dict[str, str]]) -> None:
    """Every start of a task counts an attempt: a queued task whose record says it
    ran before continues its count, and one left ``running`` (its start was cut
    short: the daemon stopped, died or lost the lease) adds to its interrupted
    starts, which end it at ``crashLoopAfter`` (:func:`agentos.runtime.faults.abandon`)."""
    records = {r.get("id", ""): r for r in unfinished}
    for task in runner.state.queue:
        record = records.get(task.id)
        if record is None:
            continue
        task.attempt = max(task.attempt, int(record.get("attempt") or 0) + 1)
        cut = int(record.get("interrupted") or 0) + (record.get("status") == TaskStatus.RUNNING)
        if cut:
            runner.state.interrupted_starts[task.id] = cut


async def load_class(runner: AgentRunner) -> bool:
    """Import the entrypoint's Agent class; ``Failed`` (not retried) when it is wrong."""
    spec = runner.resource.spec
    try:
        runner.agent_cls, reload_error = load_agent_class(
            spec.entrypoint, code_path=spec.code_path, code_hash=spec.code_hash
        )
        runner.codec = StateCodec(runner.agent_cls.State)
    except (EntrypointError, TypeError) as e:
        await fail(runner, "EntrypointError", str(e), "")
        return False
    if reload_error is not None:
        message = f"the new code did not load, the previous code keeps running: {reload_error}"
        log.warning("%s: %s", runner.name, message)
        await runner.writer.write(
            Write(event=runner.writer.event("CodeReloadFailed", "code", message))
        )
    return True


async def instantiate(runner: AgentRunner, raw: bytes | None = None, *, read: bool = False) -> bool:
    """Create a fresh agent instance with its saved state (given, or read from Redis
    unless ``read``: then ``raw`` is what Redis holds, None for no state)."""
    cls, codec = runner.agent_cls, runner.codec
    assert cls is not None
    assert codec is not None
    if raw is None and not read:
        raw = await runner.writer.call(
            lambda: runner.store.agents.load_state(runner.name), "load state"
        )
    try:
        state = codec.decode(raw) if raw is not None else codec.new()
    except Exception as e:
        await fail(runner, "StateError", f"stored state does not fit {cls.__name__}.State: {e}", "")
        return False
    try:
        with running(runner.mark):
            runner.agent = cls()
    except Exception as e:
        err = AgentCodeError("__init__", e)
        await fail(runner, "AgentError", str(err), err.tb)
        return False
    runner.state.saved_state = raw
    spec = runner.resource.spec
    llm = LLM(
        runner.engine,
        runner.name,
        session=OnDemandSession(runner),
        on_usage=functools.partial(calls.on_usage, runner),
        telemetry=runner.telemetry,
        admit=functools.partial(calls.admit, runner) if runner.governor is not None else None,
        on_overflow=spec.on_overflow,
        on_compacted=functools.partial(_compacted, runner),
    )
    ctx = runner.ctx = Context(
        name=runner.name,
        llm=llm,
        state=state,
        config=freeze_config(spec.config),
        task=TaskInfo(id="", trigger="start"),
        log=agent_logger(runner.name),
        stopping=runner.stop_reason,
        _sender=functools.partial(calls.send, runner),
        _telemetry=runner.telemetry,
    )
    try:
        ctx.tools.extend(type(runner.agent).tools)
    except (TypeError, ValueError) as e:
        await fail(runner, "AgentError", f"{cls.__name__}.tools: {e}", "")
        return False
    runner.ledger = LedgerWriter(runner.writer, ctx._waits, lambda: ctx.task.id)
    ctx.tools.ledger = Ledger(ctx._waits, runner.ledger.persist, approval_rule(spec.tools))
    return True


async def _compacted(runner: AgentRunner, compaction: Compaction) -> None:
    """The agent's context did not fit the model and was compacted: say so."""
    await runner.writer.write(
        Write(
            event=runner.writer.event(
                "ContextCompacted", compaction.operation, compaction.describe()
            )
        )
    )
