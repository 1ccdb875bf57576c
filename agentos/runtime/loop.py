"""One task of an agent: observe, plan, act, learn, again, until observe says there is nothing.

Shared by the daemon's supervisor and by :mod:`agentos.testing`, so that an agent
author's tests exercise exactly the loop the daemon runs.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import traceback
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio.lowlevel

from agentos.core.code import module_candidates
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


_loaded: dict[tuple[str, str], tuple[str, ModuleType]] = {}
"""Modules loaded from a spec's ``codePath``: (path, name) -> (codeHash, module)."""


def load_agent_class(
    entrypoint: str, *, code_path: str | None = None, code_hash: str | None = None
) -> tuple[type[Agent], str | None]:
    """Import ``module.path:ClassName`` and check that it is an Agent subclass; returns
    the class and, when new code failed to load, why (the previous code is kept).

    With ``code_path`` (``spec.codePath``) the module is loaded from its file there, not
    from whatever the daemon's path finds first (two agents' folders may both hold an
    ``agent.py``), and that folder joins the end of the path for what the module
    imports. A ``code_hash`` other than the one it was last loaded with (the file was
    edited and applied again) loads it afresh, as a new module object (a package with
    its submodules): agents still running the old class keep it. New code that fails to
    import leaves the old module in place: its class is returned with the error.

    Raises :class:`EntrypointError` saying what went wrong and where it looked.
    """
    module_name, sep, attr = entrypoint.partition(":")
    if not sep or not module_name or not attr:
        raise EntrypointError(f"entrypoint {entrypoint!r} must look like 'package.module:Class'")
    reload_error = None
    if code_path is None:
        try:
            module = importlib.import_module(module_name)
        except Exception as e:
            raise EntrypointError(
                f"entrypoint {entrypoint!r}: cannot import {module_name!r} on the daemon's "
                f"path ({_path()}): {type(e).__name__}: {e}"
            ) from None
    else:
        known = _loaded.get((code_path, module_name))
        try:
            module = _from_folder(module_name, code_path, code_hash, known)
        except Exception as e:
            error = f"cannot import {module_name!r} from codePath {code_path}: "
            error += e.args[0] if isinstance(e, EntrypointError) else f"{type(e).__name__}: {e}"
            if known is None:
                raise EntrypointError(f"entrypoint {entrypoint!r}: {error}") from None
            sys.modules[module_name] = module = known[1]
            reload_error, code_hash = error, known[0]
        _loaded[(code_path, module_name)] = (code_hash or "", module)
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


def _from_folder(
    name: str, folder: str, code_hash: str | None, known: tuple[str, ModuleType] | None
) -> ModuleType:
    """Module ``name`` from its file under ``folder``: the one loaded before while its
    hash is the same (or the one Python has from that very file), else loaded anew."""
    if known is not None and known[0] == (code_hash or ""):
        return known[1]
    files = [f for f in module_candidates(Path(folder), name) if f.is_file()]
    if not files:
        looked = " and ".join(str(f) for f in module_candidates(Path(folder), name))
        raise EntrypointError(f"not found (looked for {looked})")
    file = files[0]
    if folder not in sys.path:
        sys.path.append(folder)  # for what the module imports; never ahead of the rest
    cached = sys.modules.get(name)
    cached_file = getattr(cached, "__file__", None)
    if (
        known is None
        and cached is not None
        and cached_file
        and Path(cached_file).resolve() == file.resolve()
    ):
        return cached  # already imported from this file (by this process, before)
    package = file.name == "__init__.py"
    spec = importlib.util.spec_from_file_location(
        name, file, submodule_search_locations=[str(file.parent)] if package else None
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    stale = {n: m for n, m in sys.modules.items() if package and n.startswith(name + ".")}
    for sub in stale:  # the package's submodules come anew with it
        del sys.modules[sub]
    previous = sys.modules.get(name)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.update(stale)
        if previous is not None:
            sys.modules[name] = previous
        else:
            del sys.modules[name]
        raise
    return module


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
