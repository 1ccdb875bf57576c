"""The runner's loop between tasks: what an agent does when no task runs.

Each turn it records the event-loop blocks the watchdog charged to the agent, waits
for an operator's wake while the agent is Failed, hibernates it when asked (an
operator's request releases it too; the slot arbiter's only swaps it out), runs the
next due task, or, with nothing due, releases an agent idle for ``idleAfter`` until
its next trigger; else it waits for a command, a fire or the next deadline and turns
what came into queued tasks (:mod:`.intake`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agentos.core.lifecycle import Phase
from agentos.core.tasks import Task
from agentos.runtime import faults, intake, releasing, tasking

if TYPE_CHECKING:
    from agentos.runtime.runner import AgentRunner

__all__ = ["loop"]


async def loop(runner: AgentRunner) -> None:
    """Until the runner is asked to stop: run due tasks, hibernate or release the agent
    when asked or idle long enough, else wait for a command, a fire or a deadline."""
    s = runner.state
    while s.stop_reason is None:
        if s.blocked:  # charged by the watchdog outside a task (observe, init)
            await faults.charge_blocked(runner)
            continue
        if s.failed:
            await runner.wait_nudge(None)
            if "wake" in s.cmds:
                s.cmds.discard("wake")
                if await faults.recover(runner) and not s.queue:
                    runner.queue_last(Task("wake"))
            continue
        # A slot promised to a waiting agent goes first: we are idle, it is not.
        if s.hibernate_requested and s.phase is Phase.IDLE:
            # An operator's request releases the agent too; an eviction (another
            # agent needs the slot) only swaps it out until it is idle long enough.
            asked, why = not s.evicting, s.hibernate_requested
            s.releasing = (
                asked and not runner.resource.spec.hibernation.never and _releasable(runner)
            )
            await releasing.hibernate(runner, why, release=s.releasing)
            s.releasing = False
            continue
        if s.evicting:  # asked while not idle: let the arbiter ask someone else
            s.evicting = False
            runner.arbiter.eviction_over(runner.name)
        task = runner.next_due(pop=True)
        if task is not None:
            await tasking.run_task(runner, task)
            continue
        if s.phase is Phase.HIBERNATED:
            s.hibernate_requested = None
        now = runner.clock()
        deadlines = [runner.triggers.next_at] + [w.not_before for w in s.queue]
        hibernation = runner.resource.spec.hibernation
        if s.phase in (Phase.IDLE, Phase.HIBERNATED) and not hibernation.never:
            idle_deadline = runner.last_activity + hibernation.idle_after
            if idle_deadline <= now and _releasable(runner):
                why = f"idle for {hibernation.idle_after:g}s"
                s.releasing = True  # not to be handed over meanwhile
                if s.phase is Phase.IDLE:
                    await releasing.hibernate(runner, why, release=True)
                else:
                    await releasing.release_hibernated(runner, why)
                continue
            deadlines.append(idle_deadline)
        due = [d for d in deadlines if d is not None]
        await runner.wait_nudge(max(0.0, min(due) - now) if due else None)
        await intake.collect(runner)


def _releasable(runner: AgentRunner) -> bool:
    """Nothing to do before the next trigger: the agent may be released until then."""
    next_at = runner.triggers.next_at
    s = runner.state
    return (
        not (s.queue or s.cmds or s.busy)
        and s.stop_reason is None
        and (next_at is None or next_at > runner.clock() + 0.05)
    )
