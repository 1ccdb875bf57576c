"""What one agent's runner knows about the agent it runs, in one value.

The runner (:class:`agentos.runtime.runner.AgentRunner`) owns one :class:`RunnerState`;
its collaborators (:mod:`.tasking`, :mod:`.faults`, :mod:`.waits`, :mod:`.releasing`,
:mod:`.starting`) read it and change the task-local fields (the unacknowledged message,
the phase path, the counters of a task's starts), but the phase, the queue and the stop
reason change only through the runner's ``_apply_*`` methods, so every such change is
visible in one file.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar, cast, overload

import anyio

from agentos.core.lifecycle import Phase, StopReason
from agentos.core.tasks import Task
from agentos.runtime.watchdog import Stall

__all__ = ["RunnerState", "View"]

_V = TypeVar("_V")


@dataclass(slots=True)
class RunnerState:
    """The lifecycle state of one runner (see the module docstring)."""

    phase: Phase = Phase.PENDING
    queue: deque[Task] = field(default_factory=deque)
    stop_reason: StopReason | None = None
    hibernate_requested: str | None = None
    # Set while the agent is being released into the due index (its due time); the
    # runner finishes the job as it ends if it is cancelled in between.
    release_due: float | None = None
    releasing: bool = False  # on its way to be released: not to be handed over
    released: bool = False  # the lease is given up (released or waiting): the runner ends
    failed: bool = False
    busy: bool = False
    evicting: bool = False  # the slot arbiter asked for our slot
    # Commands of the daemon not turned into tasks yet: "message", "wake".
    cmds: set[str] = field(default_factory=set)
    # The task running now and its cancel scope (`agentos tasks cancel` cuts it).
    running: tuple[Task, anyio.CancelScope] | None = None
    # Tasks cancelled while not running here (queued, starting, backing off, or
    # noted on their records): id -> (who, recorded already); each ends as it comes up.
    cancels: dict[str, tuple[str, bool]] = field(default_factory=dict)
    # The running task's message, until its ack is written (and its idempotency key).
    unacked: str | None = None
    unacked_key: str | None = None
    phase_path: list[str] = field(default_factory=list)
    interrupted: bool = False  # cancelled in the middle of an iteration
    # Isolation: blocks of the event loop charged to this agent, not yet recorded
    # (agentos.runtime.watchdog), whether one happened during the current task, and
    # how many starts of each unfinished task were cut short before it ended.
    blocked: list[Stall] = field(default_factory=list)
    blocked_in_task: bool = False
    interrupted_starts: dict[str, int] = field(default_factory=dict)
    uses_model: bool = False  # has called the model (or has a stored context)
    slow_slot: bool = False  # the last wait for a slot was long enough to say so
    saved_state: bytes | None = None  # the state's bytes as Redis holds them
    task_tokens: tuple[int, int] = (0, 0)  # tokens in and out when the task began
    over_tokens: str | None = None  # the task passed maxTokensPerTask
    task_cost: float = 0.0  # what the running task has cost so far (its calls priced)


class _HasState(Protocol):
    state: RunnerState


class View(Generic[_V]):
    """A read-only attribute of the runner that is a field of its state (what the daemon
    and the tests read; only the runner changes it)."""

    def __init__(self, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, runner: None, owner: type) -> View[_V]: ...
    @overload
    def __get__(self, runner: _HasState, owner: type) -> _V: ...
    def __get__(self, runner: _HasState | None, owner: type) -> View[_V] | _V:
        if runner is None:
            return self
        return cast(_V, getattr(runner.state, self.name))

    def __set__(self, runner: _HasState, value: object) -> None:
        # Without a setter, an assignment would hide the state's field behind a plain
        # attribute of the runner: the state changes through it, by name.
        raise AttributeError(f"{self.name} is the runner's state: set runner.state.{self.name}")
