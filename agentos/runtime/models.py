"""The models one daemon serves: an engine, slot arbiter and hibernator per declared model.

An agent's ``spec.model`` names a ``kind: Model`` (or ``default``, the daemon's own
``--engine``). The first agent that needs a model makes the daemon read its resource
from Redis and start its engine (an embedded llama.cpp server takes seconds, so that
runs in a worker thread); each model gets its own slot arbiter and hibernator, because
slots and snapshots belong to one engine. Every engine the pool started is closed when
the daemon stops; the ``default`` engine belongs to whoever passed it in.

A Model is wrong more often than it is down: a key refused (401/403), a wrong path or
model name (404), a credential variable that is not set. That is the operator's to
fix, not the agent's, so it never counts as the agent's crash: the model gets a
``ModelMisconfigured`` condition (``describe model``), and every call of its agents
raises :class:`ModelMisconfigured` (an :class:`EngineUnavailable`), which the runtime
parks as infrastructure with the reason in the task, the agent's status and its
events. An engine that cannot start at all is stood in for by one whose every call
raises why, so its agents run and park the same way instead of staying ``Pending``.

The agents hold a :class:`~agentos.runtime.served.ServedEngine`, never the engine
itself, so the pool can rebuild the engine under them without a daemon restart: before
a call it notices (at most every few seconds) that the stored Model changed (a
re-apply), or that a misconfigured Model's credential file or variable now resolves to
another secret, or that an engine that failed to start may start now; it builds the new
engine off the loop, the served engine moves every open session (their conversations)
across, the old one is closed, and the parked work resumes with its next attempt.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from agentos.core.modelspec import ModelPrices, ModelResource
from agentos.core.placement import serves_model
from agentos.core.route import Candidate, ModelStats, within
from agentos.core.spec import AgentSpec
from agentos.engine.base import Engine, EngineError, EngineUnavailable
from agentos.engine.fallback import FallbackEngine
from agentos.engine.models import build_engine, credential_digest
from agentos.runtime.hibernator import Hibernator
from agentos.runtime.models_entry import (
    DEFAULT_MODEL,
    ModelEntry,
    ModelUnavailable,
    StoreThrottleBoard,
    body_hash,
    candidate_of,
    close_engine,
    make_engine,
    parsed_model,
)
from agentos.runtime.routes import RouteEngine
from agentos.runtime.served import Condition, ServedEngine
from agentos.runtime.slots import SlotArbiter
from agentos.runtime.spend import ClassSpend
from agentos.store import Store, StoreError

__all__ = [
    "DEFAULT_MODEL",
    "Condition",
    "ModelEntry",
    "ModelPool",
    "ModelUnavailable",
    "ServedEngine",
    "StoreThrottleBoard",
    "candidate_of",
]

log = logging.getLogger("agentos.models")

_CHECK_S = 2.0  # how often a served Model's stored spec is compared with the running one
_RESOLVE_S = 2.0  # how often a misconfigured Model's credential is resolved again
_RETRY_START_S = 30.0  # an engine that failed to start is tried again this much later


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
        daemon_id: str = "",
        monotonic: Callable[[], float] = time.monotonic,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.entries: dict[str, ModelEntry] = {DEFAULT_MODEL: default}
        self.attained = attained
        self.home = home
        self.on_new = on_new
        self.board = StoreThrottleBoard(store)
        self.daemon_id = daemon_id
        self._build = build
        self._lock = anyio.Lock()
        self._monotonic = monotonic
        self._clock = clock
        self._bodies: dict[str, dict[str, Any]] = {}
        self._bodies_at = -_CHECK_S
        # The daemon's labels (agentos daemon --labels): which site-bound models it serves.
        self.labels: Mapping[str, str] = {}
        # What routed calls taught this daemon of each model: latency, output, cooldowns.
        self.route_stats: dict[str, ModelStats] = {}
        self._route_prices: dict[str, ModelPrices] = {}
        self._parsed: dict[str, tuple[str, ModelResource | None]] = {}
        # The quota classes' money per day, shared by the daemon's agents.
        self.spend = ClassSpend(store, clock=clock)

    def get(self, name: str) -> ModelEntry | None:
        """The model called ``name`` if this daemon already serves it."""
        return self.entries.get(name)

    async def entry(self, name: str) -> ModelEntry:
        """The model called ``name``, starting its engine on first use.

        A model that cannot start (no such Model, a credential that does not resolve, a
        server that refuses the key) is served by a stand-in whose calls raise why, so
        its agents park instead of waiting unseen; its condition says why.
        """
        found = self.entries.get(name)
        if found is not None:
            await self.refresh(name)
            return found
        async with self._lock:
            found = self.entries.get(name)
            if found is not None:
                return found
            try:
                body = (await self.store.models.read()).get(name)
            except StoreError as e:
                raise ModelUnavailable(f"cannot read Model {name}: {e}", repeated=False) from e
            made = await self._new_entry(name, body)
            self.entries[name] = made
        if self.on_new is not None:
            self.on_new(made)
        return made

    async def _new_entry(self, name: str, body: dict[str, Any] | None) -> ModelEntry:
        engine, resource, condition, digest = await self._make(name, body)
        served = ServedEngine(
            engine,
            model_name=name,
            refresh=lambda: self.refresh(name),
            condition=condition,
            clock=self._clock,
        )
        outer: Engine = served
        fallback = resource.spec.fallback if resource is not None else None
        if fallback is not None:
            outer = FallbackEngine(
                served, fallback_name=fallback, resolve=lambda: self._engine_of(fallback)
            )
        now = self._monotonic()
        return ModelEntry(
            name,
            outer,
            SlotArbiter(outer, attained=self.attained),
            Hibernator(outer),
            resource,
            served=served,
            spec_hash=body_hash(body),
            credential=digest,
            check_at=now + _CHECK_S,
            resolve_at=now + _RESOLVE_S,
            started_at=now,
        )

    async def _make(
        self, name: str, body: dict[str, Any] | None
    ) -> tuple[Engine, ModelResource | None, Condition | None, str]:
        return await make_engine(
            name, body, build=self._build, home=self.home, board=self.board, clock=self._clock
        )

    async def _engine_of(self, name: str) -> Engine:
        found = await self.entry(name)
        if found.served is not None and not found.served.started:
            reason = found.served.condition.reason if found.served.condition else "not started"
            raise ModelUnavailable(reason, repeated=True)
        return found.engine

    def prices(self, name: str) -> ModelPrices:
        """The prices of the model called ``name`` as this daemon serves it (none known:
        zero, as for the daemon's own engine)."""
        if name == DEFAULT_MODEL:  # no Model: the fleet's prices for it, if declared
            return self.spend.default_prices
        found = self.entries.get(name)
        if found is not None and found.resource is not None:
            return found.resource.spec.prices
        return self._route_prices.get(name, ModelPrices())

    async def for_spec(self, agent: str, spec: AgentSpec) -> ModelEntry:
        """The model entry an agent runs on: its ``spec.model``, or for a route its home
        model with a :class:`RouteEngine` over the route's candidates."""
        if spec.route is None:
            return await self.for_agent(
                agent, spec.model, allow_fallback=spec.model_fallback is not False
            )
        route = spec.route
        try:
            bodies = await self.store.models.read()
        except StoreError as e:
            raise ModelUnavailable(f"cannot read the route's Models: {e}", repeated=False) from e
        self._bodies, self._bodies_at = bodies, self._monotonic()
        candidates = await self.route_candidates(route.models)
        home = next(
            (
                c.name
                for c in candidates
                if not self.route_stats.get(c.name, ModelStats()).down
                and within(c.boundary, route.data_class, c.region)
            ),
            "",
        )
        if not home:
            raise ModelUnavailable(
                f"no model of the route can be served by this daemon ({', '.join(route.models)})",
                repeated=False,
            )
        entry = await self.for_agent(agent, home, allow_fallback=False)
        engine = RouteEngine(
            agent=agent,
            route=route,
            candidates=candidates,
            home=home,
            # The home model itself, not a fallback wrapper: a Model's fallback could
            # answer past the route's data boundary.
            primary=entry.served if entry.served is not None else entry.engine,
            resolve=self._route_engine_of,
            stats=self.route_stats,
            quota_class=spec.quota_class,
            clock=self._clock,
        )
        engine.refresh = lambda: self.route_candidates(route.models)
        return dataclasses.replace(entry, engine=engine)

    async def route_candidates(self, names: Sequence[str]) -> list[Candidate]:
        """The route candidates ``names`` as their stored Models say now (read at most
        every few seconds for the whole pool): a re-applied Model's boundary, prices and
        capabilities apply to the next call. Marks each one this daemon may not serve
        (a local Model of another site) down, and clears that once it may."""
        bodies = await self._stored()
        out: list[Candidate] = []
        for name in names:
            resource = None
            if name != DEFAULT_MODEL and bodies is None:  # unreadable now: as last read
                cached = self._parsed.get(name)
                resource = cached[1] if cached is not None else None
            elif name != DEFAULT_MODEL and bodies is not None:
                resource = self._parse_cached(name, bodies.get(name))
                if resource is not None:
                    self._route_prices[name] = resource.spec.prices
            candidate = candidate_of(name, resource)
            if name == DEFAULT_MODEL:
                prices = self.spend.default_prices
                candidate = dataclasses.replace(
                    candidate,
                    input_price=prices.input,
                    cached_price=prices.input
                    if prices.cached_input is None
                    else prices.cached_input,
                    output_price=prices.output,
                )
            out.append(candidate)
            self.route_stats.setdefault(name, ModelStats()).down = serves_model(
                self.labels, resource
            )
        return out

    def _parse_cached(self, name: str, body: Mapping[str, Any] | None) -> ModelResource | None:
        """``body`` parsed, once per distinct body of ``name`` (None: no such Model)."""
        if body is None:
            self._parsed.pop(name, None)
            return None
        digest = body_hash(body)
        cached = self._parsed.get(name)
        if cached is not None and cached[0] == digest:
            return cached[1]
        resource = parsed_model(body)
        self._parsed[name] = (digest, resource)
        return resource

    async def _route_engine_of(self, name: str) -> Engine:
        """A route candidate's engine; one that cannot serve is unavailable (failover).
        Never the Model's own ``fallback``: that would answer past the route's data
        boundary; the route fails over within its candidates."""
        try:
            found = await self.entry(name)
        except EngineError as e:
            raise EngineUnavailable(str(e)) from e
        served = found.served
        if served is None:
            return found.engine
        if not served.started:
            reason = served.condition.reason if served.condition else "not started"
            raise EngineUnavailable(f"model {name} cannot serve: {reason}")
        return served

    async def for_agent(self, agent: str, model: str, *, allow_fallback: bool) -> ModelEntry:
        """:meth:`entry` for one agent, recording whether its calls may fall back.

        The first time an agent is given a model that did not start, a
        ``ModelUnavailable`` event on the agent says why.
        """
        found = await self.entry(model)
        if isinstance(found.engine, FallbackEngine):
            found.engine.allowed[agent] = allow_fallback
        served = found.served
        if served is not None and not served.started and agent not in found.told:
            found.told.add(agent)
            why = served.condition.reason if served.condition else "its engine did not start"
            try:
                await self.store.events.record_fleet_event(
                    agent, "ModelUnavailable", model, f"{why}; its calls park", self.daemon_id
                )
            except StoreError as e:
                log.warning("%s: could not record why model %s cannot serve: %s", agent, model, e)
        return found

    # ------------------------------------------------------------------ rebuilds

    async def refresh(self, name: str) -> None:
        """Rebuild ``name``'s engine if the stored Model changed, its credential changed
        while it is misconfigured, or it failed to start a while ago (each checked at
        most every few seconds; errors reading them are left for the next check)."""
        found = self.entries.get(name)
        if found is None or found.served is None:
            return
        served = found.served
        now = self._monotonic()
        why = ""
        if now >= found.check_at:
            found.check_at = now + _CHECK_S
            bodies = await self._stored()
            if bodies is not None and body_hash(bodies.get(name)) != found.spec_hash:
                why = "its Model was applied again"
        resource = found.resource
        misconfigured = served.condition is not None and resource is not None
        if not why and misconfigured and now >= found.resolve_at:
            # Its key file or variable may have been fixed: resolve it again.
            found.resolve_at = now + _RESOLVE_S
            assert resource is not None
            digest = await anyio.to_thread.run_sync(lambda: credential_digest(resource))
            if digest != found.credential:
                why = "its credential changed"
        if not why and not served.started and now >= found.started_at + _RETRY_START_S:
            why = "its engine is tried again"
        if why:
            await self._rebuild(found, why)

    async def _stored(self) -> dict[str, dict[str, Any]] | None:
        """Every stored Model, read at most every few seconds for all the pool's models."""
        now = self._monotonic()
        if now - self._bodies_at >= _CHECK_S:
            try:
                self._bodies = await self.store.models.read()
            except StoreError as e:
                log.warning("could not read the stored Models: %s", e)
                return None
            self._bodies_at = now
        return self._bodies

    async def _rebuild(self, found: ModelEntry, why: str) -> None:
        assert found.served is not None
        async with self._lock:
            try:
                body = (await self.store.models.read()).get(found.name)
            except StoreError as e:
                log.warning("model %s: cannot read its Model to rebuild it: %s", found.name, e)
                return
            now = self._monotonic()
            found.started_at = found.check_at = now
            engine, resource, condition, digest = await self._make(found.name, body)
            old = await found.served.swap(engine, condition)
            if resource is not None:
                found.resource = resource
            found.spec_hash = body_hash(body)
            found.credential = digest
            found.check_at = now + _CHECK_S
            found.resolve_at = now + _RESOLVE_S
            found.told.clear()
            log.warning(
                "model %s: engine rebuilt (%s)%s",
                found.name,
                why,
                "" if condition is None else f"; still cannot serve: {condition.reason}",
            )
        await close_engine(found.name, old)

    def describe(self) -> dict[str, dict[str, Any]]:
        """What each served model reports about itself (replicas, health, counters) and
        its ``condition`` (type, reason, since; None while it serves)."""
        out: dict[str, dict[str, Any]] = {}
        for name, e in self.entries.items():
            info: dict[str, Any] = {"engine": e.engine.name, "model": e.engine.model}
            describe = getattr(e.engine, "describe", None)
            if callable(describe):
                info.update(describe())
            if e.served is not None:
                condition = e.served.condition
                info["condition"] = None if condition is None else condition.to_dict()
            info["slotsHeld"] = sum(1 for h in e.arbiter.holders if e.engine.has_session(h))
            info["slots"] = e.engine.slots
            out[name] = info
        return out

    async def aclose(self) -> None:
        """Close every engine the pool started (not the default one)."""
        for name, e in list(self.entries.items()):
            if name == DEFAULT_MODEL:
                continue
            await close_engine(name, e.served.inner if e.served is not None else e.engine)
            del self.entries[name]
