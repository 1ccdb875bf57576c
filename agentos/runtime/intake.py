"""How wake-ups become queued tasks: the daemon's commands, due fires, missed fires.

Commands (``message``: read the inbox; ``wake``: an operator's wake) and the time
triggers' due fires are turned into tasks, recorded as ``queued`` in one write with the
triggers' next fire times, and queued on the runner. Heartbeats only ask ``observe``:
they get a record if it finds work, and at most one is queued per trigger.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agentos.core.lifecycle import Phase
from agentos.core.tasks import Task, inbox_task, queued_record
from agentos.store import TaskWrite, Write

if TYPE_CHECKING:
    from agentos.runtime.runner import AgentRunner

__all__ = ["collect", "enqueue", "missed_fires", "queued_write"]

_INBOX_BATCH = 100


async def collect(runner: AgentRunner) -> None:
    """Turn commands and due triggers into queued tasks."""
    cmds = runner.state.cmds
    if "message" in cmds:
        cmds.discard("message")
        new = await runner.writer.call(
            lambda: runner.store.inbox.read(
                runner.name, runner.daemon_id, count=_INBOX_BATCH, lease=runner.lease_value
            ),
            "read inbox",
        )
        # An idle agent's first message runs at once: its start write records it.
        await enqueue(
            runner,
            [inbox_task(m) for m in new],
            runs_now=not runner.state.queue and runner.phase in (Phase.IDLE, Phase.HIBERNATED),
        )
        if len(new) == _INBOX_BATCH:
            cmds.add("message")
            runner.nudged.set()
    if "wake" in cmds:
        cmds.discard("wake")
        await runner.writer.write(Write(clear=("woken",)))
        await enqueue(runner, [Task("wake")])
    fires = runner.triggers.due_fires(runner.clock())
    if fires:
        # Heartbeats only ask observe: they get a record if it finds work.
        # At most one heartbeat queued per trigger: one whose observe is parked (a
        # spent budget, an engine down) must not pile up a copy per beat.
        waiting = {w.index for w in runner.state.queue if w.trigger == "heartbeat"}
        for f in fires:
            if f.kind == "heartbeat" and f.index not in waiting:
                waiting.add(f.index)
                runner.queue_last(Task("heartbeat", index=f.index))
        timed = [
            Task(f.kind, scheduled_at=f.at, index=f.index) for f in fires if f.kind != "heartbeat"
        ]
        await enqueue(runner, timed, persist_schedule=True)


async def enqueue(
    runner: AgentRunner,
    queued: list[Task],
    *,
    persist_schedule: bool = False,
    runs_now: bool = False,
) -> None:
    """Record the wake-ups as queued tasks (one write for all), then queue them.

    With ``persist_schedule`` the triggers' next fire times are stored in the same
    write, so a fire is never both lost and moved past. With ``runs_now`` the first
    one runs next and is recorded by its start write; its message keeps it safe
    meanwhile.
    """
    schedule = runner.triggers.persisted() if persist_schedule else None
    now = runner.clock()
    later = queued[1:] if runs_now else queued
    if later or schedule:
        await runner.writer.write(
            Write(tasks=[queued_write(runner, w) for w in later], schedule=schedule)
        )
    for task in later:
        task.recorded = True
    for task in queued:
        task.queued_at = now
        runner.queue_last(task)


async def missed_fires(runner: AgentRunner) -> list[Task]:
    """Fires that passed while no daemon ran the agent, per each trigger's catchUp: a
    ``MissedFires`` event for each trigger, and the tasks to queue."""
    clock = runner.triggers
    for missed in clock.missed:
        verdict = {"skip": "none run", "one": "the latest runs", "all": f"{missed.run} run"}
        await runner.writer.write(
            Write(
                event=runner.writer.event(
                    "MissedFires",
                    f"catchUp: {missed.policy}",
                    f"{missed.count} fire(s) of {missed.kind} trigger #{missed.index} passed "
                    f"while no daemon ran the agent; {verdict[missed.policy]}",
                )
            )
        )
    return [Task(f.kind, scheduled_at=f.at, index=f.index) for f in clock.catch_up]


def queued_write(runner: AgentRunner, task: Task) -> TaskWrite:
    """The first write of ``task``'s record (queued)."""
    now = runner.clock()
    return TaskWrite(task.id, queued_record(task, runner.name, now), created_at=now)
