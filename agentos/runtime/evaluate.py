"""Judging a task after it ran: the Agent's ``spec.evaluate`` function, loaded, bounded, contained.

An agent can say whether its task did its job (``ctx.succeed`` / ``ctx.fail``), but a
wrong answer often looks like a right one from inside. An Agent may declare
``spec.evaluate: {entrypoint: module:function, timeout: 30s}``: a function the runtime
calls after each task that ended normally, and that ``agentos eval`` calls again over
recorded tasks. Its verdict wins over the agent's own.

The function is ``fn(task, result)``: ``task`` is an
:class:`~agentos.core.taskview.EvaluatedTask` (id, agent, trigger, status, message body,
result, error, attempt and the agent's own verdict), ``result`` the task's result as its
record keeps it (text; JSON for a structured result). It returns ``True`` / ``False``,
``"pass"`` / ``"fail"`` / ``"unknown"``, a score (passes at 0.5 or above), a mapping
``{verdict | pass, score, reason}`` or an :class:`~agentos.core.outcomes.Outcome`
(:func:`agentos.core.outcomes.outcome_of`). It may be ``async`` (run on the event loop:
it must not block it) or plain (run in a worker thread). It is imported like the
agent's class: from ``spec.codePath`` when the agent has one (the same module object as
the agent's, when they share a module), else from the daemon's path.

A judge is the runtime's helper, not the agent: one that cannot be imported, raises,
runs past ``evaluate.timeout`` or returns something that is not a verdict gives the
verdict ``unknown`` with the error recorded, never a crash of the agent or the daemon,
and never a step toward the agent's crash loop. A plain function past its timeout is
abandoned in its thread (Python cannot stop a thread); the agent goes on.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
from collections.abc import Callable
from typing import Any

import anyio
import anyio.to_thread

from agentos.core.durations import format_duration
from agentos.core.outcomes import Outcome, outcome_of
from agentos.core.routespec import Evaluate
from agentos.core.spec import AgentSpec
from agentos.core.taskview import EvaluatedTask
from agentos.runtime.loop import EntrypointError, _from_folder, _loaded, _path

__all__ = ["Evaluator", "EvaluatorFn", "evaluator_of", "judge", "load_evaluator"]

EvaluatorFn = Callable[[EvaluatedTask, str], Any]
_ERROR_CHARS = 500


def load_evaluator(
    entrypoint: str, *, code_path: str | None = None, code_hash: str | None = None
) -> EvaluatorFn:
    """Import ``module.path:function`` (from ``code_path`` when given, as the agent's
    class is: :func:`agentos.runtime.loop.load_agent_class`) and check it is callable.

    Raises :class:`EntrypointError` saying what went wrong and where it looked.
    """
    module_name, sep, attr = entrypoint.partition(":")
    if not sep or not module_name or not attr:
        raise EntrypointError(f"evaluate {entrypoint!r} must look like 'package.module:function'")
    try:
        if code_path is None:
            module = importlib.import_module(module_name)
        else:
            known = _loaded.get((code_path, module_name))
            module = _from_folder(module_name, code_path, code_hash, known)
            _loaded[(code_path, module_name)] = (code_hash or "", module)
    except Exception as e:
        where = f"codePath {code_path}" if code_path else f"the daemon's path ({_path()})"
        detail = e.args[0] if isinstance(e, EntrypointError) else f"{type(e).__name__}: {e}"
        raise EntrypointError(
            f"evaluate {entrypoint!r}: cannot import {module_name!r} from {where}: {detail}"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise EntrypointError(
            f"evaluate {entrypoint!r}: module {module_name!r} has no function {attr!r}"
        )
    return fn  # type: ignore[no-any-return]


def _is_async(fn: Any) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - an object whose __call__ is async
    )


def _unknown(error: str) -> Outcome:
    if len(error) > _ERROR_CHARS:
        error = error[: _ERROR_CHARS - 1] + "…"
    return Outcome("unknown", source="evaluator", error=error)


async def judge(fn: EvaluatorFn, task: EvaluatedTask, *, timeout_s: float) -> Outcome:
    """``fn``'s verdict on ``task`` (source ``evaluator``), or ``unknown`` with ``error``
    saying why there is none: it raised, ran past ``timeout_s`` or returned something
    that is not a verdict. Never raises (but for cancellation)."""
    try:
        with anyio.fail_after(timeout_s):
            if _is_async(fn):
                value = await fn(task, task.result)
            else:
                value = await anyio.to_thread.run_sync(
                    fn, task, task.result, abandon_on_cancel=True
                )
                if inspect.isawaitable(value):
                    close = getattr(value, "close", None)
                    if callable(close):
                        close()  # never awaited: no "coroutine was never awaited" warning
                    return _unknown(
                        "the evaluator returned an awaitable from a plain function; "
                        "declare it `async def`"
                    )
    except TimeoutError:
        return _unknown(f"timed out after {format_duration(timeout_s)}")
    except Exception as e:
        return _unknown(f"raised {type(e).__name__}: {e}")
    try:
        outcome = outcome_of(value)
    except ValueError as e:
        return _unknown(f"returned no verdict: {e}")
    return dataclasses.replace(outcome, source="evaluator", error=None)


class Evaluator:
    """An Agent's ``spec.evaluate``: its function loaded once (again when the code
    changes), called by :meth:`judge`."""

    def __init__(
        self, evaluate: Evaluate, *, code_path: str | None = None, code_hash: str | None = None
    ) -> None:
        self.evaluate = evaluate
        self.code_path = code_path
        self.code_hash = code_hash
        self._fn: EvaluatorFn | None = None

    @property
    def name(self) -> str:
        """Who judges, for the trace: the entrypoint."""
        return self.evaluate.entrypoint

    def load(self) -> EvaluatorFn:
        """The function (imported on first use). Raises :class:`EntrypointError`."""
        if self._fn is None:
            self._fn = load_evaluator(
                self.evaluate.entrypoint, code_path=self.code_path, code_hash=self.code_hash
            )
        return self._fn

    async def judge(self, task: EvaluatedTask) -> Outcome:
        """The verdict on ``task`` (see :func:`judge`); an evaluator that cannot be
        imported gives ``unknown`` with the import error."""
        try:
            fn = self.load()
        except EntrypointError as e:
            return _unknown(str(e))
        return await judge(fn, task, timeout_s=self.evaluate.timeout)


_evaluators: dict[tuple[str, float, str | None, str | None], Evaluator] = {}


def evaluator_of(spec: AgentSpec) -> Evaluator | None:
    """The evaluator ``spec`` declares (one object per entrypoint, timeout and code
    version, so its function is imported once), or None."""
    if spec.evaluate is None:
        return None
    key = (spec.evaluate.entrypoint, spec.evaluate.timeout, spec.code_path, spec.code_hash)
    evaluator = _evaluators.get(key)
    if evaluator is None:
        evaluator = _evaluators[key] = Evaluator(
            spec.evaluate, code_path=spec.code_path, code_hash=spec.code_hash
        )
    return evaluator
