"""One import point for inference backends, and a by-name factory so config can pick one.

The runtime and the CLI (``--engine sim``) only ever see the :class:`Engine` protocol;
:func:`create_engine` maps a backend name to the class that implements it. Backends
other than ``sim`` pull in heavy native dependencies, so they are imported only when
asked for by name.
"""

from __future__ import annotations

import importlib
from typing import Any

from agentos.engine.base import (
    Completion,
    ContextOverflow,
    Engine,
    EngineError,
    EngineUnavailable,
    KVSnapshot,
    NoFreeSlot,
    SessionInfo,
    StreamChunk,
)
from agentos.engine.sim import SimEngine, SimStats

__all__ = [
    "BACKENDS",
    "Completion",
    "ContextOverflow",
    "Engine",
    "EngineError",
    "EngineUnavailable",
    "KVSnapshot",
    "NoFreeSlot",
    "SessionInfo",
    "SimEngine",
    "SimStats",
    "StreamChunk",
    "create_engine",
]

# name -> "module:Class"; a string, not the class, so that a missing optional dependency
# of one backend only fails when that backend is chosen.
BACKENDS: dict[str, str] = {
    "sim": "agentos.engine.sim:SimEngine",
    "llama": "agentos.engine.llama:LlamaEngine",
    "llamaserver": "agentos.engine.llamaserver:LlamaServerEngine",
    "openai": "agentos.engine.openai:OpenAIEngine",
}


def create_engine(name: str, **options: Any) -> Engine:
    """Build the backend called ``name`` with keyword ``options``.

    Raises :class:`EngineError` for an unknown name (listing the known ones), a backend
    whose dependencies are not installed, or options the backend rejects.
    """
    target = BACKENDS.get(name)
    if target is None:
        known = ", ".join(sorted(BACKENDS))
        raise EngineError(f"unknown engine {name!r}; known engines: {known}")
    module_name, _, class_name = target.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), class_name)
    except ImportError as exc:
        raise EngineError(f"engine {name!r} is not available: {exc}") from exc
    try:
        engine = factory(**options)
    except (TypeError, ValueError) as exc:
        raise EngineError(f"bad options for engine {name!r}: {exc}") from exc
    if not isinstance(engine, Engine):
        raise EngineError(f"{target} does not implement the Engine protocol")
    return engine
