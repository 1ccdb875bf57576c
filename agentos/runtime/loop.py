"""One task of an agent: observe, plan, act, learn, again, until observe says there is nothing.

Shared by the daemon's supervisor and by :mod:`agentos.testing`, so that an agent
author's tests exercise exactly the loop the daemon runs.
"""

from __future__ import annotations

import importlib
import traceback
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import anyio.lowlevel

from agentos.sdk import Agent, Context

__all__ = [
    "AgentCodeError",
    "EntrypointError",
    "StepHook",
    "TaskResult",
    "load_agent_class",
    "run_task",
]


class EntrypointError(Exception):
    """The spec's entrypoint does not name an importable Agent subclass. Not retried."""


class AgentCodeError(Exception):
    """Agent code raised in ``phase``; ``tb`` is the formatted traceback."""

    def __init__(self, phase: str, error: BaseException) -> None:
        self.phase = phase
        self.error = error
        self.tb = "".join(traceback.format_exception(error))
        super().__init__(f"{phase} raised {type(error).__name__}: {error}")


@dataclass(frozen=True, slots=True)
class TaskResult:
    """How a task ended: the number of loop iterations it ran and the last outcome."""

    steps: int
    outcome: Any
    stopped: bool  # ended early because the agent is stopping
    limited: bool = False  # observe found more work after max_steps iterations


StepHook = Callable[[int, Any], Awaitable[None]]
PhaseSpan = Callable[[str], AbstractContextManager[Any]]


def no_span(phase: str) -> AbstractContextManager[Any]:
    return nullcontext()


def load_agent_class(entrypoint: str) -> type[Agent]:
    """Import ``module.path:ClassName`` and check that it is an Agent subclass.

    Raises :class:`EntrypointError` saying what went wrong, in words an operator
    can act on.
    """
    module_name, sep, attr = entrypoint.partition(":")
    if not sep or not module_name or not attr:
        raise EntrypointError(f"entrypoint {entrypoint!r} must look like 'package.module:Class'")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise EntrypointError(
            f"entrypoint {entrypoint!r}: cannot import {module_name!r}: {type(e).__name__}: {e}"
        ) from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise EntrypointError(
                f"entrypoint {entrypoint!r}: module {module_name!r} has no attribute {attr!r}"
            ) from None
    if not (isinstance(obj, type) and issubclass(obj, Agent)):
        raise EntrypointError(
            f"entrypoint {entrypoint!r} is {obj!r}, not a subclass of agentos.Agent"
        )
    return obj


async def run_task(
    agent: Agent,
    ctx: Context,
    *,
    after_step: StepHook,
    first_observation: Any = None,
    max_steps: int | None = None,
    phase_span: PhaseSpan = no_span,
    before_step: Callable[[], Awaitable[None]] | None = None,
) -> TaskResult:
    """Run loop iterations until ``observe`` returns None or the agent is stopping (or,
    after ``max_steps`` iterations, observe still finds work: ``limited``).

    ``after_step(step, outcome)`` runs after each complete iteration (the runtime
    saves state there). When ``first_observation`` is given, the first iteration
    uses it instead of calling observe (a heartbeat has already observed).
    ``phase_span(name)`` wraps each agent call (the daemon opens a tracing span).
    ``before_step()`` runs when observe found work, before its plan (the runtime makes
    the previous step's state durable there, if it held it back).
    Raises :class:`AgentCodeError` when agent code raises.
    """
    steps = 0
    outcome: Any = None
    observation = first_observation
    while ctx.stopping is None:
        if observation is None:
            observation = await _call("observe", agent.observe(ctx), phase_span)
            if observation is None:
                return TaskResult(steps, outcome, stopped=False)
            if max_steps is not None and steps >= max_steps:
                return TaskResult(steps, outcome, stopped=False, limited=True)
            if before_step is not None:
                await before_step()
        plan = await _call("plan", agent.plan(ctx, observation), phase_span)
        outcome = await _call("act", agent.act(ctx, plan), phase_span)
        await _call("learn", agent.learn(ctx, outcome), phase_span)
        steps += 1
        observation = None
        ctx._waits.next_iteration()  # what the next iteration waits for is its own
        await after_step(steps, outcome)
        # A busy agent must not starve the others that share the event loop.
        await anyio.lowlevel.checkpoint()
    return TaskResult(steps, outcome, stopped=ctx.stopping is not None)


async def _call(phase: str, awaitable: Awaitable[Any], span: PhaseSpan) -> Any:
    with span(phase):
        try:
            return await awaitable
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as e:
            raise AgentCodeError(phase, e) from e
