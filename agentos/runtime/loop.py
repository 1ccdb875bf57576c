"""One task of an agent: observe, plan, act, learn, again, until observe says there is nothing.

Shared by the daemon's supervisor and by :mod:`agentos.testing`, so that an agent
author's tests exercise exactly the loop the daemon runs.
"""

from __future__ import annotations

import importlib
import sys
import traceback
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from types import ModuleType
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


_loaded: dict[str, tuple[str, ModuleType]] = {}
"""Modules loaded for a spec's ``codeHash``: name -> (hash, module), for reloads."""


def load_agent_class(
    entrypoint: str, *, code_path: str | None = None, code_hash: str | None = None
) -> tuple[type[Agent], str | None]:
    """Import ``module.path:ClassName`` and check that it is an Agent subclass; returns
    the class and, when new code failed to load, why (the previous code is kept).

    ``code_path`` (``spec.codePath``) is where the module is imported from. A
    ``code_hash`` other than the one the module was last loaded with (the file was
    edited and applied again) loads the module afresh, as a new module object: agents
    still running the old class keep it. New code that fails to import leaves the old
    module in place: its class is returned with the error.

    Raises :class:`EntrypointError` saying what went wrong and where it looked.
    """
    module_name, sep, attr = entrypoint.partition(":")
    if not sep or not module_name or not attr:
        raise EntrypointError(f"entrypoint {entrypoint!r} must look like 'package.module:Class'")
    if code_path is not None and code_path not in sys.path:
        sys.path.insert(0, code_path)
    known = _loaded.get(module_name)
    reload_error = None
    try:
        if known is not None and code_hash is not None and known[0] != code_hash:
            del sys.modules[module_name]  # a new module object from the file as it is now
            importlib.invalidate_caches()
        module = importlib.import_module(module_name)
    except Exception as e:
        where = f"from codePath {code_path}" if code_path else f"on the daemon's path ({_path()})"
        error = f"cannot import {module_name!r} {where}: {type(e).__name__}: {e}"
        if known is None:
            raise EntrypointError(f"entrypoint {entrypoint!r}: {error}") from None
        sys.modules[module_name] = module = known[1]
        reload_error, code_hash = error, known[0]
    if code_hash is not None:
        _loaded[module_name] = (code_hash, module)
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
    return obj, reload_error


def _path() -> str:
    """The daemon's module path, short, for an import error."""
    shown = [p or "." for p in sys.path[:4]]
    return ", ".join(shown) + (", …" if len(sys.path) > 4 else "")


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
