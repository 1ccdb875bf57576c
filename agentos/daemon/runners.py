"""Starting, supervising and stopping the runners of the agents one daemon holds.

An activation (:class:`~agentos.runtime.activation.Activator`) hands over agents that are
due; here their leases are taken in batches (held before the due-index claim goes, so a
daemon that dies now still brings them back), their specs and models resolved, their
state opened in a few pipelines, and a runner started for each under a supervisor. The
supervisor finishes a release that was cut short, backs off a runner that failed (a
runtime bug, not the agent's), and says why on an agent whose lease was lost. Stopping
is here too: one agent (a respec restarts it, a rebalance hands it over) or all of them
within the grace period. An agent this daemon may not host (its new spec, or a changed
Model, rules the daemon's labels out) is let go of at once, due for a daemon that may.
Kept apart from :mod:`agentos.daemon`, which decides what runs where.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.abc

from agentos.core.lifecycle import StopReason, backoff_delay
from agentos.core.placement import format_labels
from agentos.core.reconcile import Desired
from agentos.core.spec import AgentResource, SpecError, parse_resource
from agentos.engine.base import EngineError
from agentos.governor.admission import Governor
from agentos.runtime.activation import Activator, Placer
from agentos.runtime.agentlog import attributed
from agentos.runtime.models import ModelEntry, ModelPool
from agentos.runtime.runner import AgentRunner
from agentos.settings import DaemonSettings
from agentos.store import Store, StoreError
from agentos.store.keeper import LeaseKeeper
from agentos.telemetry import Telemetry

if TYPE_CHECKING:  # the mcp package is imported when a daemon starts, not by every CLI call
    from agentos.tools.mcp import ToolServerPool

__all__ = ["RUNNER_ERROR_BACKOFF", "Runners", "clean"]

log = logging.getLogger("agentos.daemon")
_T = TypeVar("_T")
# Backoff of an agent whose runner failed (a runtime bug, not the agent's): 1 s to 5 min.
RUNNER_ERROR_BACKOFF = (1.0, 300.0)


def clean(text: str) -> str:
    """``text`` with control characters escaped: fit for one log line."""
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group())[1:-1], text)


class Runners:
    """The runners of :class:`agentos.daemon.Daemon` (mixed in; uses its store, models,
    governor, activator, keeper and settings)."""

    id: str
    store: Store
    settings: DaemonSettings
    clock: Callable[[], float]
    telemetry: Telemetry
    governor: Governor
    models: ModelPool
    tool_servers: ToolServerPool
    activator: Activator
    placer: Placer
    keeper: LeaseKeeper
    runners: dict[str, AgentRunner]
    _agents_tg: anyio.abc.TaskGroup | None
    _opening: dict[str, set[str]]
    _desired: dict[str, Desired]
    _scopes: dict[str, anyio.CancelScope]
    _stopping: set[str]
    _handing_over: set[str]
    _runner_errors: dict[str, int]
    _reported: dict[str, str]
    _live: set[str]
    _stop: anyio.Event
    _kick: anyio.Event
    _released: anyio.Event
    _draining: bool

    if TYPE_CHECKING:  # the daemon's own and its upkeep's (agentos.daemon)

        async def _until_done(self, op: Callable[[], Awaitable[_T]], what: str) -> _T: ...

        def _report(
            self, where: str, text: str, template: str, *, exc: BaseException | None = None
        ) -> None: ...

        def _publish_held(self) -> dict[str, str]: ...

        def _store_failed(self, where: str, e: StoreError, delay: float | None = None) -> None: ...

    def _spawn(self, coro: Any) -> None:
        assert self._agents_tg is not None
        self._agents_tg.start_soon(_run_coro, coro)

    async def _start_many(
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
        for i in range(0, len(wanted), 500):
            if self._stop.is_set():
                return
            chunk = dict(wanted[i : i + 500])
            try:
                await self._start_chunk(chunk, ttl_ms, claims or {}, resources or {})
            finally:
                for name in chunk:
                    self._opening.pop(name, None)

    async def _start_chunk(
        self,
        chunk: dict[str, str],
        ttl_ms: int,
        claims: dict[str, float],
        read: dict[str, AgentResource],
    ) -> None:
        """Start one batch of ``_start_many``: name -> spec hash."""
        for name in chunk:
            self._opening.setdefault(name, set())
        tokens = await self.store.acquire_leases(list(chunk), self.id, ttl_ms)
        # Started meanwhile by another pass (the same daemon gets the same lease
        # back): one runner per agent.
        won = [n for n, t in tokens.items() if t and n not in self.runners]
        try:
            await self._start_won(chunk, tokens, won, claims, read)
        except anyio.get_cancelled_exc_class():
            # Cut by the shutdown with leases taken: let those agents go at once, or no
            # daemon could run them until the leases expired.
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.settings.lease_ttl_s):
                for name in won:
                    if name not in self.runners:
                        with contextlib.suppress(StoreError):
                            await self.store.release_lease(name, f"{self.id}|{tokens[name]}")
                            await self.store.due_release(
                                name, self.id, self.clock(), now=self.clock()
                            )
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
        await self.store.held_add(self.id, won)
        taken = [n for n, t in tokens.items() if not t]
        drop = {n: at for n, at in claims.items() if tokens.get(n)}
        if taken and claims:
            # Held by a live daemon (it makes the agent due when it lets go): the claim
            # goes. By a dead one: due again the moment that lease expires.
            owners = await self.store.leases(taken)
            live = {n for n in taken if n in owners and owners[n].owner in self._live}
            drop |= {n: claims[n] for n in live if n in claims}
            now = self.clock()
            await self.store.due_defer(
                {n: now + o.ttl_ms / 1000 + 0.05 for n, o in owners.items() if n not in live}
            )
        await self.store.due_unclaim(drop)
        bodies = await self.store.agent_specs_of([n for n in won if n not in read])
        if won and not self.placer.loaded:
            # Read once; a later change of a Model is the reconcile's (it lets go of
            # what this daemon may no longer host).
            await self.placer.refresh()
        resources: dict[str, tuple[AgentResource, ModelEntry]] = {}
        for name in won:
            resource = read.get(name) or self._parse(name, bodies.get(name))
            why = "" if resource is None else self.placer.here(resource.spec)
            if why:
                await self._not_here(name, tokens[name], why)
                continue
            model = await self._model_of(name, resource)
            if resource is None or model is None:
                await self.store.release_lease(name, f"{self.id}|{tokens[name]}")
                if resource is not None:  # its model cannot serve: try again in a while
                    retry_at = self.clock() + self.settings.lease_ttl_s
                    await self.store.due_release(
                        name, self.id, retry_at, now=self.clock(), look=False
                    )
                else:
                    await self.store.held_remove(self.id, [name])
            else:
                resources[name] = (resource, model)
        try:
            opened = await self.store.open_agents(list(resources), self.id)
        except StoreError as e:  # each runner reads its own, with retries
            log.warning("could not read %d agents in one batch: %s", len(resources), e)
            opened = {}
        for name, (resource, model) in resources.items():
            if name in self.runners:
                continue
            lease_value = f"{self.id}|{tokens[name]}"
            if self._stop.is_set():
                # Asked to stop while these were being opened: the stop may have counted
                # the runners already, so let the agent go rather than start it unstopped.
                with contextlib.suppress(StoreError):
                    await self.store.release_lease(name, lease_value)
                    await self.store.due_release(name, self.id, self.clock(), now=self.clock())
                continue
            runner = AgentRunner(
                resource=resource,
                spec_hash=chunk[name],
                lease_value=lease_value,
                store=self.store,
                engine=model.engine,
                arbiter=model.arbiter,
                hibernator=model.hibernator,
                daemon_id=self.id,
                clock=self.clock,
                retry_max_s=self.settings.redis_retry_max_s,
                telemetry=self.telemetry,
                governor=self.governor,
                opened=opened.get(name),
                lend_after_s=self.settings.lend_slot_after_s,
                tool_servers=self.tool_servers,
            )
            runner.price_of = self.models.prices
            runner.spend = self.models.spend
            runner.error_delay_s = backoff_delay(
                self._runner_errors.get(name, 0) + 1, *RUNNER_ERROR_BACKOFF
            )
            self.runners[name] = runner
            self._desired[name] = Desired(name, chunk[name], resource.spec.priority)
            for cmd in self._opening.pop(name, ()):
                runner.nudge(cmd)
            self._spawn(self._supervise(runner))
        if resources:
            # The keeper renews these from now on: a loop blocked before the lease loop's
            # next pass must not cost them their leases.
            self._publish_held()

    async def _not_here(self, name: str, token: int, why: str) -> None:
        """Let go of an agent this daemon may not host (just taken: its spec or a Model
        it uses changed): due now for a daemon that may, never again here until the
        fleet changes. An ``Unhostable`` event says why."""
        self.placer.reject(name)
        self._desired.pop(name, None)
        await self._until_done(
            lambda: self.store.release_lease(name, f"{self.id}|{token}"), "release"
        )
        await self._until_done(
            lambda: self.store.due_release(name, self.id, self.clock(), now=self.clock()),
            "release",
        )
        labels = format_labels(self.settings.labels) or "no labels"
        message = (
            f"daemon {self.id} ({labels}) may not host the agent: {why}; it is due for a "
            "daemon that may"
        )
        log.info("%s: %s", clean(name), message)
        try:
            await self.store.record_agent_event(name, "Unhostable", "placement", message, self.id)
        except StoreError as e:
            self._store_failed("Unhostable event", e)

    def _let_go_of_unhostable(self) -> None:
        """After the fleet changed: restart the agents held here that this daemon may no
        longer host (a Model they use moved to another site); their start lets them go.
        A changed agent spec restarts its agent anyway (and the start checks it)."""
        for name, runner in self.runners.items():
            want = self._desired.get(name)
            if name in self._stopping or want is None or want.spec_hash != runner.spec_hash:
                continue
            why = self.placer.here(runner.resource.spec)
            if why:
                log.info(
                    "%s: may not be hosted here any more (%s); letting it go", clean(name), why
                )
                self._spawn(self._stop_one(name, StopReason.RESPEC, runner.spec_hash))

    async def _model_of(self, name: str, resource: AgentResource | None) -> ModelEntry | None:
        """The model ``resource`` names, started on first use; None when it cannot serve."""
        if resource is None:
            return None
        try:
            return await self.models.for_spec(name, resource.spec)
        except Exception as e:  # an OSError too (a full or read-only AGENTOS_HOME)
            # Not started now: the agent is due again in a lease (see _start_chunk).
            if not isinstance(e, EngineError):
                e = EngineError(f"{type(e).__name__}: {e}")
                if self._reported.get(f"model {resource.spec.route_key}") == str(e):
                    e.repeated = True  # type: ignore[attr-defined]
                self._reported[f"model {resource.spec.route_key}"] = str(e)
            if not getattr(e, "repeated", False):
                log.error("%s: model %s cannot serve: %s", name, resource.spec.route_key, e)
                with contextlib.suppress(StoreError):
                    await self.store.record_fleet_event(
                        name,
                        "ModelUnavailable",
                        resource.spec.route_key,
                        f"model {resource.spec.route_key} cannot serve: {e}",
                        self.id,
                    )
            return None

    @staticmethod
    def _parse(name: str, body: dict[str, Any] | None) -> AgentResource | None:
        if body is None:  # deleted meanwhile
            return None
        try:
            resource = parse_resource(body)
        except SpecError as e:
            log.error("%s: stored spec no longer validates: %s", name, e)
            return None
        return resource if isinstance(resource, AgentResource) else None

    async def _supervise(self, runner: AgentRunner) -> None:
        scope = anyio.CancelScope()
        self._scopes[runner.name] = scope
        crashed: BaseException | None = None
        try:
            with scope, attributed(runner.name):  # its lines go to its log
                await runner.run()
        except Exception as e:  # the runner's own last resort failed: back off all the same
            crashed = e
            log.exception("%s: supervisor crashed; the agent is activated again later", runner.name)
        finally:
            name = runner.name
            if runner.release_due is not None:
                # Cut short while releasing the agent: finish the job (our lease goes
                # first, if the release did not get that far), until Redis takes it.
                due = runner.release_due
                await self._until_done(
                    lambda: self.store.release_lease(name, runner.lease_value), "release"
                )
                await self._until_done(
                    lambda: self.store.due_release(name, self.id, due, now=self.clock()),
                    "release",
                )
            failed = crashed is not None or runner.error is not None
            if failed:
                errors = self._runner_errors[name] = self._runner_errors.get(name, 0) + 1
            else:
                self._runner_errors.pop(name, None)
            if crashed is not None and runner.release_due is None:
                # Not released by the runner: due after a backoff, as for a crash (not
                # at once: a runner that fails as it starts would be a hot loop).
                at = self.clock() + backoff_delay(errors, *RUNNER_ERROR_BACKOFF)
                await self._until_done(
                    lambda: self.store.release_lease(name, runner.lease_value), "release"
                )
                await self._until_done(
                    lambda: self.store.due_release(name, self.id, at, now=self.clock(), look=False),
                    "release",
                )
            elif runner.stop_reason is StopReason.LEASE_LOST:
                await self._lease_lost(runner)
            if self.runners.get(name) is runner:
                del self.runners[name]
                # At once, not at the next publish: a released lease renewed again would
                # be a command per agent for nothing (and a lost-lease report).
                self.keeper.forget(name, runner.lease_value)
                self._scopes.pop(name, None)
                if name not in self._stopping:
                    self._desired.pop(name, None)
            if runner.stop_reason is StopReason.REBALANCE or self._draining:
                self._released.set()  # its lease is free: the others may take it now
            self._kick.set()
            self.activator.nudge()  # room for one more

    async def _lease_loss_reason(self, runner: AgentRunner) -> str:
        """What happened to a lease this daemon lost (for its LeaseLost event)."""
        if runner.lost_why:
            return runner.lost_why
        try:
            info = (await self.store.leases([runner.name])).get(runner.name)
        except StoreError:
            return "it is no longer ours"
        if info is None:
            return (
                f"it expired: not renewed within {self.settings.lease_ttl_s:g}s "
                "(Redis unreachable or too slow for that long)"
            )
        if info.owner == self.id:
            return "this daemon holds it again under a newer token"
        return f"daemon {info.owner} holds it now: it took the agent over after the lease expired"

    async def _lease_lost(self, runner: AgentRunner) -> None:
        """A runner stopped because its lease was lost: say why on the agent, and make
        the agent due at once (our own lease, if we still have it, comes back to
        whichever of our passes claims it)."""
        name = runner.name
        why = await self._lease_loss_reason(runner)
        message = f"daemon {self.id} lost the agent's lease: {why}; the agent is activated again"
        log.warning("%s: %s", name, message)
        with anyio.CancelScope(shield=True):
            try:
                await self.store.record_agent_event(name, "LeaseLost", "lease", message, self.id)
            except StoreError as e:
                self._store_failed("LeaseLost event", e)
        await self._until_done(lambda: self.store.due_now([name], now=self.clock()), "release")
        await self._until_done(lambda: self.store.held_remove(self.id, [name]), "release")

    async def _stop_one(self, name: str, reason: StopReason, restart_hash: str | None) -> None:
        runner = self.runners.get(name)
        if runner is None or name in self._stopping:
            self._handing_over.discard(name)
            return
        if reason is StopReason.REBALANCE and not runner.settled:
            # A task began since reconcile chose it: never cut one short to rebalance.
            self._handing_over.discard(name)
            return
        self._stopping.add(name)
        try:
            runner.request_stop(reason)
            with anyio.move_on_after(self.settings.grace_s):
                await runner.done.wait()
            if not runner.done.is_set():
                log.warning(
                    "%s: did not stop within %.0fs; cancelling it", name, self.settings.grace_s
                )
                self._scopes[name].cancel()
                await runner.done.wait()
            if restart_hash is not None:
                await self._restart(name, restart_hash)
        finally:
            # Only now: until the restarted runner exists, reconcile must not start one.
            self._stopping.discard(name)
            self._handing_over.discard(name)

    async def _operator_restart(self, name: str, grace_s: float | None) -> None:
        """``agentos restart``: once the agent is between tasks (or ``grace_s`` is up),
        stop it gracefully (state saved, slot released, KV handed over) and start it
        again here, its code loaded anew; a ``Restarted`` event says it is done."""
        runner = self.runners.get(name)
        if runner is None:
            return
        started = self.clock()
        # Never cut a task short for a restart: wait until it ends (or the grace is up).
        with anyio.move_on_after(math.inf if grace_s is None else grace_s):
            while runner.busy and not runner.done.is_set():
                await runner.task_over.wait()
        if self.runners.get(name) is not runner or name in self._stopping:
            # Restarted by a respec meanwhile, or let go of: either way its next runner
            # loads the code anew. Said, so that whoever waits for the restart knows.
            reason, message = "superseded", "restarted or released meanwhile by this daemon"
        else:
            # Started with the spec stored now (an apply may have landed while it waited).
            want = self._desired.get(name)
            await self._stop_one(
                name, StopReason.RESTART, want.spec_hash if want else runner.spec_hash
            )
            if name not in self.runners:
                return  # not started again (the daemon is stopping): due for another
            waited = self.clock() - started
            reason, message = "operator", f"restarted after {waited:.1f}s"
        log.info("%s: %s", name, message)
        try:
            await self.store.record_agent_event(
                name, "Restarted", reason, f"{message} (daemon {self.id})", self.id
            )
        except StoreError as e:
            self._store_failed("Restarted event", e)

    async def _restart(self, name: str, spec_hash: str) -> None:
        """Start a respecced agent again; a Redis blip (or anything else) delays it, with
        a backoff, until it starts or the daemon stops: then it is due for whoever has
        room (its old runner released the lease, so it must not be left unlisted)."""
        failures = 0
        while not self._stop.is_set():
            try:
                await self._start_many([(name, spec_hash)])
                return
            except Exception as e:
                failures += 1
                delay = backoff_delay(failures, 0.1, self.settings.redis_retry_max_s)
                self._report(
                    f"restart {name}",
                    f"{type(e).__name__}: {e}",
                    f"{clean(name)}: could not start again after a respec (%s); "
                    f"retrying in {delay:.1f}s",
                )
                await anyio.sleep(delay)
        if name not in self.runners:
            await self._until_done(lambda: self.store.due_now([name], now=self.clock()), "release")

    async def _stop_all(self, reason: StopReason) -> None:
        asked: set[int] = set()
        # Again for runners that a start in flight added meanwhile, until none is left.
        while runners := [r for r in self.runners.values() if id(r) not in asked]:
            asked.update(id(r) for r in runners)
            await self._stop_these(runners, reason)

    async def _stop_these(self, runners: list[AgentRunner], reason: StopReason) -> None:
        for r in runners:
            r.request_stop(reason)
        with anyio.move_on_after(self.settings.grace_s):
            for r in runners:
                await r.done.wait()
        for r in runners:
            if not r.done.is_set():
                log.warning("%s: did not stop within the grace period; cancelling it", r.name)
                scope = self._scopes.get(r.name)
                if scope is not None:
                    scope.cancel()
        for r in runners:
            await r.done.wait()


async def _run_coro(coro: Any) -> None:
    # An error here must not end the agents' task group (and with it Daemon.run); each
    # path retries what it must, this is the last resort.
    try:
        await coro
    except Exception:
        log.exception("an agent task of the daemon failed")
