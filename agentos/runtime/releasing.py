"""How a runner lets go of its agent: hibernate, release, stop, fail.

*Hibernate* saves the agent's context and gives its engine slot back (the runner keeps
the lease). *Release* gives up the lease too: the agent's counters, usage and next
fire times are written with the lease's deletion, and the agent goes into the due
index at its next fire (or at once, when work came meanwhile), so no daemon holds a
runner, a timer or a slot for it. *Stop* is the end of a runner (shutdown, delete,
respec, rebalance, a runner error): the agent's state is saved, ``on_stop`` runs, and
the agent is released (a deleted one purged). A runner cut short while it releases
leaves ``release_due`` set; it finishes the job as it ends (:func:`complete_release`).
*Fail* gives the slot back and keeps the lease: a ``Failed`` agent waits for an
operator's wake.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import anyio

from agentos.core.lifecycle import Phase, PhaseEvent, StopReason
from agentos.runtime.closing import encode_state
from agentos.runtime.securing import give_back_slot
from agentos.runtime.watchdog import marked
from agentos.runtime.writer import LeaseLost
from agentos.sdk import Agent
from agentos.store import StoreError, Write

if TYPE_CHECKING:
    from agentos.runtime.runner import AgentRunner

__all__ = ["complete_release", "fail", "finish", "hibernate", "release_hibernated", "stop"]

log = logging.getLogger("agentos.runner")


async def hibernate(runner: AgentRunner, why: str, *, release: bool = False) -> None:
    """Save the context and give the slot back; with ``release``, let go of the agent
    in the same write (see :func:`release_hibernated`)."""
    with runner.telemetry.span("agentos.hibernate", **{"gen_ai.agent.name": runner.name}) as span:
        started = time.perf_counter()
        runner.state.hibernate_requested = None
        # Without an engine session nothing slow comes before the next write: the
        # Hibernating phase rides with it.
        await runner.set_phase(
            PhaseEvent.HIBERNATE,
            Write(status={"reason": "Hibernating", "message": why}),
            defer=not runner.session.open,
        )
        had_session = runner.session.open
        tokens = runner.session.snapshot_tokens
        status = await give_back_slot(runner)
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
        span.set_attribute("agentos.kv.bytes", runner.usage.kv_stored)
        span.set_attribute("agentos.hibernate.detail", detail)
        runner.telemetry.hibernations.add(1, {"gen_ai.agent.name": runner.name})
        runner.telemetry.hibernate_latency.record(
            took_ms / 1000, {"gen_ai.agent.name": runner.name}
        )
        fields: dict[str, object] = {
            "reason": "Hibernated",
            "message": why,
            "hibernated_at": repr(runner.clock()),
            "hibernate_ms": f"{took_ms:.1f}",
            **status,
            **runner.task_counters(),
        }
        event = runner.writer.event("Hibernated", why, f"{detail}; {took_ms:.1f} ms")
        if not release:
            await runner.set_phase(PhaseEvent.HIBERNATED, Write(status=fields, event=event))
            return
        runner.move(PhaseEvent.HIBERNATED, path=True)
        fields["phase"] = runner.phase.value
        fields["updated_at"] = repr(runner.clock())
        await release_hibernated(runner, why, fields, event)


async def release_hibernated(
    runner: AgentRunner,
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
    if runner.phase is not Phase.HIBERNATED:
        runner.state.releasing = False
        return
    at = runner.triggers.next_at
    due_at = math.inf if at is None else at
    runner.state.release_due = due_at  # from here on the agent must end up in the index
    await runner.writer.write(
        Write(
            status={
                **(fields or {}),
                **runner.counters(),
                **runner.task_counters(),
                "owner": "",
                "released_at": repr(runner.clock()),
                "due_at": repr(due_at),
            },
            event=event,
            usage=runner.usage_delta(),
            schedule=runner.triggers.persisted(heartbeats=True),
        ),
        release=True,
    )
    runner._apply_released(f"hibernated ({why})")
    await _into_index(runner, due_at)


async def _into_index(runner: AgentRunner, at: float, *, look: bool = True) -> None:
    """After the lease was given up: the agent is due at ``at`` (or sooner). Not cut
    short by a stop's grace period: a released agent outside the index would wait
    for the daemon's held set to be recovered."""
    await _until_done(
        runner,
        lambda: runner.store.waits.due_release(
            runner.name, runner.daemon_id, at, now=runner.clock(), look=look
        ),
    )
    runner.state.release_due = None


async def complete_release(runner: AgentRunner) -> None:
    """Finish a release that was cut short (the runner cancelled between deciding to
    release the agent and the due index): the lease goes, if the release did not get
    that far, and the agent is due at the time it was released for."""
    due = runner.state.release_due
    if due is None:
        return
    await _until_done(runner, lambda: runner.store.leases.release(runner.name, runner.lease_value))
    await _into_index(runner, due)
    runner.state.released = True


async def _until_done(runner: AgentRunner, op: Callable[[], Awaitable[object]]) -> None:
    """Run a release step (safe to repeat) until Redis takes it, shielded from
    cancellation: given up, the agent would be in no index, with no lease and no runner,
    its schedules stopped (a Redis away for minutes included)."""
    with anyio.CancelScope(shield=True):
        delay = 0.1
        while True:
            try:
                await runner.writer.call(op, "release")
                return
            except StoreError as e:
                log.warning(
                    "%s: release not recorded (%s); retrying in %.1fs", runner.name, e, delay
                )
                await anyio.sleep(delay)
                delay = min(delay * 2, 30.0)


async def fail(runner: AgentRunner, reason: str, message: str, tb: str) -> None:
    """The agent is ``Failed`` (its slot given back): nothing runs until an operator
    wakes it (:func:`agentos.runtime.faults.recover`)."""
    runner._apply_failed()
    saved = await give_back_slot(runner) if runner.agent is not None else {}
    runner.move(PhaseEvent.FAIL)
    await runner.writer.write(
        Write(
            status={
                **saved,
                **runner.task_counters(),
                "phase": runner.phase.value,
                "owner": runner.daemon_id,
                "reason": reason,
                "message": message,
                "last_error": message,
                "last_traceback": tb,
                "last_error_at": repr(runner.clock()),
            },
            event=runner.writer.event("Failed", reason, message),
        )
    )


async def stop(runner: AgentRunner, reason: StopReason) -> None:
    """The runner's end, for ``reason``: :func:`finish`, shielded from the cancellation of a
    daemon past its grace period, bounded, and never raising."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(10):
        try:
            await finish(runner, reason)
        except* LeaseLost:
            log.warning("%s: lease lost while stopping", runner.name)
        except* StoreError as group:
            log.warning("%s: could not record the stop: %s", runner.name, group.exceptions[0])


async def finish(runner: AgentRunner, reason: StopReason) -> None:
    if (
        runner.state.released
    ):  # released (idle, or a task waits): nothing of the agent is ours any more
        return
    if reason is StopReason.LEASE_LOST:
        log.warning("%s: lease lost (%s); stopped here", runner.name, runner.lost_why or "not ours")
        runner.session.drop()  # not ours to save: the new owner starts from Redis
        return
    await runner.writer.flush()
    # Cut off mid-iteration (grace period over): the half-done iteration's state is
    # not saved; the state of the last complete iteration already is.
    if runner.agent is not None and runner.ctx is not None and not runner.state.interrupted:
        runner.ctx.stopping = reason
        if type(runner.agent).on_stop is not Agent.on_stop:  # the default does nothing
            try:
                with anyio.move_on_after(5):
                    await marked(runner.mark, runner.agent.on_stop(runner.ctx, reason))
            except Exception as e:
                log.warning("%s: on_stop raised %s: %s", runner.name, type(e).__name__, e)
        state = encode_state(runner)
        if state is not None:
            # Rides with the closing write below (or the hibernation's).
            runner.writer.defer(Write(state=state))
    if reason is StopReason.DELETE:
        runner.session.drop()
        await runner.writer.call(
            lambda: runner.store.leases.release(runner.name, runner.lease_value), "release"
        )
        await runner.writer.call(lambda: runner.store.specs.purge_agent(runner.name), "purge")
        await runner.writer.call(
            lambda: runner.store.waits.held_remove(runner.daemon_id, [runner.name]), "release"
        )
        return
    # Hand the next owner (or the respecced runner) a KV snapshot, so it wakes
    # without re-prefill. A task cut short by the grace period is abandoned; its
    # message is redelivered. An idle agent is released hibernated, until its next
    # trigger, with or without an engine session.
    if runner.session.open and runner.phase is Phase.RUNNING:
        runner.move(PhaseEvent.IDLE)
    never = runner.resource.spec.hibernation.never
    if (
        runner.phase is Phase.IDLE
        and reason not in (StopReason.RESPEC, StopReason.RESTART)
        and (runner.session.open or not never)
    ):
        await hibernate(runner, f"daemon stopping the agent ({reason.value})")
    elif runner.session.open:
        await runner.writer.write(Write(status=await give_back_slot(runner)))
    # The flush loop skips stopping runners: this write carries every counter.
    status: dict[str, object] = {**runner.counters(), **runner.task_counters(), "owner": ""}
    if reason in (StopReason.RESPEC, StopReason.RESTART):
        # The restarted runner takes over at once: counters and usage, not a phase.
        await runner.writer.write(Write(status=status, usage=runner.usage_delta()), release=True)
        return
    if runner.phase is not Phase.HIBERNATED and runner.phase is not Phase.FAILED:
        runner.move(PhaseEvent.STOP)
        status.update(
            phase=runner.phase.value, reason="Stopped", message=f"stopped: {reason.value}"
        )
    message = f"daemon {runner.daemon_id} let go of the agent"
    if reason is StopReason.REBALANCE:
        message += ": it holds more than its fair share; another daemon takes the agent"
    event = runner.writer.event("Stopped", reason.value, message)
    if runner.error is not None:
        event = runner.writer.event(
            "RunnerError",
            type(runner.error).__name__,
            f"the runner of daemon {runner.daemon_id} failed ({type(runner.error).__name__}: "
            f"{runner.error}); the agent is activated again in {runner.error_delay_s:.0f}s",
        )
    await runner.writer.write(
        Write(
            status=status,
            event=event,
            usage=runner.usage_delta(),
            schedule=runner.triggers.persisted(heartbeats=True),
        ),
        release=True,
    )
    # Released: a hibernated agent until its next fire; any other (work queued,
    # `hibernation: never`, handed over, failed) at once, for whoever has room.
    now = runner.clock()
    at: float = now
    if (
        runner.phase is Phase.HIBERNATED
        and not runner.resource.spec.hibernation.never
        and reason is not StopReason.REBALANCE
        and not runner.state.queue
    ):
        next_at = runner.triggers.next_at
        at = math.inf if next_at is None else next_at
    if runner.error is not None:
        # Backs off like a crash: activated again after the delay (what its inbox
        # holds is not looked at: a message must not make it due at once).
        at = now + runner.error_delay_s
    runner.state.release_due = at
    await _into_index(runner, at, look=runner.error is None)
