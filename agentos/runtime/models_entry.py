"""One model as a daemon serves it, and how its engine is made, described and closed.

:class:`ModelEntry` is what the pool (:mod:`agentos.runtime.models`) keeps of each model:
its engine (a :class:`~agentos.runtime.served.ServedEngine` the pool can rebuild under
the agents), slot arbiter and hibernator, and what the running engine was built from.
:func:`make_engine` builds an engine from a stored Model off the loop; one that cannot
start is stood in for by an :class:`~agentos.runtime.served.Unstarted` whose every call
raises why, sized like the real one so the governor's gate fits it. Kept apart from the
pool, which decides when a model is started, rebuilt or routed to.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from agentos.core.modelspec import ModelResource
from agentos.core.route import DEFAULT_BOUNDARY, Candidate
from agentos.core.spec import SpecError, parse_resource
from agentos.engine.base import Engine, EngineError, EngineUnavailable, ModelMisconfigured
from agentos.engine.models import credential_digest
from agentos.runtime.hibernator import Hibernator
from agentos.runtime.served import Condition, ServedEngine, Unstarted
from agentos.runtime.slots import SlotArbiter
from agentos.store import Store

__all__ = [
    "DEFAULT_MODEL",
    "ModelEntry",
    "ModelUnavailable",
    "StoreThrottleBoard",
    "body_hash",
    "candidate_of",
    "close_engine",
    "make_engine",
    "parsed_model",
]

log = logging.getLogger("agentos.models")

DEFAULT_MODEL = "default"
_REMOTE_SESSIONS = 100_000  # an openai model's sessions are memory here (as OpenAIEngine)


class ModelUnavailable(EngineError):
    """A model's engine cannot serve; ``repeated``: already reported for this attempt."""

    def __init__(self, message: str, *, repeated: bool) -> None:
        super().__init__(message)
        self.repeated = repeated


class StoreThrottleBoard:
    """A model's provider throttle, shared through Redis by every daemon of the fleet."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def throttled_until(self, model: str) -> float:
        """Until when ``model`` is throttled (epoch seconds, 0: not)."""
        return await self.store.models.throttled_until(model)

    async def throttle(self, model: str, until: float) -> None:
        """Record the throttle for every daemon."""
        await self.store.models.throttle(model, until)


@dataclass(slots=True)
class ModelEntry:
    """One model as the daemon serves it."""

    name: str
    engine: Engine
    arbiter: SlotArbiter
    hibernator: Hibernator
    resource: ModelResource | None = None  # None for the daemon's default engine
    served: ServedEngine | None = None  # None for the daemon's default engine
    spec_hash: str = ""  # of the stored Model the running engine was built from
    credential: str = ""  # digest of the secret it was built with (never the secret)
    check_at: float = 0.0  # monotonic: compare the stored spec again from then on
    resolve_at: float = 0.0  # monotonic: resolve the credential again from then on
    started_at: float = 0.0  # monotonic: when the engine was last built
    told: set[str] = field(default_factory=set)  # agents shown why it did not start


def body_hash(body: Mapping[str, Any] | None) -> str:
    if body is None:
        return "absent"
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _stand_in_size(resource: ModelResource | None) -> tuple[int, int]:
    """Slots and parallel calls of the engine ``resource`` would start: the stand-in
    offers as many, so the governor's gate fits the real one."""
    if resource is None:
        return 1, 1
    spec = resource.spec
    parallel = sum(e.max_concurrent for e in spec.endpoints) or spec.slots or 1
    slots = _REMOTE_SESSIONS if spec.engine == "openai" else (spec.slots or max(parallel, 2))
    return slots, parallel


async def make_engine(
    name: str,
    body: dict[str, Any] | None,
    *,
    build: Callable[..., Engine],
    home: Path | None,
    board: StoreThrottleBoard,
    clock: Callable[[], float],
) -> tuple[Engine, ModelResource | None, Condition | None, str]:
    """An engine for the Model ``body`` (a stand-in when it cannot start), the parsed
    resource, the model's condition and the credential's digest."""
    resource: ModelResource | None = None
    digest = ""
    error: EngineUnavailable
    if body is None:
        error = ModelMisconfigured(name, "no Model of that name is applied")
    else:
        try:
            parsed = parse_resource(body)
        except SpecError as e:
            error = ModelMisconfigured(name, f"its stored spec no longer validates: {e}")
        else:
            assert isinstance(parsed, ModelResource)
            resource = parsed
    if resource is not None:
        model = resource
        digest = await anyio.to_thread.run_sync(lambda: credential_digest(model))
        try:
            engine = await anyio.to_thread.run_sync(lambda: build(model, home=home, board=board))
        except EngineUnavailable as e:
            error = e
        except (EngineError, OSError) as e:  # a build that does not type its errors
            error = ModelMisconfigured(name, f"its engine cannot start: {e}")
        else:
            log.info("model %s: %s engine started (%d slots)", name, engine.name, engine.slots)
            return engine, resource, None, digest
    log.error("model %s cannot serve: %s", name, error)
    slots, parallel = _stand_in_size(resource)
    backend = resource.spec.engine if resource is not None else "none"
    stand_in = Unstarted(name, error, backend=backend, slots=slots, parallel=parallel)
    return stand_in, resource, Condition.of(error, clock()), digest


def parsed_model(body: Mapping[str, Any] | None) -> ModelResource | None:
    if body is None:
        return None
    try:
        resource = parse_resource(body)
    except SpecError:
        return None
    return resource if isinstance(resource, ModelResource) else None


def candidate_of(name: str, resource: ModelResource | None) -> Candidate:
    """A route candidate as the router sees the Model ``resource`` (None: the daemon's
    own engine, or a Model not applied: it then cannot serve and fails over)."""
    if resource is None:
        return Candidate(name, DEFAULT_BOUNDARY if name == DEFAULT_MODEL else "any")
    spec = resource.spec
    prices = spec.prices
    return Candidate(
        name,
        spec.data_boundary,
        region=spec.placement.region if spec.placement is not None else None,
        input_price=prices.input,
        cached_price=prices.input if prices.cached_input is None else prices.cached_input,
        output_price=prices.output,
        tools=spec.tools_capable,
        max_context=spec.max_context,
    )


async def close_engine(name: str, engine: Engine) -> None:
    """Close ``engine`` (an embedded server stops: that blocks, so off the loop)."""
    try:
        closer = getattr(engine, "aclose", None)
        with anyio.CancelScope(shield=True):
            if closer is not None:
                result = closer()
                if inspect.isawaitable(result):
                    await result
            elif callable(getattr(engine, "close", None)):
                await anyio.to_thread.run_sync(engine.close)  # type: ignore[attr-defined]
    except Exception:
        log.exception("model %s: closing its engine failed", name)
