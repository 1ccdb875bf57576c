"""A task's engine session: secured before agent code runs, lent while tools run.

:func:`secure` wakes the agent (a hibernated one is restored, ``Woke``) and takes its
engine slot in the fair order before agent code that may call the model runs, so a
task never waits for a slot while it holds an inference turn. An agent that never
called the model takes no slot for its tasks: its first model call secures one through
:class:`OnDemandSession`. :func:`away` lends the slot while agent code runs tools long
enough, saving the KV as a hibernation would.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from agentos.core.lifecycle import Phase, PhaseEvent
from agentos.engine.base import EngineError, EngineUnavailable
from agentos.runtime.hibernator import Restored
from agentos.runtime.writer import LeaseLost
from agentos.store import StoreError, Write

if TYPE_CHECKING:
    from agentos.runtime.runner import AgentRunner

__all__ = [
    "NO_SPAN",
    "OnDemandSession",
    "away",
    "give_back_slot",
    "must_wake",
    "secure",
    "slot_slow",
]

_T = TypeVar("_T")
log = logging.getLogger("agentos.runner")


class _NoSpan:
    def set_attribute(self, key: str, value: object) -> None:
        pass


NO_SPAN = _NoSpan()


class OnDemandSession:
    """The model handle's way to a session when agent code calls the model with none
    open (a heartbeat's ``observe`` of a hibernated agent): wake it as a task would."""

    def __init__(self, runner: AgentRunner) -> None:
        self._runner = runner

    async def ensure(self) -> None:
        try:
            secured = await secure(self._runner, "llm")
        except (StoreError, EngineError) as e:
            raise EngineUnavailable(f"could not wake the agent for a model call: {e}") from e
        if not secured:
            raise EngineUnavailable("the agent is stopping; no engine session for this call")

    async def away(self, fn: Callable[[], Awaitable[_T]]) -> _T:
        """Run ``fn`` (tool calls, no model call) while the slot may be lent."""
        return await away(self._runner, fn)


async def away(runner: AgentRunner, fn: Callable[[], Awaitable[_T]]) -> _T:
    """Run ``fn`` (agent code that makes no model call: its tools) and, once it has
    run for ``lend_after_s``, let the slot arbiter take our engine slot for an agent
    waiting for one. The KV is saved as on hibernation, so the next model call
    restores it (it takes a slot again, in the fair order) instead of re-prefilling.
    Nothing is lent while nobody waits, and a lend in progress completes before this
    returns, so the session is never half-saved.
    """
    if not runner.session.open or runner.lend_after_s <= 0:
        return await fn()
    saving = False

    async def lend() -> None:
        nonlocal saving
        await anyio.sleep(runner.lend_after_s)
        runner.lend_asked = anyio.Event()
        runner.lendable = True
        runner.arbiter.holder_idle()  # a waiter may pick us now
        await runner.lend_asked.wait()
        saving = True
        with anyio.CancelScope(shield=True):
            runner.lendable = False
            status = await give_back_slot(runner)
            runner.lent += 1
            with contextlib.suppress(LeaseLost, StoreError):
                await runner.writer.write(
                    Write(
                        status={**status, "reason": "SlotLent", "message": "slot lent during tools"}
                    )
                )

    async with anyio.create_task_group() as tg:
        tg.start_soon(lend)
        try:
            result = await fn()
        finally:
            runner.lendable = False
            if not saving:
                tg.cancel_scope.cancel()
    return result


async def give_back_slot(runner: AgentRunner) -> dict[str, object]:
    """Save the context (if it changed) and give the slot back; status fields to write.

    Whatever the reason, a slot the arbiter asked for is then given: its request ends.
    """
    try:
        if not runner.session.open:
            return {}
        try:
            saved = await runner.session.give_back()
        except EngineError as e:
            log.warning("%s: could not export the KV (%s); not saved", runner.name, e)
            return {}
        if saved is None:
            return {}
        runner.telemetry.kv_bytes.add(saved.stored_bytes - runner.usage.kv_stored)
        runner.usage.set_kv_stored(saved.stored_bytes)
        return saved.status
    finally:
        if runner.state.evicting:
            runner.state.evicting = False
            runner.state.hibernate_requested = None
            runner.arbiter.eviction_over(runner.name)


def slot_slow(runner: AgentRunner) -> None:
    """The arbiter says the wait for a slot is long: a ``SlotWait`` event follows."""
    runner.state.slow_slot = True
    log.info("%s: still waiting for an engine slot", runner.name)


def must_wake(runner: AgentRunner) -> bool:
    """Whether a task would have to wake the agent (restore or take a slot) first."""
    return runner.phase is Phase.HIBERNATED or (runner.state.uses_model and not runner.session.open)


async def secure(runner: AgentRunner, trigger: str, *, slot: bool = True) -> bool:
    """Wake the agent and hold its engine session, context restored, before agent
    code runs. Without ``slot`` (an agent that has never used the model) only the
    phase wakes: its first model call takes the slot, before its admission.

    Waits for a slot as long as it takes (in the fair order), but not past a stop
    request: returns False then.
    """
    if runner.session.open:
        return True
    hibernated = runner.phase is Phase.HIBERNATED
    if not slot and not hibernated:
        return True
    if hibernated:
        await runner.set_phase(
            PhaseEvent.WAKE, Write(status={"reason": "Waking", "message": f"woken by {trigger}"})
        )
    if not slot:
        await _woke(runner, trigger, None, 0.0, hibernated, NO_SPAN)
        return True
    if runner.session.would_wait:
        await runner.writer.write(
            Write(
                status={
                    "reason": "WaitingForSlot",
                    "message": f"waiting for one of {runner.engine.slots} engine slot(s)",
                }
            )
        )
    await runner.writer.flush()  # a slot may take a while: the last task's close goes first
    waited = time.perf_counter()
    runner.state.slow_slot = False
    waking = hibernated or runner.session.has_snapshot
    # A span only for a real wake: one started and never ended would leak.
    traced = (
        runner.telemetry.span("agentos.wake", **{"gen_ai.agent.name": runner.name})
        if waking
        else nullcontext(NO_SPAN)
    )
    with traced as span:
        ok, restored = await runner.until_stopped(runner.session.ensure)
        if not ok:
            return False
        took_s = time.perf_counter() - waited
        if runner.state.slow_slot:
            await runner.writer.write(
                Write(
                    event=runner.writer.event(
                        "SlotWait", "slots", f"waited {took_s:.1f}s for an engine slot"
                    )
                )
            )
        if restored is None and not hibernated:
            return True
        await _woke(runner, trigger, restored, took_s, hibernated, span)
    return True


async def _woke(
    runner: AgentRunner,
    trigger: str,
    restored: Restored | None,
    took_s: float,
    hibernated: bool,
    span: Any,
) -> None:
    path = restored.path if restored is not None else "empty"
    why = restored.why if restored is not None else "no snapshot; context starts empty"
    span.set_attribute("agentos.wake.path", path)
    span.set_attribute("agentos.wake.reason", why)
    span.set_attribute("agentos.kv.bytes", restored.nbytes if restored is not None else 0)
    attrs = {"gen_ai.agent.name": runner.name, "agentos.wake.path": path}
    runner.telemetry.wakes.add(1, attrs)
    runner.telemetry.wake_latency.record(took_s, attrs)
    if path == "restore" and runner.ctx is not None:
        runner.ctx.llm.kv_restored = True
    status: dict[str, object] = {
        "reason": "Woke",
        "message": why,
        "wake_path": path,
        "wake_ms": f"{took_s * 1000:.1f}",
        "woke_at": repr(runner.clock()),
    }
    event = runner.writer.event(
        "Woke", path, f"{why} in {took_s * 1000:.1f} ms (trigger {trigger})"
    )
    if hibernated:
        await runner.set_phase(PhaseEvent.WOKE, Write(status=status, event=event))
    else:
        await runner.writer.write(Write(status=status, event=event))
