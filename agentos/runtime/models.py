"""The models one daemon serves: an engine, slot arbiter and hibernator per declared model.

An agent's ``spec.model`` names a ``kind: Model`` (or ``default``, the daemon's own
``--engine``). The first agent that needs a model makes the daemon read its resource
from Redis and start its engine (an embedded llama.cpp server takes seconds, so that
runs in a worker thread); each model gets its own slot arbiter and hibernator, because
slots and snapshots belong to one engine. Every engine the pool started is closed when
the daemon stops; the ``default`` engine belongs to whoever passed it in.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from agentos.core.modelspec import ModelResource
from agentos.core.spec import SpecError, parse_resource
from agentos.engine.base import Engine, EngineError
from agentos.engine.fallback import FallbackEngine
from agentos.engine.models import build_engine
from agentos.runtime.hibernator import Hibernator
from agentos.runtime.slots import SlotArbiter
from agentos.store import Store

__all__ = ["DEFAULT_MODEL", "ModelEntry", "ModelPool", "ModelUnavailable", "StoreThrottleBoard"]

log = logging.getLogger("agentos.models")

DEFAULT_MODEL = "default"
_RETRY_START_S = 30.0  # a model whose engine failed to start is tried again this much later


class ModelUnavailable(EngineError):
    """A model's engine cannot start; ``repeated``: already reported for this attempt."""

    def __init__(self, message: str, *, repeated: bool) -> None:
        super().__init__(message)
        self.repeated = repeated


class StoreThrottleBoard:
    """A model's provider throttle, shared through Redis by every daemon of the fleet."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def throttled_until(self, model: str) -> float:
        """Until when ``model`` is throttled (epoch seconds, 0: not)."""
        return await self.store.model_throttled_until(model)

    async def throttle(self, model: str, until: float) -> None:
        """Record the throttle for every daemon."""
        await self.store.model_throttle(model, until)


@dataclass(slots=True)
class ModelEntry:
    """One model as the daemon serves it."""

    name: str
    engine: Engine
    arbiter: SlotArbiter
    hibernator: Hibernator
    resource: ModelResource | None = None  # None for the daemon's default engine


class ModelPool:
    """The daemon's models by name (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        default: ModelEntry,
        *,
        attained: Callable[[str], float],
        home: Path | None = None,
        on_new: Callable[[ModelEntry], None] | None = None,
        build: Callable[..., Engine] = build_engine,
    ) -> None:
        self.store = store
        self.entries: dict[str, ModelEntry] = {DEFAULT_MODEL: default}
        self.attained = attained
        self.home = home
        self.on_new = on_new
        self.board = StoreThrottleBoard(store)
        self._build = build
        self._lock = anyio.Lock()
        # model -> (monotonic time to try again, why it failed): a model that cannot start
        # is not retried (nor reported) on every reconcile pass.
        self._failed: dict[str, tuple[float, str]] = {}

    def get(self, name: str) -> ModelEntry | None:
        """The model called ``name`` if this daemon already serves it."""
        return self.entries.get(name)

    async def entry(self, name: str) -> ModelEntry:
        """The model called ``name``, starting its engine on first use.

        Raises :class:`EngineError` when no such Model is applied or its engine cannot
        start (a missing credential, a server that does not answer).
        """
        found = self.entries.get(name)
        if found is not None:
            return found
        failed = self._failed.get(name)
        if failed is not None and time.monotonic() < failed[0]:
            raise ModelUnavailable(failed[1], repeated=True)
        try:
            return await self._start(name)
        except EngineError as e:
            self._failed[name] = (time.monotonic() + _RETRY_START_S, str(e))
            raise ModelUnavailable(str(e), repeated=False) from e

    async def _start(self, name: str) -> ModelEntry:
        async with self._lock:
            found = self.entries.get(name)
            if found is not None:
                return found
            body = (await self.store.models()).get(name)
            if body is None:
                raise EngineError(f'no Model "{name}" is applied')
            try:
                resource = parse_resource(body)
            except SpecError as e:
                raise EngineError(f'stored Model "{name}" no longer validates: {e}') from e
            assert isinstance(resource, ModelResource)
            engine = await anyio.to_thread.run_sync(
                lambda: self._build(resource, home=self.home, board=self.board)
            )
            fallback = resource.spec.fallback
            if fallback is not None:
                engine = FallbackEngine(
                    engine, fallback_name=fallback, resolve=lambda: self._engine_of(fallback)
                )
            made = ModelEntry(
                name,
                engine,
                SlotArbiter(engine, attained=self.attained),
                Hibernator(engine),
                resource,
            )
            self.entries[name] = made
            log.info("model %s: %s engine started (%d slots)", name, engine.name, engine.slots)
            if self.on_new is not None:
                self.on_new(made)
            return made

    async def _engine_of(self, name: str) -> Engine:
        return (await self.entry(name)).engine

    async def for_agent(self, agent: str, model: str, *, allow_fallback: bool) -> ModelEntry:
        """:meth:`entry` for one agent, recording whether its calls may fall back."""
        found = await self.entry(model)
        if isinstance(found.engine, FallbackEngine):
            found.engine.allowed[agent] = allow_fallback
        return found

    def describe(self) -> dict[str, dict[str, Any]]:
        """What each served model reports about itself (replicas, health, counters)."""
        out: dict[str, dict[str, Any]] = {}
        for name, e in self.entries.items():
            info: dict[str, Any] = {"engine": e.engine.name, "model": e.engine.model}
            describe = getattr(e.engine, "describe", None)
            if callable(describe):
                info.update(describe())
            info["slotsHeld"] = sum(1 for h in e.arbiter.holders if e.engine.has_session(h))
            info["slots"] = e.engine.slots
            out[name] = info
        return out

    async def aclose(self) -> None:
        """Close every engine the pool started (not the default one)."""
        for name, e in list(self.entries.items()):
            if name == DEFAULT_MODEL:
                continue
            closer = getattr(e.engine, "aclose", None) or getattr(e.engine, "close", None)
            try:
                if closer is not None:
                    result = closer()
                    if inspect.isawaitable(result):
                        with anyio.CancelScope(shield=True):
                            await result
            except Exception:
                log.exception("model %s: closing its engine failed", name)
            del self.entries[name]
