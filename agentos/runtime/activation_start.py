"""Starting the agents an activation claimed: leases, specs, models, then a runner each.

An :class:`~agentos.runtime.activation.Activator` hands over agents that are due; here
their leases are taken in batches (held before the due-index claim goes, so a daemon
that dies now still brings them back), their specs and models resolved, their state
opened in a few pipelines, and a runner built for each and handed to the daemon, which
supervises it. An agent this daemon may not host (its new spec, or a changed Model,
rules the daemon's labels out) is let go of at once, due for a daemon that may. A start
cut by the shutdown lets go of the leases it took. The daemon decides *when* to start
(a claim, a respec, an operator's restart); how is all here.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import anyio

from agentos.core.lifecycle import backoff_delay
from agentos.core.placement import format_labels
from agentos.core.reconcile import Desired
from agentos.core.spec import AgentResource, SpecError, parse_resource
from agentos.engine.base import EngineError
from agentos.governor.admission import Governor
from agentos.runtime.activation_placer import Placer
from agentos.runtime.models import ModelEntry, ModelPool
from agentos.runtime.runner import AgentRunner
from agentos.settings import DaemonSettings
from agentos.store import Store, StoreError
from agentos.telemetry import Telemetry

if TYPE_CHECKING:  # the mcp package is imported when a daemon starts, not by every CLI call
    from agentos.tools.mcp import ToolServerPool

__all__ = ["RUNNER_ERROR_BACKOFF", "Faults", "Starter", "build_runner", "clean"]

log = logging.getLogger("agentos.daemon")
_T = TypeVar("_T")
# Backoff of an agent whose runner failed (a runtime bug, not the agent's): 1 s to 5 min.
RUNNER_ERROR_BACKOFF = (1.0, 300.0)
_CHUNK = 500  # agents whose leases and specs are read in one go


def clean(text: str) -> str:
    """``text`` with control characters escaped: fit for one log line."""
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group())[1:-1], text)


class Faults(Protocol):
    """How the daemon handles a failed store call (:class:`agentos.daemon.faults.Faults`)."""

    reported: dict[str, str]

    async def until_done(self, op: Callable[[], Awaitable[_T]], what: str) -> _T: ...

    def store_failed(self, where: str, e: StoreError, delay: float | None = None) -> None: ...


def build_runner(
    resource: AgentResource,
    model: ModelEntry,
    *,
    spec_hash: str,
    lease_value: str,
    opened: Any,
    errors: int,
    store: Store,
    daemon_id: str,
    settings: DaemonSettings,
    clock: Callable[[], float],
    telemetry: Telemetry,
    governor: Governor,
    models: ModelPool,
    tool_servers: ToolServerPool,
) -> AgentRunner:
    """The runner of one agent whose lease is ``lease_value``, on ``model``; ``errors``:
    how many of its runners failed in a row (its backoff if this one fails too)."""
    runner = AgentRunner(
        resource=resource,
        spec_hash=spec_hash,
        lease_value=lease_value,
        store=store,
        engine=model.engine,
        arbiter=model.arbiter,
        hibernator=model.hibernator,
        daemon_id=daemon_id,
        clock=clock,
        retry_max_s=settings.redis_retry_max_s,
        telemetry=telemetry,
        governor=governor,
        opened=opened,
        lend_after_s=settings.lend_slot_after_s,
        tool_servers=tool_servers,
    )
    runner.price_of = models.prices
    runner.spend = models.spend
    runner.error_delay_s = backoff_delay(errors + 1, *RUNNER_ERROR_BACKOFF)
    return runner


class Starter:
    """Starts claimed agents for one daemon (see the module docstring).

    ``running`` and ``desired`` are the daemon's (a started runner is added to both by
    ``adopt``, which also supervises it); ``opening`` holds, for each agent being started,
    the signals that came for it before its runner existed: a message sent just after the
    open read the inbox is not left there.
    """

    def __init__(
        self,
        store: Store,
        *,
        daemon_id: str,
        settings: DaemonSettings,
        clock: Callable[[], float],
        models: ModelPool,
        placer: Placer,
        faults: Faults,
        build: Callable[..., AgentRunner],
        running: Mapping[str, AgentRunner],
        desired: MutableMapping[str, Desired],
        errors: Mapping[str, int],
        adopt: Callable[[AgentRunner], None],
        publish: Callable[[], object],
        live: Callable[[], set[str]],
        stopping: Callable[[], bool],
    ) -> None:
        self.store = store
        self.id = daemon_id
        self.settings = settings
        self.clock = clock
        self.models = models
        self.placer = placer
        self.faults = faults
        self._build = build
        self._running = running
        self._desired = desired
        self._errors = errors
        self._adopt = adopt
        self._publish = publish
        self._live = live
        self._stopping = stopping
        self.opening: dict[str, set[str]] = {}

    def signal(self, agent: str, cmd: str) -> bool:
        """Keep ``cmd`` for an agent being started (False: none is)."""
        pending = self.opening.get(agent)
        if pending is None:
            return False
        pending.add(cmd)
        return True

    async def start_many(
        self,
        wanted: list[tuple[str, str]],
        claims: dict[str, float] | None = None,
        resources: dict[str, AgentResource] | None = None,
    ) -> None:
        """Take the leases of ``wanted`` (name, spec hash) and start their runners;
        ``claims``: the due-index claims they were activated with (dropped once held);
        ``resources``: specs of some of them read already (the others are read here)."""
        ttl_ms = int(self.settings.lease_ttl_s * 1000)
        # Leases and specs in a few pipelines: starting 10,000 agents must not take
        # 20,000 sequential round trips.
        for i in range(0, len(wanted), _CHUNK):
            if self._stopping():
                return
            chunk = dict(wanted[i : i + _CHUNK])
            try:
                await self._start_chunk(chunk, ttl_ms, claims or {}, resources or {})
            finally:
                for name in chunk:
                    self.opening.pop(name, None)

    async def _let_go(self, name: str, lease_value: str) -> None:
        """Release an agent just taken and make it due at once, for whoever has room."""
        with contextlib.suppress(StoreError):
            await self.store.leases.release(name, lease_value)
            await self.store.waits.due_release(name, self.id, self.clock(), now=self.clock())

    async def _start_chunk(
        self,
        chunk: dict[str, str],
        ttl_ms: int,
        claims: dict[str, float],
        read: dict[str, AgentResource],
    ) -> None:
        """Start one batch of :meth:`start_many`: name -> spec hash."""
        for name in chunk:
            self.opening.setdefault(name, set())
        tokens = await self.store.leases.acquire_many(list(chunk), self.id, ttl_ms)
        # Started meanwhile by another pass (the same daemon gets the same lease
        # back): one runner per agent.
        won = [n for n, t in tokens.items() if t and n not in self._running]
        try:
            await self._start_won(chunk, tokens, won, claims, read)
        except anyio.get_cancelled_exc_class():
            # Cut by the shutdown with leases taken: let those agents go at once, or no
            # daemon could run them until the leases expired.
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.settings.lease_ttl_s):
                for name in won:
                    if name not in self._running:
                        await self._let_go(name, f"{self.id}|{tokens[name]}")
            raise

    async def _start_won(
        self,
        chunk: dict[str, str],
        tokens: dict[str, int],
        won: list[str],
        claims: dict[str, float],
        read: dict[str, AgentResource],
    ) -> None:
        """The rest of :meth:`_start_chunk` once the leases were asked for: ``won``, the
        agents whose leases we got."""
        # Held before the claim goes: if we die now, our held set brings the agent back.
        await self.store.waits.held_add(self.id, won)
        await self._settle_claims(tokens, claims)
        resources = await self._resolve(tokens, won, read)
        try:
            opened = await self.store.takeover.open_agents(list(resources), self.id)
        except StoreError as e:  # each runner reads its own, with retries
            log.warning("could not read %d agents in one batch: %s", len(resources), e)
            opened = {}
        for name, (resource, model) in resources.items():
            if name in self._running:
                continue
            lease_value = f"{self.id}|{tokens[name]}"
            if self._stopping():
                # Asked to stop while these were being opened: the stop may have counted
                # the runners already, so let the agent go rather than start it unstopped.
                await self._let_go(name, lease_value)
                continue
            runner = self._build(
                resource,
                model,
                spec_hash=chunk[name],
                lease_value=lease_value,
                opened=opened.get(name),
                errors=self._errors.get(name, 0),
            )
            self._desired[name] = Desired(name, chunk[name], resource.spec.priority)
            self._adopt(runner)
            for cmd in self.opening.pop(name, ()):
                runner.nudge(cmd)
        if resources:
            # The keeper renews these from now on: a loop blocked before the lease loop's
            # next pass must not cost them their leases.
            self._publish()

    async def _settle_claims(self, tokens: dict[str, int], claims: dict[str, float]) -> None:
        """Drop the due-index claims of the agents taken; of those another daemon holds,
        drop the claim if that daemon lives, else defer the agent until its lease expires."""
        taken = [n for n, t in tokens.items() if not t]
        drop = {n: at for n, at in claims.items() if tokens.get(n)}
        if taken and claims:
            # Held by a live daemon (it makes the agent due when it lets go): the claim
            # goes. By a dead one: due again the moment that lease expires.
            owners = await self.store.leases.read(taken)
            live = self._live()
            alive = {n for n in taken if n in owners and owners[n].owner in live}
            drop |= {n: claims[n] for n in alive if n in claims}
            now = self.clock()
            await self.store.waits.due_defer(
                {n: now + o.ttl_ms / 1000 + 0.05 for n, o in owners.items() if n not in alive}
            )
        await self.store.waits.due_unclaim(drop)

    async def _resolve(
        self, tokens: dict[str, int], won: list[str], read: dict[str, AgentResource]
    ) -> dict[str, tuple[AgentResource, ModelEntry]]:
        """The spec and model of each agent of ``won`` that may start here; the others
        are let go of (not hostable here, deleted, or their model cannot serve)."""
        bodies = await self.store.specs.agents_of([n for n in won if n not in read])
        if won and not self.placer.loaded:
            # Read once; a later change of a Model is the reconcile's (it lets go of
            # what this daemon may no longer host).
            await self.placer.refresh()
        resources: dict[str, tuple[AgentResource, ModelEntry]] = {}
        for name in won:
            resource = read.get(name) or _parse(name, bodies.get(name))
            why = "" if resource is None else self.placer.here(resource.spec)
            if why:
                await self._not_here(name, tokens[name], why)
                continue
            model = await self._model_of(name, resource)
            if resource is None or model is None:
                await self.store.leases.release(name, f"{self.id}|{tokens[name]}")
                if resource is not None:  # its model cannot serve: try again in a while
                    retry_at = self.clock() + self.settings.lease_ttl_s
                    await self.store.waits.due_release(
                        name, self.id, retry_at, now=self.clock(), look=False
                    )
                else:
                    await self.store.waits.held_remove(self.id, [name])
            else:
                resources[name] = (resource, model)
        return resources

    async def _not_here(self, name: str, token: int, why: str) -> None:
        """Let go of an agent this daemon may not host (just taken: its spec or a Model
        it uses changed): due now for a daemon that may, never again here until the
        fleet changes. An ``Unhostable`` event says why."""
        self.placer.reject(name)
        self._desired.pop(name, None)
        await self.faults.until_done(
            lambda: self.store.leases.release(name, f"{self.id}|{token}"), "release"
        )
        await self.faults.until_done(
            lambda: self.store.waits.due_release(name, self.id, self.clock(), now=self.clock()),
            "release",
        )
        labels = format_labels(self.settings.labels) or "no labels"
        message = (
            f"daemon {self.id} ({labels}) may not host the agent: {why}; it is due for a "
            "daemon that may"
        )
        log.info("%s: %s", clean(name), message)
        try:
            await self.store.events.record_agent_event(
                name, "Unhostable", "placement", message, self.id
            )
        except StoreError as e:
            self.faults.store_failed("Unhostable event", e)

    async def _model_of(self, name: str, resource: AgentResource | None) -> ModelEntry | None:
        """The model ``resource`` names, started on first use; None when it cannot serve."""
        if resource is None:
            return None
        try:
            return await self.models.for_spec(name, resource.spec)
        except Exception as e:  # an OSError too (a full or read-only AGENTOS_HOME)
            # Not started now: the agent is due again in a lease (see _resolve).
            reported = self.faults.reported
            if not isinstance(e, EngineError):
                e = EngineError(f"{type(e).__name__}: {e}")
                if reported.get(f"model {resource.spec.route_key}") == str(e):
                    e.repeated = True  # type: ignore[attr-defined]
                reported[f"model {resource.spec.route_key}"] = str(e)
            if not getattr(e, "repeated", False):
                log.error("%s: model %s cannot serve: %s", name, resource.spec.route_key, e)
                with contextlib.suppress(StoreError):
                    await self.store.events.record_fleet_event(
                        name,
                        "ModelUnavailable",
                        resource.spec.route_key,
                        f"model {resource.spec.route_key} cannot serve: {e}",
                        self.id,
                    )
            return None


def _parse(name: str, body: dict[str, Any] | None) -> AgentResource | None:
    if body is None:  # deleted meanwhile
        return None
    try:
        resource = parse_resource(body)
    except SpecError as e:
        log.error("%s: stored spec no longer validates: %s", name, e)
        return None
    return resource if isinstance(resource, AgentResource) else None
