"""The SimEngine helpers and prompts shared by its tests (tests/unit/engine/test_engine_sim*.py)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from agentos.engine import SimEngine, StreamChunk

PROMPT = "You are a careful agent. Summarise the day."
FOLLOW_UP = "\nNow plan tomorrow."


def opened(session: str = "s", **options: object) -> SimEngine:
    """A SimEngine with ``options`` and one open session."""
    engine = SimEngine(**options)  # type: ignore[arg-type]
    engine.open_session(session)
    return engine


async def collect(engine: SimEngine, session: str, prompt: str, **kw: object) -> list[StreamChunk]:
    """Every chunk of one streamed call."""
    return [chunk async for chunk in engine.stream(session, prompt, **kw)]  # type: ignore[arg-type]


async def invoke(
    engine: SimEngine, call: Callable[[SimEngine], Awaitable[object] | object]
) -> None:
    """Call ``call(engine)``, awaiting what it returns if it is awaitable."""
    result = call(engine)
    if isinstance(result, Awaitable):
        await result
