"""What to do when a task did not succeed: restart, fail, retry later or park. Pure.

The runner classifies what went wrong into a :class:`Fault` and asks :func:`decide`;
this module never sees an exception, an event loop or a clock other than ``now``.
The rule that matters most (STYLE.md, "errors say who must act"): only the agent's
own exceptions count toward ``crashLoopAfter``. A wait for a slot, a Redis hiccup, an
engine outage or a quota is infrastructure: the task is retried or parked, and the
agent's crash count does not move.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from agentos.core.lifecycle import backoff_delay, on_failure

__all__ = ["INFRA_BACKOFF", "Action", "Fault", "RestartPolicy", "Verdict", "decide"]

# Infrastructure retries back off from 1 s to 30 s; they never end in Failed.
INFRA_BACKOFF = (1.0, 30.0)
MIN_QUOTA_RETRY_S = 1.0


class Fault(enum.StrEnum):
    """Who must act on a task that did not finish."""

    AGENT = "agent"  # agent code raised: backoff, restart, crash loop
    RATE = "rate"  # a rate or concurrency quota could not admit a call in time
    BUDGET = "budget"  # a daily budget is spent: park until it allows again
    INFRA = "infra"  # Redis, the engine or a slot: retry, never the agent's fault


class Action(enum.StrEnum):
    RESTART = "restart"  # re-instantiate the agent after delay_s, then retry the task
    FAIL = "fail"  # crash loop: Failed until an operator wakes it
    RETRY = "retry"  # run the same task again after delay_s, same agent instance
    PARK = "park"  # keep the task aside until resume_at (or the quota changes)


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """An agent's ``restartPolicy``: backoff bounds and the crash-loop threshold."""

    crash_loop_after: int
    initial_s: float
    max_s: float


@dataclass(frozen=True, slots=True)
class Verdict:
    """The decision for one fault, and the counters as they stand after it."""

    action: Action
    delay_s: float
    resume_at: float
    consecutive_failures: int  # agent crashes in a row (only AGENT faults move it)
    infra_attempts: int  # infrastructure retries in a row of this task
    crashed: bool  # counts as a restart and a failed attempt in the agent's status


def decide(
    fault: Fault,
    *,
    now: float,
    policy: RestartPolicy,
    consecutive_failures: int,
    infra_attempts: int = 0,
    retry_after_s: float = 0.0,
) -> Verdict:
    """Decide the fate of a task that ended with ``fault`` at ``now``.

    ``retry_after_s`` is what the quota said (rate: when a retry may be admitted;
    budget: when the budget's day ends).
    """
    if fault is Fault.AGENT:
        restart = on_failure(
            consecutive_failures,
            crash_loop_after=policy.crash_loop_after,
            initial_s=policy.initial_s,
            max_s=policy.max_s,
        )
        action = Action.FAIL if restart.failed else Action.RESTART
        return Verdict(
            action,
            restart.delay_s,
            now + restart.delay_s,
            restart.consecutive_failures,
            0,
            crashed=True,
        )
    if fault is Fault.RATE:
        delay = max(retry_after_s, MIN_QUOTA_RETRY_S)
        return Verdict(
            Action.RETRY, delay, now + delay, consecutive_failures, infra_attempts, crashed=False
        )
    if fault is Fault.BUDGET:
        delay = max(retry_after_s, MIN_QUOTA_RETRY_S)
        return Verdict(
            Action.PARK, delay, now + delay, consecutive_failures, infra_attempts, crashed=False
        )
    attempts = infra_attempts + 1
    delay = backoff_delay(attempts, *INFRA_BACKOFF)
    return Verdict(Action.RETRY, delay, now + delay, consecutive_failures, attempts, crashed=False)
