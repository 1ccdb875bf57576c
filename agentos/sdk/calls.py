"""What one model call takes besides the engine: the agent's session, its quota, its usage.

In a daemon the runtime hands the LLM handle a :class:`SessionProvider` (the engine
slot with the agent's context restored) and an :data:`Admitter` (the quota governor,
:mod:`agentos.governor`); without a runtime (tests, scripts) a session opens on first
use and every call is admitted. :func:`metered` is the one path every call takes
through the admission and the trace, so ``generate`` and ``chat`` are metered alike.
A call made before a durable wait is kept in the task's wait log
(:func:`completion_record`) and served from it when the task runs again.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from agentos.core.chat import Reply
from agentos.engine.base import Completion, Engine
from agentos.telemetry import Telemetry

__all__ = [
    "Admission",
    "Admitter",
    "PlainSession",
    "SessionProvider",
    "Usage",
    "admit_all",
    "completion_record",
    "metered",
    "replayed_completion",
]


@dataclass(slots=True)
class Usage:
    """Tokens and calls an agent used, summed by the LLM handle."""

    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0

    def add(self, completion: Completion | Reply) -> None:
        """Count one finished inference."""
        self.calls += 1
        self.input_tokens += completion.input_tokens
        self.output_tokens += completion.output_tokens


class SessionProvider(Protocol):
    """Where the model handle gets the agent's engine session from.

    In a daemon the runtime opens the session (slot and restored context) before a
    task's agent code runs, so :meth:`ensure` finds it open; it only does work when
    agent code calls the model outside a task (a heartbeat's ``observe`` of a
    hibernated agent), and then wakes the agent.
    """

    async def ensure(self) -> object:
        """Make sure the agent holds an engine session with its context in it."""
        ...


class PlainSession:
    """A session opened on first use, for engines driven without a runtime (tests)."""

    def __init__(self, engine: Engine, session_id: str) -> None:
        self._engine = engine
        self._id = session_id

    async def ensure(self) -> None:
        if not self._engine.has_session(self._id):
            self._engine.open_session(self._id)


class Admission(Protocol):
    """What the runtime's quota governor hands out per call (see ``agentos.governor``)."""

    def start(self) -> None:
        """The engine begins the call now."""

    def used(self, tokens: int) -> None:
        """The call used ``tokens`` (input + output)."""


Admitter = Callable[[Callable[[], int], "float | None"], AbstractAsyncContextManager[Admission]]
"""``admit(estimate, timeout_s)``: an async context manager around one inference call that
waits for (or refuses, with :class:`QuotaExceeded`) its quota; ``estimate()`` gives the
tokens the call may use at most."""


class _Unmetered:
    def start(self) -> None:
        pass

    def used(self, tokens: int) -> None:
        pass


@asynccontextmanager
async def admit_all(
    estimate: Callable[[], int], timeout_s: float | None
) -> AsyncIterator[Admission]:
    yield _Unmetered()


Result = TypeVar("Result", Completion, Reply)


async def metered(
    call: Callable[[], Awaitable[Result]],
    *,
    admit: Admitter,
    estimate: Callable[[], int],
    timeout_s: float | None,
    engine: Engine,
    telemetry: Telemetry,
    operation: str,
    prompt: str,
    queued: float,
    kv_restored: Callable[[], bool],
) -> Result:
    """``call()`` under the call's quota admission and inside its inference span.

    The caller has secured the session already (``queued`` is when it started to): a
    call never waits for a slot while it holds a quota admission or an engine turn,
    since agents holding slots need those turns. The admission is charged what the
    engine counted, and the span records it with the time spent waiting and whether
    the context came back from a hibernation (``kv_restored()``, read once it is done).
    """
    async with admit(estimate, timeout_s) as admission:
        queue_wait = time.perf_counter() - queued
        admission.start()
        with telemetry.inference(
            model=engine.model, provider=engine.name, operation=operation, prompt=prompt
        ) as inference:
            result = await call()
            admission.used(result.input_tokens + result.output_tokens)
            inference.finish(
                input_tokens=result.input_tokens,
                output_tokens=result.output_tokens,
                time_to_first_token_s=result.time_to_first_token_s,
                kv_restored=kv_restored(),
                queue_wait_s=queue_wait,
                cached_tokens=result.cached_tokens,
                response_model=result.served_by,
                route_reason=result.routed,
                server_address=result.served_at,
            )
    return result


def completion_record(completion: Completion) -> dict[str, Any]:
    """What the wait log keeps of a completion (:func:`replayed_completion` reads it)."""
    return {
        "text": completion.text,
        "input_tokens": completion.input_tokens,
        "output_tokens": completion.output_tokens,
        "finish_reason": completion.finish_reason,
    }


def replayed_completion(hit: Mapping[str, Any]) -> Completion:
    """The completion a call made before a durable wait, as the wait log kept it."""
    return Completion(
        text=str(hit.get("text", "")),
        input_tokens=int(hit.get("input_tokens", 0)),
        output_tokens=int(hit.get("output_tokens", 0)),
        finish_reason=str(hit.get("finish_reason", "stop")),
        time_to_first_token_s=0.0,
        duration_s=0.0,
    )
