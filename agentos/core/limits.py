"""Limits on one task (``spec.limits``): how long it may run, how many loop iterations,
how many tokens. A runaway agent (a loop that never ends, a model call that never
returns) stops at the first one it passes instead of running until its quota stops it.

A task past a limit ends ``failed`` with the limit in its reason and a
``TaskLimitExceeded`` event; it is not retried (running it again would pass the same
limit) and it is not a crash (the agent is not restarted for it). Pure: the schema and
the words; the runtime measures and stops.
"""

from __future__ import annotations

from pydantic import Field

from agentos.core.durations import PositiveDuration, format_duration
from agentos.core.specbase import _Model

__all__ = ["TaskLimitExceeded", "TaskLimits", "over_tokens"]


class TaskLimits(_Model):
    """``spec.limits`` of an Agent; each is off when left out."""

    task_timeout: PositiveDuration | None = None
    max_steps: int | None = Field(default=None, ge=1, strict=True)
    max_tokens_per_task: int | None = Field(default=None, ge=1, strict=True)

    def timeout_reason(self) -> str:
        assert self.task_timeout is not None
        return f"taskTimeout: ran past {format_duration(self.task_timeout)}"

    def steps_reason(self) -> str:
        return f"maxSteps: still had work after {self.max_steps} loop iterations"


def over_tokens(limits: TaskLimits | None, used: int) -> str | None:
    """Why a task that has used ``used`` tokens (input and output) must stop, or None."""
    if limits is None or limits.max_tokens_per_task is None:
        return None
    if used <= limits.max_tokens_per_task:
        return None
    return f"maxTokensPerTask: used {used} tokens, the limit is {limits.max_tokens_per_task}"


class TaskLimitExceeded(BaseException):
    """Raised under agent code when its task passes a limit (a BaseException, so that an
    agent's ``except Exception`` cannot keep a runaway going); ``reason`` says which."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)
