"""The agent phase machine and restart arithmetic, as pure functions.

Every phase change of an agent goes through :func:`transition`, so an impossible
change (waking an agent that is running, hibernating a failed one) is caught where it
is attempted instead of showing up later as a confusing status. Backoff and
crash-loop decisions live here too, so that the supervisor only performs them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "IllegalTransition",
    "Phase",
    "PhaseEvent",
    "RestartDecision",
    "StopReason",
    "backoff_delay",
    "on_failure",
    "transition",
]


class Phase(enum.StrEnum):
    """Where an agent is in its life, as shown by ``agentos ps``."""

    PENDING = "Pending"  # desired, not yet started by any daemon (or restarting after an error)
    RUNNING = "Running"  # executing a task (observe / plan / act / learn)
    IDLE = "Idle"  # started, holding an engine slot, nothing to do
    HIBERNATING = "Hibernating"  # exporting KV and state, about to free its slot
    HIBERNATED = "Hibernated"  # no slot held; KV and state in Redis
    WAKING = "Waking"  # taking a slot and restoring KV (or re-prefilling)
    WAITING = "Waiting"  # a task waits durably (answer, event, time); no runner, lease or slot
    FAILED = "Failed"  # crash loop or an error no restart can fix; needs an operator
    STOPPED = "Stopped"  # stopped by a daemon shutdown; another daemon may adopt it


class PhaseEvent(enum.StrEnum):
    """What happened to an agent; the input of :func:`transition`."""

    START = "start"  # a supervisor took the agent
    TASK = "task"  # a task began
    IDLE = "idle"  # observe returned None
    HIBERNATE = "hibernate"
    HIBERNATED = "hibernated"
    WAKE = "wake"
    WOKE = "woke"
    CRASH = "crash"  # agent code raised; a restart follows
    FAIL = "fail"  # crash loop or permanent error
    STOP = "stop"
    WAIT = "wait"  # a task parked on a durable wait; the agent is released


class StopReason(enum.StrEnum):
    """Why an agent is asked to stop; agents read it as ``ctx.stopping``."""

    SHUTDOWN = "shutdown"  # the daemon is exiting
    DELETE = "delete"  # the agent was deleted
    RESPEC = "respec"  # a new spec was applied; the agent restarts with it
    RESTART = "restart"  # `agentos restart`: the agent restarts (with its code loaded anew)
    LEASE_LOST = "lease-lost"  # another daemon owns the agent now
    REBALANCE = "rebalance"  # handed to another daemon: this one holds more than its share


class IllegalTransition(ValueError):
    """A phase change that the phase machine does not allow."""


_ALLOWED: dict[tuple[Phase, PhaseEvent], Phase] = {
    (Phase.PENDING, PhaseEvent.START): Phase.IDLE,
    (Phase.STOPPED, PhaseEvent.START): Phase.IDLE,
    (Phase.FAILED, PhaseEvent.START): Phase.IDLE,
    (Phase.HIBERNATED, PhaseEvent.START): Phase.HIBERNATED,
    (Phase.IDLE, PhaseEvent.TASK): Phase.RUNNING,
    (Phase.RUNNING, PhaseEvent.TASK): Phase.RUNNING,
    (Phase.RUNNING, PhaseEvent.IDLE): Phase.IDLE,
    (Phase.IDLE, PhaseEvent.IDLE): Phase.IDLE,
    (Phase.IDLE, PhaseEvent.HIBERNATE): Phase.HIBERNATING,
    (Phase.HIBERNATING, PhaseEvent.HIBERNATED): Phase.HIBERNATED,
    (Phase.HIBERNATED, PhaseEvent.WAKE): Phase.WAKING,
    (Phase.WAKING, PhaseEvent.WOKE): Phase.IDLE,
    (Phase.HIBERNATED, PhaseEvent.HIBERNATED): Phase.HIBERNATED,
    # agent code that fails in a heartbeat's observe restarts without waking
    (Phase.HIBERNATED, PhaseEvent.CRASH): Phase.HIBERNATED,
    (Phase.RUNNING, PhaseEvent.WAIT): Phase.WAITING,
}
for _phase in (Phase.RUNNING, Phase.IDLE, Phase.HIBERNATING, Phase.WAKING, Phase.PENDING):
    _ALLOWED[(_phase, PhaseEvent.CRASH)] = Phase.PENDING
for _phase in Phase:
    if _phase is not Phase.STOPPED:
        _ALLOWED[(_phase, PhaseEvent.FAIL)] = Phase.FAILED
    _ALLOWED[(_phase, PhaseEvent.STOP)] = Phase.STOPPED


def transition(phase: Phase, event: PhaseEvent) -> Phase:
    """Return the phase that ``event`` leads to from ``phase``.

    Raises :class:`IllegalTransition` when the machine has no such edge.
    """
    try:
        return _ALLOWED[(phase, event)]
    except KeyError:
        raise IllegalTransition(f"cannot {event.value} an agent that is {phase.value}") from None


def backoff_delay(failures: int, initial_s: float, max_s: float) -> float:
    """Seconds to wait before restart number ``failures`` (1-based): doubling, capped."""
    if failures < 1:
        return 0.0
    # Cap the exponent so that huge failure counts do not overflow a float.
    return float(min(max_s, initial_s * 2.0 ** min(failures - 1, 62)))


@dataclass(frozen=True, slots=True)
class RestartDecision:
    """What to do after agent code failed: restart after ``delay_s``, or give up."""

    failed: bool
    delay_s: float
    consecutive_failures: int


def on_failure(
    consecutive_failures: int, *, crash_loop_after: int, initial_s: float, max_s: float
) -> RestartDecision:
    """Decide the fate of an agent whose code just raised.

    ``consecutive_failures`` counts failures before this one; a task that succeeds
    resets it to zero. The agent fails for good once ``crash_loop_after`` failures
    happened in a row.
    """
    count = consecutive_failures + 1
    if count >= crash_loop_after:
        return RestartDecision(failed=True, delay_s=0.0, consecutive_failures=count)
    return RestartDecision(
        failed=False, delay_s=backoff_delay(count, initial_s, max_s), consecutive_failures=count
    )
